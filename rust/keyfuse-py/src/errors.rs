//! The one error path from the core to Python, and the one helper every heavy call goes
//! through ([`detach`]: GIL released, Ctrl-C honoured, panics and forks survived).

use keyfuse_core::{cancel, KfError};
use pyo3::prelude::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

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

/// The keyfuse exception for a core error.
pub fn to_pyerr(py: Python<'_>, err: KfError) -> PyErr {
    let msg = err.to_string();
    match err {
        KfError::InvalidImage(_) => raise(py, "InvalidImageError", msg),
        KfError::InvalidArgument(_) => raise(py, "InvalidArgumentError", msg),
        KfError::Corrupt(_) => raise(py, "CorruptDataError", msg),
        KfError::DeviceUnavailable(_) => raise(py, "DeviceUnavailableError", msg),
        KfError::Io(_) => raise(py, "KeyfuseIOError", msg),
        KfError::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err(msg),
    }
}

/// `InvalidArgumentError(msg)`: a bad argument found while converting Python values.
pub fn invalid(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    to_pyerr(py, KfError::InvalidArgument(msg.into()))
}

/// `KeyfuseError(msg)`: a failure that is not the caller's (a bug, kernels that do not
/// compile).
pub fn internal(py: Python<'_>, msg: impl Into<String>) -> PyErr {
    raise(py, "KeyfuseError", msg.into())
}

/// Set in a child process made by `fork()`: rayon's global pool did not survive the fork
/// (its threads exist only in the parent), so using it there would hang forever.
static FORKED: AtomicBool = AtomicBool::new(false);

/// Register the fork hook once (multiprocessing / DataLoader workers fork the interpreter).
#[cfg(unix)]
pub fn install_fork_guard() {
    extern "C" fn mark_forked_child() {
        FORKED.store(true, Ordering::SeqCst);
    }
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: registers a plain function that only stores to an atomic.
        unsafe {
            libc::pthread_atfork(None, None, Some(mark_forked_child));
        }
    });
}

/// Without `fork()` there is nothing to guard.
#[cfg(not(unix))]
pub fn install_fork_guard() {}

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

/// How often a waiting call looks for Ctrl-C (Python runs signal handlers only when asked).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Stack of the worker thread: as large as a main thread's, for deep recursions.
const WORKER_STACK: usize = 8 << 20;

/// Run `f` with the GIL released and return its result as a Python result.
///
/// `f` runs on a worker thread while the calling thread waits, waking every
/// [`SIGNAL_POLL`] to let Python run its signal handlers. When one raises (Ctrl-C:
/// `KeyboardInterrupt`), the core is asked to stop ([`keyfuse_core::cancel`]), the worker
/// is awaited (it returns at its next check) and the handler's exception is raised. Core
/// errors become keyfuse exceptions, and a panic (a bug) becomes `KeyfuseError` instead
/// of a dead interpreter. The same idea as polars' `enter_polars`.
pub fn detach<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> keyfuse_core::Result<T> + Send,
{
    let (result, signal) = py.detach(|| {
        std::thread::scope(|scope| {
            let (done_tx, done_rx) = mpsc::channel::<()>();
            let worker = std::thread::Builder::new()
                .name("keyfuse".into())
                .stack_size(WORKER_STACK)
                .spawn_scoped(scope, move || {
                    let out = catch_unwind(AssertUnwindSafe(|| on_a_live_pool(f)));
                    let _ = done_tx.send(());
                    out
                })
                .map_err(|e| format!("cannot start a worker thread: {e}"));
            let worker = match worker {
                Ok(worker) => worker,
                Err(e) => return (Err(Box::new(e) as Box<dyn std::any::Any + Send>), None),
            };
            let mut signal = None;
            while let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(SIGNAL_POLL) {
                if signal.is_none() {
                    signal = Python::attach(|py| py.check_signals()).err();
                    if signal.is_some() {
                        cancel::request();
                    }
                }
            }
            let result = worker.join().unwrap_or_else(Err);
            if signal.is_some() {
                cancel::clear();
            }
            (result, signal)
        })
    });
    if let Some(err) = signal {
        return Err(err);
    }
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(to_pyerr(py, err)),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(internal(
                py,
                format!("internal error in keyfuse core (please report): {what}"),
            ))
        }
    }
}
