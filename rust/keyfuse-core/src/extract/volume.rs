//! Dense float volumes and the scale-space primitives: separable Gaussian blur,
//! 2×2×2 averaging, trilinear sampling and isotropic resampling.
//!
//! Layout: C order, index `(i, j, k)`, `k` contiguous. Every kernel is written as
//! AXPY over contiguous rows or planes (so it autovectorises) and parallelised over
//! `i`-planes; there are no cross-thread reductions, so results are bit-identical
//! whatever the rayon thread count.

use crate::{KfError, Result};
use rayon::prelude::*;

/// A dense 3D float volume (a 2D image is a volume with `n[2] == 1`).
#[derive(Clone, Debug)]
pub(crate) struct Vol {
    pub n: [usize; 3],
    pub data: Vec<f32>,
}

/// Allocate `len` zeros, failing cleanly (not aborting) when memory is short.
pub(crate) fn try_zeros(len: usize) -> Result<Vec<f32>> {
    let mut v: Vec<f32> = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        KfError::InvalidImage(format!(
            "cannot allocate {} MB for the scale space",
            len * 4 / (1 << 20)
        ))
    })?;
    advise_huge_pages(&v);
    v.resize(len, 0.0);
    Ok(v)
}

/// Ask Linux to back the 2 MiB-aligned interior of a fresh (untouched) buffer with
/// transparent huge pages where the system leaves that to `madvise`: a 1 mm volume is
/// ~8,500 pages of 4 KiB, each a page fault on first touch and a TLB entry that the
/// scale space's plane sweeps and the descriptors' scattered samples keep missing
/// (docs/decisions.md). Contents and results are unchanged; elsewhere a no-op.
fn advise_huge_pages(v: &Vec<f32>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = v.capacity() * std::mem::size_of::<f32>();
        if bytes < 2 * HUGE {
            return;
        }
        let start = v.as_ptr() as usize;
        let (a, end) = (
            (start + HUGE - 1) & !(HUGE - 1),
            (start + bytes) & !(HUGE - 1),
        );
        if end > a {
            // SAFETY: [a, end) lies inside the vector's allocation; MADV_HUGEPAGE only
            // changes how the kernel backs those pages (a failure is harmless and ignored)
            unsafe {
                libc::madvise(a as *mut libc::c_void, end - a, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

impl Vol {
    pub fn zeros(n: [usize; 3]) -> Result<Vol> {
        Ok(Vol {
            n,
            data: try_zeros(n[0] * n[1] * n[2])?,
        })
    }

    /// A volume of shape `m` whose voxel (p, q, r) is `value(p, q, r)`, filled in
    /// parallel over `p`-planes.
    pub(crate) fn from_fn(
        m: [usize; 3],
        value: impl Fn(usize, usize, usize) -> f32 + Sync,
    ) -> Result<Vol> {
        let mut out = Vol::zeros(m)?;
        let mplane = m[1] * m[2];
        if mplane == 0 {
            return Ok(out);
        }
        out.data
            .par_chunks_mut(mplane)
            .enumerate()
            .for_each(|(p, o)| {
                for q in 0..m[1] {
                    for r in 0..m[2] {
                        o[q * m[2] + r] = value(p, q, r);
                    }
                }
            });
        Ok(out)
    }

    #[inline]
    pub fn idx(&self, i: usize, j: usize, k: usize) -> usize {
        (i * self.n[1] + j) * self.n[2] + k
    }

    #[inline]
    pub fn at(&self, i: usize, j: usize, k: usize) -> f32 {
        self.data[self.idx(i, j, k)]
    }

    /// Trilinear interpolation at a continuous index position, clamped to the grid
    /// (replicated border), so any finite position is safe. One formula everywhere, the
    /// CUDA sampler's too (`kf_trilinear` in scale.cu): `lerp(a, b, f) = a + f·(b − a)`
    /// along axis 2, then 1, then 0, with f = x − ⌊x⌋.
    #[inline]
    pub fn sample(&self, p: [f32; 3]) -> f32 {
        // fast path: strictly inside the grid, no clamping needed
        match cell_of(p, self.n) {
            Some((c, f)) => trilinear_fast(&self.data, self.n, c, f),
            None => self.sample_clamped(p),
        }
    }

    /// Trilinear interpolation with the position clamped to the grid (the fast path's
    /// formula and order of operations: bit-identical to it inside the grid).
    fn sample_clamped(&self, p: [f32; 3]) -> f32 {
        trilinear_clamped(self.n, p, |i, j, k| self.at(i, j, k))
    }
}

/// The cell `⌊p⌋` and the fractions `p − ⌊p⌋` when `p` lies strictly inside a grid of
/// shape `n` (the trilinear fast path needs no clamping), else `None`.
#[inline(always)]
pub(crate) fn cell_of(p: [f32; 3], n: [usize; 3]) -> Option<([usize; 3], [f32; 3])> {
    let inside = (0..3).all(|a| p[a] >= 0.0 && p[a] < (n[a] - 1) as f32);
    inside.then(|| {
        let c = p.map(|x| x as usize);
        (c, [0, 1, 2].map(|a| p[a] - c[a] as f32))
    })
}

/// [`Vol::sample`]'s fast path: the trilinear formula on the voxels `(x, y, z) + {0, 1}³`
/// of `data`, a C-ordered grid of shape `n`, with the fractions `[fx, fy, fz]` in that cell.
#[inline(always)]
pub(crate) fn trilinear_fast(
    data: &[f32],
    n: [usize; 3],
    [x, y, z]: [usize; 3],
    [fx, fy, fz]: [f32; 3],
) -> f32 {
    let (sj, si) = (n[2], n[1] * n[2]);
    let b = (x * n[1] + y) * n[2] + z;
    let d = &data[b..b + si + sj + 2];
    let l = |o: usize| d[o] + fz * (d[o + 1] - d[o]);
    let c0 = l(0) + fy * (l(sj) - l(0));
    let c1 = l(si) + fy * (l(si + sj) - l(si));
    c0 + fx * (c1 - c0)
}

/// Trilinear interpolation at `p`, clamped to a grid of shape `n` whose voxel `(i, j, k)`
/// is `at(i, j, k)`: [`Vol::sample`]'s formula and order of operations.
#[inline(always)]
pub(crate) fn trilinear_clamped(
    n: [usize; 3],
    p: [f32; 3],
    at: impl Fn(usize, usize, usize) -> f32,
) -> f32 {
    let mut i0 = [0usize; 3];
    let mut i1 = [0usize; 3];
    let mut f = [0f32; 3];
    for a in 0..3 {
        let hi = (n[a] - 1) as f32;
        let x = if p[a].is_finite() {
            p[a].clamp(0.0, hi)
        } else {
            0.0
        };
        let fl = x.floor();
        i0[a] = fl as usize;
        i1[a] = (i0[a] + 1).min(n[a] - 1);
        f[a] = x - fl;
    }
    let l = |i: usize, j: usize| {
        let a = at(i, j, i0[2]);
        a + f[2] * (at(i, j, i1[2]) - a)
    };
    let c0 = l(i0[0], i0[1]) + f[1] * (l(i0[0], i1[1]) - l(i0[0], i0[1]));
    let c1 = l(i1[0], i0[1]) + f[1] * (l(i1[0], i1[1]) - l(i1[0], i0[1]));
    c0 + f[0] * (c1 - c0)
}

/// Half of a normalised Gaussian kernel of σ `sigma` voxels, in f32 throughout: `w[0]` is
/// the centre tap, `w[t]` the weight of offsets ±t, truncated at 3σ (at least one tap each
/// side) and normalised by `w[0] + 2·Σw[1..]`. The extractor's blur and the CUDA blur both
/// take their taps from here, so their results stay bit-identical.
pub fn gaussian_half_kernel(sigma: f32) -> Vec<f32> {
    let r = ((3.0 * sigma).ceil() as usize).max(1);
    let mut w: Vec<f32> = (0..=r)
        .map(|t| (-((t * t) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = w[0] + 2.0 * w[1..].iter().sum::<f32>();
    for x in &mut w {
        *x /= sum;
    }
    w
}

#[inline]
fn clampi(x: isize, n: usize) -> usize {
    x.clamp(0, n as isize - 1) as usize
}

/// Voxels per register block of the blur: the accumulators of one block stay in
/// registers across all taps (2 loads per tap per vector, no accumulator traffic).
const LANES: usize = 32;

/// `out[x] = w[0]·c[x] + Σ_{t=1..r} w[t]·(a_t[x] + b_t[x])` with `(a_t, b_t) = pair(t)`,
/// summed in exactly that order for every voxel (so the result does not depend on the
/// block width or the instruction set: no fused multiply-add, no reassociation). The
/// slices given by `c` and `pair` are indexed like `out` (they may be longer).
#[inline(always)]
fn sym_conv<'a>(
    out: &mut [f32],
    c: &[f32],
    w: &[f32],
    pair: impl Fn(usize) -> (&'a [f32], &'a [f32]),
) {
    let n = out.len();
    if n < LANES {
        for (x, o) in out.iter_mut().enumerate() {
            let mut acc = w[0] * c[x];
            for (t, &wt) in w.iter().enumerate().skip(1) {
                let (a, b) = pair(t);
                acc += wt * (a[x] + b[x]);
            }
            *o = acc;
        }
        return;
    }
    let mut x = 0;
    loop {
        // the last block overlaps the previous one: recomputing a voxel gives the same value
        let x0 = x.min(n - LANES);
        let cc: &[f32; LANES] = c[x0..x0 + LANES].try_into().unwrap();
        let mut acc = [0f32; LANES];
        for l in 0..LANES {
            acc[l] = w[0] * cc[l];
        }
        for (t, &wt) in w.iter().enumerate().skip(1) {
            let (a, b) = pair(t);
            let a: &[f32; LANES] = a[x0..x0 + LANES].try_into().unwrap();
            let b: &[f32; LANES] = b[x0..x0 + LANES].try_into().unwrap();
            for l in 0..LANES {
                acc[l] += wt * (a[l] + b[l]);
            }
        }
        out[x0..x0 + LANES].copy_from_slice(&acc);
        if x0 + LANES == n {
            break;
        }
        x += LANES;
    }
}

/// What every plane of one blur reads: the source volume's voxels and shape, and the
/// Gaussian half-kernel.
struct BlurInput<'a> {
    src: &'a [f32],
    n: [usize; 3],
    w: &'a [f32],
}

/// One worker's scratch: a plane (`tmp`) and a row padded by the kernel radius (`pad`).
struct BlurScratch {
    tmp: Vec<f32>,
    pad: Vec<f32>,
}

/// Blur the `i`-plane `p` of the input (planes of `nj · nk` voxels, `ni` of them) along
/// all three axes into `o`.
#[inline(always)]
fn blur_plane_body(input: &BlurInput, p: usize, o: &mut [f32], s: &mut BlurScratch) {
    let BlurInput { src, n, w } = *input;
    let (tmp, pad) = (&mut s.tmp[..], &mut s.pad[..]);
    let [ni, nj, nk] = n;
    let plane = nj * nk;
    let r = w.len() - 1;
    let s = &src[p * plane..(p + 1) * plane];
    let pl = |q: usize| &src[q * plane..(q + 1) * plane];
    // axis i: a weighted sum of whole planes, into `tmp`
    let side = |q: usize, t: usize, len: usize| {
        (
            clampi(q as isize - t as isize, len),
            clampi(q as isize + t as isize, len),
        )
    };
    if ni > 1 {
        let prs: Vec<(&[f32], &[f32])> = (1..=r)
            .map(|t| side(p, t, ni))
            .map(|(a, b)| (pl(a), pl(b)))
            .collect();
        sym_conv(tmp, s, w, |t| prs[t - 1]);
    } else {
        tmp.copy_from_slice(s);
    }
    // axes j then k, row by row: the j-blurred row goes straight into the padded row
    // buffer of the k pass
    let tmp = &*tmp;
    let row = |q: usize| &tmp[q * nk..(q + 1) * nk];
    let mut prs: Vec<(&[f32], &[f32])> = Vec::with_capacity(r);
    for y in 0..nj {
        prs.clear();
        prs.extend(
            (1..=r)
                .map(|t| side(y, t, nj))
                .map(|(a, b)| (row(a), row(b))),
        );
        let orow = &mut o[y * nk..(y + 1) * nk];
        if nk > 1 {
            let mid = &mut pad[r..r + nk];
            if nj > 1 {
                sym_conv(mid, row(y), w, |t| prs[t - 1]);
            } else {
                mid.copy_from_slice(row(y));
            }
            let (first, last) = (pad[r], pad[r + nk - 1]);
            pad[..r].fill(first);
            pad[r + nk..].fill(last);
            let pad = &*pad;
            sym_conv(orow, &pad[r..], w, |t| (&pad[r - t..], &pad[r + t..]));
        } else if nj > 1 {
            sym_conv(orow, row(y), w, |t| prs[t - 1]);
        } else {
            orow.copy_from_slice(row(y));
        }
    }
}

/// [`blur_plane_body`] compiled for AVX (8-wide vectors; same arithmetic, so the same
/// bits as the baseline build).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn blur_plane_avx(input: &BlurInput, p: usize, o: &mut [f32], s: &mut BlurScratch) {
    blur_plane_body(input, p, o, s)
}

/// [`blur_plane_body`] compiled for AVX-512 (a register block is two 16-wide vectors; same
/// arithmetic, no fused multiply-add, so the same bits as the baseline build): the blur is
/// bound by arithmetic, and twice the vector width cuts its time (docs/decisions.md).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn blur_plane_avx512(input: &BlurInput, p: usize, o: &mut [f32], s: &mut BlurScratch) {
    blur_plane_body(input, p, o, s)
}

/// [`blur_plane_body`] for CPUs without AVX.
#[inline(never)]
fn blur_plane_generic(input: &BlurInput, p: usize, o: &mut [f32], s: &mut BlurScratch) {
    blur_plane_body(input, p, o, s)
}

/// Separable Gaussian blur with standard deviation `sigma` (voxels) along every axis
/// of length > 1; replicated border.
pub(crate) fn blur(src: &Vol, sigma: f32) -> Result<Vol> {
    let mut out = Vol::zeros(src.n)?;
    blur_into(src, sigma, &mut out);
    Ok(out)
}

/// [`blur`] into an existing volume of the same shape (reuses its memory).
#[inline(never)]
pub(crate) fn blur_into(src: &Vol, sigma: f32, out: &mut Vol) {
    let [ni, nj, nk] = src.n;
    let plane = nj * nk;
    let w = gaussian_half_kernel(sigma);
    let r = w.len() - 1;
    out.n = src.n;
    out.data.resize(src.data.len(), 0.0);
    if plane == 0 || ni == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    let (avx, avx512) = (
        std::is_x86_feature_detected!("avx"),
        std::is_x86_feature_detected!("avx512f"),
    );
    let input = BlurInput {
        src: &src.data,
        n: src.n,
        w: &w,
    };
    out.data.par_chunks_mut(plane).enumerate().for_each_init(
        || BlurScratch {
            tmp: vec![0f32; plane],
            pad: vec![0f32; nk + 2 * r],
        },
        |scratch, (p, o)| {
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the CPU supports AVX-512F (checked above)
                unsafe { blur_plane_avx512(&input, p, o, scratch) };
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: the CPU supports AVX (checked above)
                unsafe { blur_plane_avx(&input, p, o, scratch) };
                return;
            }
            blur_plane_generic(&input, p, o, scratch);
        },
    );
}

/// [`blur_into`]'s output at the 27 voxels `c + d`, `d ∈ {−1, 0, 1}³` (each coordinate
/// clamped to the grid; index `(d0 + 1)·9 + (d1 + 1)·3 + d2 + 1`), computed from `src`
/// alone with the half-kernel `w`: the same passes (i, j, k; length-1 axes skipped), the
/// same replicated border and the same order of operations per voxel, so the values are
/// bit-identical to the full blur's. The scale space's top level is only ever read around
/// extremum candidates, so it is computed there instead of over the whole volume.
pub(crate) fn blur_at_neighbourhood(src: &Vol, w: &[f32], c: [usize; 3]) -> [f32; 27] {
    let n = src.n;
    let centre = |a: usize, d: usize| clampi(c[a] as isize + d as isize - 1, n[a]);
    // the spans of axes 1 and 2 that the later passes read (clamped indices stay inside)
    let r = w.len() - 1;
    let span = |a: usize| {
        let reach = if n[a] > 1 { r as isize } else { 0 };
        let lo = (c[a] as isize - 1 - reach).max(0) as usize;
        (lo, (c[a] + 1 + reach as usize).min(n[a] - 1) + 1 - lo)
    };
    let ((j0, nj), (k0, nk)) = (span(1), span(2));
    // one pass over rows of `nk` values: `out = w0·row(pos) + Σ w_t·(row(pos − t) +
    // row(pos + t))`, the clamped positions of an axis of length `len` (copied when 1)
    #[inline(always)]
    fn pass<'a>(
        w: &[f32],
        out: &mut [f32],
        row: impl Fn(usize) -> &'a [f32],
        pos: usize,
        len: usize,
    ) {
        out.copy_from_slice(row(pos));
        if len == 1 {
            return;
        }
        for o in out.iter_mut() {
            *o *= w[0];
        }
        for (t, &wt) in w.iter().enumerate().skip(1) {
            let (a, b) = (
                row(clampi(pos as isize - t as isize, len)),
                row(clampi(pos as isize + t as isize, len)),
            );
            for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                *o += wt * (x + y);
            }
        }
    }
    // pass i at the planes c0 − 1 ..= c0 + 1, over the span of (j, k)
    let mut a = vec![0f32; 3 * nj * nk];
    for (di, plane) in a.chunks_exact_mut(nj * nk).enumerate() {
        for (y, out) in plane.chunks_exact_mut(nk).enumerate() {
            let row = |q: usize| &src.data[src.idx(q, j0 + y, k0)..][..nk];
            pass(w, out, row, centre(0, di), n[0]);
        }
    }
    // pass j at the rows c1 − 1 ..= c1 + 1, over the span of k
    let mut b = vec![0f32; 9 * nk];
    for (e, out) in b.chunks_exact_mut(nk).enumerate() {
        let (di, dj) = (e / 3, e % 3);
        let row = |q: usize| &a[(di * nj + q - j0) * nk..][..nk];
        pass(w, out, row, centre(1, dj), n[1]);
    }
    // pass k at the 27 voxels
    let mut out = [0f32; 27];
    for (x, o) in out.iter_mut().enumerate() {
        let at = |q: usize| std::slice::from_ref(&b[(x / 3) * nk + q - k0]);
        pass(w, std::slice::from_mut(o), at, centre(2, x % 3), n[2]);
    }
    out
}

/// Halve the grid by averaging 2×2×2 blocks (2×2 for a 2D image): child index `p`
/// covers parent indices `2p, 2p+1`, i.e. sits at parent coordinate `2p + 0.5`.
pub(crate) fn downsample(src: &Vol) -> Result<Vol> {
    let [ni, nj, nk] = src.n;
    let flat = nk == 1;
    let m = [ni / 2, nj / 2, if flat { 1 } else { nk / 2 }];
    Vol::from_fn(m, |p, q, r| {
        let mut s = 0.0f32;
        for di in 0..2 {
            for dj in 0..2 {
                if flat {
                    s += src.at(2 * p + di, 2 * q + dj, 0);
                } else {
                    s += src.at(2 * p + di, 2 * q + dj, 2 * r)
                        + src.at(2 * p + di, 2 * q + dj, 2 * r + 1);
                }
            }
        }
        if flat {
            s * 0.25
        } else {
            s * 0.125
        }
    })
}

/// Fill `out` (C order, shape `out.n`) from `src`, the same volume in Fortran order (`i`
/// fastest). Tiles of 16 `i`-planes: each cache line of `src` (16 consecutive `i`) is read
/// once and scattered over the tile's planes, in parallel over tiles.
pub(crate) fn copy_fortran(src: &[f32], out: &mut Vol) {
    const TILE: usize = 16;
    let [ni, nj, nk] = out.n;
    let plane = nj * nk;
    assert_eq!(src.len(), ni * plane);
    if plane == 0 {
        return;
    }
    out.data
        .par_chunks_mut(TILE * plane)
        .enumerate()
        .for_each(|(t, o)| {
            let i0 = t * TILE;
            let m = o.len() / plane;
            for k in 0..nk {
                for j in 0..nj {
                    let s = &src[i0 + ni * (j + nj * k)..][..m];
                    for (di, &v) in s.iter().enumerate() {
                        o[di * plane + j * nk + k] = v;
                    }
                }
            }
        });
}

/// Trilinear resampling onto a grid of shape `m` where new index `q` sits at old index
/// `q * step` (per axis).
pub(crate) fn resample(src: &Vol, m: [usize; 3], step: [f64; 3]) -> Result<Vol> {
    Vol::from_fn(m, |p, q, r| {
        src.sample([
            (p as f64 * step[0]) as f32,
            (q as f64 * step[1]) as f32,
            (r as f64 * step[2]) as f32,
        ])
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn kernel_is_normalised() {
        for s in [0.5f32, 1.0, 1.6, 3.3] {
            let w = gaussian_half_kernel(s);
            let sum = w[0] + 2.0 * w[1..].iter().sum::<f32>();
            assert!((sum - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn blur_keeps_constants_and_mass() {
        let n = [9, 7, 11];
        let mut v = Vol::zeros(n).unwrap();
        v.data.fill(2.5);
        let b = blur(&v, 1.3).unwrap();
        assert!(b.data.iter().all(|&x| (x - 2.5).abs() < 1e-5));
        // an impulse in the middle spreads symmetrically and keeps its mass
        let mut d = Vol::zeros([21, 21, 21]).unwrap();
        let c = d.idx(10, 10, 10);
        d.data[c] = 1.0;
        let b = blur(&d, 1.5).unwrap();
        let sum: f32 = b.data.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4);
        assert!((b.at(9, 10, 10) - b.at(11, 10, 10)).abs() < 1e-7);
        assert!((b.at(10, 9, 10) - b.at(10, 10, 11)).abs() < 1e-7);
    }

    /// The blur's arithmetic, one voxel at a time (the order the CUDA kernel and the
    /// parity tests mirror): per axis i, j, k (length-1 axes skipped),
    /// acc = w0·x; acc += w[t]·(x[−t] + x[+t]) for t = 1..r, replicated border.
    fn reference_blur(v: &Vol, sigma: f32) -> Vol {
        let w = gaussian_half_kernel(sigma);
        let mut cur = v.clone();
        for axis in 0..3 {
            let len = v.n[axis];
            if len == 1 {
                continue;
            }
            let mut next = cur.clone();
            for i in 0..v.n[0] {
                for j in 0..v.n[1] {
                    for k in 0..v.n[2] {
                        let at = |q: isize| {
                            let mut c = [i, j, k];
                            c[axis] = clampi(q, len);
                            cur.at(c[0], c[1], c[2])
                        };
                        let pos = [i, j, k][axis] as isize;
                        let mut acc = w[0] * at(pos);
                        for (t, &wt) in w.iter().enumerate().skip(1) {
                            acc += wt * (at(pos - t as isize) + at(pos + t as isize));
                        }
                        let x = next.idx(i, j, k);
                        next.data[x] = acc;
                    }
                }
            }
            cur = next;
        }
        cur
    }

    #[test]
    fn blur_is_bit_identical_to_the_reference_order() {
        let shapes = [
            [9, 7, 11],
            [5, 40, 70],
            [12, 33, 1],
            [1, 37, 65],
            [6, 1, 50],
            [3, 3, 3],
        ];
        for (si, n) in shapes.into_iter().enumerate() {
            let mut v = Vol::zeros(n).unwrap();
            for (x, val) in v.data.iter_mut().enumerate() {
                *val = (((x + si) * 7919) % 1013) as f32 / 97.0 - 3.0;
            }
            for sigma in [0.7f32, 1.6, 2.45, 4.0] {
                let want = reference_blur(&v, sigma);
                let mut out = Vol::zeros([1, 1, 1]).unwrap();
                blur_into(&v, sigma, &mut out);
                assert!(
                    out.data
                        .iter()
                        .zip(&want.data)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{n:?} σ={sigma}"
                );
                assert_eq!(blur(&v, sigma).unwrap().data, out.data);
                // the baseline (non-AVX) build of the plane kernel gives the same bits, and
                // so does the AVX build where AVX-512 ran above
                let (plane, r) = (n[1] * n[2], gaussian_half_kernel(sigma).len() - 1);
                let w = gaussian_half_kernel(sigma);
                let input = BlurInput {
                    src: &v.data,
                    n,
                    w: &w,
                };
                let mut s = BlurScratch {
                    tmp: vec![0f32; plane],
                    pad: vec![0f32; n[2] + 2 * r],
                };
                let mut o = vec![0f32; plane];
                for p in 0..n[0] {
                    blur_plane_generic(&input, p, &mut o, &mut s);
                    assert_eq!(o, out.data[p * plane..(p + 1) * plane], "{n:?} σ={sigma}");
                    #[cfg(target_arch = "x86_64")]
                    if std::is_x86_feature_detected!("avx") {
                        // SAFETY: AVX was detected
                        unsafe { blur_plane_avx(&input, p, &mut o, &mut s) };
                        assert_eq!(o, out.data[p * plane..(p + 1) * plane], "{n:?} σ={sigma}");
                    }
                }
            }
        }
    }

    #[test]
    fn neighbourhood_blur_is_bit_identical_to_the_full_blur() {
        for (si, n) in [
            [9, 7, 11],
            [20, 23, 19],
            [12, 33, 1],
            [1, 17, 25],
            [6, 1, 40],
        ]
        .into_iter()
        .enumerate()
        {
            let mut v = Vol::zeros(n).unwrap();
            for (x, val) in v.data.iter_mut().enumerate() {
                *val = (((x + si) * 7919) % 1013) as f32 / 97.0 - 3.0;
            }
            for sigma in [0.7f32, 1.6, 2.45, 4.0] {
                let full = blur(&v, sigma).unwrap();
                let w = gaussian_half_kernel(sigma);
                for c in [
                    [0, 0, 0],
                    [n[0] / 2, n[1] / 2, n[2] / 2],
                    n.map(|x| x - 1),
                    [1, 2, 3].map(|x: usize| x.min(n[0] - 1).min(n[1] - 1).min(n[2] - 1)),
                ] {
                    let got = blur_at_neighbourhood(&v, &w, c);
                    for (x, g) in got.iter().enumerate() {
                        let d = [x / 9, (x / 3) % 3, x % 3];
                        let p = [0, 1, 2].map(|a| clampi(c[a] as isize + d[a] as isize - 1, n[a]));
                        let want = full.at(p[0], p[1], p[2]);
                        assert_eq!(g.to_bits(), want.to_bits(), "{n:?} σ={sigma} {c:?} {d:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn fortran_copy_transposes() {
        for n in [[37, 5, 9], [16, 3, 4], [1, 7, 2], [33, 1, 1]] {
            let len = n[0] * n[1] * n[2];
            // Fortran order: element (i, j, k) at i + ni·(j + nj·k)
            let f: Vec<f32> = (0..len).map(|x| x as f32 * 0.5 - 7.0).collect();
            let mut out = Vol::zeros(n).unwrap();
            copy_fortran(&f, &mut out);
            for i in 0..n[0] {
                for j in 0..n[1] {
                    for k in 0..n[2] {
                        assert_eq!(out.at(i, j, k), f[i + n[0] * (j + n[1] * k)], "{n:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn downsample_averages_blocks() {
        let mut v = Vol::zeros([4, 4, 4]).unwrap();
        for (x, val) in v.data.iter_mut().enumerate() {
            *val = x as f32;
        }
        let d = downsample(&v).unwrap();
        assert_eq!(d.n, [2, 2, 2]);
        let want = (0..2)
            .flat_map(|a| (0..2).flat_map(move |b| (0..2).map(move |c| (a, b, c))))
            .map(|(a, b, c)| v.at(a, b, c))
            .sum::<f32>()
            / 8.0;
        assert!((d.at(0, 0, 0) - want).abs() < 1e-6);
    }

    #[test]
    fn sample_interpolates_and_clamps() {
        let mut v = Vol::zeros([2, 2, 2]).unwrap();
        let c = v.idx(1, 1, 1);
        v.data[c] = 8.0;
        assert!((v.sample([0.5, 0.5, 0.5]) - 1.0).abs() < 1e-6);
        assert_eq!(v.sample([5.0, 5.0, 5.0]), 8.0);
        assert_eq!(v.sample([f32::NAN, -3.0, 0.0]), 0.0);
    }

    /// Uniform numbers in [0, 1) from a xorshift generator seeded with `s`.
    pub(crate) fn uniform(mut s: u64) -> impl FnMut() -> f32 {
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    #[test]
    fn sample_paths_share_one_formula() {
        // inside the grid the fast path and the clamped path (the CUDA sampler's
        // formula) give bit-identical values
        let mut v = Vol::zeros([7, 6, 5]).unwrap();
        let mut next = uniform(0x2545_f491_4f6c_dd1du64);
        for x in v.data.iter_mut() {
            *x = 100.0 * next() - 30.0;
        }
        for _ in 0..2000 {
            let p = [5.99 * next(), 4.99 * next(), 3.99 * next()];
            assert_eq!(
                v.sample(p).to_bits(),
                v.sample_clamped(p).to_bits(),
                "{p:?}"
            );
        }
    }
}
/// Blur timings (fastest of 10, one thread):
/// `cargo test --release -p keyfuse-core blur_timing -- --ignored --nocapture`.
#[cfg(test)]
#[test]
#[ignore]
fn blur_timing() {
    let n = [197, 233, 189];
    let mut v = Vol::zeros(n).unwrap();
    for (x, val) in v.data.iter_mut().enumerate() {
        *val = ((x * 7919) % 1013) as f32 / 97.0;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut out = Vol::zeros(n).unwrap();
    for sigma in [1.03f32, 2.45] {
        let mut best = std::time::Duration::MAX;
        for _ in 0..10 {
            let t = std::time::Instant::now();
            pool.install(|| blur_into(&v, sigma, &mut out));
            best = best.min(t.elapsed());
        }
        eprintln!("blur σ={sigma}: {best:?}");
    }
}
