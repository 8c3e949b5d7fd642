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

/// In a forked child, a rayon pool made in that child (None: the global pool is alive).
fn child_pool() -> Option<Arc<rayon::ThreadPool>> {
    if !FORKED.load(Ordering::SeqCst) {
        return None;
    }
    // keyed by pid: a grandchild must not reuse its parent's (dead) pool
    static CHILD_POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut slot = CHILD_POOL.lock().unwrap_or_else(|e| e.into_inner());
    match slot.as_ref() {
        Some((owner, pool)) if *owner == pid => Some(pool.clone()),
        _ => {
            let fresh = rayon::ThreadPoolBuilder::new().build().ok().map(Arc::new);
            *slot = fresh.clone().map(|p| (pid, p));
            fresh
        }
    }
}

/// How often a waiting call looks for Ctrl-C (Python runs signal handlers only when asked).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

type Outcome<T> = std::thread::Result<keyfuse_core::Result<T>>;

/// Wait for the job's outcome, letting Python run its signal handlers every
/// [`SIGNAL_POLL`]; the first handler that raises (Ctrl-C) asks the core to stop.
fn wait_for<T>(done: &mpsc::Receiver<Outcome<T>>) -> (Outcome<T>, Option<PyErr>) {
    let mut signal = None;
    loop {
        match done.recv_timeout(SIGNAL_POLL) {
            Ok(outcome) => return (outcome, signal),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if signal.is_none() {
                    signal = Python::attach(|py| py.check_signals()).err();
                    if signal.is_some() {
                        cancel::request();
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return (Err(Box::new("the job ended without a result")), signal)
            }
        }
    }
}

/// Spawn `f` in `scope` and wait for it (see [`detach`]).
fn run_job<'scope, T, F>(scope: &rayon::Scope<'scope>, f: F) -> (Outcome<T>, Option<PyErr>)
where
    T: Send + 'scope,
    F: FnOnce() -> keyfuse_core::Result<T> + Send + 'scope,
{
    let (done_tx, done_rx) = mpsc::channel();
    scope.spawn(move |_| {
        let _ = done_tx.send(catch_unwind(AssertUnwindSafe(f)));
    });
    let (outcome, signal) = wait_for(&done_rx);
    if signal.is_some() {
        cancel::clear();
    }
    (outcome, signal)
}

/// Ask every keyfuse computation running now, on any thread, to stop at its next check
/// (each then raises `KeyboardInterrupt`). For Python code that interrupts work running
/// on its own worker threads (a batch on a thread pool), which never see the signal;
/// call [`clear_stop`] once those threads have returned, before starting new work.
#[pyfunction]
pub fn request_stop() {
    cancel::request();
}

/// Withdraw [`request_stop`].
#[pyfunction]
pub fn clear_stop() {
    cancel::clear();
}

/// Run `f` with the GIL released and return its result as a Python result.
///
/// `f` runs as a job on the rayon pool (a pool made in this process after a `fork()`)
/// while the calling thread waits, waking every [`SIGNAL_POLL`] to let Python run its
/// signal handlers. When one raises (Ctrl-C: `KeyboardInterrupt`), the core is asked to
/// stop ([`keyfuse_core::cancel`]), the job is awaited (it returns at its next check) and
/// the handler's exception is raised. Core errors become keyfuse exceptions, and a panic
/// (a bug) becomes `KeyfuseError` instead of a dead interpreter. The same idea as
/// polars' `enter_polars`.
pub fn detach<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> keyfuse_core::Result<T> + Send,
{
    let (result, signal) = py.detach(|| match child_pool() {
        Some(pool) => pool.in_place_scope(|scope| run_job(scope, f)),
        None => rayon::in_place_scope(|scope| run_job(scope, f)),
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
