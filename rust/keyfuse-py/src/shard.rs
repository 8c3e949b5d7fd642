//! Bindings for the shards of a sharded index (keyfuse_core::shard): per-shard k-NN with
//! global point ids, the deterministic merge of the shards' lists and the soft-Jaccard
//! scoring from merged lists — the one scoring path of `keyfuse.Index`, in process or on
//! Dask workers.

use std::path::PathBuf;

use keyfuse_core::jaccard::{self, DimStats};
use keyfuse_core::knn::{self, ForestParams};
use keyfuse_core::shard::Shard as CoreShard;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;

use crate::convert::{self, array2, descriptors, neighbor_lists, owner_of};
use crate::errors::{detach, invalid};
use crate::matching::sj_params;

/// (global point ids, squared distances), both (m, k) uint32; missing: 2³²−1.
type KnnOut<'py> = (Bound<'py, PyArray2<u32>>, Bound<'py, PyArray2<u32>>);

fn forest_params(trees: usize) -> ForestParams {
    ForestParams {
        trees,
        ..ForestParams::default()
    }
}

/// One shard of an index: descriptors (in memory or memory-mapped from a shard file), each
/// point's global subject and its kd-forest.
#[pyclass(module = "keyfuse._core", frozen)]
struct Shard {
    inner: CoreShard,
}

#[pymethods]
impl Shard {
    /// An in-memory shard over `desc` (subjects `first_subject..` with `sizes` keypoints
    /// each; its first point has global id `base`).
    #[new]
    #[pyo3(signature = (desc, sizes, *, first_subject, base, trees))]
    fn new(
        py: Python<'_>,
        desc: PyReadonlyArray2<'_, u8>,
        sizes: Vec<usize>,
        first_subject: usize,
        base: usize,
        trees: usize,
    ) -> PyResult<Self> {
        let d = descriptors(py, "descriptors", &desc)?.into_owned();
        let inner = detach(py, || {
            CoreShard::new(d, &sizes, first_subject, base, forest_params(trees))
        })?;
        Ok(Shard { inner })
    }

    /// Memory-map a shard file, checking its size and header.
    #[staticmethod]
    #[pyo3(signature = (path, sizes, *, first_subject, base, trees))]
    fn open(
        py: Python<'_>,
        path: PathBuf,
        sizes: Vec<usize>,
        first_subject: usize,
        base: usize,
        trees: usize,
    ) -> PyResult<Self> {
        let inner = detach(py, || {
            CoreShard::open(&path, &sizes, first_subject, base, forest_params(trees))
        })?;
        Ok(Shard { inner })
    }

    /// The shard made of shard files (path and point count each, in order; sizes and
    /// headers checked), e.g. an open shard's segments: one file memory-mapped in place;
    /// several joined first into the shard file `joined` and mapped (reused when it
    /// matches; read into RAM instead where it cannot be written), or read into RAM when
    /// `joined` is None.
    #[staticmethod]
    #[pyo3(signature = (files, joined, sizes, *, first_subject, base, trees))]
    #[allow(clippy::too_many_arguments)]
    fn open_files(
        py: Python<'_>,
        files: Vec<(PathBuf, usize)>,
        joined: Option<PathBuf>,
        sizes: Vec<usize>,
        first_subject: usize,
        base: usize,
        trees: usize,
    ) -> PyResult<Self> {
        let inner = detach(py, || {
            CoreShard::open_files(
                &files,
                joined.as_deref(),
                &sizes,
                first_subject,
                base,
                forest_params(trees),
            )
        })?;
        Ok(Shard { inner })
    }

    #[getter]
    fn n_points(&self) -> usize {
        self.inner.n_points()
    }

    #[getter]
    fn is_mapped(&self) -> bool {
        self.inner.is_mapped()
    }

    #[getter]
    fn has_forest(&self) -> bool {
        self.inner.has_forest()
    }

    /// Drop this process's pages of the shard's mapped files (descriptors, the forest's
    /// permutations); they stay in the OS page cache.
    fn release_pages(&self) {
        self.inner.release_pages()
    }

    /// Bytes of the mapped descriptor file resident in this process (0 in memory).
    fn resident_bytes(&self, py: Python<'_>) -> PyResult<usize> {
        let inner = &self.inner;
        detach(py, || inner.mapped_resident_bytes())
    }

    /// Bytes held in RAM (memory-mapped descriptors not counted).
    fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes()
    }

    /// The descriptor statistics: 129 uint64 words (row count, sums, sums of squares).
    fn stats<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        self.inner.stats().to_words().into_pyarray(py)
    }

    /// A copy of the shard's descriptor rows `start..stop` (`None`: to the end),
    /// (rows, 64) uint8.
    #[pyo3(signature = (start, stop))]
    fn descriptors<'py>(
        &self,
        py: Python<'py>,
        start: usize,
        stop: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray2<u8>>> {
        let n = self.inner.n_points();
        let stop = stop.unwrap_or(n);
        if start > stop || stop > n {
            return Err(invalid(py, format!("rows {start}..{stop} outside 0..{n}")));
        }
        const L: usize = keyfuse_core::DESC_LEN;
        let d = self.inner.data()[start * L..stop * L].to_vec();
        array2(py, stop - start, L, d)
    }

    /// Read every descriptor and check them against the header (raises when damaged).
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        detach(py, || inner.verify())
    }

    fn build_forest(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        detach(py, || inner.build_forest())
    }

    /// Write the forest to `path` atomically (deterministic bytes).
    fn save_forest(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let Some(f) = self.inner.forest() else {
            return Err(invalid(py, "the shard has no forest to save"));
        };
        detach(py, || f.save(&path))
    }

    /// Load and validate the forest saved at `path`.
    fn load_forest(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let inner = &self.inner;
        detach(py, || inner.load_forest(&path))
    }

    /// Each query keypoint's k nearest points of this shard, by global id.
    #[pyo3(signature = (queries, *, exclude, allowed, k, exact, checks))]
    #[allow(clippy::too_many_arguments)]
    fn knn<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, u8>,
        exclude: Option<usize>,
        allowed: Option<PyReadonlyArray1<'py, bool>>,
        k: usize,
        exact: bool,
        checks: usize,
    ) -> PyResult<KnnOut<'py>> {
        let q = descriptors(py, "queries", &queries)?;
        let mask: Option<Vec<bool>> = allowed.map(|a| a.as_array().to_vec());
        let p = sj_params(k, exact, checks, 1.0, f64::INFINITY, true);
        let inner = &self.inner;
        let nb = detach(py, || inner.knn(&q, &p, exclude, mask.as_deref()))?;
        let nq = nb.n_queries();
        Ok((array2(py, nq, k, nb.idx)?, array2(py, nq, k, nb.dist2)?))
    }

    /// Every point's k nearest points among the shard's other subjects (exact, global
    /// ids): a cohort's all-pairs when one shard holds it.
    fn knn_all_pairs<'py>(&self, py: Python<'py>, k: usize) -> PyResult<KnnOut<'py>> {
        let inner = &self.inner;
        let nb = detach(py, || inner.knn_all_pairs(k))?;
        let nq = nb.n_queries();
        Ok((array2(py, nq, k, nb.idx)?, array2(py, nq, k, nb.dist2)?))
    }
}

/// Write `desc` as a shard file at `path`, atomically.
#[pyfunction]
fn write_shard(py: Python<'_>, path: PathBuf, desc: PyReadonlyArray2<'_, u8>) -> PyResult<()> {
    let d = descriptors(py, "descriptors", &desc)?;
    detach(py, || CoreShard::write(&path, &d))
}

/// Soft intersections of one query set with every subject, from the shards' neighbour
/// lists: merged by (distance, global id), then scored with the cohort's statistics.
#[pyfunction]
#[pyo3(signature = (parts, *, subject_offsets, stats, k, alpha2_floor, alpha2_cap_fraction,
    posterior))]
#[allow(clippy::too_many_arguments)]
fn merge_score<'py>(
    py: Python<'py>,
    parts: Vec<(PyReadonlyArray2<'py, u32>, PyReadonlyArray2<'py, u32>)>,
    subject_offsets: PyReadonlyArray1<'py, i64>,
    stats: PyReadonlyArray1<'py, u64>,
    k: usize,
    alpha2_floor: f64,
    alpha2_cap_fraction: f64,
    posterior: bool,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let lists = neighbor_lists(py, &parts)?;
    let offsets = convert::subject_offsets(py, &subject_offsets)?;
    let stats = DimStats::from_words(stats.as_array().as_slice().unwrap_or(&[]));
    let p = sj_params(k, true, 1, alpha2_floor, alpha2_cap_fraction, posterior);
    let n = offsets.len() - 1;
    let out = detach(py, || {
        let stats = stats?;
        let nb = knn::merge_neighbors(&lists, k)?;
        jaccard::score_neighbors(&nb, |c| owner_of(&offsets, c), n, &stats, &p)
    })?;
    Ok(out.into_pyarray(py))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(write_shard, m)?)?;
    m.add_function(wrap_pyfunction!(merge_score, m)?)?;
    m.add_class::<Shard>()?;
    Ok(())
}
