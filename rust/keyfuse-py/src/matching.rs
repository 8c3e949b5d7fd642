//! Bindings for k-NN, matching, alignment and soft-Jaccard scoring (keyfuse_core::knn,
//! ::matching, ::jaccard), and the `SearchEngine` behind `keyfuse.Index`.

use keyfuse_core::jaccard::{self, Cohort, Geometry};
use keyfuse_core::knn::{self, ForestParams, KdForest};
use keyfuse_core::matching::{self, AlignParams, MatchParams};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub(crate) use crate::convert::sj_params;
use crate::convert::{array2, descriptors, keypoints, points, rows_array, sj_kwargs, votes_kwargs};
use crate::errors::{detach, invalid};

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
    Ok((array2(py, nq, k, idx)?, array2(py, nq, k, d)?))
}

/// Exact k-NN: (indices (m, k) int64 with -1 for missing, squared distances (m, k)).
#[pyfunction]
#[pyo3(signature = (data, queries, *, k))]
fn knn_exact<'py>(
    py: Python<'py>,
    data: PyReadonlyArray2<'py, u8>,
    queries: PyReadonlyArray2<'py, u8>,
    k: usize,
) -> PyResult<NeighborsOut<'py>> {
    let d = descriptors(py, "data", &data)?;
    let q = descriptors(py, "queries", &queries)?;
    let nb = detach(py, || knn::knn_exact(&d, &q, k, |_, _| true))?;
    neighbors_out(py, nb)
}

/// The exact k-NN kernel this machine runs: "amx", "avx2" or "portable".
#[pyfunction]
fn knn_exact_kernel() -> &'static str {
    knn::exact_kernel_name()
}

/// Approximate k-NN through a randomized kd-forest built on `data`.
#[pyfunction]
#[pyo3(signature = (data, queries, *, k, checks, trees, leaf_size, seed))]
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
    let d = descriptors(py, "data", &data)?;
    let q = descriptors(py, "queries", &queries)?;
    let params = ForestParams {
        trees,
        leaf_size,
        seed,
    };
    let nb = detach(py, || {
        let f = KdForest::build(&d, &params)?;
        f.search(&d, &q, k, checks, |_, _| true)
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
#[pyo3(signature = (desc_a, xyz_a, scale_a, desc_b, xyz_b, scale_b, *, ratio, scale_factor,
    hough, hough_sigma, keep_fraction, kde_bandwidth))]
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
    let a = keypoints(py, "a", &desc_a, &xyz_a, &scale_a)?;
    let b = keypoints(py, "b", &desc_b, &xyz_b, &scale_b)?;
    let params = MatchParams {
        ratio,
        scale_factor,
        hough,
        hough_sigma,
        keep_fraction,
        kde_bandwidth,
    };
    let res = detach(py, || matching::match_sets(&a.view(), &b.view(), &params))?;
    let as_i64 = |v: &[u32]| v.iter().map(|&i| i as i64).collect::<Vec<_>>();
    Ok((
        as_i64(&res.ia).into_pyarray(py),
        as_i64(&res.ib).into_pyarray(py),
        res.distance.into_pyarray(py),
        rows_array(py, &res.translation)?,
        res.p.into_pyarray(py),
        res.mode.map(|m| (m[0], m[1], m[2])),
    ))
}

/// Robust similarity src → dst: (4×4 matrix, inlier mask, rmse, scale).
#[pyfunction]
#[pyo3(signature = (src, dst, *, iterations, inlier_mm, max_scale, with_scale, seed))]
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
    Ok((
        rows_array(py, &res.transform.matrix())?,
        res.inliers.into_pyarray(py),
        res.rmse,
        res.transform.s,
    ))
}

/// Soft intersections (|A∩B|, |B∩A|) of two sets; geometry arrays optional (all or none).
#[pyfunction]
#[pyo3(signature = (desc_a, desc_b, *, xyz_a, scale_a, xyz_b, scale_b, **sj))]
#[allow(clippy::too_many_arguments)]
fn soft_intersections<'py>(
    py: Python<'py>,
    desc_a: PyReadonlyArray2<'py, u8>,
    desc_b: PyReadonlyArray2<'py, u8>,
    xyz_a: Option<PyReadonlyArray2<'py, f64>>,
    scale_a: Option<PyReadonlyArray1<'py, f64>>,
    xyz_b: Option<PyReadonlyArray2<'py, f64>>,
    scale_b: Option<PyReadonlyArray1<'py, f64>>,
    sj: Option<&Bound<'py, PyDict>>,
) -> PyResult<(f64, f64)> {
    let (da, db) = (
        descriptors(py, "a", &desc_a)?,
        descriptors(py, "b", &desc_b)?,
    );
    let p = sj_kwargs(py, sj)?;
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
                "geometry needs xyz_a, scale_a, xyz_b and scale_b together",
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
        jaccard::soft_intersections_pair(&da, &db, &p, g.as_ref())
    })
}

/// The reference matcher's (featMatchMultiple) vote matrix over a list of sets, N×N.
#[pyfunction]
#[pyo3(signature = (sets, **votes))]
fn reference_votes<'py>(
    py: Python<'py>,
    sets: Vec<PyReadonlyArray2<'py, u8>>,
    votes: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let owned: Vec<_> = sets
        .iter()
        .enumerate()
        .map(|(i, s)| descriptors(py, &format!("sets[{i}]"), s))
        .collect::<PyResult<_>>()?;
    let slices: Vec<&[u8]> = owned.iter().map(|s| &**s).collect();
    let n = slices.len();
    let p = votes_kwargs(py, votes)?;
    let v = detach(py, || jaccard::reference_votes(&slices, &p))?;
    array2(py, n, n, v)
}

/// The in-memory search engine of `keyfuse.Index`: every subject's descriptors, a lazily
/// built kd-forest and soft-Jaccard accumulation per subject (GIL released).
#[pyclass(module = "keyfuse._core")]
struct SearchEngine {
    inner: Cohort,
}

impl SearchEngine {
    /// `f` run on the engine with the GIL released, the kd-forest built first unless
    /// `exact`.
    fn with_forest<T: Send>(
        &mut self,
        py: Python<'_>,
        exact: bool,
        f: impl FnOnce(&Cohort) -> keyfuse_core::Result<T> + Send,
    ) -> PyResult<T> {
        let inner = &mut self.inner;
        detach(py, || {
            if !exact {
                inner.build_forest()?;
            }
            f(inner)
        })
    }

    /// An N×N matrix over the subjects, from `f` (as [`Self::with_forest`]).
    fn matrix<'py>(
        &mut self,
        py: Python<'py>,
        exact: bool,
        f: impl FnOnce(&Cohort) -> keyfuse_core::Result<Vec<f64>> + Send,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let n = self.inner.n_subjects();
        let out = self.with_forest(py, exact, f)?;
        array2(py, n, n, out)
    }
}

#[pymethods]
impl SearchEngine {
    /// An empty engine whose kd-forest (built on demand) has `trees` trees.
    #[new]
    #[pyo3(signature = (*, trees))]
    fn new(trees: usize) -> Self {
        SearchEngine {
            inner: Cohort::new(ForestParams {
                trees,
                ..ForestParams::default()
            }),
        }
    }

    /// Append one subject's descriptors; returns its subject number.
    fn add(&mut self, py: Python<'_>, desc: PyReadonlyArray2<'_, u8>) -> PyResult<usize> {
        let d = descriptors(py, "descriptors", &desc)?;
        let inner = &mut self.inner;
        detach(py, || inner.add(&d))
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
        array2(
            py,
            d.len() / keyfuse_core::DESC_LEN,
            keyfuse_core::DESC_LEN,
            d,
        )
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
    #[pyo3(signature = (desc, *, exclude, allowed, **sj))]
    fn search<'py>(
        &mut self,
        py: Python<'py>,
        desc: PyReadonlyArray2<'py, u8>,
        exclude: Option<usize>,
        allowed: Option<PyReadonlyArray1<'py, bool>>,
        sj: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let q = descriptors(py, "query", &desc)?;
        let mask: Option<Vec<bool>> = allowed.map(|a| a.as_array().to_vec());
        let p = sj_kwargs(py, sj)?;
        let out = self.with_forest(py, p.exact, |c| c.search(&q, exclude, mask.as_deref(), &p))?;
        Ok(out.into_pyarray(py))
    }

    /// N×N soft-Jaccard (row = query subject), diagonal 1.
    #[pyo3(signature = (*, symmetric, **sj))]
    fn pairwise<'py>(
        &mut self,
        py: Python<'py>,
        symmetric: bool,
        sj: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let p = sj_kwargs(py, sj)?;
        self.matrix(py, p.exact, |c| c.pairwise(&p, symmetric))
    }

    /// The reference matcher's vote matrix over the cohort, N×N.
    #[pyo3(signature = (**votes))]
    fn reference_votes<'py>(
        &mut self,
        py: Python<'py>,
        votes: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let p = votes_kwargs(py, votes)?;
        self.matrix(py, p.exact, |c| c.reference_votes(&p))
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
    m.add_class::<SearchEngine>()?;
    Ok(())
}
