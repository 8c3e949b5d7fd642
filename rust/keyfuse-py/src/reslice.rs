//! Binding of the cubic B-spline reslicer: `reslice`.

use crate::errors::{detach, internal};
use keyfuse_core::extract::reslice;
use ndarray::Array3;
use numpy::{IntoPyArray, PyArray3, PyReadonlyArray3};
use pyo3::prelude::*;

/// `volume` resliced onto a grid of shape `shape` whose voxel q sits at source index
/// `matrix · [q, 1]` (`matrix` 3 × 4); cubic B-spline, 0 outside the source; a grid over
/// `max_voxels` is refused. The GIL is released while it runs.
#[pyfunction]
#[pyo3(signature = (*, volume, matrix, shape, max_voxels))]
fn reslice_volume<'py>(
    py: Python<'py>,
    volume: PyReadonlyArray3<'py, f32>,
    matrix: [[f64; 4]; 3],
    shape: [usize; 3],
    max_voxels: f64,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let view = volume.as_array();
    let data = detach(py, || reslice::reslice(view, matrix, shape, max_voxels))?;
    let out = Array3::from_shape_vec(shape, data)
        .map_err(|e| internal(py, format!("result of unexpected shape: {e}")))?;
    Ok(out.into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(reslice_volume, m)?)
}
