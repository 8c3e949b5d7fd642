//! numpy ↔ core conversions shared by every binding: descriptor, point and keypoint arrays
//! in, arrays out, and the parameter groups taken as keyword arguments (extraction,
//! soft-Jaccard, reference matcher). Each input check is written once here, with one
//! message.

use std::borrow::Cow;

use keyfuse_core::extract::ExtractParams;
use keyfuse_core::jaccard::SoftJaccardParams;
use keyfuse_core::knn::Neighbors;
use keyfuse_core::matching::KeypointView;
use keyfuse_core::DESC_LEN;
use keyfuse_cuda::ops::SjParams;
use numpy::ndarray::{Array2, ArrayView2};
use numpy::{IntoPyArray, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::conversion::FromPyObjectOwned;
use pyo3::exceptions::PyTypeError;
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

/// A keypoint set's arrays (descriptors, (n, 3) positions, scales), converted.
pub struct Keypoints<'a> {
    pub desc: Cow<'a, [u8]>,
    pub xyz: Vec<[f64; 3]>,
    pub scale: Vec<f64>,
}

impl Keypoints<'_> {
    /// The core's view (lengths and values are checked by the core).
    pub fn view(&self) -> KeypointView<'_> {
        KeypointView::new(&self.desc, &self.xyz, &self.scale)
    }
}

/// A keypoint set from its three arrays.
pub fn keypoints<'a>(
    py: Python<'_>,
    name: &str,
    desc: &'a PyReadonlyArray2<'_, u8>,
    xyz: &PyReadonlyArray2<'_, f64>,
    scale: &PyReadonlyArray1<'_, f64>,
) -> PyResult<Keypoints<'a>> {
    Ok(Keypoints {
        desc: descriptors(py, name, desc)?,
        xyz: points(py, name, xyz)?,
        scale: scale.as_array().to_vec(),
    })
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

/// A group of keyword arguments (`**name` in a binding's signature) that several bindings
/// share, read one by one ([`Kwargs::take`]): each is required, and one left over is an
/// error ([`Kwargs::finish`]), as with a plain signature. The core checks the values.
pub struct Kwargs<'py> {
    group: &'static str,
    left: Bound<'py, PyDict>,
}

/// The keyword arguments of `group` (None: none given).
pub fn kwargs<'py>(
    py: Python<'py>,
    group: &'static str,
    given: Option<&Bound<'py, PyDict>>,
) -> PyResult<Kwargs<'py>> {
    let left = match given {
        Some(d) => d.copy()?,
        None => PyDict::new(py),
    };
    Ok(Kwargs { group, left })
}

impl<'py> Kwargs<'py> {
    /// The argument `name`, converted.
    pub fn take<T: FromPyObjectOwned<'py>>(&self, name: &str) -> PyResult<T> {
        let group = self.group;
        let value = self.left.get_item(name)?.ok_or_else(|| {
            PyTypeError::new_err(format!(
                "missing required keyword argument {name:?} ({group} settings)"
            ))
        })?;
        self.left.del_item(name)?;
        value.extract::<T>().map_err(|e| {
            let e: PyErr = e.into();
            PyTypeError::new_err(format!("keyword argument {name:?}: {e}"))
        })
    }

    /// `value`, when no argument is left unread.
    pub fn finish<T>(self, value: T) -> PyResult<T> {
        if self.left.is_empty() {
            return Ok(value);
        }
        let names: Vec<String> = self.left.keys().iter().map(|k| k.to_string()).collect();
        Err(PyTypeError::new_err(format!(
            "unexpected keyword argument(s) {} ({} settings)",
            names.join(", "),
            self.group
        )))
    }
}

/// The soft-Jaccard settings given as `**sj` (k, exact, checks, alpha2_floor,
/// alpha2_cap_fraction, posterior).
pub fn sj_kwargs(py: Python<'_>, sj: Option<&Bound<'_, PyDict>>) -> PyResult<SoftJaccardParams> {
    let kw = kwargs(py, "soft-Jaccard", sj)?;
    let p = sj_params(
        kw.take("k")?,
        kw.take("exact")?,
        kw.take("checks")?,
        kw.take("alpha2_floor")?,
        kw.take("alpha2_cap_fraction")?,
        kw.take("posterior")?,
    );
    kw.finish(p)
}

/// The soft-Jaccard settings from their values.
pub fn sj_params(
    k: usize,
    exact: bool,
    checks: usize,
    alpha2_floor: f64,
    alpha2_cap_fraction: f64,
    posterior: bool,
) -> SoftJaccardParams {
    SoftJaccardParams {
        k,
        exact,
        checks,
        alpha2_floor,
        alpha2_cap_fraction,
        posterior,
        // the posterior kernel's width is part of its definition (keyfuse_core::jaccard)
        alpha_scale: if posterior {
            SoftJaccardParams::posterior().alpha_scale
        } else {
            1.0
        },
    }
}

/// The reference matcher's settings given as `**votes` (k, exact, checks; its α² clamp
/// is not used).
pub fn votes_kwargs(
    py: Python<'_>,
    votes: Option<&Bound<'_, PyDict>>,
) -> PyResult<SoftJaccardParams> {
    let kw = kwargs(py, "reference-matcher", votes)?;
    let (k, exact, checks) = (kw.take("k")?, kw.take("exact")?, kw.take("checks")?);
    kw.finish(sj_params(k, exact, checks, 1.0, f64::INFINITY, false))
}

/// The GPU's soft-Jaccard settings given as `**sj` (k, alpha2_floor, alpha2_cap_fraction;
/// the published kernel; k-NN kernel from `KEYFUSE_CUDA_KNN`).
pub fn gpu_sj_kwargs(py: Python<'_>, sj: Option<&Bound<'_, PyDict>>) -> PyResult<SjParams> {
    let kw = kwargs(py, "soft-Jaccard", sj)?;
    let p = SjParams {
        k: kw.take("k")?,
        alpha2_floor: kw.take("alpha2_floor")?,
        alpha2_cap_fraction: kw.take("alpha2_cap_fraction")?,
        kernel: None,
    };
    kw.finish(p)
}
