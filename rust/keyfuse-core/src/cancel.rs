//! Cooperative cancellation of long computations (Ctrl-C in Python).
//!
//! A caller that wants to stop the work in progress calls [`request`]; the core looks at
//! the flag only at a few coarse loop boundaries (an octave of the scale space, a block of
//! k-NN queries, an atlas), so a check costs nothing measurable. A cancelled call returns
//! [`KfError::Interrupted`]; the caller then calls [`clear`] before starting new work.
//!
//! The flag is process-wide: a request stops every keyfuse computation running at the
//! time, which is what an interrupted program wants.

use crate::{KfError, Result};
use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Ask every running computation to stop at its next check.
pub fn request() {
    REQUESTED.store(true, Ordering::Relaxed);
}

/// Withdraw a request (after the interrupted computation has returned).
pub fn clear() {
    REQUESTED.store(false, Ordering::Relaxed);
}

/// Whether a stop has been requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// `Err(KfError::Interrupted)` once a stop has been requested.
pub fn check() -> Result<()> {
    if requested() {
        Err(KfError::Interrupted)
    } else {
        Ok(())
    }
}

/// Leave the enclosing closure early (with `Default::default()`) once a stop has been
/// requested: for parallel loop bodies that cannot return an error; the function that
/// runs the loop reports the stop with [`check`] after it.
#[macro_export]
macro_rules! return_if_cancelled {
    () => {
        if $crate::cancel::requested() {
            return Default::default();
        }
    };
}
