//! Bindings of the SIFT-Rank extractor: `extract3d`, `extract2d`, `default_extract_params`.

use crate::{detach, to_pyerr};
use keyfuse_core::extract::{self, ExtractParams, Keypoints};
use keyfuse_core::KfError;
use ndarray::{Array1, Array2, Array3};
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

fn parse_params(py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<ExtractParams> {
    let mut p = ExtractParams::default();
    if let Some(kw) = kwargs {
        for (k, v) in kw.iter() {
            let name: String = k.extract()?;
            let value: f64 = v.extract().map_err(|_| {
                to_pyerr(
                    py,
                    KfError::InvalidArgument(format!("parameter {name:?} must be a number")),
                )
            })?;
            p.set(&name, value).map_err(|e| to_pyerr(py, e))?;
        }
    }
    Ok(p)
}

fn to_dict<'py>(py: Python<'py>, k: Keypoints) -> PyResult<Bound<'py, PyDict>> {
    let n = k.len();
    let d = PyDict::new(py);
    let flat3 = |v: Vec<[f64; 3]>| v.into_iter().flatten().collect::<Vec<_>>();
    let shape_err = |e: ndarray::ShapeError| to_pyerr(py, KfError::InvalidArgument(e.to_string()));
    d.set_item(
        "ijk",
        Array2::from_shape_vec((n, 3), flat3(k.ijk))
            .map_err(shape_err)?
            .into_pyarray(py),
    )?;
    d.set_item("scale", Array1::from(k.scale).into_pyarray(py))?;
    let orient: Vec<f32> = k.orientation.into_iter().flatten().flatten().collect();
    d.set_item(
        "orientation",
        Array3::from_shape_vec((n, 3, 3), orient)
            .map_err(shape_err)?
            .into_pyarray(py),
    )?;
    let desc: Vec<u8> = k.descriptors.into_iter().flatten().collect();
    d.set_item(
        "descriptors",
        Array2::from_shape_vec((n, keyfuse_core::DESC_LEN), desc)
            .map_err(shape_err)?
            .into_pyarray(py),
    )?;
    d.set_item("polarity", Array1::from(k.polarity).into_pyarray(py))?;
    d.set_item("response", Array1::from(k.response).into_pyarray(py))?;
    let eig: Vec<f32> = k.eigenvalues.into_iter().flatten().collect();
    d.set_item(
        "eigenvalues",
        Array2::from_shape_vec((n, 3), eig)
            .map_err(shape_err)?
            .into_pyarray(py),
    )?;
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
    let p = parse_params(py, params)?;
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
    let p = parse_params(py, params)?;
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
