//! Keypoint-transfer segmentation (Wachinger et al., IPMI 2015): keypoint label voting and
//! the weighted transfer of whole organ label maps along keypoint matches.
//!
//! The two hot steps of the method live here:
//!
//! * [`vote_labels`]: every test keypoint gets the label
//!   `L̂ = argmax_l Σ_m [L_m = l] · exp(−d_m² / 2τ²) · p(m)`, with `τ²` the largest squared
//!   descriptor distance among the keypoint's matches, and the vote certainty
//!   `p(L̂) = score(L̂) / Σ_l score(l)`.
//! * [`AtlasSet::transfer`]: every agreeing match adds the whole organ map of its training
//!   image, shifted by the match's (integer voxel) translation, weighted by
//!   `p(L̂) · p(m) · N(I(x) − I_m(x); ν²)`. Transfers that share (atlas, organ, shift) are
//!   merged first, so each distinct shift costs one pass over the organ's voxels.
//!
//! Organs are stored as x-runs (row segments) with their intensities, so a shifted add is
//! a contiguous loop in both the source and the target. The accumulation is parallel over
//! (label, target plane) and each voxel sums its contributions in one fixed order, so the
//! result is bit-identical whatever the thread count.
//!
//! ```
//! use keyfuse_core::segment::{AtlasSet, Transfer};
//! use ndarray::Array3;
//! let mut labels = Array3::<i32>::zeros((8, 8, 8));
//! labels.slice_mut(ndarray::s![2..4, 2..4, 2..4]).fill(1);
//! let intensity = Array3::<f32>::zeros((8, 8, 8));
//! let atlases = AtlasSet::new(&[labels.view()], &[intensity.view()]).unwrap();
//! let test = Array3::<f32>::zeros((8, 8, 8));
//! let t = [Transfer { atlas: 0, label: 1, shift: [1, 0, 0], weight: 1.0 }];
//! let out = atlases.transfer(test.view(), &t, &[f32::INFINITY], 0.15).unwrap();
//! assert_eq!(out.labels[[3, 2, 2]], 1);
//! assert_eq!(out.labels[[2, 2, 2]], 0);
//! ```

mod atlas_matching;
mod grid;
mod transfer;
mod voting;

pub use atlas_matching::{AtlasKeypointSet, AtlasKeypoints, AtlasMatches};
pub use transfer::{posterior_in_place, AtlasSet, BackgroundRule, Transfer, TransferResult};
pub use voting::vote_labels;

#[cfg(test)]
mod tests;
