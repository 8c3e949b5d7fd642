//! Bindings for the CUDA backend (keyfuse-cuda): the availability probe, an NVRTC compile
//! check that needs no GPU, and GPU versions of the CPU entry points with the same
//! arguments and return values. Every `gpu_*` call raises `DeviceUnavailableError` when no
//! usable GPU exists; `keyfuse.device.resolve_device` decides which path runs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use keyfuse_core::KfError;
use keyfuse_cuda::ops::{intensity_scale, DeviceCohort, ScaleSpaceParams};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::convert::{array2, descriptor_view, extract_params, gpu_sj_kwargs};
use crate::errors::{detach, internal, invalid, to_pyerr};

/// `libnvrtc.so.13` inside the `nvidia-cuda-nvrtc` wheel, found through importlib without
/// importing anything heavy (`nvidia` is a bare namespace package).
fn wheel_nvrtc(py: Python<'_>) -> Option<PathBuf> {
    let util = py.import("importlib.util").ok()?;
    let spec = util.call_method1("find_spec", ("nvidia",)).ok()?;
    if spec.is_none() {
        return None;
    }
    let locations = spec.getattr("submodule_search_locations").ok()?;
    for loc in locations.try_iter().ok()? {
        let Ok(dir) = loc.and_then(|l| l.extract::<String>()) else {
            continue;
        };
        // CUDA 13 wheels use nvidia/cu13/lib; older ones nvidia/cuda_nvrtc/lib
        for sub in ["cu13/lib/libnvrtc.so.13", "cuda_nvrtc/lib/libnvrtc.so.13"] {
            let p = Path::new(&dir).join(sub);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Before the first probe: make the pip wheel's NVRTC visible to cudarc (unless
/// `KEYFUSE_NVRTC_PATH` names one explicitly).
fn ensure_nvrtc(py: Python<'_>) {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.get().is_some() {
        return;
    }
    let found = if std::env::var_os(keyfuse_cuda::runtime::NVRTC_PATH_ENV).is_some() {
        None
    } else {
        wheel_nvrtc(py)
    };
    DONE.get_or_init(|| {
        if let Some(p) = found {
            // a wheel that fails to load simply leaves NVRTC "not found" in cuda_info()
            let _ = keyfuse_cuda::preload_nvrtc(&p);
        }
    });
}

/// Whether a usable CUDA device exists: driver and NVRTC libraries found, a device
/// answers, and the kernels compiled for it. Probed once per process; raises only on
/// Ctrl-C.
#[pyfunction]
fn cuda_available(py: Python<'_>) -> PyResult<bool> {
    ensure_nvrtc(py);
    detach(py, || Ok(keyfuse_cuda::cuda_available()))
}

/// What the CUDA probe found: a dict with `available`, `driver_found`, `nvrtc_found`,
/// `nvrtc_path`, `device_name`, `compute_capability`, `sm_count`, `total_memory` and
/// `reason` (why it is unavailable, or None).
#[pyfunction]
fn cuda_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    ensure_nvrtc(py);
    let info = detach(py, || Ok(keyfuse_cuda::cuda_info()))?;
    let d = PyDict::new(py);
    d.set_item("available", info.available)?;
    d.set_item("driver_found", info.driver_found)?;
    d.set_item("nvrtc_found", info.nvrtc_found)?;
    d.set_item("nvrtc_path", info.nvrtc_path)?;
    d.set_item("device_name", info.device_name)?;
    d.set_item("compute_capability", info.compute_capability)?;
    d.set_item("sm_count", info.sm_count)?;
    d.set_item("total_memory", info.total_memory)?;
    d.set_item("reason", info.reason)?;
    Ok(d)
}

/// Compile every CUDA kernel with NVRTC (for a generic architecture; no GPU needed) and
/// check each entry point is present. Returns `{"kernels": [...], "ptx_bytes": n,
/// "nvrtc_path": str | None}`. Raises `DeviceUnavailableError` when NVRTC is not found and
/// `KeyfuseError` (with the compiler log) when a kernel does not compile.
#[pyfunction]
fn cuda_compile_check(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    ensure_nvrtc(py);
    if !detach(py, || Ok(keyfuse_cuda::runtime::nvrtc_present()))? {
        return Err(to_pyerr(
            py,
            KfError::DeviceUnavailable(
                "NVRTC library not found (pip install nvidia-cuda-nvrtc)".into(),
            ),
        ));
    }
    let bytes = detach(py, || Ok(keyfuse_cuda::compile_check()))?.map_err(|e| internal(py, e))?;
    let d = PyDict::new(py);
    d.set_item(
        "kernels",
        PyList::new(py, keyfuse_cuda::kernels::KERNEL_NAMES)?,
    )?;
    d.set_item("ptx_bytes", bytes)?;
    d.set_item("nvrtc_path", keyfuse_cuda::runtime::preloaded_nvrtc())?;
    Ok(d)
}

fn gpu() -> keyfuse_core::Result<&'static keyfuse_cuda::Gpu> {
    keyfuse_cuda::gpu()
}

/// Owner (subject number) of every row from per-subject row counts.
fn owners(py: Python<'_>, sizes: &PyReadonlyArray1<'_, i64>, rows: usize) -> PyResult<Vec<i32>> {
    let sizes = sizes.as_array();
    if sizes.iter().any(|&s| s < 0) || sizes.len() > i32::MAX as usize {
        return Err(invalid(py, "sizes must be non-negative"));
    }
    let total: i64 = sizes.iter().sum();
    if total as usize != rows {
        return Err(invalid(
            py,
            format!("sizes add up to {total} rows but data has {rows}"),
        ));
    }
    let mut owner = Vec::with_capacity(rows);
    for (s, &n) in sizes.iter().enumerate() {
        owner.extend(std::iter::repeat_n(s as i32, n as usize));
    }
    Ok(owner)
}

/// (indices, squared distances), both (m, k) int64.
type KnnOut<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<i64>>);

/// Exact k-NN on the GPU, as `knn_exact`: (indices (m, k) int64 with -1 for missing,
/// squared distances (m, k) int64 with -1 for missing). k ≤ 32.
#[pyfunction]
#[pyo3(signature = (data, queries, *, k))]
fn gpu_knn<'py>(
    py: Python<'py>,
    data: PyReadonlyArray2<'py, u8>,
    queries: PyReadonlyArray2<'py, u8>,
    k: usize,
) -> PyResult<KnnOut<'py>> {
    let d = descriptor_view(py, "data", &data)?;
    let q = descriptor_view(py, "queries", &queries)?;
    ensure_nvrtc(py);
    let (dist, idx) = detach(py, || gpu()?.knn(q, d, k))?;
    let dist = dist.mapv(|x| if x == u32::MAX { -1 } else { x as i64 });
    Ok((idx.into_pyarray(py), dist.into_pyarray(py)))
}

/// Soft-Jaccard of `desc` against every subject of a cohort on the GPU (uploaded for this
/// call: `GpuCohort(data, sizes).search(...)`) — the exact-search `SearchEngine.search`
/// (same α² clamp: [alpha2_floor, alpha2_cap_fraction · E], E from `data`).
/// `data` holds all subjects' rows in order, `sizes` their row counts.
/// `exclude`: a subject whose rows are never neighbours; `allowed`: per-subject bool mask.
#[pyfunction]
#[pyo3(signature = (data, sizes, desc, *, exclude, allowed, **sj))]
fn gpu_cohort_search<'py>(
    py: Python<'py>,
    data: PyReadonlyArray2<'py, u8>,
    sizes: PyReadonlyArray1<'py, i64>,
    desc: PyReadonlyArray2<'py, u8>,
    exclude: Option<usize>,
    allowed: Option<Vec<bool>>,
    sj: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    GpuCohort::new(py, data, sizes)?.search(py, desc, exclude, allowed, sj)
}

/// A cohort's descriptors resident on the GPU — upload once, search many times (the GPU
/// counterpart of `SearchEngine` for exact search). `data`: every subject's rows in order;
/// `sizes`: their row counts.
#[pyclass(module = "keyfuse._core", frozen)]
struct GpuCohort {
    inner: DeviceCohort,
}

#[pymethods]
impl GpuCohort {
    #[new]
    fn new(
        py: Python<'_>,
        data: PyReadonlyArray2<'_, u8>,
        sizes: PyReadonlyArray1<'_, i64>,
    ) -> PyResult<Self> {
        let d = descriptor_view(py, "data", &data)?;
        let owner = owners(py, &sizes, d.nrows())?;
        let n = sizes.as_array().len();
        ensure_nvrtc(py);
        let inner = detach(py, || gpu()?.upload_cohort(d, &owner, n))?;
        Ok(GpuCohort { inner })
    }

    fn __len__(&self) -> usize {
        self.inner.n_subjects()
    }

    /// Number of descriptor rows held.
    #[getter]
    fn n_points(&self) -> usize {
        self.inner.n_rows()
    }

    /// Soft-Jaccard of `desc` against every subject (as `gpu_cohort_search`).
    #[pyo3(signature = (desc, *, exclude, allowed, **sj))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        desc: PyReadonlyArray2<'py, u8>,
        exclude: Option<usize>,
        allowed: Option<Vec<bool>>,
        sj: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let q = descriptor_view(py, "desc", &desc)?;
        let sj = gpu_sj_kwargs(py, sj)?;
        let inner = &self.inner;
        let scores = detach(py, || {
            gpu()?.cohort_search_on(inner, q, exclude, allowed.as_deref(), &sj)
        })?;
        Ok(scores.into_pyarray(py))
    }

    /// N×N soft-Jaccard matrix (as `gpu_cohort_pairwise`).
    #[pyo3(signature = (*, symmetric, **sj))]
    fn pairwise<'py>(
        &self,
        py: Python<'py>,
        symmetric: bool,
        sj: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let sj = gpu_sj_kwargs(py, sj)?;
        let inner = &self.inner;
        let n = inner.n_subjects();
        let flat = detach(py, || gpu()?.cohort_pairwise_on(inner, &sj, symmetric))?;
        array2(py, n, n, flat)
    }
}

/// N×N soft-Jaccard matrix of a cohort on the GPU (`GpuCohort(data, sizes).pairwise(...)`)
/// — the exact-search `SearchEngine.pairwise`
/// (row = query subject, diagonal 1, `symmetric` averages the two intersections).
#[pyfunction]
#[pyo3(signature = (data, sizes, *, symmetric, **sj))]
fn gpu_cohort_pairwise<'py>(
    py: Python<'py>,
    data: PyReadonlyArray2<'py, u8>,
    sizes: PyReadonlyArray1<'py, i64>,
    symmetric: bool,
    sj: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    GpuCohort::new(py, data, sizes)?.pairwise(py, symmetric, sj)
}

/// Per-class kernel sums of the fusion model on the GPU:
/// `out[q, c] = Σ_{j: classes[j]=c} exp(−d²(queries[q], data[j]) / denom[q])`, terms with
/// d²/denom ≥ `cutoff` skipped.
#[pyfunction]
#[pyo3(signature = (queries, data, classes, n_classes, denom, *, cutoff))]
fn gpu_kde_class_sums<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, u8>,
    data: PyReadonlyArray2<'py, u8>,
    classes: PyReadonlyArray1<'py, i64>,
    n_classes: usize,
    denom: PyReadonlyArray1<'py, f64>,
    cutoff: f64,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let q = descriptor_view(py, "queries", &queries)?;
    let d = descriptor_view(py, "data", &data)?;
    let cls: Vec<i32> = classes
        .as_array()
        .iter()
        .map(|&c| i32::try_from(c).unwrap_or(-1))
        .collect();
    if cls.iter().any(|&c| c < 0 || c as usize >= n_classes) {
        return Err(invalid(py, format!("classes must be in 0..{n_classes}")));
    }
    let den: Vec<f32> = denom.as_array().iter().map(|&x| x as f32).collect();
    ensure_nvrtc(py);
    let out = detach(py, || {
        gpu()?.kde_class_sums(q, d, &cls, n_classes, &den, cutoff)
    })?;
    Ok(out.into_pyarray(py))
}

/// log p({f_i}|C_k) per class on the GPU (eqs. 5–7), with `keypoint_log_likelihood`'s
/// arguments and result; k ≤ 32 (or None: every training keypoint). With k the result is
/// bit-identical to the CPU's; without, within ~1e-9 (fixed-point GPU sums).
#[pyfunction]
#[pyo3(signature = (query, train, train_sample, sample_class, n_classes, *, exclude_sample, k,
    background))]
#[allow(clippy::too_many_arguments)]
fn gpu_keypoint_log_likelihood<'py>(
    py: Python<'py>,
    query: PyReadonlyArray2<'py, u8>,
    train: PyReadonlyArray2<'py, u8>,
    train_sample: PyReadonlyArray1<'py, i64>,
    sample_class: PyReadonlyArray1<'py, i64>,
    n_classes: usize,
    exclude_sample: Option<usize>,
    k: Option<usize>,
    background: f64,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let q = descriptor_view(py, "query", &query)?;
    let t = descriptor_view(py, "train", &train)?;
    let ts: Vec<i64> = train_sample.as_array().to_vec();
    let sc: Vec<i64> = sample_class.as_array().to_vec();
    ensure_nvrtc(py);
    let out = detach(py, || {
        gpu()?.keypoint_log_likelihood(q, t, &ts, &sc, n_classes, exclude_sample, k, background)
    })?;
    Ok(out.into_pyarray(py))
}

/// The extractor's DoG scale space on the GPU: intensities normalised as the CPU
/// extractor does (99.5th percentile of |value| → 1), Gaussian levels, DoGs and strict
/// 80-neighbour extrema per octave, with the CPU's blur, schedule and margins. `params` are
/// `extract3d`'s (same names and defaults; the detection ones are used). Returns a list of
/// dicts, one per octave: `shape`, `extrema` ((n, 5) int64: DoG level, i, j, k, polarity)
/// and, with `keep_images`, `gaussians` / `dogs` (lists of float32 volumes).
#[pyfunction]
#[pyo3(signature = (volume, *, keep_images, **params))]
fn gpu_scale_space<'py>(
    py: Python<'py>,
    volume: PyReadonlyArray3<'py, f32>,
    keep_images: bool,
    params: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyList>> {
    let ep = extract_params(py, params)?;
    // keyfuse-cuda takes the scale-space settings as they are: check them here
    ep.validate().map_err(|e| to_pyerr(py, e))?;
    let params = ScaleSpaceParams {
        keep_images,
        ..ScaleSpaceParams::from_extract(&ep)
    };
    ensure_nvrtc(py);
    let v = volume.as_array();
    let octaves = detach(py, || {
        let data: Vec<f32> = v.iter().copied().collect();
        let Some(scale) = intensity_scale(&data)? else {
            return Ok(Vec::new());
        };
        let scaled = numpy::ndarray::Array3::from_shape_vec(v.raw_dim(), data)
            .map_err(|e| KfError::InvalidArgument(e.to_string()))?
            .mapv_into(|x| x * scale);
        gpu()?.scale_space(scaled.view(), &params)
    })?;
    let out = PyList::empty(py);
    for o in octaves {
        let d = PyDict::new(py);
        d.set_item("shape", (o.shape[0], o.shape[1], o.shape[2]))?;
        let rows: Vec<i64> = o
            .extrema
            .iter()
            .flat_map(|e| {
                [
                    e.level as i64,
                    e.ijk[0] as i64,
                    e.ijk[1] as i64,
                    e.ijk[2] as i64,
                    e.polarity as i64,
                ]
            })
            .collect();
        d.set_item("extrema", array2(py, o.extrema.len(), 5, rows)?)?;
        if keep_images {
            let g = PyList::empty(py);
            for a in o.gaussians {
                g.append(a.into_pyarray(py))?;
            }
            let dl = PyList::empty(py);
            for a in o.dogs {
                dl.append(a.into_pyarray(py))?;
            }
            d.set_item("gaussians", g)?;
            d.set_item("dogs", dl)?;
        }
        out.append(d)?;
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_info, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile_check, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_knn, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_cohort_search, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_cohort_pairwise, m)?)?;
    m.add_class::<GpuCohort>()?;
    m.add_function(wrap_pyfunction!(gpu_kde_class_sums, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_keypoint_log_likelihood, m)?)?;
    m.add_function(wrap_pyfunction!(gpu_scale_space, m)?)?;
    Ok(())
}
