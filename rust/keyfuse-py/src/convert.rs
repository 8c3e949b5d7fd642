//! numpy ↔ core conversions shared by every binding: descriptor and point arrays in,
//! arrays out, extraction parameters from keyword arguments. Each input check is written
//! once here, with one message.

use std::borrow::Cow;

use keyfuse_core::extract::ExtractParams;
use keyfuse_core::knn::Neighbors;
use keyfuse_core::DESC_LEN;
use numpy::ndarray::{Array2, ArrayView2};
use numpy::{IntoPyArray, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{internal, invalid, to_pyerr};

/// An `(n, 64)` uint8 descriptor array, checked for shape.
pub fn descriptor_view<'a>(
    py: Python<'_>,
    name: &str,
    a: &'a PyReadonlyArray2<'_, u8>,
) -> PyResult<ArrayView2<'a, u8>> {
    let v = a.as_array();
    if v.ncols() != DESC_LEN {
        return Err(invalid(
            py,
            format!(
                "{name}: descriptors must have shape (n, {DESC_LEN}), got {:?}",
                v.shape()
            ),
        ));
    }
    Ok(v)
}

/// An `(n, 64)` uint8 descriptor array as rows back to back: borrowed from numpy when it
/// is C-contiguous (the usual case), else copied.
pub fn descriptors<'a>(
    py: Python<'_>,
    name: &str,
    a: &'a PyReadonlyArray2<'_, u8>,
) -> PyResult<Cow<'a, [u8]>> {
    let v = descriptor_view(py, name, a)?;
    Ok(match a.as_slice() {
        Ok(rows) => Cow::Borrowed(rows),
        Err(_) => Cow::Owned(v.iter().copied().collect()),
    })
}

/// An `(n, 3)` float64 array as points.
pub fn points(
    py: Python<'_>,
    name: &str,
    a: &PyReadonlyArray2<'_, f64>,
) -> PyResult<Vec<[f64; 3]>> {
    let v = a.as_array();
    if v.ncols() != 3 {
        return Err(invalid(
            py,
            format!("{name}: points must have shape (n, 3), got {:?}", v.shape()),
        ));
    }
    Ok(v.rows().into_iter().map(|r| [r[0], r[1], r[2]]).collect())
}

/// A row-major `rows × cols` buffer as a new numpy array (moved, not copied).
pub fn array2<'py, T: numpy::Element>(
    py: Python<'py>,
    rows: usize,
    cols: usize,
    data: Vec<T>,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    Array2::from_shape_vec((rows, cols), data)
        .map(|a| a.into_pyarray(py))
        .map_err(|e| internal(py, format!("result of unexpected shape: {e}")))
}

/// Rows of `N` values (points, matrices) as an `(n, N)` numpy array.
pub fn rows_array<'py, T: numpy::Element + Copy, const N: usize>(
    py: Python<'py>,
    rows: &[[T; N]],
) -> PyResult<Bound<'py, PyArray2<T>>> {
    array2(py, rows.len(), N, rows.iter().flatten().copied().collect())
}

/// (global point ids, squared distances) arrays of several shards, both (m, k) uint32, as
/// the core's neighbour lists.
pub fn neighbor_lists(
    py: Python<'_>,
    parts: &[(PyReadonlyArray2<'_, u32>, PyReadonlyArray2<'_, u32>)],
) -> PyResult<Vec<Neighbors>> {
    let mut lists = Vec::with_capacity(parts.len());
    for (i, d) in parts {
        let (i, d) = (i.as_array(), d.as_array());
        if i.shape() != d.shape() {
            return Err(invalid(py, "neighbour ids and distances differ in shape"));
        }
        lists.push(Neighbors {
            k: i.shape()[1],
            idx: i.iter().copied().collect(),
            dist2: d.iter().copied().collect(),
        });
    }
    Ok(lists)
}

/// Each subject's first global point id and the total (n_subjects + 1 offsets), checked.
pub fn subject_offsets(py: Python<'_>, a: &PyReadonlyArray1<'_, i64>) -> PyResult<Vec<usize>> {
    let offsets: Vec<usize> = a.as_array().iter().map(|&o| o.max(0) as usize).collect();
    if offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[1] < w[0]) {
        return Err(invalid(
            py,
            "subject offsets must be non-decreasing, starting at 0",
        ));
    }
    Ok(offsets)
}

/// The subject of global point `c` given [`subject_offsets`]: the last offset at or
/// before it (`offsets.len() − 1`, outside the cohort, for a point past the end).
pub fn owner_of(offsets: &[usize], c: u32) -> u32 {
    (offsets.partition_point(|&o| o <= c as usize) - 1) as u32
}

/// Extraction parameters: the core's defaults, overridden by the keyword arguments
/// (names and ranges are checked by the core).
pub fn extract_params(
    py: Python<'_>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<ExtractParams> {
    let mut p = ExtractParams::default();
    for (k, v) in kwargs.into_iter().flat_map(|kw| kw.iter()) {
        let name: String = k.extract()?;
        let value: f64 = v
            .extract()
            .map_err(|_| invalid(py, format!("parameter {name:?} must be a number")))?;
        p.set(&name, value).map_err(|e| to_pyerr(py, e))?;
    }
    Ok(p)
}
