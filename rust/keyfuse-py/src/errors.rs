//! Error mapping and the one helper every heavy call goes through.

use keyfuse_core::KfError;
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Raise `keyfuse.errors.<name>(msg)`; the classes live in Python so that they can also
/// subclass the matching builtins (ValueError, OSError, …).
fn raise(py: Python<'_>, name: &str, msg: String) -> PyErr {
    let class = py
        .import("keyfuse.errors")
        .and_then(|module| module.getattr(name));
    match class {
        Ok(class) => match class.call1((msg.clone(),)) {
            Ok(instance) => PyErr::from_value(instance),
            Err(e) => e,
        },
        Err(_) => pyo3::exceptions::PyRuntimeError::new_err(msg),
    }
}

pub fn to_pyerr(py: Python<'_>, err: KfError) -> PyErr {
    let msg = err.to_string();
    match err {
        KfError::InvalidImage(_) => raise(py, "InvalidImageError", msg),
        KfError::InvalidArgument(_) => raise(py, "InvalidArgumentError", msg),
        KfError::Corrupt(_) => raise(py, "CorruptDataError", msg),
        KfError::DeviceUnavailable(_) => raise(py, "DeviceUnavailableError", msg),
        KfError::Io(_) => raise(py, "KeyfuseIOError", msg),
    }
}

/// Run `f` with the GIL released; core errors become keyfuse exceptions and a panic
/// (a bug) becomes `KeyfuseError` instead of a dead interpreter.
pub fn detach<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> keyfuse_core::Result<T> + Send,
{
    match py.detach(|| catch_unwind(AssertUnwindSafe(f))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(to_pyerr(py, err)),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(raise(
                py,
                "KeyfuseError",
                format!("internal error in keyfuse core (please report): {what}"),
            ))
        }
    }
}
