//! The fusion model's keypoint likelihood on the device (kernel `kf_kde_class` in
//! `kernels/score.cu`, neighbours from [`crate::knn`]). The kernel term, its cut-off and
//! the final log sums come from `keyfuse_core::kde`.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use keyfuse_core::kde::{add_kernel_term, log_likelihood_from_sums, EXP_CUTOFF};
use keyfuse_core::{KfError, Result, DESC_LEN};
use ndarray::{Array2, ArrayView2};

use crate::knn::KNN_KMAX;
use crate::launch::{as_i32, BLOCK};
use crate::runtime::{dev_err, Gpu};

impl Gpu {
    /// Per-class kernel sums of the fusion model (ALGORITHMS.md §4): for each query row q,
    /// `out[q, c] = Σ_{j: class[j]=c} exp(-d²(q, j) / denom[q])` over every database row.
    /// Rows with a negative class are skipped, and so are terms with d²/denom ≥ `cutoff`.
    /// Exact 32.32 fixed-point sums (deterministic). At most 6,000 classes.
    pub fn kde_class_sums(
        &self,
        queries: ArrayView2<u8>,
        database: ArrayView2<u8>,
        db_class: &[i32],
        n_class: usize,
        denom: &[f32],
        cutoff: f64,
    ) -> Result<Array2<f64>> {
        let (nq, nd) = (queries.nrows(), database.nrows());
        if db_class.len() != nd || denom.len() != nq {
            return Err(KfError::InvalidArgument(
                "class/denominator lengths disagree".into(),
            ));
        }
        if n_class == 0 || n_class > 6000 {
            return Err(KfError::InvalidArgument(
                "n_class must be in 1..=6000".into(),
            ));
        }
        if nq == 0 {
            return Ok(Array2::zeros((0, n_class)));
        }
        let q = self.upload_descriptors(queries, "queries")?;
        let db = self.upload_descriptors(database, "database")?;
        let cls = self.upload_i32(db_class)?;
        let den = self.stream.clone_htod(denom).map_err(dev_err)?;
        let mut out = self
            .stream
            .alloc_zeros::<u64>(nq * n_class)
            .map_err(dev_err)?;
        let (nq_i, nd_i, nc_i) = (
            as_i32(nq, "queries")?,
            as_i32(nd, "database")?,
            n_class as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (nq as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: (n_class * 8) as u32,
        };
        let f = self.func("kf_kde_class")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(&q)
            .arg(&nq_i)
            .arg(&db)
            .arg(&nd_i)
            .arg(&cls)
            .arg(&nc_i)
            .arg(&den)
            .arg(&cutoff)
            .arg(&mut out);
        unsafe { lb.launch(cfg) }.map_err(dev_err)?;
        self.download_fixed(&out, nq, n_class)
    }

    /// The fusion model's keypoint term on the GPU, as
    /// `keyfuse_core::kde::keypoint_log_likelihood`: Σ_i ln(S_ik/N_k + b) per class k, with
    /// S_ik = Σ_{j ∈ k} exp(−d²(f_i, f_j) / (1 + dNN_i²)) over every training keypoint
    /// (`k = None`) or over the k ≤ 32 nearest (`Some(k)`), training sample
    /// `exclude_sample` left out everywhere. With `Some(k)` the neighbour lists come from the
    /// GPU and the sums are formed on the host in the CPU's order (bit-identical); with
    /// `None` they are 32.32 fixed-point sums on the GPU (within ~1e-9 of the CPU's).
    #[allow(clippy::too_many_arguments)]
    pub fn keypoint_log_likelihood(
        &self,
        query: ArrayView2<u8>,
        train: ArrayView2<u8>,
        train_sample: &[i64],
        sample_class: &[i64],
        n_classes: usize,
        exclude_sample: Option<usize>,
        k: Option<usize>,
        background: f64,
    ) -> Result<Vec<f64>> {
        if !(background.is_finite() && background > 0.0) {
            return Err(KfError::InvalidArgument(format!(
                "background must be a finite number > 0, got {background}"
            )));
        }
        if query.ncols() != DESC_LEN || train.ncols() != DESC_LEN {
            return Err(KfError::InvalidArgument(
                "descriptors must have 64 columns".into(),
            ));
        }
        if train_sample.len() != train.nrows() {
            return Err(KfError::InvalidArgument(
                "train_sample needs one entry per training keypoint".into(),
            ));
        }
        if n_classes == 0 || n_classes > 6000 {
            return Err(KfError::InvalidArgument(
                "n_classes must be in 1..=6000".into(),
            ));
        }
        if k == Some(0) || k.is_some_and(|k| k > KNN_KMAX) {
            return Err(KfError::InvalidArgument(format!(
                "k must be in 1..={KNN_KMAX} on the GPU (or None for all)"
            )));
        }
        if sample_class
            .iter()
            .any(|&c| c < 0 || c as u64 >= n_classes as u64)
        {
            return Err(KfError::InvalidArgument(
                "sample_class outside 0..n_classes".into(),
            ));
        }
        let n_samples = sample_class.len();
        if train_sample
            .iter()
            .any(|&s| s < 0 || s as u64 >= n_samples as u64)
        {
            return Err(KfError::InvalidArgument(
                "train_sample outside 0..n_samples".into(),
            ));
        }
        let kp_class: Vec<i32> = train_sample
            .iter()
            .map(|&s| {
                if exclude_sample == Some(s as usize) {
                    -1
                } else {
                    sample_class[s as usize] as i32
                }
            })
            .collect();
        let mut n_per_class = vec![0usize; n_classes];
        for &c in kp_class.iter().filter(|&&c| c >= 0) {
            n_per_class[c as usize] += 1;
        }
        let b = background;
        let nq = query.nrows();
        if nq == 0 {
            return Ok(vec![0.0; n_classes]);
        }
        let active = kp_class.iter().filter(|&&c| c >= 0).count();
        if active == 0 {
            return Ok(vec![nq as f64 * b.ln(); n_classes]);
        }
        let q = self.upload_descriptors(query, "query")?;
        let t = self.upload_descriptors(train, "train")?;
        // excluded keypoints are never neighbours: owner = sample, allowed = not excluded
        let owner: Vec<i32> = train_sample.iter().map(|&s| s as i32).collect();
        let allowed: Vec<bool> = (0..n_samples).map(|s| Some(s) != exclude_sample).collect();
        let filter = self.device_filter(Some(&owner), None, Some(&allowed))?;
        let kernel = self.knn_kernel();
        let nt = train.nrows();
        let mut sums = vec![0.0f64; nq * n_classes];
        match k {
            Some(k) if k < active => {
                let (d, i) = self.knn_device(&q, nq, &t, nt, k, &filter, kernel)?;
                let d = self.stream.clone_dtoh(&d).map_err(dev_err)?;
                let i = self.stream.clone_dtoh(&i).map_err(dev_err)?;
                for (qi, out) in sums.chunks_exact_mut(n_classes).enumerate() {
                    let row = (0..k)
                        .map(|s| (i[qi * k + s], d[qi * k + s]))
                        .filter(|&(j, _)| j >= 0);
                    let width = 1.0 + row.clone().next().map_or(0.0, |(_, d)| d as f64);
                    for (j, d2) in row {
                        add_kernel_term(out, kp_class[j as usize] as usize, d2, width);
                    }
                }
            }
            _ => {
                let (d1, _) = self.knn_device(&q, nq, &t, nt, 1, &filter, kernel)?;
                let d1 = self.stream.clone_dtoh(&d1).map_err(dev_err)?;
                // 1 + dNN² ≤ 1 + 64·255² is exact in f32
                let denom: Vec<f32> = d1[..nq].iter().map(|&d| 1.0 + d as f32).collect();
                let s =
                    self.kde_class_sums(query, train, &kp_class, n_classes, &denom, EXP_CUTOFF)?;
                sums = s.into_raw_vec_and_offset().0;
            }
        }
        Ok(log_likelihood_from_sums(&sums, &n_per_class, b))
    }
}
