//! `keyfuse._core`: the thin PyO3 layer over keyfuse-core and keyfuse-cuda. numpy in and
//! out ([`convert`]), the GIL released and Ctrl-C honoured around every heavy call
//! ([`errors::detach`]), and core errors mapped onto the exception classes of
//! `keyfuse.errors` ([`errors::to_pyerr`]). Parameters have no defaults here: they live in
//! the core's `Default` impls and in the public Python signatures.

use pyo3::prelude::*;

mod convert;
mod errors;
mod extract;
mod gpu;
mod kde;
mod matching;
mod reslice;
mod segment;
mod shard;
mod vecscan;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::install_fork_guard();
    m.add_function(wrap_pyfunction!(errors::request_stop, m)?)?;
    m.add_function(wrap_pyfunction!(errors::clear_stop, m)?)?;
    extract::register(m)?;
    matching::register(m)?;
    reslice::register(m)?;
    kde::register(m)?;
    segment::register(m)?;
    shard::register(m)?;
    gpu::register(m)?;
    vecscan::register(m)?;
    Ok(())
}
