//! Map transfer: the training label maps as x-runs, and the weighted, shifted sum of whole
//! organ maps onto a test grid ([`AtlasSet::transfer`]).

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

/// How [`AtlasSet::transfer_with`] turns the summed transfer weights into labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackgroundRule {
    /// Each label's sums divided by the total weight transferred for that label (the
    /// share of its transfers covering the voxel); background where the best share is
    /// below the fraction.
    #[default]
    PerLabel,
    /// Arg-max of the summed weights; background where the best sum is below the
    /// fraction of the largest sum anywhere (any label): Wachinger et al.'s rule.
    MaxVote,
}

/// The result of [`AtlasSet::transfer`].
#[derive(Debug, Clone)]
pub struct TransferResult {
    /// Per voxel label (0 = background), on the test grid.
    pub labels: Array3<i32>,
    /// `(n_labels, Z, Y, X)`: the summed transfer weight at each voxel divided by the total
    /// weight transferred for that label ([`BackgroundRule::PerLabel`]) or by the largest
    /// sum ([`BackgroundRule::MaxVote`]), in `[0, 1]`, in the order of [`AtlasSet::labels`].
    pub probabilities: Array4<f32>,
    /// Total weight transferred per label.
    pub total_weight: Vec<f64>,
    /// Number of distinct (atlas, organ, shift) groups accumulated.
    pub n_groups: usize,
}

/// exp(−u) ≈ (1 + u/256)^−256: eight squarings and a division, which the compiler
/// vectorises, unlike `expf` or a table lookup (see docs/decisions.md). Relative error
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
        self.transfer_with(
            image,
            transfers,
            nu,
            background_fraction,
            BackgroundRule::PerLabel,
        )
    }

    /// [`Self::transfer`] with a choice of [`BackgroundRule`].
    pub fn transfer_with(
        &self,
        image: ArrayView3<f32>,
        transfers: &[Transfer],
        nu: &[f32],
        background_fraction: f32,
        rule: BackgroundRule,
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

        // normalise (per label, or by the largest vote), then argmax with the background rule
        let inv: Vec<f32> = match rule {
            BackgroundRule::PerLabel => total_weight
                .iter()
                .map(|&w| if w > 0.0 { (1.0 / w) as f32 } else { 0.0 })
                .collect(),
            BackgroundRule::MaxVote => {
                let top = acc.par_iter().copied().reduce(|| 0.0f32, f32::max);
                vec![if top > 0.0 { 1.0 / top } else { 0.0 }; n_labels]
            }
        };
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

/// Turn [`TransferResult::probabilities`] (`(n_labels, Z, Y, X)`, each label's share) into
/// a posterior in place: every voxel's labels divided by `max(1, Σ_l p_l)`, so they sum
/// to at most 1 (background the rest). The sum runs over the labels in order in f32,
/// as numpy's `p / np.maximum(p.sum(axis=0), 1)` does, so the values are the same bits;
/// parallel over voxels.
pub fn posterior_in_place(probabilities: &mut Array4<f32>) {
    let n_labels = probabilities.shape()[0];
    let n_vox: usize = probabilities.shape()[1..].iter().product();
    if n_labels == 0 || n_vox == 0 {
        return;
    }
    if !probabilities.is_standard_layout() {
        *probabilities = probabilities.as_standard_layout().into_owned();
    }
    let p = probabilities.as_slice_mut().expect("standard layout");
    const BLOCK: usize = 1 << 14;
    let denom: Vec<f32> = {
        let p = &*p;
        (0..n_vox)
            .into_par_iter()
            .with_min_len(BLOCK)
            .map(|v| {
                let mut s = p[v];
                for l in 1..n_labels {
                    s += p[l * n_vox + v];
                }
                s.max(1.0)
            })
            .collect()
    };
    p.par_chunks_mut(n_vox).for_each(|label| {
        label
            .par_chunks_mut(BLOCK)
            .zip(denom.par_chunks(BLOCK))
            .for_each(|(x, d)| {
                for (x, &d) in x.iter_mut().zip(d) {
                    *x /= d;
                }
            });
    });
}
