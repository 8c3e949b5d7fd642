//! Exact k-NN of uint8 descriptors on the device (kernels in `kernels/knn.cu` and
//! `kernels/knn_mma.cu`): the same neighbours, distances and tie order as
//! `keyfuse_core::knn::knn_exact`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use keyfuse_core::{KfError, Result};
use ndarray::{Array2, ArrayView2};

use crate::launch::{as_i32, grid};
use crate::runtime::{dev_err, Gpu};

/// Descriptors per shared-memory tile in the k-NN kernels (KF_TILE in knn.cu).
const KNN_TILE: usize = 128;
/// Largest k the k-NN kernel keeps per query (KF_KMAX in knn.cu).
pub const KNN_KMAX: usize = 32;

/// Which k-NN kernel runs: the brute-force `__dp4a` one, or the tensor-core one (integer
/// MMA, sm_80+), which gives the same results. Chosen by `KEYFUSE_CUDA_KNN=mma|dp4a`
/// (default dp4a until the MMA kernel's parity has been run on a GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnnKernel {
    Dp4a,
    Mma,
}

/// Environment variable choosing the k-NN kernel (`mma` or `dp4a`).
pub const KNN_KERNEL_ENV: &str = "KEYFUSE_CUDA_KNN";

/// The k-NN row filter, on the device.
pub(crate) struct DeviceFilter {
    owner: CudaSlice<i32>,
    exclude: CudaSlice<i32>,
    allowed: CudaSlice<u8>,
    mode: i32,
}

impl Gpu {
    /// The k-NN kernel calls will use (see [`KnnKernel`]); MMA needs compute capability 8.0+.
    pub fn knn_kernel(&self) -> KnnKernel {
        let want = std::env::var(KNN_KERNEL_ENV).unwrap_or_default();
        if want.eq_ignore_ascii_case("mma") && self.compute_capability.0 >= 8 {
            KnnKernel::Mma
        } else {
            KnnKernel::Dp4a
        }
    }

    /// The k-NN row filter on the device (mode 0 = none).
    pub(crate) fn device_filter(
        &self,
        db_owner: Option<&[i32]>,
        exclude: Option<&[i32]>,
        allowed: Option<&[bool]>,
    ) -> Result<DeviceFilter> {
        let mut mode = 0;
        if exclude.is_some() {
            mode |= 1;
        }
        if allowed.is_some() {
            mode |= 2;
        }
        if mode != 0 && db_owner.is_none() {
            return Err(KfError::InvalidArgument(
                "a k-NN filter needs row owners".into(),
            ));
        }
        let allowed: Vec<u8> =
            allowed.map_or_else(Vec::new, |a| a.iter().map(|&x| x as u8).collect());
        Ok(DeviceFilter {
            owner: self.upload_i32(db_owner.unwrap_or(&[]))?,
            exclude: self.upload_i32(exclude.unwrap_or(&[]))?,
            allowed: if allowed.is_empty() {
                self.stream.alloc_zeros::<u8>(1).map_err(dev_err)?
            } else {
                self.stream.clone_htod(&allowed).map_err(dev_err)?
            },
            mode,
        })
    }

    /// k nearest database rows per query on the device: (distances, indices), (nq·k) each,
    /// sorted by (distance, index); missing entries are (u32::MAX, -1). Rows rejected by
    /// `filter` are never candidates (as in the CPU's filtered search).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn knn_device(
        &self,
        q: &CudaSlice<u32>,
        nq: usize,
        db: &CudaSlice<u32>,
        nd: usize,
        k: usize,
        filter: &DeviceFilter,
        kernel: KnnKernel,
    ) -> Result<(CudaSlice<u32>, CudaSlice<i32>)> {
        if k == 0 || k > KNN_KMAX {
            return Err(KfError::InvalidArgument(format!(
                "k must be in 1..={KNN_KMAX}"
            )));
        }
        let (nq_i, nd_i, k_i) = (
            as_i32(nq, "queries")?,
            as_i32(nd, "database rows")?,
            k as i32,
        );
        let mma = kernel == KnnKernel::Mma && self.compute_capability.0 >= 8;
        // the MMA kernel's block holds 64 queries (4 warps × 16), the dp4a one 128
        let per_block = if mma { 64 } else { KNN_TILE };
        let qblocks = nq.div_ceil(per_block).max(1);
        // split the database across grid.y when there are too few queries to fill the GPU
        let want = (4 * self.sm_count).div_ceil(qblocks);
        let nsplit = want.clamp(1, nd.div_ceil(4 * KNN_TILE).clamp(1, 65535));
        let chunk = nd.div_ceil(nsplit).div_ceil(KNN_TILE).max(1) * KNN_TILE;
        let nsplit = nd.div_ceil(chunk).max(1);
        let chunk_i = as_i32(chunk, "chunk")?;
        let cfg = LaunchConfig {
            grid_dim: (qblocks as u32, nsplit as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let n_out = (nsplit * nq * k).max(1);
        let mut pd = self.stream.alloc_zeros::<u32>(n_out).map_err(dev_err)?;
        let mut pi = self.stream.alloc_zeros::<i32>(n_out).map_err(dev_err)?;
        let name = match (mma, k) {
            (true, _) => "kf_knn_mma",
            (false, 2) => "kf_knn2",
            (false, _) => "kf_knn",
        };
        let f = self.func(name)?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(q).arg(&nq_i).arg(db).arg(&nd_i);
        if name != "kf_knn2" {
            lb.arg(&k_i);
        }
        lb.arg(&chunk_i);
        lb.arg(&filter.owner)
            .arg(&filter.exclude)
            .arg(&filter.allowed)
            .arg(&filter.mode);
        lb.arg(&mut pd).arg(&mut pi);
        unsafe { lb.launch(cfg) }.map_err(dev_err)?;
        if nsplit == 1 {
            return Ok((pd, pi));
        }
        let mut od = self
            .stream
            .alloc_zeros::<u32>((nq * k).max(1))
            .map_err(dev_err)?;
        let mut oi = self
            .stream
            .alloc_zeros::<i32>((nq * k).max(1))
            .map_err(dev_err)?;
        let ns = nsplit as i32;
        let f = self.func("kf_knn_merge")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(&pd)
            .arg(&pi)
            .arg(&ns)
            .arg(&nq_i)
            .arg(&k_i)
            .arg(&mut od)
            .arg(&mut oi);
        unsafe { lb.launch(grid(nq)?) }.map_err(dev_err)?;
        Ok((od, oi))
    }

    /// Exact k-NN (k ≤ 32) of uint8 descriptors by brute force, as
    /// `keyfuse_core::knn::knn_exact`: squared distances (exact integers) and indices, each
    /// (nq, k), sorted by (distance, index); when the database has fewer than k rows the
    /// tail is (u32::MAX, -1).
    pub fn knn(
        &self,
        queries: ArrayView2<u8>,
        database: ArrayView2<u8>,
        k: usize,
    ) -> Result<(Array2<u32>, Array2<i64>)> {
        self.knn_with_kernel(queries, database, k, self.knn_kernel())
    }

    /// [`Self::knn`] with an explicit kernel (both give the same results).
    pub fn knn_with_kernel(
        &self,
        queries: ArrayView2<u8>,
        database: ArrayView2<u8>,
        k: usize,
        kernel: KnnKernel,
    ) -> Result<(Array2<u32>, Array2<i64>)> {
        if k == 0 || k > KNN_KMAX {
            return Err(KfError::InvalidArgument(format!(
                "k must be in 1..={KNN_KMAX}"
            )));
        }
        let (nq, nd) = (queries.nrows(), database.nrows());
        let q = self.upload_descriptors(queries, "queries")?;
        let db = self.upload_descriptors(database, "database")?;
        if nq == 0 || nd == 0 {
            return Ok((
                Array2::from_elem((nq, k), u32::MAX),
                Array2::from_elem((nq, k), -1),
            ));
        }
        let filter = self.device_filter(None, None, None)?;
        let (d, i) = self.knn_device(&q, nq, &db, nd, k, &filter, kernel)?;
        let mut d = self.stream.clone_dtoh(&d).map_err(dev_err)?;
        let mut i = self.stream.clone_dtoh(&i).map_err(dev_err)?;
        d.truncate(nq * k);
        i.truncate(nq * k);
        let shape = (nq, k);
        let d = Array2::from_shape_vec(shape, d)
            .map_err(|e| KfError::InvalidArgument(e.to_string()))?;
        let i = Array2::from_shape_vec(shape, i.into_iter().map(i64::from).collect())
            .map_err(|e| KfError::InvalidArgument(e.to_string()))?;
        Ok((d, i))
    }
}
