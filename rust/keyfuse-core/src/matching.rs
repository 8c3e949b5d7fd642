//! Keypoint matching between two sets: nearest neighbours with Lowe's ratio test and a
//! scale gate, optional Hough translation voting with spatially constrained re-matching
//! (keypoint transfer, Wachinger et al.), p(m) by kernel density over the translations,
//! and a robust 3D similarity transform (RANSAC over Horn's closed-form fit).
//!
//! Everything here is deterministic: exact integer distances, ties broken by index,
//! RANSAC hypotheses drawn from per-iteration seeds and reduced with a total order.
// Index loops mirror the formulas; `!(x > 0.0)` is deliberate: it also rejects NaN.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

use crate::knn::{check_rows, dist2, knn_exact, SplitMix};
use crate::linalg::{norm2, sq_dist, sub, sym4_top_eigenvector};
use crate::{KfError, Result, DESC_LEN};
use rayon::prelude::*;

/// A keypoint set as the matcher sees it: descriptors (`n × 64`), world positions (mm)
/// and scales (mm).
#[derive(Clone, Copy)]
pub struct KeypointView<'a> {
    pub desc: &'a [u8],
    pub xyz: &'a [[f64; 3]],
    pub scale: &'a [f64],
}

impl<'a> KeypointView<'a> {
    /// The view of descriptors (`n × 64`, rows back to back), positions and scales.
    pub const fn new(desc: &'a [u8], xyz: &'a [[f64; 3]], scale: &'a [f64]) -> Self {
        KeypointView { desc, xyz, scale }
    }

    fn check(&self, name: &str) -> Result<usize> {
        let n = check_rows(name, self.desc)?;
        if self.xyz.len() != n || self.scale.len() != n {
            return Err(KfError::InvalidArgument(format!(
                "{name}: descriptors, positions and scales disagree in length"
            )));
        }
        if self.xyz.iter().flatten().any(|v| !v.is_finite())
            || self.scale.iter().any(|s| !(*s > 0.0 && s.is_finite()))
        {
            return Err(KfError::InvalidArgument(format!(
                "{name}: positions must be finite and scales positive"
            )));
        }
        Ok(n)
    }
}

/// Matching parameters (defaults from keypoint transfer: ratio 0.9, scale factor 2).
#[derive(Clone, Debug)]
pub struct MatchParams {
    /// Lowe ratio: keep when d1/d2 ≤ ratio (distances, not squared). 1 keeps every match.
    pub ratio: f64,
    /// Candidates must have a scale within this factor of the query's (≥ 1; ∞ disables).
    pub scale_factor: f64,
    /// Hough translation voting + spatially constrained re-matching.
    pub hough: bool,
    /// Hough bin width and smoothing σ (mm).
    pub hough_sigma: f64,
    /// Re-matching keeps this fraction of B's keypoints closest to the predicted position.
    pub keep_fraction: f64,
    /// Bandwidth (mm) of the Gaussian KDE over translations that gives p(m).
    pub kde_bandwidth: f64,
}

impl Default for MatchParams {
    fn default() -> Self {
        MatchParams {
            ratio: 0.9,
            scale_factor: 2.0,
            hough: false,
            hough_sigma: 3.0,
            keep_fraction: 0.1,
            kde_bandwidth: 3.0,
        }
    }
}

/// Matches from A to B (at most one per A keypoint).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MatchResult {
    pub ia: Vec<u32>,
    pub ib: Vec<u32>,
    /// Euclidean descriptor distance.
    pub distance: Vec<f64>,
    /// `b.xyz[ib] − a.xyz[ia]` (mm).
    pub translation: Vec<[f64; 3]>,
    /// Leave-one-out Gaussian KDE of each translation among the other matches (density in
    /// mm⁻³; 0 for a lone match).
    pub p: Vec<f64>,
    /// The Hough mode (mm) when voting was used and found one.
    pub mode: Option<[f64; 3]>,
}

pub(crate) fn check_params(p: &MatchParams) -> Result<()> {
    let ok = p.ratio > 0.0
        && p.ratio <= 1.0
        && p.scale_factor >= 1.0
        && p.hough_sigma > 0.0
        && p.hough_sigma.is_finite()
        && p.keep_fraction > 0.0
        && p.keep_fraction <= 1.0
        && p.kde_bandwidth > 0.0
        && p.kde_bandwidth.is_finite();
    if !ok {
        return Err(KfError::InvalidArgument(
            "match needs 0 < ratio ≤ 1, scale_factor ≥ 1, 0 < keep_fraction ≤ 1 and positive \
             finite hough_sigma / kde_bandwidth"
                .into(),
        ));
    }
    Ok(())
}

#[inline]
pub(crate) fn scale_ok(sa: f64, sb: f64, f: f64) -> bool {
    let r = sb / sa;
    r <= f && r * f >= 1.0
}

/// Ratio test on the two best squared distances.
#[inline]
pub(crate) fn ratio_ok(d1: u32, d2: u32, ratio: f64) -> bool {
    d2 == u32::MAX || (d1 as f64) <= ratio * ratio * d2 as f64
}

/// Match every keypoint of `a` to `b` (see [`MatchParams`]).
pub fn match_sets(a: &KeypointView, b: &KeypointView, p: &MatchParams) -> Result<MatchResult> {
    check_params(p)?;
    let na = a.check("a")?;
    let nb = b.check("b")?;
    if na == 0 || nb == 0 {
        return Ok(MatchResult::default());
    }
    let f = p.scale_factor;
    let nn = knn_exact(b.desc, a.desc, 2, |q, c| {
        scale_ok(a.scale[q], b.scale[c as usize], f)
    })?;
    let mut pairs: Vec<(u32, u32, u32)> = (0..na)
        .filter_map(|q| {
            let (i1, d1) = (nn.idx[2 * q], nn.dist2[2 * q]);
            (i1 != crate::knn::NONE && ratio_ok(d1, nn.dist2[2 * q + 1], p.ratio))
                .then_some((q as u32, i1, d1))
        })
        .collect();
    let mut mode = None;
    if p.hough && !pairs.is_empty() {
        let t: Vec<[f64; 3]> = pairs
            .iter()
            .map(|&(q, c, _)| sub(b.xyz[c as usize], a.xyz[q as usize]))
            .collect();
        let m = hough_mode(&t, p.hough_sigma);
        mode = Some(m);
        pairs = rematch(a, b, m, p);
    }
    let translation: Vec<[f64; 3]> = pairs
        .iter()
        .map(|&(q, c, _)| sub(b.xyz[c as usize], a.xyz[q as usize]))
        .collect();
    let pm = kde3(&translation, p.kde_bandwidth);
    Ok(MatchResult {
        ia: pairs.iter().map(|x| x.0).collect(),
        ib: pairs.iter().map(|x| x.1).collect(),
        distance: pairs.iter().map(|x| (x.2 as f64).sqrt()).collect(),
        translation,
        p: pm,
        mode,
    })
}

/// The mode of a set of translations: a sparse histogram (bins of σ) smoothed by a Gaussian
/// of σ over ±2 bins, then mean-shift refinement from the best bin.
pub fn hough_mode(t: &[[f64; 3]], sigma: f64) -> [f64; 3] {
    let (k, _) = densest_bin(t, sigma);
    let mut m = [
        (k[0] as f64 + 0.5) * sigma,
        (k[1] as f64 + 0.5) * sigma,
        (k[2] as f64 + 0.5) * sigma,
    ];
    for _ in 0..20 {
        let (mut w, mut acc) = (0.0, [0.0; 3]);
        for &v in t {
            let g = (-0.5 * sq_dist(v, m) / (sigma * sigma)).exp();
            w += g;
            for d in 0..3 {
                acc[d] += g * v[d];
            }
        }
        if w <= 0.0 {
            break;
        }
        let next = [acc[0] / w, acc[1] / w, acc[2] / w];
        let step = sq_dist(next, m);
        m = next;
        if step < 1e-8 * sigma * sigma {
            break;
        }
    }
    m
}

/// The occupied bins of width σ with their counts, sorted by key (no hash order:
/// deterministic).
fn count_bins(t: &[[f64; 3]], sigma: f64) -> Vec<([i64; 3], f64)> {
    let key = |v: [f64; 3]| -> [i64; 3] {
        [
            (v[0] / sigma).floor() as i64,
            (v[1] / sigma).floor() as i64,
            (v[2] / sigma).floor() as i64,
        ]
    };
    let mut keys: Vec<[i64; 3]> = t.iter().map(|&v| key(v)).collect();
    keys.sort_unstable();
    let mut bins: Vec<([i64; 3], f64)> = Vec::new();
    for k in keys {
        match bins.last_mut() {
            Some((lk, c)) if *lk == k => *c += 1.0,
            _ => bins.push((k, 1.0)),
        }
    }
    bins
}

/// The bin (of width σ) with the largest count smoothed by a Gaussian of σ over ±2 bins,
/// and that smoothed count (the first such bin in key order on ties).
fn densest_bin(t: &[[f64; 3]], sigma: f64) -> ([i64; 3], f64) {
    let bins = count_bins(t, sigma);
    // the smoothing weight exp(−|δ|²/2) of a neighbour bin by its squared offset (≤ 12)
    let weight: [f64; 13] = std::array::from_fn(|s| (-0.5 * s as f64).exp());
    // For each of the 25 (dx, dy) offsets, the first bin at or after (x+dx, y+dy, z−2):
    // it only moves forward as the bins are visited in order, and the bins up to
    // (x+dx, y+dy, z+2) follow it, so every neighbour is found by a short forward walk
    // (in the same (dx, dy, dz) order as a search per neighbour: the same sum).
    let mut first = [0usize; 25];
    let mut best = (f64::MIN, 0usize);
    for (i, (k, _)) in bins.iter().enumerate() {
        let mut s = 0.0;
        let mut slot = 0;
        for dx in -2i64..=2 {
            for dy in -2i64..=2 {
                let lo = [k[0] + dx, k[1] + dy, k[2] - 2];
                let mut j = first[slot];
                while j < bins.len() && bins[j].0 < lo {
                    j += 1;
                }
                first[slot] = j;
                slot += 1;
                while let Some(&(nk, c)) = bins.get(j) {
                    if nk[0] != lo[0] || nk[1] != lo[1] || nk[2] > k[2] + 2 {
                        break;
                    }
                    let dz = nk[2] - k[2];
                    s += c * weight[(dx * dx + dy * dy + dz * dz) as usize];
                    j += 1;
                }
            }
        }
        if s > best.0 {
            best = (s, i);
        }
    }
    (bins[best.1].0, best.0)
}

/// Re-match with the spatial constraint: for each A keypoint, only the `keep_fraction`
/// of B keypoints nearest to `x_a + mode` are candidates; ratio and scale tests as before.
fn rematch(
    a: &KeypointView,
    b: &KeypointView,
    mode: [f64; 3],
    p: &MatchParams,
) -> Vec<(u32, u32, u32)> {
    let nb = b.desc.len() / DESC_LEN;
    let keep = ((p.keep_fraction * nb as f64).ceil() as usize).clamp(1, nb);
    (0..a.desc.len() / DESC_LEN)
        .into_par_iter()
        .map_init(Vec::new, |near: &mut Vec<(f64, u32)>, q| {
            let y = [
                a.xyz[q][0] + mode[0],
                a.xyz[q][1] + mode[1],
                a.xyz[q][2] + mode[2],
            ];
            near.clear();
            near.extend((0..nb).map(|c| (sq_dist(b.xyz[c], y), c as u32)));
            if keep < nb {
                near.select_nth_unstable_by(keep - 1, |x, z| {
                    x.0.total_cmp(&z.0).then(x.1.cmp(&z.1))
                });
                near.truncate(keep);
            }
            let qd = &a.desc[q * DESC_LEN..(q + 1) * DESC_LEN];
            let (mut b1, mut b2) = ((u32::MAX, u32::MAX), (u32::MAX, u32::MAX));
            for &(_, c) in near.iter() {
                if !scale_ok(a.scale[q], b.scale[c as usize], p.scale_factor) {
                    continue;
                }
                let d = dist2(qd, &b.desc[c as usize * DESC_LEN..]);
                if (d, c) < b1 {
                    b2 = b1;
                    b1 = (d, c);
                } else if (d, c) < b2 {
                    b2 = (d, c);
                }
            }
            (b1.1 != u32::MAX && ratio_ok(b1.0, b2.0, p.ratio)).then_some((q as u32, b1.1, b1.0))
        })
        .flatten()
        .collect()
}

/// Leave-one-out Gaussian kernel density (mm⁻³) of each point among the *other* points:
/// a point's own kernel is left out, so a lone translation gets ~0 however few points
/// there are, and only agreement with other matches raises it. A single point gets 0.
pub fn kde3(t: &[[f64; 3]], h: f64) -> Vec<f64> {
    let n = t.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let KdeWindows {
        order,
        xs,
        norm,
        cut,
    } = KdeWindows::new(t, h);
    (0..n)
        .into_par_iter()
        .map(|i| {
            let lo = xs.partition_point(|&x| x < t[i][0] - cut);
            let hi = xs.partition_point(|&x| x <= t[i][0] + cut);
            let s: f64 = order[lo..hi]
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| (-0.5 * sq_dist(t[i], t[j]) / (h * h)).exp())
                .sum();
            s * norm
        })
        .collect()
}

/// What [`kde3`] and its pairwise twin share: the points sorted by (x, index), so that
/// only those within `cut` = 5h along x are visited, their sorted x and the density's
/// normalisation for `n ≥ 2` points.
pub(crate) struct KdeWindows {
    pub order: Vec<usize>,
    pub xs: Vec<f64>,
    pub norm: f64,
    pub cut: f64,
}

impl KdeWindows {
    pub(crate) fn new(t: &[[f64; 3]], h: f64) -> Self {
        let n = t.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&i, &j| t[i][0].total_cmp(&t[j][0]).then(i.cmp(&j)));
        let xs: Vec<f64> = order.iter().map(|&i| t[i][0]).collect();
        let norm = 1.0 / ((2.0 * std::f64::consts::PI).powf(1.5) * h * h * h * (n - 1) as f64);
        KdeWindows {
            order,
            xs,
            norm,
            cut: 5.0 * h,
        }
    }
}

/// A 3D similarity transform `y = s·R·x + t`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Similarity {
    pub r: [[f64; 3]; 3],
    pub s: f64,
    pub t: [f64; 3],
}

impl Similarity {
    pub fn apply(&self, x: [f64; 3]) -> [f64; 3] {
        let mut y = self.t;
        for (i, yi) in y.iter_mut().enumerate() {
            *yi += self.s * (self.r[i][0] * x[0] + self.r[i][1] * x[1] + self.r[i][2] * x[2]);
        }
        y
    }
    /// The 4×4 homogeneous matrix, row-major.
    pub fn matrix(&self) -> [[f64; 4]; 4] {
        let mut m = [[0.0; 4]; 4];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] = self.s * self.r[i][j];
            }
            m[i][3] = self.t[i];
        }
        m[3][3] = 1.0;
        m
    }
}

/// Least-squares similarity from point pairs (Horn's unit-quaternion method; the scale
/// is Umeyama's `Σ y'·R x' / Σ |x'|²`). `None` when the points are degenerate.
pub fn fit_similarity(src: &[[f64; 3]], dst: &[[f64; 3]], with_scale: bool) -> Option<Similarity> {
    let n = src.len();
    if n < 3 || dst.len() != n {
        return None;
    }
    let mean = |p: &[[f64; 3]]| {
        let mut m = [0.0; 3];
        for v in p {
            for d in 0..3 {
                m[d] += v[d] / n as f64;
            }
        }
        m
    };
    let (ms, md) = (mean(src), mean(dst));
    let mut sm = [[0.0; 3]; 3];
    let mut var = 0.0;
    for (x, y) in src.iter().zip(dst) {
        let (xc, yc) = (sub(*x, ms), sub(*y, md));
        var += norm2(xc);
        for i in 0..3 {
            for j in 0..3 {
                sm[i][j] += xc[i] * yc[j];
            }
        }
    }
    if !(var > 1e-12) {
        return None;
    }
    let [[sxx, sxy, sxz], [syx, syy, syz], [szx, szy, szz]] = sm;
    let nmat = [
        [sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
        [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
        [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
        [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz],
    ];
    let [q0, qx, qy, qz] = sym4_top_eigenvector(nmat);
    let qn = (q0 * q0 + qx * qx + qy * qy + qz * qz).sqrt();
    if !(qn > 0.0) {
        return None;
    }
    let (q0, qx, qy, qz) = (q0 / qn, qx / qn, qy / qn, qz / qn);
    let r = [
        [
            q0 * q0 + qx * qx - qy * qy - qz * qz,
            2.0 * (qx * qy - q0 * qz),
            2.0 * (qx * qz + q0 * qy),
        ],
        [
            2.0 * (qy * qx + q0 * qz),
            q0 * q0 - qx * qx + qy * qy - qz * qz,
            2.0 * (qy * qz - q0 * qx),
        ],
        [
            2.0 * (qz * qx - q0 * qy),
            2.0 * (qz * qy + q0 * qx),
            q0 * q0 - qx * qx - qy * qy + qz * qz,
        ],
    ];
    let s = if with_scale {
        let mut num = 0.0;
        for (x, y) in src.iter().zip(dst) {
            let (xc, yc) = (sub(*x, ms), sub(*y, md));
            for i in 0..3 {
                num += yc[i] * (r[i][0] * xc[0] + r[i][1] * xc[1] + r[i][2] * xc[2]);
            }
        }
        num / var
    } else {
        1.0
    };
    if !(s > 0.0 && s.is_finite()) {
        return None;
    }
    let mut t = md;
    for i in 0..3 {
        t[i] -= s * (r[i][0] * ms[0] + r[i][1] * ms[1] + r[i][2] * ms[2]);
    }
    Some(Similarity { r, s, t })
}

/// RANSAC parameters for [`ransac_similarity`].
#[derive(Clone, Debug)]
pub struct AlignParams {
    pub iterations: usize,
    /// A pair is an inlier when `‖T(x) − y‖ ≤ inlier_mm`.
    pub inlier_mm: f64,
    /// Hypotheses with a scale outside [1/max_scale, max_scale] are rejected.
    pub max_scale: f64,
    pub with_scale: bool,
    pub seed: u64,
}

impl Default for AlignParams {
    fn default() -> Self {
        AlignParams {
            iterations: 4000,
            inlier_mm: 5.0,
            max_scale: 2.0,
            with_scale: true,
            seed: 0x616c_6967_6e21,
        }
    }
}

/// A robust similarity from putative correspondences `src[i] → dst[i]`.
#[derive(Clone, Debug)]
pub struct AlignResult {
    pub transform: Similarity,
    pub inliers: Vec<bool>,
    pub rmse: f64,
}

fn msac_cost(tr: &Similarity, src: &[[f64; 3]], dst: &[[f64; 3]], thr2: f64) -> f64 {
    src.iter()
        .zip(dst)
        .map(|(x, y)| sq_dist(tr.apply(*x), *y).min(thr2))
        .sum()
}

/// RANSAC (MSAC cost) over minimal 3-point samples, then iterated least squares on the
/// inliers. Hypotheses are scored in parallel and reduced by (cost, iteration): the result
/// does not depend on the thread count.
pub fn ransac_similarity(
    src: &[[f64; 3]],
    dst: &[[f64; 3]],
    p: &AlignParams,
) -> Result<AlignResult> {
    let n = src.len();
    if dst.len() != n {
        return Err(KfError::InvalidArgument(
            "src and dst differ in length".into(),
        ));
    }
    if !(p.inlier_mm > 0.0) || !(p.max_scale >= 1.0) || p.iterations == 0 {
        return Err(KfError::InvalidArgument(
            "align needs inlier_mm > 0, max_scale ≥ 1 and iterations ≥ 1".into(),
        ));
    }
    if src.iter().chain(dst).flatten().any(|v| !v.is_finite()) {
        return Err(KfError::InvalidArgument(
            "non-finite point coordinates".into(),
        ));
    }
    if n < 3 {
        return Err(KfError::InvalidArgument(format!(
            "a similarity transform needs at least 3 matches, found {n}"
        )));
    }
    let thr2 = p.inlier_mm * p.inlier_mm;
    let scale_ok = |t: &Similarity| t.s <= p.max_scale && t.s * p.max_scale >= 1.0;
    let best = (0..p.iterations)
        .into_par_iter()
        .filter_map(|it| {
            let mut rng = SplitMix(p.seed ^ (it as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let i = rng.below(n);
            let mut j = rng.below(n - 1);
            if j >= i {
                j += 1;
            }
            let mut k = rng.below(n - 2);
            for m in [i.min(j), i.max(j)] {
                if k >= m {
                    k += 1;
                }
            }
            let (a, b, c) = (src[i], src[j], src[k]);
            let (u, v) = (sub(b, a), sub(c, a));
            let cr = [
                u[1] * v[2] - u[2] * v[1],
                u[2] * v[0] - u[0] * v[2],
                u[0] * v[1] - u[1] * v[0],
            ];
            if norm2(cr) < 1e-6 * norm2(u) * norm2(v) + 1e-12 {
                return None; // (nearly) collinear sample
            }
            let tr = fit_similarity(&[a, b, c], &[dst[i], dst[j], dst[k]], p.with_scale)?;
            if !scale_ok(&tr) {
                return None;
            }
            Some((msac_cost(&tr, src, dst, thr2), it, tr))
        })
        .min_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let Some((_, _, mut tr)) = best else {
        return Err(KfError::InvalidArgument(
            "no valid similarity hypothesis (degenerate or too few matches)".into(),
        ));
    };
    let inl = |tr: &Similarity| -> Vec<bool> {
        src.iter()
            .zip(dst)
            .map(|(x, y)| sq_dist(tr.apply(*x), *y) <= thr2)
            .collect()
    };
    let mut inliers = inl(&tr);
    for _ in 0..10 {
        let (s, d): (Vec<[f64; 3]>, Vec<[f64; 3]>) = src
            .iter()
            .zip(dst)
            .zip(&inliers)
            .filter(|(_, &k)| k)
            .map(|((x, y), _)| (*x, *y))
            .unzip();
        let Some(next) = fit_similarity(&s, &d, p.with_scale) else {
            break;
        };
        if !scale_ok(&next) {
            break;
        }
        let ni = inl(&next);
        if ni.iter().filter(|&&k| k).count() < inliers.iter().filter(|&&k| k).count() {
            break;
        }
        let same = ni == inliers;
        tr = next;
        inliers = ni;
        if same {
            break;
        }
    }
    let (mut sse, mut cnt) = (0.0, 0usize);
    for ((x, y), &k) in src.iter().zip(dst).zip(&inliers) {
        if k {
            sse += sq_dist(tr.apply(*x), *y);
            cnt += 1;
        }
    }
    Ok(AlignResult {
        transform: tr,
        inliers,
        rmse: if cnt > 0 {
            (sse / cnt as f64).sqrt()
        } else {
            f64::NAN
        },
    })
}

#[cfg(test)]
mod tests;
