//! Bindings of the SIFT-Rank extractor: `extract3d`, `extract2d`, `default_extract_params`.

use crate::convert::{extract_params, rows_array};
use crate::errors::{detach, internal};
use keyfuse_core::extract::{self, ExtractParams, Keypoints};
use ndarray::{Array1, Array3};
use numpy::{IntoPyArray, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Parameters that are counts: reported as Python ints.
const INTEGER_PARAMS: [&str; 5] = [
    "scales_per_octave",
    "min_size",
    "max_octaves",
    "max_orientations",
    "max_voxels",
];

fn to_dict<'py>(py: Python<'py>, k: Keypoints) -> PyResult<Bound<'py, PyDict>> {
    let n = k.len();
    let d = PyDict::new(py);
    d.set_item("ijk", rows_array(py, &k.ijk)?)?;
    d.set_item("scale", Array1::from(k.scale).into_pyarray(py))?;
    let orient: Vec<f32> = k.orientation.into_iter().flatten().flatten().collect();
    let orient = Array3::from_shape_vec((n, 3, 3), orient)
        .map_err(|e| internal(py, format!("result of unexpected shape: {e}")))?;
    d.set_item("orientation", orient.into_pyarray(py))?;
    d.set_item("descriptors", rows_array(py, &k.descriptors)?)?;
    d.set_item("polarity", Array1::from(k.polarity).into_pyarray(py))?;
    d.set_item("response", Array1::from(k.response).into_pyarray(py))?;
    d.set_item("eigenvalues", rows_array(py, &k.eigenvalues)?)?;
    d.set_item("point", Array1::from(k.point).into_pyarray(py))?;
    Ok(d)
}

/// 3D SIFT-Rank keypoints of a float32 volume (index order i, j, k) with voxel sizes
/// `spacing` (mm). Returns a dict of arrays: ijk, scale, orientation, descriptors,
/// polarity, response, eigenvalues, point. The GIL is released while it runs.
#[pyfunction]
#[pyo3(signature = (volume, spacing, **params))]
fn extract3d<'py>(
    py: Python<'py>,
    volume: PyReadonlyArray3<'py, f32>,
    spacing: (f64, f64, f64),
    params: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = extract_params(py, params)?;
    let view = volume.as_array();
    let sp = [spacing.0, spacing.1, spacing.2];
    let k = detach(py, || extract::extract3d(view, sp, &p))?;
    to_dict(py, k)
}

/// 2D SIFT-Rank keypoints of a float32 image (same keys as `extract3d`; ijk[:, 2] = 0;
/// descriptors are 4×4 cells × 4 orientation bins).
#[pyfunction]
#[pyo3(signature = (image, spacing, **params))]
fn extract2d<'py>(
    py: Python<'py>,
    image: PyReadonlyArray2<'py, f32>,
    spacing: (f64, f64),
    params: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = extract_params(py, params)?;
    let view = image.as_array();
    let sp = [spacing.0, spacing.1];
    let k = detach(py, || extract::extract2d(view, sp, &p))?;
    to_dict(py, k)
}

/// Every extraction parameter with its default value.
#[pyfunction]
fn default_extract_params(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (name, value) in ExtractParams::defaults() {
        if INTEGER_PARAMS.contains(&name) {
            d.set_item(name, value as i64)?;
        } else {
            d.set_item(name, value)?;
        }
    }
    Ok(d)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(extract3d, m)?)?;
    m.add_function(wrap_pyfunction!(extract2d, m)?)?;
    m.add_function(wrap_pyfunction!(default_extract_params, m)?)?;
    Ok(())
}
