//! DoG extrema: strict comparisons with every neighbour in space and scale (80 in 3D,
//! 26 in 2D), an edge test on the DoG Hessian, then sub-voxel, sub-scale positions from
//! a quadratic fit (3D: full fit in space and scale with cross terms, falling back to one
//! parabola per axis when the step leaves the voxel's neighbourhood; 2D: one parabola
//! per axis and one over scale).

use super::blur::blur_at_neighbourhood;
use super::volume::Vol;
use crate::linalg::sym3_eigenvalues;
use rayon::prelude::*;

/// Lowe's edge test generalised to 3D on the DoG Hessian `h` at an extremum of sign
/// `pol`: the Hessian must be definite with the extremum's sign, and with eigenvalues
/// λ1 ≥ λ2 ≥ λ3 > 0 of −pol·H, (Σλ)³ / Πλ < (r+2)³ / r — this rejects the shells,
/// tubes and sheets of strict discrete extrema that surround blobs and run along edges.
#[inline]
fn blob_like_3d(h: [[f64; 3]; 3], pol: f64, r: f64) -> bool {
    let m = h.map(|row| row.map(|x| -pol * x));
    let e = sym3_eigenvalues(m);
    if e[2] <= 0.0 {
        return false;
    }
    let (tr, det) = (e[0] + e[1] + e[2], e[0] * e[1] * e[2]);
    tr * tr * tr * r < (r + 2.0).powi(3) * det
}

/// The 2D version: (tr H)² / det H < (r+1)² / r with det > 0.
#[inline]
fn blob_like_2d(hxx: f64, hyy: f64, hxy: f64, r: f64) -> bool {
    let det = hxx * hyy - hxy * hxy;
    let tr = hxx + hyy;
    det > 0.0 && tr * tr * r < (r + 1.0).powi(2) * det
}

/// One DoG level, read as the difference of its two Gaussians (`hi − lo`, the same f32
/// subtraction the blur once stored): the scale space keeps four Gaussians alive instead
/// of two Gaussians and three DoGs, one full-size volume less (docs/decisions.md).
#[derive(Clone, Copy)]
pub(crate) struct Dog<'a> {
    pub n: [usize; 3],
    hi: &'a [f32],
    lo: &'a [f32],
}

impl<'a> Dog<'a> {
    /// `hi − lo` (two volumes of one shape).
    pub fn new(hi: &'a Vol, lo: &'a Vol) -> Self {
        assert_eq!(hi.n, lo.n);
        assert_eq!(hi.data.len(), lo.data.len());
        Dog {
            n: hi.n,
            hi: &hi.data,
            lo: &lo.data,
        }
    }
    #[inline(always)]
    pub fn at(&self, x: usize) -> f32 {
        self.hi[x] - self.lo[x]
    }
}

/// The DoG above the searched one: stored, or an octave's top level, `blur(g) − g` with the
/// half-kernel `w`, which detection reads only in the 3×3×3 neighbourhoods of the voxels
/// that beat their neighbours in the two lower DoGs, so the scale space computes it only
/// there (bit-identical to blurring the whole volume: `blur_at_neighbourhood`) instead of
/// making its largest blur pass (docs/decisions.md). 3D only.
#[derive(Clone, Copy)]
pub(crate) enum Upper<'a> {
    Stored(Dog<'a>),
    Top { g: &'a Vol, w: &'a [f32] },
}

impl Upper<'_> {
    /// The DoG at the 27 voxels `(i, j, k) + d`, `d ∈ {−1, 0, 1}³` (index
    /// `(d0 + 1)·9 + (d1 + 1)·3 + d2 + 1`), inside the grid; `x` is `(i, j, k)`'s index.
    fn around(&self, x: usize, ijk: [usize; 3]) -> [f32; 27] {
        let n = match self {
            Upper::Stored(d) => d.n,
            Upper::Top { g, .. } => g.n,
        };
        let at = |e: usize| {
            let (d0, d1, d2) = (
                (e / 9) as isize - 1,
                ((e / 3) % 3) as isize - 1,
                (e % 3) as isize - 1,
            );
            (x as isize + (d0 * n[1] as isize + d1) * n[2] as isize + d2) as usize
        };
        match self {
            Upper::Stored(d) => std::array::from_fn(|e| d.at(at(e))),
            Upper::Top { g, w } => {
                let hi = blur_at_neighbourhood(g, w, ijk);
                std::array::from_fn(|e| hi[e] - g.data[at(e)])
            }
        }
    }
}

/// A refined DoG extremum in octave voxel coordinates.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    pub pos: [f32; 3],
    /// sub-scale offset in [-0.5, 0.5] levels
    pub ds: f32,
    pub response: f32,
    pub polarity: i8,
}

/// Solve the 4×4 system `m·x = r` (Gaussian elimination with partial pivoting);
/// `None` when singular.
#[allow(clippy::needless_range_loop)]
fn solve4(mut m: [[f64; 4]; 4], mut r: [f64; 4]) -> Option<[f64; 4]> {
    for c in 0..4 {
        let p = (c..4).max_by(|&x, &y| m[x][c].abs().total_cmp(&m[y][c].abs()))?;
        if m[p][c].abs() < 1e-12 {
            return None;
        }
        m.swap(c, p);
        r.swap(c, p);
        for row in c + 1..4 {
            let f = m[row][c] / m[c][c];
            for col in c..4 {
                m[row][col] -= f * m[c][col];
            }
            r[row] -= f * r[c];
        }
    }
    let mut x = [0f64; 4];
    for c in (0..4).rev() {
        let s: f64 = (c + 1..4).map(|q| m[c][q] * x[q]).sum();
        x[c] = (r[c] - s) / m[c][c];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// Vertex of the parabola through (-1, m), (0, c), (1, p), clipped to ±0.5, and the
/// value there.
#[inline]
fn parabola(m: f32, c: f32, p: f32) -> (f32, f32) {
    let den = m - 2.0 * c + p;
    if den.abs() <= 1e-20 {
        return (0.0, 0.0);
    }
    let off = (0.5 * (m - p) / den).clamp(-0.5, 0.5);
    (off, 0.25 * (p - m) * off)
}

/// Whether `v = cur[x]` is a strict maximum (v > 0) or minimum (otherwise) against its
/// neighbours in `cur` at the offsets `offs`, and against `prev` and `next` at `x` and at
/// the same offsets. A NaN is never an extremum.
#[inline(always)]
fn strict_extremum(prev: &Dog, cur: &Dog, next: &Dog, x: usize, offs: &[isize]) -> bool {
    #[inline(always)]
    fn beats_all(
        prev: &Dog,
        cur: &Dog,
        next: &Dog,
        x: usize,
        offs: &[isize],
        beats: impl Fn(f32) -> bool,
    ) -> bool {
        offs.iter()
            .all(|&o| beats(cur.at((x as isize + o) as usize)))
            && beats(prev.at(x))
            && beats(next.at(x))
            && offs.iter().all(|&o| {
                let y = (x as isize + o) as usize;
                beats(prev.at(y)) && beats(next.at(y))
            })
    }
    let v = cur.at(x);
    if v > 0.0 {
        beats_all(prev, cur, next, x, offs, |y| y < v)
    } else {
        beats_all(prev, cur, next, x, offs, |y| y > v)
    }
}

/// Whether `v = cur[x]` beats (as in [`strict_extremum`]) its neighbours in `cur` at the
/// offsets `offs` and the voxels of `prev` at `x` and at those offsets.
#[inline(always)]
fn strict_below_top(prev: &Dog, cur: &Dog, x: usize, offs: &[isize]) -> bool {
    let v = cur.at(x);
    let all = |beats: &dyn Fn(f32) -> bool| {
        offs.iter()
            .all(|&o| beats(cur.at((x as isize + o) as usize)))
            && beats(prev.at(x))
            && offs
                .iter()
                .all(|&o| beats(prev.at((x as isize + o) as usize)))
    };
    if v > 0.0 {
        all(&|y| y < v)
    } else {
        all(&|y| y > v)
    }
}

/// The candidate keypoints of the middle of three adjacent DoG levels `dogs` of a
/// `dim`-dimensional image (2: stored as `ni × nj × 1`): strict extrema with |value| >
/// `thr`, at least `margin` voxels from every face, ordered by (i, j, k) — none when an
/// axis is too short for the margin.
pub(crate) fn extrema(
    [prev, cur]: [Dog; 2],
    next: Upper,
    dim: usize,
    thr: f32,
    margin: usize,
    edge: f64,
) -> Vec<Candidate> {
    if cur.n[..dim].iter().any(|&len| len <= 2 * margin) {
        return Vec::new();
    }
    match (dim, next) {
        (3, _) => extrema_3d([prev, cur], next, thr, margin, edge),
        (_, Upper::Stored(next)) => extrema_2d(&[prev, cur, next], thr, margin, edge),
        (_, Upper::Top { .. }) => unreachable!("the 2D scale space stores its top level"),
    }
}

/// The prefilter of one row (`row7`: the centre's and its six face neighbours' `(hi, lo)`
/// slices): appends `margin + q` to `hits` for every `q` (increasing) where the centre
/// DoG `v` is above `thr` and all six neighbours, or below `−thr` and all six. Branchless
/// flags (vectorisable), then the few set flags, skipping 8 clear ones at a time.
fn row_hits(
    row7: &[(&[f32], &[f32]); 7],
    thr: f32,
    margin: usize,
    flags: &mut [u8],
    hits: &mut Vec<usize>,
) {
    let [c, l, r, u, dn, f, b] = *row7;
    let len = c.0.len();
    for (q, fl) in flags[..len].iter_mut().enumerate() {
        let at = |s: (&[f32], &[f32])| s.0[q] - s.1[q];
        let v = at(c);
        let (l, r, u, dn, f, b) = (at(l), at(r), at(u), at(dn), at(f), at(b));
        let mx = (v > thr) & (v > l) & (v > r) & (v > u) & (v > dn) & (v > f) & (v > b);
        let mn = (v < -thr) & (v < l) & (v < r) & (v < u) & (v < dn) & (v < f) & (v < b);
        *fl = mx as u8 | mn as u8;
    }
    let mut q = 0;
    while q < len {
        if q + 8 <= len && flags[q..q + 8].iter().all(|&f| f == 0) {
            q += 8;
            continue;
        }
        if flags[q] != 0 {
            hits.push(margin + q);
        }
        q += 1;
    }
}

/// Extrema of `cur` against its 26 spatial neighbours and the 27 voxels of `prev` and
/// `next` around it (see [`extrema`]).
#[inline(never)]
fn extrema_3d(
    [prev, cur]: [Dog; 2],
    next: Upper,
    thr: f32,
    margin: usize,
    edge: f64,
) -> Vec<Candidate> {
    let (prev, cur) = (&prev, &cur);
    let [ni, nj, nk] = cur.n;
    let (sj, si) = (nk, nj * nk);
    let offs: Vec<isize> = {
        let mut o = Vec::with_capacity(26);
        for di in -1isize..=1 {
            for dj in -1isize..=1 {
                for dk in -1isize..=1 {
                    if (di, dj, dk) != (0, 0, 0) {
                        o.push(di * si as isize + dj * sj as isize + dk);
                    }
                }
            }
        }
        o
    };
    #[cfg(target_arch = "x86_64")]
    let avx512 = super::blur::Isa::best() == super::blur::Isa::Avx512;
    (margin..ni - margin)
        .into_par_iter()
        .flat_map_iter(|i| {
            let mut out = Vec::new();
            let mut flags: Vec<u8> = vec![0; nk];
            let mut hits: Vec<usize> = Vec::new();
            for j in margin..nj - margin {
                let row = (i * nj + j) * nk;
                // prefilter against the 6 face neighbours: the centre and its 6 face
                // neighbours, as (hi, lo) slices of the DoG
                let (k0, k1) = (row + margin, row + nk - margin);
                let sl = |o: usize| {
                    (
                        &cur.hi[k0 + o - si..k1 + o - si],
                        &cur.lo[k0 + o - si..k1 + o - si],
                    )
                };
                let row7 = [
                    sl(si),
                    sl(si - 1),
                    sl(si + 1),
                    sl(si - sj),
                    sl(si + sj),
                    sl(0),
                    sl(2 * si),
                ];
                hits.clear();
                #[cfg(target_arch = "x86_64")]
                if avx512 {
                    // SAFETY: the CPU runs AVX-512F (checked above)
                    unsafe { super::detect_avx512::row_hits(&row7, thr, margin, &mut hits) };
                } else {
                    row_hits(&row7, thr, margin, &mut flags, &mut hits);
                }
                #[cfg(not(target_arch = "x86_64"))]
                row_hits(&row7, thr, margin, &mut flags, &mut hits);
                for &k in &hits {
                    let x = row + k;
                    let v = cur.at(x);
                    // the two lower DoGs first: the upper one may have to be computed
                    if !strict_below_top(prev, cur, x, &offs) {
                        continue;
                    }
                    let up = next.around(x, [i, j, k]);
                    let beaten = if v > 0.0 {
                        up.iter().all(|&y| y < v)
                    } else {
                        up.iter().all(|&y| y > v)
                    };
                    if !beaten {
                        continue;
                    }
                    // the upper DoG at (i, j, k) + (d0, d1, d2)
                    let sn = |d0: isize, d1: isize, d2: isize| {
                        up[(13 + 9 * d0 + 3 * d1 + d2) as usize] as f64
                    };
                    let d = |o: isize| cur.at((x as isize + o) as usize) as f64;
                    let (a, b) = (si as isize, sj as isize);
                    let c2 = 2.0 * v as f64;
                    let hxy =
                        |p: isize, q: isize| 0.25 * (d(p + q) - d(p - q) - d(-p + q) + d(-p - q));
                    let hess = [
                        [d(a) + d(-a) - c2, hxy(a, b), hxy(a, 1)],
                        [hxy(a, b), d(b) + d(-b) - c2, hxy(b, 1)],
                        [hxy(a, 1), hxy(b, 1), d(1) + d(-1) - c2],
                    ];
                    if !blob_like_3d(hess, if v > 0.0 { 1.0 } else { -1.0 }, edge) {
                        continue;
                    }
                    // full quadratic fit in (i, j, k, s) with cross terms (Lowe); when the
                    // step leaves the voxel, one parabola per axis instead
                    let sv = |o: isize| prev.at((x as isize + o) as usize) as f64;
                    let grad = [
                        0.5 * (d(a) - d(-a)),
                        0.5 * (d(b) - d(-b)),
                        0.5 * (d(1) - d(-1)),
                        0.5 * (sn(0, 0, 0) - sv(0)),
                    ];
                    // mixed space-scale derivative along the axis of stride `o`, unit `e`
                    let hs = |o: isize, [e0, e1, e2]: [isize; 3]| {
                        0.25 * (sn(e0, e1, e2) - sn(-e0, -e1, -e2) - sv(o) + sv(-o))
                    };
                    let (ha, hb, hk) = (hs(a, [1, 0, 0]), hs(b, [0, 1, 0]), hs(1, [0, 0, 1]));
                    let h4 = [
                        [hess[0][0], hess[0][1], hess[0][2], ha],
                        [hess[1][0], hess[1][1], hess[1][2], hb],
                        [hess[2][0], hess[2][1], hess[2][2], hk],
                        [ha, hb, hk, sn(0, 0, 0) + sv(0) - c2],
                    ];
                    let step =
                        solve4(h4, grad.map(|g| -g)).filter(|o| o.iter().all(|x| x.abs() <= 1.0));
                    let (off, resp) = match step {
                        Some(o) => {
                            let dv: f64 = (0..4).map(|q| grad[q] * o[q]).sum::<f64>() * 0.5;
                            (o.map(|x| x as f32), v + dv as f32)
                        }
                        None => {
                            let (oi, ri) = parabola(cur.at(x - si), v, cur.at(x + si));
                            let (oj, rj) = parabola(cur.at(x - sj), v, cur.at(x + sj));
                            let (ok, rk) = parabola(cur.at(x - 1), v, cur.at(x + 1));
                            let (os, rs) = parabola(prev.at(x), v, up[13]);
                            ([oi, oj, ok, os], v + ri + rj + rk + rs)
                        }
                    };
                    out.push(Candidate {
                        pos: [i as f32 + off[0], j as f32 + off[1], k as f32 + off[2]],
                        ds: off[3].clamp(-0.5, 0.5),
                        response: resp,
                        polarity: if v > 0.0 { 1 } else { -1 },
                    });
                }
            }
            out
        })
        .collect()
}

/// 2D version (images stored as `ni × nj × 1`): 8 in-plane neighbours plus 9 in each
/// adjacent DoG.
fn extrema_2d(dogs: &[Dog; 3], thr: f32, margin: usize, edge: f64) -> Vec<Candidate> {
    let [prev, cur, next] = dogs;
    let [ni, nj, _] = cur.n;
    let offs: Vec<isize> = (-1isize..=1)
        .flat_map(|di| (-1isize..=1).map(move |dj| di * nj as isize + dj))
        .filter(|&o| o != 0)
        .collect();
    (margin..ni - margin)
        .into_par_iter()
        .flat_map_iter(|i| {
            let mut out = Vec::new();
            for j in margin..nj - margin {
                let x = i * nj + j;
                let v = cur.at(x);
                if v.abs() <= thr {
                    continue;
                }
                if !strict_extremum(prev, cur, next, x, &offs) {
                    continue;
                }
                let d = |o: isize| cur.at((x as isize + o) as usize) as f64;
                let a = nj as isize;
                let c2 = 2.0 * v as f64;
                let hxy = 0.25 * (d(a + 1) - d(a - 1) - d(-a + 1) + d(-a - 1));
                if !blob_like_2d(d(a) + d(-a) - c2, d(1) + d(-1) - c2, hxy, edge) {
                    continue;
                }
                let (oi, ri) = parabola(cur.at(x - nj), v, cur.at(x + nj));
                let (oj, rj) = parabola(cur.at(x - 1), v, cur.at(x + 1));
                let (os, rs) = parabola(prev.at(x), v, next.at(x));
                out.push(Candidate {
                    pos: [i as f32 + oi, j as f32 + oj, 0.0],
                    ds: os,
                    response: v + ri + rj + rs,
                    polarity: if v > 0.0 { 1 } else { -1 },
                });
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 prefilter finds the portable one's hits, in order, on rows of every
    /// length up to 70 with ties, NaNs, values at ±threshold and extrema of both signs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_prefilter_finds_the_portable_hits() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512F on this CPU: the AVX-512 prefilter is not compared");
            return;
        }
        let mut next = super::super::volume::tests::uniform(0x51ed_2701_f3a5_c8b9);
        let mut total = 0;
        for len in 0..=70usize {
            for round in 0..20 {
                let mut col = || -> Vec<f32> {
                    (0..len)
                        .map(|_| {
                            let u = next();
                            match (u * 100.0) as u32 {
                                0 => f32::NAN,
                                1..=3 => 0.25,
                                4..=6 => -0.25,
                                7..=20 => (u * 8.0).floor() / 8.0 - 0.5,
                                _ => (u - 0.5) * if round % 2 == 0 { 1.0 } else { 3.0 },
                            }
                        })
                        .collect()
                };
                let cols: Vec<(Vec<f32>, Vec<f32>)> = (0..7).map(|_| (col(), col())).collect();
                let row7: [(&[f32], &[f32]); 7] =
                    std::array::from_fn(|i| (&cols[i].0[..], &cols[i].1[..]));
                let (mut want, mut got) = (Vec::new(), Vec::new());
                row_hits(&row7, 0.25, 3, &mut vec![0; len], &mut want);
                // SAFETY: AVX-512F was detected
                unsafe { super::super::detect_avx512::row_hits(&row7, 0.25, 3, &mut got) };
                assert_eq!(got, want, "len {len} round {round}");
                total += want.len();
            }
        }
        assert!(total > 100, "{total} hits");
    }

    #[test]
    fn parabola_vertex() {
        // f(x) = -(x - 0.25)² sampled at -1, 0, 1
        let f = |x: f32| -(x - 0.25) * (x - 0.25);
        let (off, dv) = parabola(f(-1.0), f(0.0), f(1.0));
        assert!((off - 0.25).abs() < 1e-6);
        assert!((f(0.0) + dv - 0.0).abs() < 1e-6);
    }

    #[test]
    fn computed_top_level_finds_the_same_candidates_as_a_stored_one() {
        use super::super::blur::{blur, gaussian_half_kernel};
        use super::super::volume::tests::uniform;
        let n = [40, 44, 38];
        let mut next = uniform(0x9e37_79b9_7f4a_7c15);
        let next_noise = |x: usize| ((x * 7919) % 1013) as f32 / 1013.0;
        // blobs of both signs, σ 2.8–3.6 (extrema of the middle DoG), a little noise
        let blobs: Vec<[f32; 5]> = (0..10)
            .map(|_| {
                let c = [0, 1, 2].map(|a| 4.0 + (n[a] as f32 - 8.0) * next());
                [
                    c[0],
                    c[1],
                    c[2],
                    2.8 + 0.8 * next(),
                    if next() < 0.5 { -1.0 } else { 1.0 },
                ]
            })
            .collect();
        let v = Vol::from_fn(n, |i, j, k| {
            let p = [i, j, k].map(|x| x as f32);
            let b: f32 = blobs
                .iter()
                .map(|b| {
                    let d2: f32 = (0..3).map(|a| (p[a] - b[a]).powi(2)).sum();
                    b[4] * (-d2 / (2.0 * b[3] * b[3])).exp()
                })
                .sum();
            b + 0.01 * next_noise(i * 1000 + j * 31 + k)
        })
        .unwrap();
        let g: Vec<Vol> = [0.0f32, 1.0, 1.2, 1.45]
            .iter()
            .scan(v, |cur, &s| {
                if s > 0.0 {
                    *cur = blur(cur, s).unwrap();
                }
                Some(cur.clone())
            })
            .collect();
        let w = gaussian_half_kernel(1.7);
        let top = blur(&g[3], 1.7).unwrap();
        let [prev, cur] = [1, 2].map(|i| Dog::new(&g[i + 1], &g[i]));
        let stored = extrema(
            [prev, cur],
            Upper::Stored(Dog::new(&top, &g[3])),
            3,
            0.0,
            2,
            10.0,
        );
        let computed = extrema([prev, cur], Upper::Top { g: &g[3], w: &w }, 3, 0.0, 2, 10.0);
        assert!(stored.len() >= 5, "{}", stored.len());
        assert_eq!(stored.len(), computed.len());
        for (a, b) in stored.iter().zip(&computed) {
            assert_eq!(a.pos.map(f32::to_bits), b.pos.map(f32::to_bits));
            assert_eq!(
                (a.ds.to_bits(), a.response.to_bits(), a.polarity),
                (b.ds.to_bits(), b.response.to_bits(), b.polarity)
            );
        }
    }

    #[test]
    fn finds_a_single_strict_maximum() {
        let n = [7, 7, 7];
        let mk = |peak: f32| {
            let mut v = Vol::zeros(n).unwrap();
            let c = v.idx(3, 3, 3);
            v.data[c] = peak;
            v
        };
        let (a, b, c, z) = (mk(0.5), mk(1.0), mk(0.5), mk(0.0));
        let dog = |v| Dog::new(v, &z);
        let e = extrema([dog(&a), dog(&b)], Upper::Stored(dog(&c)), 3, 0.1, 1, 10.0);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].polarity, 1);
        // a plateau is not a strict extremum
        let e = extrema([dog(&b), dog(&b)], Upper::Stored(dog(&c)), 3, 0.1, 1, 10.0);
        assert!(e.is_empty());
    }
}
