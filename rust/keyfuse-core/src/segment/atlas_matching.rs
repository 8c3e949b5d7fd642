//! Atlas matching: a test image's keypoints against every atlas' keypoints at once, with
//! exactly the matches of [`crate::matching::match_sets`] per atlas
//! ([`AtlasKeypoints::match_all`]).

use super::grid::{Grid, Near};
use crate::linalg::sq_dist;
use crate::{KfError, Result};
use rayon::prelude::*;

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

/// Fold candidate `c` at squared descriptor distance `d` into the two best `(b1, b2)` by
/// (distance, index), among candidates within the scale factor `f` of scale `sa`. The
/// scale test runs only for a candidate that would enter (few do), and the result does
/// not depend on the order in which candidates are folded.
#[inline(always)]
fn fold_best_two(
    best: &mut ((u32, u32), (u32, u32)),
    d: u32,
    c: u32,
    sa: f64,
    scale: &[f64],
    f: f64,
) {
    if (d, c) < best.1 && crate::matching::scale_ok(sa, scale[c as usize], f) {
        if (d, c) < best.0 {
            best.1 = best.0;
            best.0 = (d, c);
        } else {
            best.1 = (d, c);
        }
    }
}

const NO_BEST: ((u32, u32), (u32, u32)) = ((u32::MAX, u32::MAX), (u32::MAX, u32::MAX));

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
    let mut best = NO_BEST;
    for &c in cand {
        fold_best_two(&mut best, dist(c as usize), c, sa, &b.scale, f);
    }
    best
}

/// [`best_two_by`] with squared distances `|q|² + |b|² − 2 q·b` from AVX2 dot products,
/// four candidates at a time (exact integers: every byte ≤ 127, so `maddubs` cannot
/// saturate).
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
    use crate::simd::{dot64_avx2, hsum_epi32_256};
    use std::arch::x86_64::*;
    let q0 = _mm256_loadu_si256(qd.as_ptr() as *const __m256i);
    let q1 = _mm256_loadu_si256(qd.as_ptr().add(32) as *const __m256i);
    let ones = _mm256_set1_epi16(1);
    let desc = b.desc.as_ptr();
    let dot = |c: u32| {
        let p = desc.add(c as usize * crate::DESC_LEN);
        let b0 = _mm256_loadu_si256(p as *const __m256i);
        let b1 = _mm256_loadu_si256(p.add(32) as *const __m256i);
        dot64_avx2!(b0, b1, q0, q1, ones)
    };
    let mut best = NO_BEST;
    let quads = cand.chunks_exact(4);
    let rest = quads.remainder();
    let qn4 = _mm_set1_epi32(qn as i32);
    for c in quads {
        // four rows' eight partial sums each, reduced together: lane k holds row k's dot
        let h01 = _mm256_hadd_epi32(dot(c[0]), dot(c[1]));
        let h23 = _mm256_hadd_epi32(dot(c[2]), dot(c[3]));
        let h = _mm256_hadd_epi32(h01, h23);
        let dots = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        let norms = _mm_setr_epi32(
            b.norm[c[0] as usize] as i32,
            b.norm[c[1] as usize] as i32,
            b.norm[c[2] as usize] as i32,
            b.norm[c[3] as usize] as i32,
        );
        let d = _mm_sub_epi32(_mm_add_epi32(qn4, norms), _mm_slli_epi32(dots, 1));
        let mut out = [0u32; 4];
        _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, d);
        for k in 0..4 {
            fold_best_two(&mut best, out[k], c[k], sa, &b.scale, f);
        }
    }
    for &c in rest {
        let d = qn + b.norm[c as usize] - 2 * hsum_epi32_256!(dot(c));
        fold_best_two(&mut best, d, c, sa, &b.scale, f);
    }
    best
}

/// First radius tried for a query's closest points: the previous query's radius plus this
/// fraction of the step between the two (1 always suffices; less usually does).
const TIGHT: f64 = 0.3;

/// Queries per task of the re-matching: each task's first query scans every atlas
/// keypoint, the others only the cells near their ball.
const CHUNK: usize = 64;

/// Per-thread scratch of the re-matching.
#[derive(Default)]
struct Scratch {
    near: Near,
    cand: Vec<u32>,
}

impl KpSet {
    fn view(&self) -> crate::matching::KeypointView<'_> {
        crate::matching::KeypointView::new(&self.desc, &self.xyz, &self.scale)
    }

    /// The `keep` atlas keypoints closest to `y` (ties by index) into `s.cand` (any order);
    /// returns the `keep`-th smallest squared distance (infinite when all are kept).
    /// Balls of the given radii around `y` are tried first (any radius is correct: a ball
    /// is used only when it provably holds the `keep` closest points), then every point.
    fn closest_within(&self, y: [f64; 3], keep: usize, radii: &[f64], s: &mut Scratch) -> f64 {
        let nb = self.xyz.len();
        if keep >= nb {
            s.cand.clear();
            s.cand.extend(0..nb as u32);
            return f64::INFINITY;
        }
        for &r in radii {
            if !r.is_finite() {
                break;
            }
            // a little margin so rounding cannot drop a point at the boundary
            let r = r * (1.0 + 1e-9) + 1e-9;
            let r2 = r * r;
            self.grid.ball(y, r, r2, &mut s.near);
            // every point left out is farther than r: exact when dk is clearly inside
            match s.near.select(&self.grid, keep, r2, &mut s.cand) {
                Some(dk) if dk < r2 * (1.0 - 1e-9) => return dk,
                _ => {}
            }
        }

        let top = self.grid.all(y, &mut s.near);
        s.near
            .select(&self.grid, keep, top, &mut s.cand)
            .expect("keep < every keypoint")
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
        // each atlas' matches, translations and p(m) in one task (the densities of
        // different atlases are independent)
        type PerAtlas = (Vec<(u32, u32, u32)>, Vec<[f64; 3]>, Vec<f64>);
        let per: Vec<PerAtlas> = self
            .sets
            .par_iter()
            .map(|b| {
                let pairs = self.match_one(a, b, p, hough_queries)?;
                let t = translations(&pairs, a, b);
                let pm = kde3_pairs(&t, p.kde_bandwidth);
                Ok((pairs, t, pm))
            })
            .collect::<Result<_>>()?;
        let mut out = AtlasMatches::default();
        for (i, ((pairs, t, pm), b)) in per.iter().zip(&self.sets).enumerate() {
            out.p.extend_from_slice(pm);
            for (&(q, c, d), t) in pairs.iter().zip(t) {
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
        // grid-cell order; within a cell, queries at the same position next to each other
        // (several oriented rows share a keypoint's position): they share the candidates
        let mut order: Vec<u32> = (0..na as u32).collect();
        let key: Vec<(usize, [u64; 3])> = y
            .iter()
            .map(|&v| (b.grid.cell_of(v), v.map(f64::to_bits)))
            .collect();
        order.sort_unstable_by_key(|&q| (key[q as usize], q));
        let fast = b.small && crate::simd::has_avx2() && a.desc.iter().all(|&v| v < 128);
        let qnorm = if fast {
            crate::knn::sq_norms(a.desc)
        } else {
            Vec::new()
        };
        let best_two = |q: usize, cand: &[u32]| {
            let qd = &a.desc[q * crate::DESC_LEN..(q + 1) * crate::DESC_LEN];
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: AVX2 detected and all bytes ≤ 127 (checked above)
                return unsafe { best_two_avx2(qd, qnorm[q], a.scale[q], b, cand, f) };
            }
            best_two_by(a.scale[q], b, cand, f, |c| {
                crate::knn::dist2(qd, &b.desc[c * crate::DESC_LEN..])
            })
        };
        let mut found: Vec<(u32, Option<(u32, u32)>)> = order
            .par_chunks(CHUNK)
            .flat_map_iter(|chunk| {
                let mut s = Scratch::default();
                let mut prev: Option<([f64; 3], f64)> = None;
                let mut out = Vec::with_capacity(chunk.len());
                // the queries at one position (consecutive in this order) share candidates
                for group in chunk.chunk_by(|&p, &q| y[p as usize] == y[q as usize]) {
                    let yq = y[group[0] as usize];
                    // a tight guess first, then the bound that always holds enough
                    let radii = match prev {
                        Some((yp, dk)) => {
                            let (rk, step) = (dk.sqrt(), sq_dist(yq, yp).sqrt());
                            [rk + TIGHT * step, rk + step]
                        }
                        None => [f64::INFINITY; 2],
                    };
                    let dk = b.closest_within(yq, keep, &radii, &mut s);
                    prev = Some((yq, dk));
                    for &q in group {
                        let (b1, b2) = best_two(q as usize, &s.cand);
                        let hit = (b1.1 != u32::MAX
                            && crate::matching::ratio_ok(b1.0, b2.0, p.ratio))
                        .then_some((b1.1, b1.0));
                        out.push((q, hit));
                    }
                }
                out
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

/// Pairs beyond which [`kde3_pairs`] computes every value twice instead of keeping a table
/// (32 MB).
const MAX_KDE_PAIRS: usize = 1 << 22;

/// [`crate::matching::kde3`], bit for bit, with each pair's kernel value computed once:
/// `exp(−½ |t_i − t_j|² / h²)` is the same number for (i, j) and (j, i) (the difference
/// only changes sign), and the exponentials are most of the density's cost (the matches
/// of one atlas cluster around its Hough mode, so nearly all pairs fall in each other's
/// window). Each point's window and summation order are kde3's: the points sorted by
/// (x, index), those within 5h along x, in that order; a value missing from the shared
/// table (x rounding can make windows asymmetric at their edges) is computed directly.
/// Beyond [`MAX_KDE_PAIRS`] pairs it is kde3 itself.
pub(super) fn kde3_pairs(t: &[[f64; 3]], h: f64) -> Vec<f64> {
    let n = t.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let crate::matching::KdeWindows {
        order,
        xs,
        norm,
        cut,
    } = crate::matching::KdeWindows::new(t, h);
    let kernel = |i: usize, j: usize| (-0.5 * sq_dist(t[i], t[j]) / (h * h)).exp();
    // window [lo, hi) of the point at sorted position p
    let window = |p: usize| {
        let x = t[order[p]][0];
        (
            xs.partition_point(|&v| v < x - cut),
            xs.partition_point(|&v| v <= x + cut),
        )
    };
    let windows: Vec<(usize, usize)> = (0..n).into_par_iter().map(window).collect();
    // row p: the kernel values of sorted positions p + 1 .. hi(p)
    let mut start = vec![0usize; n + 1];
    for p in 0..n {
        start[p + 1] = start[p] + windows[p].1.saturating_sub(p + 1);
    }
    if start[n] > MAX_KDE_PAIRS {
        return crate::matching::kde3(t, h);
    }
    let mut table = vec![0.0f64; start[n]];
    {
        let mut rows: Vec<&mut [f64]> = Vec::with_capacity(n);
        let mut rest = &mut table[..];
        for p in 0..n {
            let (row, tail) = rest.split_at_mut(start[p + 1] - start[p]);
            rows.push(row);
            rest = tail;
        }
        rows.into_par_iter().enumerate().for_each(|(p, row)| {
            for (k, v) in row.iter_mut().enumerate() {
                *v = kernel(order[p], order[p + 1 + k]);
            }
        });
    }
    let value = |p: usize, q: usize| {
        // the pair's value from the row of the smaller position when it holds it
        let (a, b) = if p < q { (p, q) } else { (q, p) };
        if b < windows[a].1 {
            table[start[a] + (b - a - 1)]
        } else {
            kernel(order[p], order[q])
        }
    };
    let mut out = vec![0.0; n];
    let sums: Vec<(usize, f64)> = (0..n)
        .into_par_iter()
        .map(|p| {
            let (lo, hi) = windows[p];
            let s: f64 = (lo..hi).filter(|&q| q != p).map(|q| value(p, q)).sum();
            (order[p], s * norm)
        })
        .collect();
    for (i, v) in sums {
        out[i] = v;
    }
    out
}
