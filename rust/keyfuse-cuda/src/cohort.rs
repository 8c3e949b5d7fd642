//! Soft-Jaccard cohort scoring on the device (kernel `kf_sj_accumulate` in
//! `kernels/score.cu`): the exact-search counterpart of `keyfuse_core::jaccard::Cohort`.
//! The α² bounds, the descriptor statistics behind them and the J-matrix assembly come
//! from `keyfuse_core::jaccard`, so CPU and GPU scores cannot drift apart.

use cudarc::driver::{CudaSlice, PushKernelArg};
use keyfuse_core::jaccard::{alpha2_clamp, jaccard_matrix, jaccard_scores, DimStats};
use keyfuse_core::{KfError, Result};
use ndarray::{Array2, ArrayView2};

use crate::knn::{KnnKernel, KNN_KMAX};
use crate::launch::{as_i32, grid};
use crate::runtime::{dev_err, Gpu};

/// Soft-Jaccard parameters of the GPU cohort engine (the exact-search subset of
/// `keyfuse_core::jaccard::SoftJaccardParams`, same defaults).
#[derive(Clone, Debug)]
pub struct SjParams {
    /// Nearest neighbours per keypoint (K ≤ 32).
    pub k: usize,
    /// Lower bound of α².
    pub alpha2_floor: f64,
    /// Upper bound of α² as a fraction of the data's mean squared pair distance.
    pub alpha2_cap_fraction: f64,
    /// k-NN kernel (None: [`Gpu::knn_kernel`], i.e. `KEYFUSE_CUDA_KNN`).
    pub kernel: Option<KnnKernel>,
}

impl Default for SjParams {
    fn default() -> Self {
        Self {
            k: 30,
            alpha2_floor: 1.0,
            alpha2_cap_fraction: 0.1,
            kernel: None,
        }
    }
}

fn check_sj(sj: &SjParams) -> Result<()> {
    if sj.k == 0
        || sj.k > KNN_KMAX
        || sj.alpha2_floor.is_nan()
        || sj.alpha2_floor <= 0.0
        || sj.alpha2_cap_fraction.is_nan()
        || sj.alpha2_cap_fraction <= 0.0
    {
        return Err(KfError::InvalidArgument(format!(
            "soft Jaccard on the GPU needs 1 ≤ k ≤ {KNN_KMAX}, alpha2_floor > 0 and \
             alpha2_cap_fraction > 0"
        )));
    }
    Ok(())
}

/// The α² clamp `[floor, γ·E]` of the CPU's soft Jaccard
/// ([`keyfuse_core::jaccard::alpha2_clamp`]), E = the mean squared distance between two
/// independent descriptors of `data` (`2 Σ_d Var_d`, from exact integer sums).
pub fn alpha2_bounds(data: ArrayView2<u8>, floor: f64, cap_fraction: f64) -> (f64, f64) {
    alpha2_clamp(floor, cap_fraction, mean_sq_dist(data))
}

/// E = `2 Σ_d Var_d` of the rows of `data` (∞ for fewer than two rows), as the CPU's
/// cohort computes it.
fn mean_sq_dist(data: ArrayView2<u8>) -> f64 {
    let mut stats = DimStats::default();
    let rows = data.as_standard_layout();
    stats.add(rows.as_slice().expect("standard layout is contiguous"));
    stats.mean_sq_dist()
}

/// A cohort's descriptors resident on the device (upload once, search many times): the
/// GPU counterpart of `keyfuse_core::jaccard::Cohort` for exact search.
pub struct DeviceCohort {
    data: CudaSlice<u32>,
    owner: CudaSlice<i32>,
    owner_host: Vec<i32>,
    sizes: Vec<usize>,
    n_rows: usize,
    mean_sq: f64,
}

impl DeviceCohort {
    /// Number of subjects.
    pub fn n_subjects(&self) -> usize {
        self.sizes.len()
    }
    /// Number of descriptor rows.
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }
    /// Rows per subject.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }
}

impl Drop for DeviceCohort {
    fn drop(&mut self) {
        crate::runtime::bind_before_free(&self.data);
    }
}

fn subject_sizes(owner: &[i32], n_subjects: usize) -> Vec<usize> {
    let mut sizes = vec![0usize; n_subjects];
    for &s in owner {
        sizes[s as usize] += 1;
    }
    sizes
}

impl Gpu {
    /// Accumulate soft intersections from neighbour lists on the device (see score.cu).
    #[allow(clippy::too_many_arguments)]
    fn sj_launch(
        &self,
        nn_i: &CudaSlice<i32>,
        nn_d: &CudaSlice<u32>,
        nq: usize,
        k: usize,
        subject: &CudaSlice<i32>,
        alpha2: Option<&[f32]>,
        bounds: (f64, f64),
        rows: &CudaSlice<i32>,
        n_rows: usize,
        n_subjects: usize,
        exclude_same: bool,
    ) -> Result<Array2<f64>> {
        let cells = n_rows * n_subjects;
        let mut acc = self
            .stream
            .alloc_zeros::<u64>(cells.max(1))
            .map_err(dev_err)?;
        let from_nn: i32 = alpha2.is_none() as i32;
        let a2 = match alpha2 {
            Some(a) if !a.is_empty() => self.stream.clone_htod(a).map_err(dev_err)?,
            _ => self.stream.alloc_zeros::<f32>(1).map_err(dev_err)?,
        };
        let (nq_i, k_i, ns_i, ex) = (
            as_i32(nq, "queries")?,
            k as i32,
            as_i32(n_subjects, "subjects")?,
            exclude_same as i32,
        );
        let f = self.func("kf_sj_accumulate")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(nn_i).arg(nn_d).arg(&nq_i).arg(&k_i).arg(subject);
        lb.arg(&a2).arg(&from_nn).arg(&bounds.0).arg(&bounds.1);
        lb.arg(rows).arg(&ns_i).arg(&ex).arg(&mut acc);
        unsafe { lb.launch(grid(nq)?) }.map_err(dev_err)?;
        self.download_fixed(&acc, n_rows, n_subjects)
    }

    /// Upload a cohort: `data` holds every subject's rows, `owner[r]` the subject (0..n)
    /// of row r.
    pub fn upload_cohort(
        &self,
        data: ArrayView2<u8>,
        owner: &[i32],
        n_subjects: usize,
    ) -> Result<DeviceCohort> {
        if owner.len() != data.nrows() {
            return Err(KfError::InvalidArgument(
                "one owner (subject id) per descriptor row".into(),
            ));
        }
        if owner.iter().any(|&s| s < 0 || s as usize >= n_subjects) {
            return Err(KfError::InvalidArgument("subject id out of range".into()));
        }
        Ok(DeviceCohort {
            data: self.upload_descriptors(data, "cohort descriptors")?,
            owner: self.upload_i32(owner)?,
            owner_host: owner.to_vec(),
            sizes: subject_sizes(owner, n_subjects),
            n_rows: data.nrows(),
            mean_sq: mean_sq_dist(data),
        })
    }

    /// Soft-Jaccard of a query set against every subject of a device cohort — the
    /// exact-search version of `keyfuse_core::jaccard::Cohort::search`: each query row's
    /// k nearest cohort rows (rows of subject `exclude` and of subjects not `allowed` are
    /// never candidates), α² = d² to the first clamped to [`alpha2_bounds`] of the cohort
    /// data, and per subject the nearest of its rows adds `exp(−d²/2α²)` to the soft
    /// intersection. Sums are exact 32.32 fixed point (deterministic); they differ from the
    /// CPU's f64 sums by < 2⁻³² per term.
    pub fn cohort_search_on(
        &self,
        cohort: &DeviceCohort,
        queries: ArrayView2<u8>,
        exclude: Option<usize>,
        allowed: Option<&[bool]>,
        sj: &SjParams,
    ) -> Result<Vec<f64>> {
        let n_subjects = cohort.n_subjects();
        check_sj(sj)?;
        if allowed.is_some_and(|a| a.len() != n_subjects) {
            return Err(KfError::InvalidArgument(
                "restriction mask length differs from the number of subjects".into(),
            ));
        }
        if exclude.is_some_and(|e| e >= n_subjects) {
            return Err(KfError::InvalidArgument("exclude is not a subject".into()));
        }
        let nq = queries.nrows();
        let q = self.upload_descriptors(queries, "queries")?;
        if nq == 0 || cohort.n_rows == 0 {
            return Ok(vec![0.0; n_subjects]);
        }
        let bounds = alpha2_clamp(sj.alpha2_floor, sj.alpha2_cap_fraction, cohort.mean_sq);
        let ex: Vec<i32> = exclude.map_or_else(Vec::new, |e| vec![e as i32; nq]);
        let filter = self.device_filter(
            Some(&cohort.owner_host),
            exclude.map(|_| ex.as_slice()),
            allowed,
        )?;
        let kernel = sj.kernel.unwrap_or_else(|| self.knn_kernel());
        let (nn_d, nn_i) =
            self.knn_device(&q, nq, &cohort.data, cohort.n_rows, sj.k, &filter, kernel)?;
        let rows = self.stream.alloc_zeros::<i32>(nq).map_err(dev_err)?;
        let inter = self.sj_launch(
            &nn_i,
            &nn_d,
            nq,
            sj.k,
            &cohort.owner,
            None,
            bounds,
            &rows,
            1,
            n_subjects,
            false,
        )?;
        Ok(jaccard_scores(
            inter.as_slice().expect("a fresh array"),
            nq,
            &cohort.sizes,
        ))
    }

    /// [`Self::cohort_search_on`] for a cohort given as host arrays (uploaded for this call).
    #[allow(clippy::too_many_arguments)]
    pub fn cohort_search(
        &self,
        data: ArrayView2<u8>,
        owner: &[i32],
        n_subjects: usize,
        queries: ArrayView2<u8>,
        exclude: Option<usize>,
        allowed: Option<&[bool]>,
        sj: &SjParams,
    ) -> Result<Vec<f64>> {
        let cohort = self.upload_cohort(data, owner, n_subjects)?;
        self.cohort_search_on(&cohort, queries, exclude, allowed, sj)
    }

    /// N×N soft-Jaccard matrix of a device cohort (row = query subject, its own rows excluded
    /// from its neighbours; diagonal 1; `symmetric` averages the two intersections) — the
    /// exact-search version of `Cohort::pairwise`, row-major. All subjects' rows are queried
    /// in one k-NN launch; the neighbour lists never leave the device.
    pub fn cohort_pairwise_on(
        &self,
        cohort: &DeviceCohort,
        sj: &SjParams,
        symmetric: bool,
    ) -> Result<Vec<f64>> {
        let inter = self.pairwise_intersections_on(cohort, sj)?;
        Ok(jaccard_matrix(&cohort.sizes, symmetric, |a, b| {
            inter[[a, b]]
        }))
    }

    /// [`Self::cohort_pairwise_on`] for a cohort given as host arrays.
    pub fn cohort_pairwise(
        &self,
        data: ArrayView2<u8>,
        owner: &[i32],
        n_subjects: usize,
        sj: &SjParams,
        symmetric: bool,
    ) -> Result<Vec<f64>> {
        let cohort = self.upload_cohort(data, owner, n_subjects)?;
        self.cohort_pairwise_on(&cohort, sj, symmetric)
    }

    /// The (n_subjects, n_subjects) soft-intersection matrix behind
    /// [`Self::cohort_pairwise_on`]: `I[a, b]` = soft intersection of a's rows with subject b.
    pub fn pairwise_intersections_on(
        &self,
        cohort: &DeviceCohort,
        sj: &SjParams,
    ) -> Result<Array2<f64>> {
        check_sj(sj)?;
        let (n, n_subjects) = (cohort.n_rows, cohort.n_subjects());
        if n == 0 {
            return Ok(Array2::zeros((n_subjects, n_subjects)));
        }
        let bounds = alpha2_clamp(sj.alpha2_floor, sj.alpha2_cap_fraction, cohort.mean_sq);
        let owner = &cohort.owner_host;
        let filter = self.device_filter(Some(owner), Some(owner), None)?;
        let kernel = sj.kernel.unwrap_or_else(|| self.knn_kernel());
        let (nn_d, nn_i) =
            self.knn_device(&cohort.data, n, &cohort.data, n, sj.k, &filter, kernel)?;
        self.sj_launch(
            &nn_i,
            &nn_d,
            n,
            sj.k,
            &cohort.owner,
            None,
            bounds,
            &cohort.owner,
            n_subjects,
            n_subjects,
            false,
        )
    }
}
