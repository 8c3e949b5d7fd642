//! keyfuse-core: the numerical heart of keyfuse, in pure Rust.
//!
//! * [`extract`]: 3D (and 2D) SIFT-Rank keypoints from a Gaussian/DoG scale space.
//! * [`knn`]: exact and approximate k-nearest-neighbour search over 64-byte rank descriptors.
//! * [`matching`]: ratio/scale tests, Hough translation voting, p(m) by kernel density.
//! * [`jaccard`]: soft-Jaccard keypoint-set similarity and the reference voting scheme.
//! * [`kde`]: the keypoint and CNN-vector likelihoods of the shallow+deep fusion model.
//! * [`segment`]: keypoint-transfer label voting and whole-map transfer.
//!
//! Every function is deterministic: the same input gives bit-identical output whatever
//! the rayon thread count.

pub mod cancel;
pub mod error;
pub mod extract;
pub mod jaccard;
pub mod kde;
pub mod knn;
mod linalg;
pub mod matching;
pub mod segment;
mod simd;

pub use error::{KfError, Result};

/// Length of a SIFT-Rank descriptor (2×2×2 cells × 8 orientation bins).
pub const DESC_LEN: usize = 64;
