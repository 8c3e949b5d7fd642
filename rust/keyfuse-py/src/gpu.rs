use pyo3::prelude::*;

/// Whether a usable CUDA device exists (replaced by the keyfuse-cuda probe).
#[pyfunction]
fn cuda_available() -> bool {
    false
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    Ok(())
}
