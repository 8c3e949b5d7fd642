//! The separable Gaussian blur of the scale space: whole volumes, and single voxels'
//! neighbourhoods.
//!
//! Layout: C order, index `(i, j, k)`, `k` contiguous. Every kernel is written as AXPY
//! over contiguous rows or planes (so it autovectorises) and parallelised over
//! `i`-planes; there are no cross-thread reductions, so results are bit-identical
//! whatever the rayon thread count.

use super::volume::Vol;
use crate::Result;
use rayon::prelude::*;

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
    let mut out = Vol::scratch(src.n)?;
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

#[cfg(test)]
mod tests {
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
            [19, 50, 90],
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
