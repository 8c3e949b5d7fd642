//! `keyfuse._core`: the thin PyO3 layer over keyfuse-core. Argument checks, numpy in and
//! out, the GIL released around every heavy call (through [`detach`]), and core errors
//! mapped onto the exception classes of `keyfuse.errors`.

use pyo3::prelude::*;

mod errors;
mod extract;
mod gpu;
mod kde;
mod matching;
mod segment;

pub use errors::{detach, to_pyerr};

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::install_fork_guard();
    extract::register(m)?;
    matching::register(m)?;
    kde::register(m)?;
    segment::register(m)?;
    gpu::register(m)?;
    Ok(())
}
