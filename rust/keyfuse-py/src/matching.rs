//! Bindings for k-NN, matching, alignment and soft-Jaccard scoring (keyfuse_core::knn,
//! ::matching, ::jaccard), and the `Cohort` search engine behind `keyfuse.Index`.

use keyfuse_core::jaccard::{self, Cohort as CoreCohort, Geometry, SoftJaccardParams};
use keyfuse_core::knn::{self, ForestParams, KdForest};
use keyfuse_core::matching::{self, AlignParams, KeypointView, MatchParams};
use keyfuse_core::KfError;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

use crate::{detach, to_pyerr};

fn invalid(py: Python<'_>, msg: String) -> PyErr {
    to_pyerr(py, KfError::InvalidArgument(msg))
}

/// A `(n, 64)` C-contiguous uint8 array as a flat slice.
fn desc_slice<'a>(
    py: Python<'_>,
    name: &str,
    a: &'a PyReadonlyArray2<'_, u8>,
) -> PyResult<&'a [u8]> {
    if a.as_array().ncols() != keyfuse_core::DESC_LEN {
        return Err(invalid(
            py,
            format!(
                "{name}: descriptors must have shape (n, 64), got {:?}",
                a.as_array().shape()
            ),
        ));
    }
    a.as_slice()
        .map_err(|_| invalid(py, format!("{name}: descriptors must be C-contiguous")))
}

fn points(py: Python<'_>, name: &str, a: &PyReadonlyArray2<'_, f64>) -> PyResult<Vec<[f64; 3]>> {
    let v = a.as_array();
    if v.ncols() != 3 {
        return Err(invalid(
            py,
            format!("{name}: points must have shape (n, 3)"),
        ));
    }
    Ok(v.rows().into_iter().map(|r| [r[0], r[1], r[2]]).collect())
}

/// (neighbour indices, squared distances), both (m, k) int64.
type NeighborsOut<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<i64>>);

fn neighbors_out<'py>(py: Python<'py>, nb: knn::Neighbors) -> PyResult<NeighborsOut<'py>> {
    let (k, nq) = (nb.k, nb.n_queries());
    let idx: Vec<i64> = nb
        .idx
        .iter()
        .map(|&i| if i == knn::NONE { -1 } else { i as i64 })
        .collect();
    let d: Vec<i64> = nb
        .dist2
        .iter()
        .map(|&d| if d == u32::MAX { -1 } else { d as i64 })
        .collect();
    let shape = |v: Vec<i64>| {
        numpy::ndarray::Array2::from_shape_vec((nq, k), v).map(|a| a.into_pyarray(py))
    };
    Ok((
        shape(idx).map_err(|e| invalid(py, e.to_string()))?,
        shape(d).map_err(|e| invalid(py, e.to_string()))?,
    ))
}

/// Exact k-NN: (indices (m, k) int64 with -1 for missing, squared distances (m, k)).
#[pyfunction]
fn knn_exact<'py>(
    py: Python<'py>,
    data: PyReadonlyArray2<'py, u8>,
    queries: PyReadonlyArray2<'py, u8>,
    k: usize,
) -> PyResult<NeighborsOut<'py>> {
    let (d, q) = (
        desc_slice(py, "data", &data)?,
        desc_slice(py, "queries", &queries)?,
    );
    let nb = detach(py, || knn::knn_exact(d, q, k, |_, _| true))?;
    neighbors_out(py, nb)
}

/// The exact k-NN kernel this machine runs: "amx", "avx2" or "portable".
#[pyfunction]
fn knn_exact_kernel() -> &'static str {
    knn::exact_kernel_name()
}

/// Approximate k-NN through a randomized kd-forest built on `data`.
#[pyfunction]
#[pyo3(signature = (data, queries, k, checks=128, trees=8, leaf_size=8, seed=0x6b65_7966_7573_6521))]
#[allow(clippy::too_many_arguments)]
fn knn_forest<'py>(
    py: Python<'py>,
    data: PyReadonlyArray2<'py, u8>,
    queries: PyReadonlyArray2<'py, u8>,
    k: usize,
    checks: usize,
    trees: usize,
    leaf_size: usize,
    seed: u64,
) -> PyResult<NeighborsOut<'py>> {
    let (d, q) = (
        desc_slice(py, "data", &data)?,
        desc_slice(py, "queries", &queries)?,
    );
    let params = ForestParams {
        trees,
        leaf_size,
        seed,
    };
    let nb = detach(py, || {
        let f = KdForest::build(d, &params)?;
        f.search(d, q, k, checks, |_, _| true)
    })?;
    neighbors_out(py, nb)
}

type MatchOut<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<f64>>,
    Bound<'py, PyArray2<f64>>,
    Bound<'py, PyArray1<f64>>,
    Option<(f64, f64, f64)>,
);

/// Match A to B: (ia, ib, distance, translation (n, 3) mm, p, Hough mode or None).
#[pyfunction]
#[pyo3(signature = (desc_a, xyz_a, scale_a, desc_b, xyz_b, scale_b, ratio=0.9, scale_factor=2.0,
    hough=false, hough_sigma=3.0, keep_fraction=0.1, kde_bandwidth=3.0))]
#[allow(clippy::too_many_arguments)]
fn match_sets<'py>(
    py: Python<'py>,
    desc_a: PyReadonlyArray2<'py, u8>,
    xyz_a: PyReadonlyArray2<'py, f64>,
    scale_a: PyReadonlyArray1<'py, f64>,
    desc_b: PyReadonlyArray2<'py, u8>,
    xyz_b: PyReadonlyArray2<'py, f64>,
    scale_b: PyReadonlyArray1<'py, f64>,
    ratio: f64,
    scale_factor: f64,
    hough: bool,
    hough_sigma: f64,
    keep_fraction: f64,
    kde_bandwidth: f64,
) -> PyResult<MatchOut<'py>> {
    let (da, db) = (desc_slice(py, "a", &desc_a)?, desc_slice(py, "b", &desc_b)?);
    let (xa, xb) = (points(py, "a", &xyz_a)?, points(py, "b", &xyz_b)?);
    let (sa, sb) = (scale_a.as_array().to_vec(), scale_b.as_array().to_vec());
    let params = MatchParams {
        ratio,
        scale_factor,
        hough,
        hough_sigma,
        keep_fraction,
        kde_bandwidth,
    };
    let res = detach(py, || {
        let a = KeypointView {
            desc: da,
            xyz: &xa,
            scale: &sa,
        };
        let b = KeypointView {
            desc: db,
            xyz: &xb,
            scale: &sb,
        };
        matching::match_sets(&a, &b, &params)
    })?;
    let n = res.ia.len();
    let t: Vec<f64> = res.translation.iter().flatten().copied().collect();
    let t = numpy::ndarray::Array2::from_shape_vec((n, 3), t)
        .map_err(|e| invalid(py, e.to_string()))?;
    Ok((
        res.ia
            .iter()
            .map(|&i| i as i64)
            .collect::<Vec<_>>()
            .into_pyarray(py),
        res.ib
            .iter()
            .map(|&i| i as i64)
            .collect::<Vec<_>>()
            .into_pyarray(py),
        res.distance.into_pyarray(py),
        t.into_pyarray(py),
        res.p.into_pyarray(py),
        res.mode.map(|m| (m[0], m[1], m[2])),
    ))
}

/// Robust similarity src → dst: (4×4 matrix, inlier mask, rmse, scale).
#[pyfunction]
#[pyo3(signature = (src, dst, iterations=4000, inlier_mm=5.0, max_scale=2.0, with_scale=true, seed=0x616c_6967_6e21))]
#[allow(clippy::too_many_arguments)]
#[allow(clippy::type_complexity)]
fn ransac_similarity<'py>(
    py: Python<'py>,
    src: PyReadonlyArray2<'py, f64>,
    dst: PyReadonlyArray2<'py, f64>,
    iterations: usize,
    inlier_mm: f64,
    max_scale: f64,
    with_scale: bool,
    seed: u64,
) -> PyResult<(
    Bound<'py, PyArray2<f64>>,
    Bound<'py, PyArray1<bool>>,
    f64,
    f64,
)> {
    let (s, d) = (points(py, "src", &src)?, points(py, "dst", &dst)?);
    let params = AlignParams {
        iterations,
        inlier_mm,
        max_scale,
        with_scale,
        seed,
    };
    let res = detach(py, || matching::ransac_similarity(&s, &d, &params))?;
    let m: Vec<f64> = res.transform.matrix().iter().flatten().copied().collect();
    let m = numpy::ndarray::Array2::from_shape_vec((4, 4), m)
        .map_err(|e| invalid(py, e.to_string()))?;
    Ok((
        m.into_pyarray(py),
        res.inliers.into_pyarray(py),
        res.rmse,
        res.transform.s,
    ))
}

fn sj_params(
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

/// Soft intersections (|A∩B|, |B∩A|) of two sets; geometry arrays optional (all or none).
#[pyfunction]
#[pyo3(signature = (desc_a, desc_b, k=30, exact=false, checks=128, alpha2_floor=1.0,
    alpha2_cap_fraction=0.1, xyz_a=None, scale_a=None, xyz_b=None, scale_b=None,
    posterior=false))]
#[allow(clippy::too_many_arguments)]
fn soft_intersections<'py>(
    py: Python<'py>,
    desc_a: PyReadonlyArray2<'py, u8>,
    desc_b: PyReadonlyArray2<'py, u8>,
    k: usize,
    exact: bool,
    checks: usize,
    alpha2_floor: f64,
    alpha2_cap_fraction: f64,
    xyz_a: Option<PyReadonlyArray2<'py, f64>>,
    scale_a: Option<PyReadonlyArray1<'py, f64>>,
    xyz_b: Option<PyReadonlyArray2<'py, f64>>,
    scale_b: Option<PyReadonlyArray1<'py, f64>>,
    posterior: bool,
) -> PyResult<(f64, f64)> {
    let (da, db) = (desc_slice(py, "a", &desc_a)?, desc_slice(py, "b", &desc_b)?);
    let p = sj_params(
        k,
        exact,
        checks,
        alpha2_floor,
        alpha2_cap_fraction,
        posterior,
    );
    let geo = match (xyz_a, scale_a, xyz_b, scale_b) {
        (Some(xa), Some(sa), Some(xb), Some(sb)) => Some((
            points(py, "a", &xa)?,
            sa.as_array().to_vec(),
            points(py, "b", &xb)?,
            sb.as_array().to_vec(),
        )),
        (None, None, None, None) => None,
        _ => {
            return Err(invalid(
                py,
                "geometry needs xyz_a, scale_a, xyz_b and scale_b together".into(),
            ))
        }
    };
    detach(py, || {
        let g = geo.as_ref().map(|(xa, sa, xb, sb)| Geometry {
            xyz_a: xa,
            scale_a: sa,
            xyz_b: xb,
            scale_b: sb,
        });
        jaccard::soft_intersections_pair(da, db, &p, g.as_ref())
    })
}

/// The reference matcher's (featMatchMultiple) vote matrix over a list of sets, N×N.
#[pyfunction]
#[pyo3(signature = (sets, k=5, exact=false, checks=64))]
fn reference_votes<'py>(
    py: Python<'py>,
    sets: Vec<PyReadonlyArray2<'py, u8>>,
    k: usize,
    exact: bool,
    checks: usize,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let slices: Vec<&[u8]> = sets
        .iter()
        .enumerate()
        .map(|(i, s)| desc_slice(py, &format!("sets[{i}]"), s))
        .collect::<PyResult<_>>()?;
    let n = slices.len();
    let p = sj_params(k, exact, checks, 1.0, f64::INFINITY, false);
    let v = detach(py, || jaccard::reference_votes(&slices, &p))?;
    let v = numpy::ndarray::Array2::from_shape_vec((n, n), v)
        .map_err(|e| invalid(py, e.to_string()))?;
    Ok(v.into_pyarray(py))
}

/// The in-memory search engine of `keyfuse.Index`: every subject's descriptors, a lazily
/// built kd-forest and soft-Jaccard accumulation per subject (GIL released).
#[pyclass(module = "keyfuse._core")]
struct Cohort {
    inner: CoreCohort,
}

#[pymethods]
impl Cohort {
    #[new]
    #[pyo3(signature = (trees=8, leaf_size=8, seed=0x6b65_7966_7573_6521))]
    fn new(py: Python<'_>, trees: usize, leaf_size: usize, seed: u64) -> PyResult<Self> {
        if trees == 0 || leaf_size == 0 {
            return Err(invalid(py, "trees and leaf_size must be ≥ 1".into()));
        }
        Ok(Cohort {
            inner: CoreCohort::new(ForestParams {
                trees,
                leaf_size,
                seed,
            }),
        })
    }

    /// Append one subject's descriptors; returns its subject number.
    fn add(&mut self, py: Python<'_>, desc: PyReadonlyArray2<'_, u8>) -> PyResult<usize> {
        let d = desc_slice(py, "descriptors", &desc)?;
        let inner = &mut self.inner;
        detach(py, || inner.add(d))
    }

    fn __len__(&self) -> usize {
        self.inner.n_subjects()
    }

    #[getter]
    fn n_points(&self) -> usize {
        self.inner.n_points()
    }

    fn sizes<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        self.inner
            .sizes()
            .iter()
            .map(|&s| s as i64)
            .collect::<Vec<_>>()
            .into_pyarray(py)
    }

    /// A copy of every indexed descriptor, (n_points, 64) uint8, subjects in order.
    fn descriptors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u8>>> {
        let d = self.inner.descriptors().to_vec();
        let n = d.len() / keyfuse_core::DESC_LEN;
        numpy::ndarray::Array2::from_shape_vec((n, keyfuse_core::DESC_LEN), d)
            .map(|a| a.into_pyarray(py))
            .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))
    }

    /// Bytes held by descriptors, owners and the forest.
    fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes()
    }

    #[getter]
    fn has_forest(&self) -> bool {
        self.inner.has_forest()
    }

    fn build_forest(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        detach(py, || inner.build_forest())
    }

    /// Soft-Jaccard of a query set against every subject, shape (N,).
    #[pyo3(signature = (desc, exclude=None, allowed=None, k=30, exact=false, checks=128, alpha2_floor=1.0, alpha2_cap_fraction=0.1, posterior=false))]
    #[allow(clippy::too_many_arguments)]
    fn search<'py>(
        &mut self,
        py: Python<'py>,
        desc: PyReadonlyArray2<'py, u8>,
        exclude: Option<usize>,
        allowed: Option<PyReadonlyArray1<'py, bool>>,
        k: usize,
        exact: bool,
        checks: usize,
        alpha2_floor: f64,
        alpha2_cap_fraction: f64,
        posterior: bool,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let q = desc_slice(py, "query", &desc)?;
        let mask: Option<Vec<bool>> = allowed.map(|a| a.as_array().to_vec());
        let p = sj_params(
            k,
            exact,
            checks,
            alpha2_floor,
            alpha2_cap_fraction,
            posterior,
        );
        let inner = &mut self.inner;
        let out = detach(py, || {
            if !p.exact {
                inner.build_forest()?;
            }
            inner.search(q, exclude, mask.as_deref(), &p)
        })?;
        Ok(out.into_pyarray(py))
    }

    /// N×N soft-Jaccard (row = query subject), diagonal 1.
    #[pyo3(signature = (k=30, exact=false, checks=128, alpha2_floor=1.0, alpha2_cap_fraction=0.1, symmetric=false, posterior=false))]
    #[allow(clippy::too_many_arguments)]
    fn pairwise<'py>(
        &mut self,
        py: Python<'py>,
        k: usize,
        exact: bool,
        checks: usize,
        alpha2_floor: f64,
        alpha2_cap_fraction: f64,
        symmetric: bool,
        posterior: bool,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let p = sj_params(
            k,
            exact,
            checks,
            alpha2_floor,
            alpha2_cap_fraction,
            posterior,
        );
        let n = self.inner.n_subjects();
        let inner = &mut self.inner;
        let out = detach(py, || {
            if !p.exact {
                inner.build_forest()?;
            }
            inner.pairwise(&p, symmetric)
        })?;
        let out = numpy::ndarray::Array2::from_shape_vec((n, n), out)
            .map_err(|e| invalid(py, e.to_string()))?;
        Ok(out.into_pyarray(py))
    }

    /// The reference matcher's vote matrix over the cohort, N×N.
    #[pyo3(signature = (k=5, exact=false, checks=64))]
    fn reference_votes<'py>(
        &mut self,
        py: Python<'py>,
        k: usize,
        exact: bool,
        checks: usize,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let p = sj_params(k, exact, checks, 1.0, f64::INFINITY, false);
        let n = self.inner.n_subjects();
        let inner = &mut self.inner;
        let out = detach(py, || {
            if !p.exact {
                inner.build_forest()?;
            }
            inner.reference_votes(&p)
        })?;
        let out = numpy::ndarray::Array2::from_shape_vec((n, n), out)
            .map_err(|e| invalid(py, e.to_string()))?;
        Ok(out.into_pyarray(py))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(knn_exact, m)?)?;
    m.add_function(wrap_pyfunction!(knn_exact_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(knn_forest, m)?)?;
    m.add_function(wrap_pyfunction!(match_sets, m)?)?;
    m.add_function(wrap_pyfunction!(ransac_similarity, m)?)?;
    m.add_function(wrap_pyfunction!(soft_intersections, m)?)?;
    m.add_function(wrap_pyfunction!(reference_votes, m)?)?;
    m.add_class::<Cohort>()?;
    Ok(())
}
