//! k-nearest-neighbour search over 64-byte SIFT-Rank descriptors (squared Euclidean).
//!
//! * [`knn_exact`]: brute force, the ground truth. Integer distances (no rounding), one
//!   rayon task per block of queries, AVX2 picked at run time on x86-64.
//! * [`knn_all_pairs`]: the exact all-pairs of a cohort (every row against the rows of
//!   the other subjects), each pair computed once where the kernel allows it.
//! * [`KdForest`]: randomized kd-trees searched best-bin-first across all trees (FLANN's
//!   scheme: split on one of the 5 highest-variance dimensions at its mean; a shared
//!   priority queue of unexplored branches; stop after `checks` distance evaluations).
//!
//! Both are deterministic: trees come from a fixed seed, each query is searched by one
//! thread in a fixed order, ties are broken by point index, so results are bit-identical
//! whatever the thread count.
//!
//! ```
//! use keyfuse_core::knn::{knn_exact, KdForest, ForestParams};
//! let data: Vec<u8> = (0..64 * 100).map(|i| ((i * 7919) % 64) as u8).collect();
//! let exact = knn_exact(&data, &data[..64], 3, |_, _| true).unwrap();
//! assert_eq!(exact.idx[0], 0);
//! let forest = KdForest::build(&data, &ForestParams::default()).unwrap();
//! let approx = forest.search(&data, &data[..64], 3, 64, |_, _| true).unwrap();
//! assert_eq!(approx.idx[0], 0);
//! ```

use crate::{KfError, Result, DESC_LEN};

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod best;
mod exact;
mod forest;
mod forest_io;
mod pairs;
mod perm;
#[cfg(target_arch = "x86_64")]
mod rank;
mod topk;

pub use exact::{exact_kernel_name, knn_exact, knn_exact_prepared, ExactPrepared};
pub(crate) use forest::SplitMix;
pub use forest::{ForestParams, KdForest};
pub(crate) use forest_io::{fnv64, release_mapped_pages, write_aside, write_atomic};
pub use forest_io::{perm_bits, perm_width, FOREST_FORMAT_VERSION};
pub use pairs::knn_all_pairs;
pub(crate) use topk::TopK;
pub use topk::{merge_neighbors, Neighbors};

/// Marks a missing neighbour (fewer than k candidates passed the filter).
pub const NONE: u32 = u32::MAX;

/// Squared Euclidean distance between two 64-byte descriptors (exact, integer).
#[inline(always)]
pub fn dist2(a: &[u8], b: &[u8]) -> u32 {
    let a: &[u8; DESC_LEN] = a[..DESC_LEN].try_into().unwrap();
    let b: &[u8; DESC_LEN] = b[..DESC_LEN].try_into().unwrap();
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: SSE2 is part of the x86-64 baseline; the arrays are 64 bytes long.
        unsafe { crate::simd::dist2_sse2(a, b) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        crate::simd::dist2_scalar(a, b)
    }
}

/// |row|², the squared norm of one descriptor (for d² = |q|² + |b|² − 2 q·b).
#[inline]
pub(crate) fn sq_norm(row: &[u8]) -> u32 {
    row.iter().map(|&v| v as u32 * v as u32).sum()
}

/// The squared norm of every `64`-byte row.
pub(crate) fn sq_norms(desc: &[u8]) -> Vec<u32> {
    desc.chunks_exact(DESC_LEN).map(sq_norm).collect()
}

pub(crate) fn check_rows(name: &str, data: &[u8]) -> Result<usize> {
    if !data.len().is_multiple_of(DESC_LEN) {
        return Err(KfError::InvalidArgument(format!(
            "{name}: descriptor buffer of {} bytes is not a multiple of {DESC_LEN}",
            data.len()
        )));
    }
    let n = data.len() / DESC_LEN;
    if n >= NONE as usize {
        return Err(KfError::InvalidArgument(format!(
            "{name}: too many descriptors ({n})"
        )));
    }
    Ok(n)
}

#[cfg(test)]
pub(crate) mod tests;
