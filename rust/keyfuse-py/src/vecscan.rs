//! Binding for the int8 vector scan of exact vector search (keyfuse_core::vecscan).

use keyfuse_core::vecscan;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

use crate::errors::{detach, invalid};

/// `scale[r] × (codes[r] · query)` for every row of the (n, d) int8 `codes`, float32.
#[pyfunction]
#[pyo3(signature = (codes, scale, query))]
fn vector_dots_i8<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray2<'py, i8>,
    scale: PyReadonlyArray1<'py, f32>,
    query: PyReadonlyArray1<'py, f32>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let shape = codes.as_array().dim();
    if shape.0 != scale.len()? || shape.1 != query.len()? {
        return Err(invalid(
            py,
            format!(
                "codes of shape {shape:?} need {} scales and a query of {} values, got {} and {}",
                shape.0,
                shape.1,
                scale.len()?,
                query.len()?
            ),
        ));
    }
    let (c, s, q) = (codes.as_slice(), scale.as_slice(), query.as_slice());
    let (c, s, q) = match (c, s, q) {
        (Ok(c), Ok(s), Ok(q)) => (c, s, q),
        _ => return Err(invalid(py, "codes, scale and query must be C-contiguous")),
    };
    let out = detach(py, || vecscan::dots_i8(c, s, q))?;
    Ok(out.into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(vector_dots_i8, m)?)?;
    Ok(())
}
