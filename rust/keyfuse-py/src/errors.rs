//! Error mapping and the one helper every heavy call goes through.

use keyfuse_core::KfError;
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Set in a child process made by `fork()`: rayon's global pool did not survive the fork
/// (its threads exist only in the parent), so using it there would hang forever.
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn mark_forked_child() {
    FORKED.store(true, Ordering::SeqCst);
}

/// Register the fork hook once (multiprocessing / DataLoader workers fork the interpreter).
pub fn install_fork_guard() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: registers a plain function that only stores to an atomic.
        unsafe {
            libc::pthread_atfork(None, None, Some(mark_forked_child));
        }
    });
}

/// Run `f` on the global rayon pool, or, in a forked child, on a pool made in that child.
fn on_a_live_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if !FORKED.load(Ordering::SeqCst) {
        return f();
    }
    // keyed by pid: a grandchild must not reuse its parent's (dead) pool
    static CHILD_POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    let pid = std::process::id();
    let pool = {
        let mut slot = CHILD_POOL.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some((owner, pool)) if *owner == pid => Some(pool.clone()),
            _ => {
                let fresh = rayon::ThreadPoolBuilder::new().build().ok().map(Arc::new);
                *slot = fresh.clone().map(|p| (pid, p));
                fresh
            }
        }
    };
    match pool {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

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
    match py.detach(|| catch_unwind(AssertUnwindSafe(|| on_a_live_pool(f)))) {
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
