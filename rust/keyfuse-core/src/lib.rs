//! keyfuse-core: the numerical heart of [keyfuse], in pure Rust: 3D SIFT-Rank keypoints
//! from MRI and CT volumes, keypoint matching, soft-Jaccard similarity between keypoint
//! sets, the likelihoods of the shallow+deep fusion classifier, and keypoint-transfer
//! segmentation. It has no Python types; the `keyfuse` Python package wraps it, and other
//! tools can embed it directly.
//!
//! # Stages
//!
//! * [`extract`]: 3D (and 2D) SIFT-Rank keypoints from a Gaussian/DoG scale space.
//! * [`knn`]: exact and approximate k-nearest-neighbour search over 64-byte rank descriptors.
//! * [`matching`]: ratio/scale tests, Hough translation voting, p(m) by kernel density, and
//!   a robust similarity transform.
//! * [`jaccard`]: soft-Jaccard keypoint-set similarity and the reference voting scheme.
//! * [`kde`]: the keypoint and CNN-vector likelihoods of the shallow+deep fusion model.
//! * [`segment`]: keypoint-transfer segmentation: atlas matching, label voting, map transfer.
//! * [`vecscan`]: the int8 scan behind exact CNN-vector search.
//!
//! Every function is deterministic: the same input gives bit-identical output whatever
//! the rayon thread count and whichever SIMD kernel the CPU runs. Errors are [`KfError`].
//!
//! # Example
//!
//! Extract keypoints from a volume (here three Gaussian blobs, 1 mm voxels) and match the
//! set with itself:
//!
//! ```
//! use keyfuse_core::extract::{extract3d, ExtractParams};
//! use keyfuse_core::matching::{match_sets, KeypointView, MatchParams};
//! use ndarray::Array3;
//!
//! # fn main() -> keyfuse_core::Result<()> {
//! let blob = |p: [f32; 3], c: [f32; 3], s: f32| {
//!     let d2: f32 = (0..3).map(|a| (p[a] - c[a]).powi(2)).sum();
//!     (-d2 / (2.0 * s * s)).exp()
//! };
//! let volume = Array3::from_shape_fn((40, 40, 40), |(i, j, k)| {
//!     let p = [i as f32, j as f32, k as f32];
//!     blob(p, [12.0, 14.0, 11.0], 2.0) - blob(p, [26.0, 22.0, 27.0], 3.0)
//!         + blob(p, [19.0, 28.0, 15.0], 2.5)
//! });
//! let kps = extract3d(volume.view(), [1.0; 3], &ExtractParams::default())?;
//! assert!(!kps.is_empty());
//!
//! // the matcher reads descriptors (n × 64 bytes), positions (mm) and scales (mm)
//! let desc = kps.descriptors.concat();
//! let scale: Vec<f64> = kps.scale.iter().map(|&s| s as f64).collect();
//! let view = KeypointView::new(&desc, &kps.ijk, &scale);
//! let m = match_sets(&view, &view, &MatchParams::default())?;
//! assert_eq!(m.ia.len(), kps.len()); // every keypoint finds itself (distance 0)
//! # Ok(())
//! # }
//! ```
//!
//! `examples/match_volumes.rs` goes further: it recovers a known translation between two
//! volumes with the Hough vote.
//!
//! [keyfuse]: https://pypi.org/project/keyfuse/

pub mod cancel;
pub mod error;
pub mod extract;
pub mod jaccard;
pub mod kde;
pub mod knn;
mod linalg;
pub mod matching;
pub mod segment;
pub mod shard;
mod simd;
pub mod vecscan;

pub use error::{KfError, Result};

/// Length of a SIFT-Rank descriptor (2×2×2 cells × 8 orientation bins).
pub const DESC_LEN: usize = 64;
