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

use crate::{KfError, Result};
use ndarray::{Array3, Array4, ArrayView3};
use rayon::prelude::*;

/// One row segment of an organ: voxels `(z, y, x0..x0+len)`, intensities at `offset..`.
#[derive(Debug, Clone, Copy)]
struct Run {
    y: i32,
    x0: i32,
    len: u32,
    offset: u32,
}

/// The voxels of one label in one training image, as runs grouped by plane.
#[derive(Debug, Clone)]
struct Organ {
    label: i32,
    runs: Vec<Run>,
    /// `plane_start[z]..plane_start[z + 1]` are the runs of plane `z`.
    plane_start: Vec<u32>,
    intensity: Vec<f32>,
    n_voxels: usize,
}

#[derive(Debug, Clone)]
struct Atlas {
    shape: [usize; 3],
    /// sorted by label
    organs: Vec<Organ>,
}

/// The training label maps and intensities, in run form, ready for transfers.
#[derive(Debug, Clone)]
pub struct AtlasSet {
    atlases: Vec<Atlas>,
    labels: Vec<i32>,
}

/// One transfer request: add organ `label` of atlas `atlas`, moved by `shift` voxels
/// (atlas voxel `v` lands on test voxel `v + shift`), with weight `weight`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transfer {
    pub atlas: u32,
    pub label: i32,
    pub shift: [i32; 3],
    pub weight: f64,
}

/// The result of [`AtlasSet::transfer`].
#[derive(Debug, Clone)]
pub struct TransferResult {
    /// Per voxel label (0 = background), on the test grid.
    pub labels: Array3<i32>,
    /// `(n_labels, Z, Y, X)`: the summed transfer weight at each voxel divided by the total
    /// weight transferred for that label (in `[0, 1]`), in the order of [`AtlasSet::labels`].
    pub probabilities: Array4<f32>,
    /// Total weight transferred per label.
    pub total_weight: Vec<f64>,
    /// Number of distinct (atlas, organ, shift) groups accumulated.
    pub n_groups: usize,
}

/// exp(−u) ≈ (1 + u/256)^−256: eight squarings and a division, which the compiler
/// vectorises (a table lookup or `expf` per voxel is several times slower). Relative error
/// below 0.1% for u ≤ 1 and 1% at u = 2 (two standard deviations); it tends to 0 as u grows.
#[inline(always)]
fn fast_exp_neg(u: f32) -> f32 {
    let mut v = 1.0 + u * (1.0 / 256.0);
    for _ in 0..8 {
        v *= v;
    }
    1.0 / v
}

fn check_shape(shape: &[usize]) -> Result<[usize; 3]> {
    if shape.iter().any(|&s| s == 0 || s > i32::MAX as usize / 2) {
        return Err(KfError::InvalidArgument(format!(
            "volume shape {shape:?} is empty or too large"
        )));
    }
    Ok([shape[0], shape[1], shape[2]])
}

impl Atlas {
    fn new(labels: ArrayView3<i32>, intensity: ArrayView3<f32>) -> Result<Self> {
        if labels.shape() != intensity.shape() {
            return Err(KfError::InvalidArgument(format!(
                "label map shape {:?} differs from its image shape {:?}",
                labels.shape(),
                intensity.shape()
            )));
        }
        let shape = check_shape(labels.shape())?;
        if intensity.iter().any(|v| !v.is_finite()) {
            return Err(KfError::InvalidImage(
                "training image has non-finite intensities".into(),
            ));
        }
        if labels.iter().any(|&l| l < 0) {
            return Err(KfError::InvalidArgument(
                "label maps must not contain negative labels".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut last = 0;
        for &l in labels.iter() {
            // label maps are mostly long runs of one value: skip the set for repeats
            if l != last && l > 0 {
                seen.insert(l);
            }
            last = l;
        }
        let present: Vec<i32> = seen.into_iter().collect();
        let mut organs: Vec<Organ> = present
            .iter()
            .map(|&label| Organ {
                label,
                runs: Vec::new(),
                plane_start: vec![0; shape[0] + 1],
                intensity: Vec::new(),
                n_voxels: 0,
            })
            .collect();
        let slot = |l: i32| present.binary_search(&l).ok();
        let labels = labels.as_standard_layout();
        let labels = labels.as_slice().expect("standard layout");
        let intensity = intensity.as_standard_layout();
        let intensity = intensity.as_slice().expect("standard layout");
        let nx = shape[2];
        for z in 0..shape[0] {
            for y in 0..shape[1] {
                let row0 = (z * shape[1] + y) * nx;
                let row = &labels[row0..row0 + nx];
                let mut x = 0;
                while x < nx {
                    let l = row[x];
                    if l == 0 {
                        x += 1;
                        continue;
                    }
                    let x0 = x;
                    while x < nx && row[x] == l {
                        x += 1;
                    }
                    let organ = &mut organs[slot(l).expect("label collected above")];
                    organ.runs.push(Run {
                        y: y as i32,
                        x0: x0 as i32,
                        len: (x - x0) as u32,
                        offset: organ.intensity.len() as u32,
                    });
                    organ
                        .intensity
                        .extend_from_slice(&intensity[row0 + x0..row0 + x]);
                    organ.n_voxels += x - x0;
                }
            }
            for organ in organs.iter_mut() {
                organ.plane_start[z + 1] = organ.runs.len() as u32;
            }
        }
        if organs.iter().any(|o| o.intensity.len() > u32::MAX as usize) {
            return Err(KfError::InvalidArgument("organ too large".into()));
        }
        Ok(Atlas { shape, organs })
    }

    fn organ(&self, label: i32) -> Option<&Organ> {
        self.organs
            .binary_search_by_key(&label, |o| o.label)
            .ok()
            .map(|i| &self.organs[i])
    }
}

impl AtlasSet {
    /// Build from label maps (0 = background, labels > 0) and the matching intensity
    /// volumes (already normalised). Atlases may have different shapes, but each label map
    /// must have its image's shape.
    pub fn new(label_maps: &[ArrayView3<i32>], intensities: &[ArrayView3<f32>]) -> Result<Self> {
        if label_maps.len() != intensities.len() {
            return Err(KfError::InvalidArgument(format!(
                "{} label maps for {} images",
                label_maps.len(),
                intensities.len()
            )));
        }
        if label_maps.is_empty() {
            return Err(KfError::InvalidArgument("no training images".into()));
        }
        let atlases: Vec<Atlas> = label_maps
            .par_iter()
            .zip(intensities.par_iter())
            .map(|(l, i)| Atlas::new(l.view(), i.view()))
            .collect::<Result<_>>()?;
        let mut labels: Vec<i32> = atlases
            .iter()
            .flat_map(|a| a.organs.iter().map(|o| o.label))
            .collect();
        labels.sort_unstable();
        labels.dedup();
        Ok(AtlasSet { atlases, labels })
    }

    /// The distinct non-background labels over all atlases, ascending.
    pub fn labels(&self) -> &[i32] {
        &self.labels
    }

    /// Number of atlases.
    pub fn len(&self) -> usize {
        self.atlases.len()
    }

    /// True when there are no atlases (never, for a successfully built set).
    pub fn is_empty(&self) -> bool {
        self.atlases.is_empty()
    }

    /// Number of voxels of `label` in atlas `atlas` (0 when absent).
    pub fn organ_size(&self, atlas: usize, label: i32) -> usize {
        self.atlases
            .get(atlas)
            .and_then(|a| a.organ(label))
            .map_or(0, |o| o.n_voxels)
    }

    /// Shape of atlas `atlas`.
    pub fn shape(&self, atlas: usize) -> Option<[usize; 3]> {
        self.atlases.get(atlas).map(|a| a.shape)
    }

    /// Accumulate the transfers onto the test grid of `image` (normalised intensities).
    ///
    /// * `nu`: intensity noise σ per label, in the order of [`Self::labels`] (one value is
    ///   broadcast to all); `inf` (or ≤ 0) turns the intensity likelihood off.
    /// * `background_fraction`: a voxel is background when its best label's probability is
    ///   below this (the paper's 15% rule).
    ///
    /// Transfers naming a label an atlas lacks add nothing (their weight still counts in
    /// the label's total, as the organ would have been transferred outside the image).
    pub fn transfer(
        &self,
        image: ArrayView3<f32>,
        transfers: &[Transfer],
        nu: &[f32],
        background_fraction: f32,
    ) -> Result<TransferResult> {
        let shape = check_shape(image.shape())?;
        let n_labels = self.labels.len();
        if nu.len() != 1 && nu.len() != n_labels {
            return Err(KfError::InvalidArgument(format!(
                "nu has {} values for {} labels",
                nu.len(),
                n_labels
            )));
        }
        if nu.iter().any(|v| v.is_nan()) {
            return Err(KfError::InvalidArgument("nu must not be NaN".into()));
        }
        if !(0.0..=1.0).contains(&background_fraction) {
            return Err(KfError::InvalidArgument(format!(
                "background_fraction {background_fraction} is outside [0, 1]"
            )));
        }
        if image.iter().any(|v| !v.is_finite()) {
            return Err(KfError::InvalidImage(
                "test image has non-finite intensities".into(),
            ));
        }
        // 1 / 2ν² per label (0 turns the intensity likelihood off)
        let scale: Vec<f32> = (0..n_labels)
            .map(|i| {
                let v = if nu.len() == 1 { nu[0] } else { nu[i] };
                if v.is_finite() && v > 0.0 {
                    1.0 / (2.0 * v * v)
                } else {
                    0.0
                }
            })
            .collect();

        // Validate, then merge transfers sharing (label, atlas, shift): sort by key with the
        // input position as tie-break, so the summation order is fixed.
        let mut keyed: Vec<(usize, u32, [i32; 3], usize)> = Vec::with_capacity(transfers.len());
        for (pos, t) in transfers.iter().enumerate() {
            if t.atlas as usize >= self.atlases.len() {
                return Err(KfError::InvalidArgument(format!(
                    "transfer names atlas {} of {}",
                    t.atlas,
                    self.atlases.len()
                )));
            }
            if !(t.weight.is_finite() && t.weight >= 0.0) {
                return Err(KfError::InvalidArgument(format!(
                    "transfer weight {} is not a finite non-negative number",
                    t.weight
                )));
            }
            let slot = self.labels.binary_search(&t.label).map_err(|_| {
                KfError::InvalidArgument(format!(
                    "transfer label {} is not in the atlases",
                    t.label
                ))
            })?;
            keyed.push((slot, t.atlas, t.shift, pos));
        }
        keyed.sort_unstable_by_key(|k| (k.0, k.1, k.2, k.3));
        let mut total_weight = vec![0.0f64; n_labels];
        // per label: (atlas, shift, weight)
        let mut groups: Vec<Vec<(u32, [i32; 3], f32)>> = vec![Vec::new(); n_labels];
        let mut i = 0;
        while i < keyed.len() {
            let (slot, atlas, shift, _) = keyed[i];
            let mut w = 0.0f64;
            while i < keyed.len() && (keyed[i].0, keyed[i].1, keyed[i].2) == (slot, atlas, shift) {
                w += transfers[keyed[i].3].weight;
                i += 1;
            }
            total_weight[slot] += w;
            if w > 0.0 {
                groups[slot].push((atlas, shift, w as f32));
            }
        }
        let n_groups = groups.iter().map(Vec::len).sum();

        let [nz, ny, nx] = shape;
        let plane = ny * nx;
        let mut acc = vec![0.0f32; n_labels * nz * plane];
        let img = image.as_standard_layout();
        let img = img.as_slice().expect("standard layout");
        acc.par_chunks_mut(plane)
            .enumerate()
            .for_each(|(chunk, out)| {
                let slot = chunk / nz;
                let z = (chunk % nz) as i64;
                let label = self.labels[slot];
                let sc = scale[slot];
                let target_plane = &img[z as usize * plane..(z as usize + 1) * plane];
                for &(atlas, shift, w) in &groups[slot] {
                    let Some(organ) = self.atlases[atlas as usize].organ(label) else {
                        continue;
                    };
                    let zs = z - shift[0] as i64;
                    if zs < 0 || zs as usize + 1 >= organ.plane_start.len() {
                        continue;
                    }
                    let (r0, r1) = (
                        organ.plane_start[zs as usize] as usize,
                        organ.plane_start[zs as usize + 1] as usize,
                    );
                    for run in &organ.runs[r0..r1] {
                        let yt = run.y as i64 + shift[1] as i64;
                        if yt < 0 || yt >= ny as i64 {
                            continue;
                        }
                        // clip the run to the target row
                        let xt0 = run.x0 as i64 + shift[2] as i64;
                        let lo = (-xt0).max(0);
                        let hi = (nx as i64 - xt0).min(run.len as i64);
                        if lo >= hi {
                            continue;
                        }
                        let (lo, hi) = (lo as usize, hi as usize);
                        let src =
                            &organ.intensity[run.offset as usize + lo..run.offset as usize + hi];
                        let start = yt as usize * nx + (xt0 + lo as i64) as usize;
                        let dst = &mut out[start..start + (hi - lo)];
                        let tgt = &target_plane[start..start + (hi - lo)];
                        if sc == 0.0 {
                            for d in dst.iter_mut() {
                                *d += w;
                            }
                        } else {
                            for ((d, &s), &t) in dst.iter_mut().zip(src).zip(tgt) {
                                let diff = t - s;
                                *d += w * fast_exp_neg(diff * diff * sc);
                            }
                        }
                    }
                }
            });

        // normalise per label, then argmax with the background rule
        let inv: Vec<f32> = total_weight
            .iter()
            .map(|&w| if w > 0.0 { (1.0 / w) as f32 } else { 0.0 })
            .collect();
        let n_vox = nz * plane;
        acc.par_chunks_mut(n_vox)
            .zip(inv.par_iter())
            .for_each(|(map, &s)| {
                for v in map.iter_mut() {
                    *v = (*v * s).min(1.0);
                }
            });
        let mut labels = vec![0i32; n_vox];
        labels
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(z, row)| {
                for (k, out) in row.iter_mut().enumerate() {
                    let v = z * plane + k;
                    let mut best = 0.0f32;
                    let mut best_slot = usize::MAX;
                    for slot in 0..n_labels {
                        let p = acc[slot * n_vox + v];
                        if p > best {
                            best = p;
                            best_slot = slot;
                        }
                    }
                    if best_slot != usize::MAX && best >= background_fraction && best > 0.0 {
                        *out = self.labels[best_slot];
                    }
                }
            });
        Ok(TransferResult {
            labels: Array3::from_shape_vec(shape, labels).expect("shape"),
            probabilities: Array4::from_shape_vec((n_labels, nz, ny, nx), acc).expect("shape"),
            total_weight,
            n_groups,
        })
    }
}

/// Keypoint label voting.
///
/// Match `m` links test keypoint `query[m]` to a training keypoint of label `label[m]`
/// (> 0) at squared descriptor distance `dist2[m]`, with match probability `pm[m]`.
/// Returns per test keypoint (`0..n_query`) the voted label (0 when it has no match or
/// all weights vanish) and the vote certainty `p(L̂)` in `[0, 1]`. Ties go to the smaller
/// label.
pub fn vote_labels(
    n_query: usize,
    query: &[u32],
    label: &[i32],
    dist2: &[f32],
    pm: &[f32],
) -> Result<(Vec<i32>, Vec<f32>)> {
    let n = query.len();
    if label.len() != n || dist2.len() != n || pm.len() != n {
        return Err(KfError::InvalidArgument(format!(
            "match arrays differ in length: query {}, label {}, dist2 {}, pm {}",
            n,
            label.len(),
            dist2.len(),
            pm.len()
        )));
    }
    if let Some(&q) = query.iter().find(|&&q| q as usize >= n_query) {
        return Err(KfError::InvalidArgument(format!(
            "match query index {q} out of range for {n_query} keypoints"
        )));
    }
    if label.iter().any(|&l| l <= 0) {
        return Err(KfError::InvalidArgument(
            "training keypoint labels must be > 0 (background keypoints are dropped)".into(),
        ));
    }
    if dist2
        .iter()
        .chain(pm)
        .any(|v| !(v.is_finite() && *v >= 0.0))
    {
        return Err(KfError::InvalidArgument(
            "distances and p(m) must be finite and non-negative".into(),
        ));
    }
    // counting sort of the matches by query, stable
    let mut start = vec![0usize; n_query + 1];
    for &q in query {
        start[q as usize + 1] += 1;
    }
    for i in 0..n_query {
        start[i + 1] += start[i];
    }
    let mut order = vec![0usize; n];
    let mut fill = start.clone();
    for (m, &q) in query.iter().enumerate() {
        order[fill[q as usize]] = m;
        fill[q as usize] += 1;
    }
    let out: Vec<(i32, f32)> = (0..n_query)
        .into_par_iter()
        .map(|q| {
            let ms = &order[start[q]..start[q + 1]];
            if ms.is_empty() {
                return (0, 0.0);
            }
            let tau2 = ms.iter().map(|&m| dist2[m] as f64).fold(0.0, f64::max);
            let mut scores: Vec<(i32, f64)> = Vec::new();
            for &m in ms {
                let lik = if tau2 > 0.0 {
                    (-(dist2[m] as f64) / (2.0 * tau2)).exp()
                } else {
                    1.0
                };
                let s = lik * pm[m] as f64;
                match scores.iter_mut().find(|(l, _)| *l == label[m]) {
                    Some(e) => e.1 += s,
                    None => scores.push((label[m], s)),
                }
            }
            scores.sort_unstable_by_key(|e| e.0);
            let total: f64 = scores.iter().map(|e| e.1).sum();
            let mut best = (0i32, 0.0f64);
            for &(l, s) in &scores {
                if s > best.1 {
                    best = (l, s);
                }
            }
            if total > 0.0 && best.0 > 0 {
                (best.0, (best.1 / total) as f32)
            } else {
                (0, 0.0)
            }
        })
        .collect();
    Ok(out.into_iter().unzip())
}

/// The training keypoints of a keypoint-transfer segmenter (background keypoints already
/// dropped), kept in the form the matcher reads, so that `predict` matches a test image
/// against every atlas in one call.
///
/// [`AtlasKeypoints::match_all`] gives exactly the matches of
/// [`crate::matching::match_sets`] for each atlas (same pairs, distances, translations and
/// p(m)); it runs the atlases in parallel and replaces the spatially constrained
/// re-matching's per-query sort of all atlas keypoints by a bucket selection of the
/// `keep_fraction` closest (same candidates, same (distance, index) tie-break).
#[derive(Debug, Clone)]
pub struct AtlasKeypoints {
    sets: Vec<KpSet>,
}

/// The translation `x_atlas − x_test` of every (test, atlas keypoint, distance) pair.
fn translations(
    pairs: &[(u32, u32, u32)],
    a: &crate::matching::KeypointView,
    b: &KpSet,
) -> Vec<[f64; 3]> {
    pairs
        .iter()
        .map(|&(q, c, _)| {
            let (x, y) = (b.xyz[c as usize], a.xyz[q as usize]);
            [x[0] - y[0], x[1] - y[1], x[2] - y[2]]
        })
        .collect()
}

#[derive(Debug, Clone)]
struct KpSet {
    desc: Vec<u8>,
    xyz: Vec<[f64; 3]>,
    scale: Vec<f64>,
    label: Vec<i32>,
    grid: Grid,
    /// Squared norms of the descriptors (for the dot-product distance kernel).
    norm: Vec<u32>,
    /// Every descriptor byte ≤ 127 (rank descriptors are 0..63): the AVX2 kernel applies.
    small: bool,
}

/// The keypoint positions bucketed in a uniform grid of cubic cells (row-major cells,
/// points sorted by cell then index), for the closest-points queries of the re-matching.
#[derive(Debug, Clone, Default)]
struct Grid {
    origin: [f64; 3],
    cell: f64,
    dims: [usize; 3],
    /// `start[c]..start[c + 1]` are the points of cell `c` in `xyz` / `index`.
    start: Vec<u32>,
    xyz: Vec<[f64; 3]>,
    index: Vec<u32>,
}

impl Grid {
    fn new(xyz: &[[f64; 3]]) -> Grid {
        let n = xyz.len();
        if n == 0 {
            return Grid::default();
        }
        let mut lo = [f64::INFINITY; 3];
        let mut hi = [f64::NEG_INFINITY; 3];
        for p in xyz {
            for d in 0..3 {
                lo[d] = lo[d].min(p[d]);
                hi[d] = hi[d].max(p[d]);
            }
        }
        let ext: Vec<f64> = (0..3).map(|d| (hi[d] - lo[d]).max(1e-6)).collect();
        // about one point per cell over the bounding box, at most 64 cells per axis
        let cell = ((ext[0] * ext[1] * ext[2]) / n as f64)
            .cbrt()
            .max(ext.iter().copied().fold(0.0, f64::max) / 64.0);
        let dims = [0, 1, 2].map(|d| ((ext[d] / cell).floor() as usize + 1).min(65));
        let mut g = Grid {
            origin: lo,
            cell,
            dims,
            ..Grid::default()
        };
        let key: Vec<usize> = xyz.iter().map(|&p| g.cell_of(p)).collect();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by_key(|&i| (key[i as usize], i));
        let n_cells = dims[0] * dims[1] * dims[2];
        let mut start = vec![0u32; n_cells + 1];
        for &k in &key {
            start[k + 1] += 1;
        }
        for c in 0..n_cells {
            start[c + 1] += start[c];
        }
        g.start = start;
        g.xyz = order.iter().map(|&i| xyz[i as usize]).collect();
        g.index = order;
        g
    }

    #[inline]
    fn coord(&self, v: f64, d: usize) -> usize {
        let c = ((v - self.origin[d]) / self.cell).floor();
        if c.is_nan() || c < 0.0 {
            0
        } else {
            (c as usize).min(self.dims[d] - 1)
        }
    }

    fn cell_of(&self, p: [f64; 3]) -> usize {
        let c = [0, 1, 2].map(|d| self.coord(p[d], d));
        (c[0] * self.dims[1] + c[1]) * self.dims[2] + c[2]
    }

    /// Points of the cells that meet the ball of radius `r` around `y`, with squared
    /// distance ≤ `r2`, pushed to `out` as (squared distance, original index). Every point
    /// left out is farther than `r` from `y`.
    fn ball(&self, y: [f64; 3], r: f64, r2: f64, out: &mut Vec<u128>) {
        let range =
            |d: usize| -> (usize, usize) { (self.coord(y[d] - r, d), self.coord(y[d] + r, d)) };
        let (z0, z1) = range(0);
        let (y0, y1) = range(1);
        let (x0, x1) = range(2);
        // squared distance from y to the slab of cell index c along axis d (0 inside)
        let gap = |c: usize, d: usize| -> f64 {
            let lo = self.origin[d] + c as f64 * self.cell;
            let hi = lo + self.cell;
            let g = if y[d] < lo {
                lo - y[d]
            } else if y[d] > hi {
                y[d] - hi
            } else {
                0.0
            };
            g * g
        };
        for cz in z0..=z1 {
            let gz = gap(cz, 0);
            for cy in y0..=y1 {
                let gyz = gz + gap(cy, 1);
                if gyz > r2 * (1.0 + 1e-9) + 1e-9 {
                    continue;
                }
                let row = (cz * self.dims[1] + cy) * self.dims[2];
                let (a, b) = (
                    self.start[row + x0] as usize,
                    self.start[row + x1 + 1] as usize,
                );
                for k in a..b {
                    let d = sq_dist(self.xyz[k], y);
                    if d <= r2 {
                        out.push(dist_key(d, self.index[k]));
                    }
                }
            }
        }
    }
}

/// One atlas' keypoints for [`AtlasKeypoints::new`]: descriptors (`n × 64`, row-major),
/// world positions (mm), scales (mm) and labels (> 0).
pub type AtlasKeypointSet = (Vec<u8>, Vec<[f64; 3]>, Vec<f64>, Vec<i32>);

/// All matches of a test image to every atlas, concatenated in atlas order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AtlasMatches {
    /// Test keypoint of each match.
    pub query: Vec<u32>,
    /// Atlas of each match.
    pub atlas: Vec<u32>,
    /// Keypoint index within the atlas.
    pub index: Vec<u32>,
    /// The atlas keypoint's label.
    pub label: Vec<i32>,
    /// Squared descriptor distance.
    pub dist2: Vec<u32>,
    /// p(m): the KDE of the match's translation among its atlas' matches (mm⁻³).
    pub p: Vec<f64>,
    /// `x_test − x_atlas` (mm): the shift that moves the atlas onto the test image.
    pub shift: Vec<[f64; 3]>,
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[inline]
fn sq_dist(x: [f64; 3], y: [f64; 3]) -> f64 {
    let d = [x[0] - y[0], x[1] - y[1], x[2] - y[2]];
    d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
}

/// The two candidates closest to descriptor `qd` by (squared distance, index) among those
/// within the scale factor `f` of scale `sa`.
#[inline(always)]
fn best_two_by<D: Fn(usize) -> u32>(
    sa: f64,
    b: &KpSet,
    cand: &[u32],
    f: f64,
    dist: D,
) -> ((u32, u32), (u32, u32)) {
    let (mut b1, mut b2) = ((u32::MAX, u32::MAX), (u32::MAX, u32::MAX));
    for &c in cand {
        if !crate::matching::scale_ok(sa, b.scale[c as usize], f) {
            continue;
        }
        let d = dist(c as usize);
        if (d, c) < b1 {
            b2 = b1;
            b1 = (d, c);
        } else if (d, c) < b2 {
            b2 = (d, c);
        }
    }
    (b1, b2)
}

/// [`best_two_by`] with squared distances `|q|² + |b|² − 2 q·b` from an AVX2 dot product
/// (exact integers: every byte ≤ 127, so `maddubs` cannot saturate).
///
/// # Safety
/// AVX2 must be available; `qd` and every descriptor of `b` must have bytes ≤ 127.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn best_two_avx2(
    qd: &[u8],
    qn: u32,
    sa: f64,
    b: &KpSet,
    cand: &[u32],
    f: f64,
) -> ((u32, u32), (u32, u32)) {
    use std::arch::x86_64::*;
    let q0 = _mm256_loadu_si256(qd.as_ptr() as *const __m256i);
    let q1 = _mm256_loadu_si256(qd.as_ptr().add(32) as *const __m256i);
    let ones = _mm256_set1_epi16(1);
    best_two_by(sa, b, cand, f, |c| {
        let p = b.desc.as_ptr().add(c * crate::DESC_LEN);
        let b0 = _mm256_loadu_si256(p as *const __m256i);
        let b1 = _mm256_loadu_si256(p.add(32) as *const __m256i);
        let s = _mm256_add_epi32(
            _mm256_madd_epi16(_mm256_maddubs_epi16(b0, q0), ones),
            _mm256_madd_epi16(_mm256_maddubs_epi16(b1, q1), ones),
        );
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        let dot = _mm_cvtsi128_si32(s) as u32;
        qn + b.norm[c] - 2 * dot
    })
}

/// A squared distance (≥ 0, not NaN) and an index as one integer in (distance, index) order.
#[inline]
fn dist_key(d: f64, index: u32) -> u128 {
    ((d.to_bits() as u128) << 32) | index as u128
}

#[inline]
fn key_dist(key: u128) -> f64 {
    f64::from_bits((key >> 32) as u64)
}

/// First radius tried for a query's closest points: the previous query's radius plus this
/// fraction of the step between the two (1 always suffices; less usually does).
const TIGHT: f64 = 0.3;

/// Per-thread scratch of the re-matching.
#[derive(Default)]
struct Scratch {
    /// (squared distance, index) packed as `bits(d) << 32 | index`: d ≥ 0, so integer order
    /// is (distance, index) order.
    edge: Vec<u128>,
    cand: Vec<u32>,
}

impl KpSet {
    fn view(&self) -> crate::matching::KeypointView<'_> {
        crate::matching::KeypointView {
            desc: &self.desc,
            xyz: &self.xyz,
            scale: &self.scale,
        }
    }

    /// As [`Self::closest`], trying the balls of the given radii around `y` first (any
    /// radius is correct: a ball is used only when it provably holds the `keep` closest
    /// points, else the next radius, finally the full scan). Returns the `keep`-th
    /// smallest squared distance.
    fn closest_within(&self, y: [f64; 3], keep: usize, radii: &[f64], s: &mut Scratch) -> f64 {
        let nb = self.xyz.len();
        for &r in radii {
            if keep >= nb || !r.is_finite() {
                break;
            }
            // a little margin so rounding cannot drop a point at the boundary
            let r = r * (1.0 + 1e-9) + 1e-9;
            let r2 = r * r;
            s.edge.clear();
            self.grid.ball(y, r, r2, &mut s.edge);
            if s.edge.len() >= keep {
                s.edge.select_nth_unstable(keep - 1);
                let dk = key_dist(s.edge[keep - 1]);
                // every point left out is farther than r: exact when dk is clearly inside
                if dk < r2 * (1.0 - 1e-9) {
                    s.cand.clear();
                    s.cand.extend(s.edge[..keep].iter().map(|&e| e as u32));
                    return dk;
                }
            }
        }
        self.closest(y, keep, s)
    }

    /// `keep` atlas keypoints closest to `y` (ties by index), into `s.cand` (any order);
    /// returns the `keep`-th smallest squared distance (infinite when all are kept).
    fn closest(&self, y: [f64; 3], keep: usize, s: &mut Scratch) -> f64 {
        let nb = self.xyz.len();
        s.cand.clear();
        if keep >= nb {
            s.cand.extend(0..nb as u32);
            return f64::INFINITY;
        }
        s.edge.clear();
        s.edge.extend(
            self.xyz
                .iter()
                .enumerate()
                .map(|(c, &x)| dist_key(sq_dist(x, y), c as u32)),
        );
        s.edge.select_nth_unstable(keep - 1);
        s.cand.extend(s.edge[..keep].iter().map(|&e| e as u32));
        key_dist(s.edge[keep - 1])
    }
}

impl AtlasKeypoints {
    /// One entry per atlas: descriptors (`n × 64`, row-major), world positions (mm), scales
    /// (mm) and labels (> 0).
    pub fn new(sets: Vec<AtlasKeypointSet>) -> Result<Self> {
        if sets.is_empty() {
            return Err(KfError::InvalidArgument("no training keypoint sets".into()));
        }
        let mut out = Vec::with_capacity(sets.len());
        for (i, (desc, xyz, scale, label)) in sets.into_iter().enumerate() {
            let n = xyz.len();
            if desc.len() != n * crate::DESC_LEN || scale.len() != n || label.len() != n {
                return Err(KfError::InvalidArgument(format!(
                    "atlas {i}: descriptors, positions, scales and labels disagree in length"
                )));
            }
            if xyz.iter().flatten().any(|v| !v.is_finite())
                || scale.iter().any(|s| !(*s > 0.0 && s.is_finite()))
            {
                return Err(KfError::InvalidArgument(format!(
                    "atlas {i}: positions must be finite and scales positive"
                )));
            }
            if label.iter().any(|&l| l <= 0) {
                return Err(KfError::InvalidArgument(format!(
                    "atlas {i}: keypoint labels must be > 0 (drop background keypoints)"
                )));
            }
            let grid = Grid::new(&xyz);
            let norm = crate::knn::sq_norms(&desc);
            let small = desc.iter().all(|&v| v < 128);
            out.push(KpSet {
                desc,
                xyz,
                scale,
                label,
                grid,
                norm,
                small,
            });
        }
        Ok(AtlasKeypoints { sets: out })
    }

    /// Number of atlases.
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    /// True when there are no atlases (never, for a successfully built set).
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Keypoints of atlas `atlas`.
    pub fn n_keypoints(&self, atlas: usize) -> usize {
        self.sets.get(atlas).map_or(0, |s| s.xyz.len())
    }

    /// Match the test keypoints `a` to every atlas (see [`crate::matching::match_sets`])
    /// and concatenate the matches in atlas order.
    ///
    /// `hough_queries`: when > 0 and `a` has more keypoints, the Hough translation mode is
    /// voted by every ⌈n/hough_queries⌉-th test keypoint only (the first, unconstrained
    /// matching is the costliest step; the re-matching still covers every keypoint).
    /// With 0 the matches are exactly those of `match_sets`.
    pub fn match_all(
        &self,
        a: &crate::matching::KeypointView,
        p: &crate::matching::MatchParams,
        hough_queries: usize,
    ) -> Result<AtlasMatches> {
        crate::matching::check_params(p)?;
        let na = a.xyz.len();
        if a.desc.len() != na * crate::DESC_LEN || a.scale.len() != na {
            return Err(KfError::InvalidArgument(
                "test keypoints: descriptors, positions and scales disagree in length".into(),
            ));
        }
        if a.xyz.iter().flatten().any(|v| !v.is_finite())
            || a.scale.iter().any(|s| !(*s > 0.0 && s.is_finite()))
        {
            return Err(KfError::InvalidArgument(
                "test keypoints: positions must be finite and scales positive".into(),
            ));
        }
        let per: Vec<Vec<(u32, u32, u32)>> = self
            .sets
            .par_iter()
            .map(|b| self.match_one(a, b, p, hough_queries))
            .collect::<Result<_>>()?;
        let mut out = AtlasMatches::default();
        for (i, (pairs, b)) in per.iter().zip(&self.sets).enumerate() {
            let t = translations(pairs, a, b);
            out.p.extend(crate::matching::kde3(&t, p.kde_bandwidth));
            for (&(q, c, d), t) in pairs.iter().zip(&t) {
                out.query.push(q);
                out.atlas.push(i as u32);
                out.index.push(c);
                out.label.push(b.label[c as usize]);
                out.dist2.push(d);
                out.shift.push([-t[0], -t[1], -t[2]]);
            }
        }
        Ok(out)
    }

    /// (query, atlas keypoint, squared distance) of one atlas, as `match_sets` pairs them.
    fn match_one(
        &self,
        a: &crate::matching::KeypointView,
        b: &KpSet,
        p: &crate::matching::MatchParams,
        hough_queries: usize,
    ) -> Result<Vec<(u32, u32, u32)>> {
        crate::cancel::check()?;
        let (na, nb) = (a.xyz.len(), b.xyz.len());
        if na == 0 || nb == 0 {
            return Ok(Vec::new());
        }
        let f = p.scale_factor;
        let bv = b.view();
        // the Hough vote needs only a sample of the test keypoints: every stride-th
        let stride = if p.hough && hough_queries > 0 {
            na.div_ceil(hough_queries)
        } else {
            1
        };
        let qs: Vec<usize> = (0..na).step_by(stride).collect();
        let sub: Vec<u8> = if stride == 1 {
            Vec::new()
        } else {
            qs.iter()
                .flat_map(|&q| {
                    a.desc[q * crate::DESC_LEN..(q + 1) * crate::DESC_LEN]
                        .iter()
                        .copied()
                })
                .collect()
        };
        let qdesc = if stride == 1 { a.desc } else { &sub[..] };
        let nn = crate::knn::knn_exact(bv.desc, qdesc, 2, |i, c| {
            crate::matching::scale_ok(a.scale[qs[i]], b.scale[c as usize], f)
        })?;
        let pairs: Vec<(u32, u32, u32)> = (0..qs.len())
            .filter_map(|i| {
                let (i1, d1) = (nn.idx[2 * i], nn.dist2[2 * i]);
                (i1 != crate::knn::NONE
                    && crate::matching::ratio_ok(d1, nn.dist2[2 * i + 1], p.ratio))
                .then_some((qs[i] as u32, i1, d1))
            })
            .collect();
        if !p.hough || pairs.is_empty() {
            return Ok(pairs);
        }
        let t = translations(&pairs, a, b);
        let mode = crate::matching::hough_mode(&t, p.hough_sigma);
        let keep = ((p.keep_fraction * nb as f64).ceil() as usize).clamp(1, nb);
        // Queries in grid-cell order, in chunks: within a chunk the previous query's
        // keep-th distance plus the step between the two bounds the next one's radius
        // (triangle inequality), so each query scans only the cells near its ball.
        let y: Vec<[f64; 3]> = (0..na)
            .map(|q| {
                [
                    a.xyz[q][0] + mode[0],
                    a.xyz[q][1] + mode[1],
                    a.xyz[q][2] + mode[2],
                ]
            })
            .collect();
        let mut order: Vec<u32> = (0..na as u32).collect();
        order.sort_by_key(|&q| (b.grid.cell_of(y[q as usize]), q));
        let fast = b.small && has_avx2() && a.desc.iter().all(|&v| v < 128);
        let qnorm = if fast {
            crate::knn::sq_norms(a.desc)
        } else {
            Vec::new()
        };
        let mut found: Vec<(u32, Option<(u32, u32)>)> = order
            .par_chunks(32)
            .flat_map_iter(|chunk| {
                let mut s = Scratch::default();
                let mut prev: Option<([f64; 3], f64)> = None;
                chunk
                    .iter()
                    .map(|&q| {
                        let q = q as usize;
                        // a tight guess first, then the bound that always holds enough
                        let radii = match prev {
                            Some((yp, dk)) => {
                                let (rk, step) = (dk.sqrt(), sq_dist(y[q], yp).sqrt());
                                [rk + TIGHT * step, rk + step]
                            }
                            None => [f64::INFINITY; 2],
                        };
                        let dk = b.closest_within(y[q], keep, &radii, &mut s);
                        prev = Some((y[q], dk));
                        let qd = &a.desc[q * crate::DESC_LEN..(q + 1) * crate::DESC_LEN];
                        #[cfg(target_arch = "x86_64")]
                        let (b1, b2) = if fast {
                            // SAFETY: AVX2 detected and all bytes ≤ 127 (checked above)
                            unsafe { best_two_avx2(qd, qnorm[q], a.scale[q], b, &s.cand, f) }
                        } else {
                            best_two_by(a.scale[q], b, &s.cand, f, |c| {
                                crate::knn::dist2(qd, &b.desc[c * crate::DESC_LEN..])
                            })
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let (b1, b2) = best_two_by(a.scale[q], b, &s.cand, f, |c| {
                            crate::knn::dist2(qd, &b.desc[c * crate::DESC_LEN..])
                        });
                        let hit = (b1.1 != u32::MAX
                            && crate::matching::ratio_ok(b1.0, b2.0, p.ratio))
                        .then_some((b1.1, b1.0));
                        (q as u32, hit)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        found.sort_unstable_by_key(|e| e.0);
        let r: Vec<(u32, u32, u32)> = found
            .into_iter()
            .filter_map(|(q, hit)| hit.map(|(c, d)| (q, c, d)))
            .collect();
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::s;

    fn cube_atlas() -> (Array3<i32>, Array3<f32>) {
        let mut l = Array3::<i32>::zeros((12, 10, 9));
        l.slice_mut(s![3..7, 2..6, 1..5]).fill(2);
        l.slice_mut(s![8..10, 6..9, 5..8]).fill(5);
        let i = l.mapv(|v| v as f32 * 100.0);
        (l, i)
    }

    #[test]
    fn shifted_copy_is_reproduced_exactly() {
        let (l, i) = cube_atlas();
        let set = AtlasSet::new(&[l.view()], &[i.view()]).unwrap();
        assert_eq!(set.labels(), &[2, 5]);
        assert_eq!(set.organ_size(0, 2), 64);
        // the test image is the atlas moved by (1, 1, 2)
        let shift = [1, 1, 2];
        let mut test_l = Array3::<i32>::zeros((12, 10, 9));
        for ((z, y, x), &v) in l.indexed_iter() {
            let (zt, yt, xt) = (z + 1, y + 1, x + 2);
            if zt < 12 && yt < 10 && xt < 9 {
                test_l[[zt, yt, xt]] = v;
            }
        }
        let test_i = test_l.mapv(|v| v as f32 * 100.0);
        let t = [
            Transfer {
                atlas: 0,
                label: 2,
                shift,
                weight: 0.5,
            },
            Transfer {
                atlas: 0,
                label: 5,
                shift,
                weight: 2.0,
            },
            Transfer {
                atlas: 0,
                label: 2,
                shift,
                weight: 0.25,
            },
        ];
        let out = set.transfer(test_i.view(), &t, &[50.0], 0.15).unwrap();
        assert_eq!(out.labels, test_l);
        assert_eq!(out.n_groups, 2);
        assert_eq!(out.total_weight, vec![0.75, 2.0]);
        assert!((out.probabilities[[0, 4, 3, 3]] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn intensity_likelihood_and_background_rule() {
        let (l, i) = cube_atlas();
        let set = AtlasSet::new(&[l.view()], &[i.view()]).unwrap();
        // test intensities far from the atlas' organ intensity: weight ≈ 0 -> background
        let test = Array3::<f32>::from_elem((12, 10, 9), 1000.0);
        let t = [Transfer {
            atlas: 0,
            label: 2,
            shift: [0, 0, 0],
            weight: 1.0,
        }];
        let out = set.transfer(test.view(), &t, &[50.0], 0.15).unwrap();
        assert!(out.labels.iter().all(|&v| v == 0));
        // intensity term off: the organ is transferred whatever the intensities
        let out = set
            .transfer(test.view(), &t, &[f32::INFINITY], 0.15)
            .unwrap();
        assert_eq!(out.labels[[4, 3, 2]], 2);
        // one standard deviation away gives exp(-1/2)
        let test = i.mapv(|v| v + 50.0);
        let out = set.transfer(test.view(), &t, &[50.0, 50.0], 0.15).unwrap();
        let p = out.probabilities[[0, 4, 3, 2]];
        assert!((p - (-0.5f32).exp()).abs() < 2e-3, "{p}");
        // two weaker transfers disagreeing: the voxel covered by one of 10 is background
        let t = [
            Transfer {
                atlas: 0,
                label: 2,
                shift: [0, 0, 0],
                weight: 9.0,
            },
            Transfer {
                atlas: 0,
                label: 2,
                shift: [0, 0, 4],
                weight: 1.0,
            },
        ];
        let out = set.transfer(i.view(), &t, &[f32::INFINITY], 0.15).unwrap();
        assert_eq!(out.labels[[4, 3, 2]], 2);
        assert_eq!(out.labels[[4, 3, 7]], 0);
        assert!((out.probabilities[[0, 4, 3, 7]] - 0.1).abs() < 1e-6);
    }

    #[test]
    fn shifts_outside_the_grid_are_clipped() {
        let (l, i) = cube_atlas();
        let set = AtlasSet::new(&[l.view()], &[i.view()]).unwrap();
        let test = Array3::<f32>::zeros((5, 4, 3));
        let t = [
            Transfer {
                atlas: 0,
                label: 2,
                shift: [-4, -3, -2],
                weight: 1.0,
            },
            Transfer {
                atlas: 0,
                label: 5,
                shift: [100, -100, 7],
                weight: 1.0,
            },
        ];
        let out = set
            .transfer(test.view(), &t, &[f32::INFINITY], 0.15)
            .unwrap();
        // organ 2 spans z 3..7 -> -1..3, y 2..6 -> -1..3, x 1..5 -> -1..3
        assert_eq!(out.labels[[0, 0, 0]], 2);
        assert_eq!(out.labels[[2, 2, 2]], 2);
        assert_eq!(out.labels[[3, 0, 0]], 0);
        assert_eq!(out.labels.iter().filter(|&&v| v == 2).count(), 3 * 3 * 3);
    }

    #[test]
    fn deterministic_across_thread_counts() {
        let (l, i) = cube_atlas();
        let set = AtlasSet::new(&[l.view(), l.view()], &[i.view(), i.view()]).unwrap();
        let t: Vec<Transfer> = (0..200)
            .map(|k| Transfer {
                atlas: (k % 2) as u32,
                label: if k % 3 == 0 { 5 } else { 2 },
                shift: [k % 5 - 2, k % 7 - 3, k % 3 - 1],
                weight: 0.1 + (k as f64 * 0.37).sin().abs(),
            })
            .collect();
        let run = |threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| set.transfer(i.view(), &t, &[80.0], 0.15).unwrap())
        };
        let (a, b) = (run(1), run(4));
        assert_eq!(a.labels, b.labels);
        assert_eq!(
            a.probabilities
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            b.probabilities
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_inputs_are_rejected() {
        let (l, i) = cube_atlas();
        let small = Array3::<f32>::zeros((2, 2, 2));
        assert!(AtlasSet::new(&[l.view()], &[small.view()]).is_err());
        assert!(AtlasSet::new(&[], &[]).is_err());
        let neg = l.mapv(|v| -v);
        assert!(AtlasSet::new(&[neg.view()], &[i.view()]).is_err());
        let set = AtlasSet::new(&[l.view()], &[i.view()]).unwrap();
        let t = |atlas, label, weight| {
            [Transfer {
                atlas,
                label,
                shift: [0; 3],
                weight,
            }]
        };
        assert!(set.transfer(i.view(), &t(1, 2, 1.0), &[1.0], 0.15).is_err());
        assert!(set.transfer(i.view(), &t(0, 3, 1.0), &[1.0], 0.15).is_err());
        assert!(set
            .transfer(i.view(), &t(0, 2, f64::NAN), &[1.0], 0.15)
            .is_err());
        assert!(set
            .transfer(i.view(), &t(0, 2, 1.0), &[1.0, 2.0, 3.0], 0.15)
            .is_err());
        assert!(set.transfer(i.view(), &t(0, 2, 1.0), &[1.0], 1.5).is_err());
        let nan = i.mapv(|_| f32::NAN);
        assert!(set
            .transfer(nan.view(), &t(0, 2, 1.0), &[1.0], 0.15)
            .is_err());
    }

    fn random_set(n: usize, seed: u64) -> (Vec<u8>, Vec<[f64; 3]>, Vec<f64>) {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let desc: Vec<u8> = (0..n * crate::DESC_LEN)
            .map(|_| (next() % 64) as u8)
            .collect();
        // coarse positions so that distance ties occur
        let xyz: Vec<[f64; 3]> = (0..n)
            .map(|_| {
                [
                    (next() % 40) as f64 * 2.0,
                    (next() % 40) as f64 * 2.0,
                    (next() % 30) as f64 * 2.0,
                ]
            })
            .collect();
        let scale: Vec<f64> = (0..n).map(|_| 1.0 + (next() % 100) as f64 / 25.0).collect();
        (desc, xyz, scale)
    }

    #[test]
    fn match_all_equals_match_sets_per_atlas() {
        use crate::matching::{match_sets, KeypointView, MatchParams};
        let (qd, qx, qs) = random_set(300, 1);
        let a = KeypointView {
            desc: &qd,
            xyz: &qx,
            scale: &qs,
        };
        let atlases: Vec<_> = [(250, 2), (0, 3), (1, 4), (400, 5)]
            .iter()
            .map(|&(n, seed)| {
                let (d, x, s) = random_set(n, seed);
                let l = (0..n).map(|i| 1 + (i % 3) as i32).collect::<Vec<_>>();
                (d, x, s, l)
            })
            .collect();
        let set = AtlasKeypoints::new(atlases.clone()).unwrap();
        for (hough, keep) in [(true, 0.1), (true, 0.37), (true, 1.0), (false, 0.1)] {
            let p = MatchParams {
                hough,
                keep_fraction: keep,
                ..MatchParams::default()
            };
            let all = set.match_all(&a, &p, 0).unwrap();
            let mut k = 0;
            for (i, (d, x, s, l)) in atlases.iter().enumerate() {
                let b = KeypointView {
                    desc: d,
                    xyz: x,
                    scale: s,
                };
                let r = match_sets(&a, &b, &p).unwrap();
                let n = r.ia.len();
                assert_eq!(&all.query[k..k + n], &r.ia[..]);
                assert_eq!(&all.index[k..k + n], &r.ib[..]);
                assert!(all.atlas[k..k + n].iter().all(|&v| v == i as u32));
                for m in 0..n {
                    assert_eq!(all.label[k + m], l[r.ib[m] as usize]);
                    assert_eq!((all.dist2[k + m] as f64).sqrt(), r.distance[m]);
                    assert_eq!(all.p[k + m], r.p[m]);
                    let t = r.translation[m];
                    assert_eq!(all.shift[k + m], [-t[0], -t[1], -t[2]]);
                }
                k += n;
            }
            assert_eq!(k, all.query.len());
            assert!(k > 0);
        }
        // a Hough vote on a sample: same matches whenever it finds the same mode
        let p = MatchParams {
            hough: true,
            ..MatchParams::default()
        };
        let all = set.match_all(&a, &p, 1000).unwrap();
        assert_eq!(all, set.match_all(&a, &p, 0).unwrap());
        let sampled = set.match_all(&a, &p, 100).unwrap();
        assert!(!sampled.query.is_empty());
        // in atlas order, each atlas' queries ascending (at most one match per query)
        for k in 1..sampled.query.len() {
            let (a0, a1) = (sampled.atlas[k - 1], sampled.atlas[k]);
            assert!(a0 < a1 || (a0 == a1 && sampled.query[k - 1] < sampled.query[k]));
        }
        // bytes above 127: the portable distance kernel, same matches
        let wide: Vec<u8> = qd.iter().map(|&v| v * 3).collect();
        let aw = KeypointView {
            desc: &wide,
            xyz: &qx,
            scale: &qs,
        };
        let (d, x, s) = random_set(200, 11);
        let d: Vec<u8> = d.iter().map(|&v| v * 3).collect();
        let l = vec![1; 200];
        let set = AtlasKeypoints::new(vec![(d.clone(), x.clone(), s.clone(), l)]).unwrap();
        let all = set.match_all(&aw, &p, 0).unwrap();
        let b = KeypointView {
            desc: &d,
            xyz: &x,
            scale: &s,
        };
        let r = match_sets(&aw, &b, &p).unwrap();
        assert_eq!(all.query, r.ia);
        assert_eq!(all.index, r.ib);
        assert!(!r.ia.is_empty());
        // the same matches whatever the thread count, sampled Hough vote included
        let (d, x, s) = random_set(2000, 21);
        let l = vec![2; 2000];
        let big =
            AtlasKeypoints::new(vec![(d.clone(), x.clone(), s.clone(), l.clone()); 3]).unwrap();
        let (qd2, qx2, qs2) = random_set(1500, 22);
        let a2 = KeypointView {
            desc: &qd2,
            xyz: &qx2,
            scale: &qs2,
        };
        let run = |threads, hq| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| big.match_all(&a2, &p, hq).unwrap())
        };
        assert_eq!(run(1, 0), run(4, 0));
        assert_eq!(run(1, 500), run(3, 500));
        assert!(AtlasKeypoints::new(vec![]).is_err());
        let (d, x, s) = random_set(3, 9);
        assert!(AtlasKeypoints::new(vec![(d, x, s, vec![1, 0, 2])]).is_err());
    }

    #[test]
    fn voting_follows_the_descriptor_likelihood() {
        // keypoint 0: two weak matches to label 1 lose to a close match to label 2?
        // d² = 0 (lik 1) for label 2; d² = τ² (lik e^-1/2 ≈ 0.61) twice for label 1 -> 1.21
        let (l, c) = vote_labels(
            3,
            &[0, 0, 0, 2],
            &[1, 1, 2, 7],
            &[4.0, 4.0, 0.0, 9.0],
            &[1.0, 1.0, 1.0, 0.5],
        )
        .unwrap();
        assert_eq!(l, vec![1, 0, 7]);
        let e = (-0.5f64).exp();
        assert!((c[0] as f64 - 2.0 * e / (2.0 * e + 1.0)).abs() < 1e-6);
        assert_eq!(c[1], 0.0);
        assert_eq!(c[2], 1.0);
        // p(m) tips the balance
        let (l, _) = vote_labels(
            1,
            &[0, 0, 0],
            &[1, 1, 2],
            &[4.0, 4.0, 0.0],
            &[0.1, 0.1, 1.0],
        )
        .unwrap();
        assert_eq!(l, vec![2]);
        assert!(vote_labels(1, &[1], &[1], &[0.0], &[1.0]).is_err());
        assert!(vote_labels(1, &[0], &[0], &[0.0], &[1.0]).is_err());
        assert!(vote_labels(1, &[0], &[1], &[0.0], &[1.0, 2.0]).is_err());
    }
}
