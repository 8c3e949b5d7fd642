//! What every host wrapper shares: launch geometry, index checks, uploads of descriptors
//! and ids, and the download of 32.32 fixed-point accumulators.

use cudarc::driver::{CudaSlice, LaunchConfig};
use keyfuse_core::{KfError, Result, DESC_LEN};
use ndarray::{Array2, ArrayView2};

use crate::runtime::{dev_err, Gpu};

/// Threads per block of the element-wise kernels.
pub(crate) const BLOCK: u32 = 256;
/// Fixed-point scale of the score accumulators (KF_FIX in score.cu).
const FIX: f64 = 4294967296.0;

/// One thread per element, [`BLOCK`] threads per block.
pub(crate) fn grid(n: usize) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(BLOCK as usize);
    if blocks > i32::MAX as usize {
        return Err(KfError::InvalidArgument(format!(
            "{n} elements is too many for one launch"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `n` as a kernel's `int` argument.
pub(crate) fn as_i32(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| KfError::InvalidArgument(format!("{what} = {n} exceeds 2^31")))
}

impl Gpu {
    /// Upload (n, 64) uint8 descriptors as 16 words per row (one zero row when empty).
    pub(crate) fn upload_descriptors(
        &self,
        d: ArrayView2<u8>,
        what: &str,
    ) -> Result<CudaSlice<u32>> {
        if d.ncols() != DESC_LEN {
            return Err(KfError::InvalidArgument(format!(
                "{what} must have {DESC_LEN} columns, not {}",
                d.ncols()
            )));
        }
        let host = d.as_standard_layout();
        let bytes = host.as_slice().expect("standard layout is contiguous");
        // 4 descriptor bytes per word; __dp4a works bytewise, so the byte order is immaterial
        let words: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if words.is_empty() {
            return self
                .stream
                .alloc_zeros::<u32>(DESC_LEN / 4)
                .map_err(dev_err);
        }
        self.stream.clone_htod(&words).map_err(dev_err)
    }

    /// Upload ids (one zero when empty: the kernels never read it then).
    pub(crate) fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        if v.is_empty() {
            return self.stream.alloc_zeros::<i32>(1).map_err(dev_err);
        }
        self.stream.clone_htod(v).map_err(dev_err)
    }

    /// Download a (rows, cols) matrix of 32.32 fixed-point sums as f64.
    pub(crate) fn download_fixed(
        &self,
        acc: &CudaSlice<u64>,
        rows: usize,
        cols: usize,
    ) -> Result<Array2<f64>> {
        let mut fixed = self.stream.clone_dtoh(acc).map_err(dev_err)?;
        fixed.truncate(rows * cols);
        let vals = fixed.into_iter().map(|v| v as f64 / FIX).collect();
        Array2::from_shape_vec((rows, cols), vals)
            .map_err(|e| KfError::InvalidArgument(e.to_string()))
    }
}
