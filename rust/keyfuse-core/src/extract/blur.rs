//! The separable Gaussian blur of the scale space: whole volumes, and single voxels'
//! neighbourhoods.
//!
//! Layout: C order, index `(i, j, k)`, `k` contiguous. Every kernel is written as AXPY
//! over contiguous rows or planes (so it autovectorises) and parallelised over
//! `i`-planes; there are no cross-thread reductions, so results are bit-identical
//! whatever the rayon thread count. Every task runs with subnormals flushed to zero
//! (`flush::flushed`: each multiply and add as IEEE f32 with FTZ and DAZ).

#[cfg(target_arch = "x86_64")]
use super::blur_avx512::{kconv_avx512, sym_conv_avx512};
use super::flush::flushed;
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

/// The rows a row convolution reads for the taps `t = 1..=r`: `(a_t, b_t)`.
pub(super) type Pairs<'a> = [(&'a [f32], &'a [f32])];

/// [`sym_conv`] over the given pairs.
#[inline(always)]
fn sym_conv_pairs(out: &mut [f32], c: &[f32], w: &[f32], prs: &Pairs) {
    sym_conv(out, c, w, |t| prs[t - 1])
}

/// Columns of a plane per task of the `i` pass: the task sweeps all `i`-planes over its
/// columns, so the `2r + 1` source rows a voxel needs stay in L1/L2 while the window
/// slides, and each source value comes from memory once instead of `2r + 1` times.
const I_COLS: usize = 1024;

/// The output volume shared by the `i` pass's tasks, each of which writes a disjoint set
/// of columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint voxels (see `blur_i_columns`)
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// The `i` pass over the columns `c0..c1` of the planes `p0..p1`: `out[p][c] = w0·src[p][c]
/// + Σ_t w_t·(src[p − t][c] + src[p + t][c])` (clamped).
///
/// # Safety
/// `out` points to `n[0]·plane` values, and no other thread touches columns `c0..c1`.
#[inline(always)]
unsafe fn blur_i_columns(
    conv: impl Fn(&mut [f32], &[f32], &[f32], &Pairs),
    src: &[f32],
    n: [usize; 3],
    w: &[f32],
    out: OutPtr,
    (c0, c1): (usize, usize),
    (p0, p1): (usize, usize),
) {
    let ni = n[0];
    let plane = n[1] * n[2];
    let r = w.len() - 1;
    let pl = |q: isize| {
        let q = clampi(q, ni);
        &src[q * plane + c0..q * plane + c1]
    };
    let mut prs: Vec<(&[f32], &[f32])> = Vec::with_capacity(r);
    for p in p0 as isize..p1 as isize {
        prs.clear();
        prs.extend((1..=r as isize).map(|t| (pl(p - t), pl(p + t))));
        // SAFETY: in bounds (caller), and only this task writes these columns
        let o =
            unsafe { std::slice::from_raw_parts_mut(out.0.add(p as usize * plane + c0), c1 - c0) };
        conv(o, pl(p), w, &prs);
    }
}

/// The `j` and `k` passes of one plane `o` (`nj` rows of `nk`), in place, for the rows
/// `y0..y1` (the others are left as they are): `j` into the rows of `tmp` padded by the
/// kernel radius on both sides (the padding replicates the row's ends), then `k` from
/// those rows back into `o`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn blur_jk_plane<'t>(
    conv: impl Fn(&mut [f32], &[f32], &[f32], &Pairs),
    kconv: impl Fn(&mut [f32], &'t [f32], usize, &[f32], &mut Vec<(&'t [f32], &'t [f32])>),
    o: &mut [f32],
    nj: usize,
    nk: usize,
    w: &[f32],
    tmp: &'t mut [f32],
    (y0, y1): (usize, usize),
) {
    let r = w.len() - 1;
    let src = &*o;
    let row = |q: isize| {
        let q = clampi(q, nj);
        &src[q * nk..(q + 1) * nk]
    };
    let mut prs: Vec<(&[f32], &[f32])> = Vec::with_capacity(r);
    if nk == 1 {
        if nj > 1 {
            for y in 0..nj as isize {
                prs.clear();
                prs.extend((1..=r as isize).map(|t| (row(y - t), row(y + t))));
                let y = y as usize;
                conv(&mut tmp[y..y + 1], row(y as isize), w, &prs);
            }
            o.copy_from_slice(&tmp[..nj]);
        }
        return;
    }
    // rows of `stride` values, each row's first voxel at a 64-byte boundary `lead` values
    // into it (so a row can be read as aligned vectors), the padding around it
    let (lead, stride) = jk_layout(nk, r);
    let base = tmp.as_ptr().align_offset(64).min(15);
    let tmp = &mut tmp[base..];
    for y in y0..y1 {
        let padded = &mut tmp[y * stride..(y + 1) * stride];
        let mid = &mut padded[lead..lead + nk];
        if nj > 1 {
            prs.clear();
            prs.extend((1..=r as isize).map(|t| (row(y as isize - t), row(y as isize + t))));
            conv(mid, row(y as isize), w, &prs);
        } else {
            mid.copy_from_slice(row(0));
        }
        let (first, last) = (padded[lead], padded[lead + nk - 1]);
        padded[lead - r..lead].fill(first);
        padded[lead + nk..lead + nk + r].fill(last);
    }
    let tmp = &*tmp;
    let mut prs: Vec<(&[f32], &[f32])> = Vec::with_capacity(r);
    for (y, orow) in o.chunks_exact_mut(nk).enumerate().take(y1).skip(y0) {
        let row = &tmp[y * stride..(y + 1) * stride];
        kconv(orow, row, lead, w, &mut prs);
    }
}

/// The layout of [`blur_jk_plane`]'s padded rows for rows of `nk` and radius `r`: the
/// offset of a row's first voxel (a multiple of 16, at least `r` and 16) and the row
/// stride (a multiple of 16 that leaves `r` values after the row and 16 beyond the last
/// vector, so aligned 16-wide reads stay inside); `tmp` needs `nj·stride + 15`.
fn jk_layout(nk: usize, r: usize) -> (usize, usize) {
    let lead = r.max(16).next_multiple_of(16);
    (
        lead,
        (lead + nk.next_multiple_of(16) + r.max(16)).next_multiple_of(16),
    )
}

/// The `k` pass of one padded row (`row[lead..lead + out.len()]`, padded by the radius)
/// with the pairs of any [`sym_conv_pairs`]-like `conv`.
#[inline(always)]
pub(super) fn kconv_pairs<'a>(
    conv: &impl Fn(&mut [f32], &[f32], &[f32], &Pairs),
    out: &mut [f32],
    row: &'a [f32],
    lead: usize,
    w: &[f32],
    prs: &mut Vec<(&'a [f32], &'a [f32])>,
) {
    let r = w.len() - 1;
    prs.clear();
    prs.extend((1..=r).map(|t| (&row[lead - t..], &row[lead + t..])));
    conv(out, &row[lead..lead + out.len()], w, prs);
}

/// Instruction-set builds of the two passes (same arithmetic, no fused multiply-add, so
/// the same bits in each): AVX-512 intrinsics, AVX (8-wide autovectorised), and the
/// baseline for CPUs without AVX. The row kernels are given as closures, which take the
/// build's target features (a function item passed as is was called, not inlined, through
/// a shim compiled without them).
macro_rules! builds {
    ($i:ident, $jk:ident, $conv:expr, $kconv:expr, $($feat:literal)?) => {
        $(#[target_feature(enable = $feat)])?
        #[inline(never)]
        #[allow(clippy::redundant_closure)]
        unsafe fn $i(
            src: &[f32],
            n: [usize; 3],
            w: &[f32],
            out: OutPtr,
            cols: (usize, usize),
            planes: (usize, usize),
        ) {
            // SAFETY: forwarded from the caller
            unsafe { blur_i_columns($conv, src, n, w, out, cols, planes) }
        }
        $(#[target_feature(enable = $feat)])?
        #[inline(never)]
        #[allow(clippy::redundant_closure)]
        unsafe fn $jk(
            o: &mut [f32],
            nj: usize,
            nk: usize,
            w: &[f32],
            tmp: &mut [f32],
            rows: (usize, usize),
        ) {
            blur_jk_plane($conv, $kconv, o, nj, nk, w, tmp, rows)
        }
    };
}
#[cfg(target_arch = "x86_64")]
builds!(
    blur_i_avx512,
    blur_jk_avx512,
    |o, c, w, p| sym_conv_avx512(o, c, w, p),
    |o, row, lead, w, _| kconv_avx512(o, row, lead, w),
    "avx512f"
);
#[cfg(target_arch = "x86_64")]
builds!(
    blur_i_avx,
    blur_jk_avx,
    |o, c, w, p| sym_conv_pairs(o, c, w, p),
    |o, row, lead, w, p| kconv_pairs(&|o, c, w, p| sym_conv_pairs(o, c, w, p), o, row, lead, w, p),
    "avx"
);
builds!(
    blur_i_generic,
    blur_jk_generic,
    |o, c, w, p| sym_conv_pairs(o, c, w, p),
    |o, row, lead, w, p| kconv_pairs(&|o, c, w, p| sym_conv_pairs(o, c, w, p), o, row, lead, w, p),
);

/// The widest instruction-set level the extractor's kernels may use: 0 the portable
/// code, 1 AVX/AVX2, 2 AVX-512 (the default: whatever the CPU has). The environment
/// variable `KEYFUSE_EXTRACT_ISA` (`generic`, `avx2` or `avx512`, read once) lowers it,
/// to compare the builds' output end to end (they give the same bits).
pub(crate) fn isa_cap() -> u8 {
    static CAP: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("KEYFUSE_EXTRACT_ISA").as_deref() {
        Ok("generic") => 0,
        Ok("avx2") | Ok("avx") => 1,
        _ => 2,
    })
}

/// Which build of the passes runs.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Isa {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The widest build this CPU runs, within [`isa_cap`].
    pub(crate) fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        for (isa, level) in [(Isa::Avx512, 2), (Isa::Avx, 1)] {
            if level <= isa_cap() && isa.available() {
                return isa;
            }
        }
        Isa::Generic
    }

    /// Every build this CPU can run (tests compare them).
    #[cfg(test)]
    pub(crate) fn all_available() -> Vec<Isa> {
        let mut v = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        v.extend([Isa::Avx, Isa::Avx512]);
        v.into_iter().filter(|i| i.available()).collect()
    }

    /// Whether this CPU can run the build.
    pub(crate) fn available(self) -> bool {
        match self {
            Isa::Generic => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx => std::is_x86_feature_detected!("avx"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::is_x86_feature_detected!("avx512f"),
        }
    }
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
    blur_into_with(src, sigma, out, Isa::best())
}

/// [`blur_into`] with a chosen instruction-set build (`isa` must be available): two
/// phases, the `i` pass over columns of the planes into `out`, then the `j` and `k`
/// passes plane by plane in place.
///
/// A 3D volume is computed only inside its [`Vol::support`] grown by the kernel radius:
/// outside, every tap reads +0.0, so every product and sum is +0.0, which is written
/// instead (the same bits); `out.support` is that grown box.
pub(crate) fn blur_into_with(src: &Vol, sigma: f32, out: &mut Vol, isa: Isa) {
    assert!(isa.available());
    let [ni, nj, nk] = src.n;
    let plane = nj * nk;
    let w = gaussian_half_kernel(sigma);
    let r = w.len() - 1;
    // where `out` may hold something other than +0.0 now (its own support if it already
    // has this shape: a recycled level of the same octave)
    let old = match out.n == src.n && out.data.len() == src.data.len() {
        true => out.support,
        false => Vol::full(src.n),
    };
    out.n = src.n;
    out.data.resize(src.data.len(), 0.0);
    out.support = Vol::full(src.n);
    if plane == 0 || ni == 0 {
        return;
    }
    // the box the passes compute: src's support (3D only) and its growth by r
    let boxed = ni > 1 && nj > 1 && nk > 1;
    let sup = if boxed { src.support } else { Vol::full(src.n) };
    let grown = if boxed { grow(sup, r, src.n) } else { sup };
    let [(i0, i1), (j0, j1), _] = grown;
    let cols_in = (sup[1].0 * nk, sup[1].1 * nk);
    if ni > 1 {
        let (n, ptr) = (src.n, OutPtr(out.data.as_mut_ptr()));
        let (src, w) = (&src.data[..], &w[..]);
        let planes = (i0, i1);
        let (c0, c1) = cols_in;
        (c0 / I_COLS..c1.div_ceil(I_COLS))
            .into_par_iter()
            .for_each(|c| {
                let cols = ((c * I_COLS).max(c0), ((c + 1) * I_COLS).min(c1));
                // SAFETY: `out` holds ni·plane values; tasks own disjoint columns; the build
                // is available (asserted above)
                flushed(|| unsafe {
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512 => blur_i_avx512(src, n, w, ptr, cols, planes),
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx => blur_i_avx(src, n, w, ptr, cols, planes),
                        Isa::Generic => blur_i_generic(src, n, w, ptr, cols, planes),
                    }
                })
            });
    } else {
        out.data.copy_from_slice(&src.data);
    }
    if boxed {
        // what the i pass left out is +0.0: whole planes outside i0..i1, and the rows
        // outside src's support in j within them; written where `out` held anything else
        let held = (old[1].0 * nk, old[1].1 * nk);
        let (hi0, hi1) = old[0];
        out.data[hi0 * plane..hi1 * plane]
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(p, o)| {
                let (a, b) = match (i0..i1).contains(&(hi0 + p)) {
                    true => cols_in,
                    false => (held.1, held.1),
                };
                o[held.0..a.clamp(held.0, held.1)].fill(0.0);
                o[b.clamp(held.0, held.1)..held.1].fill(0.0);
            });
        out.support = grown;
    }
    if nj == 1 && nk == 1 {
        return;
    }
    let w = &w[..];
    let tmp_len = nj * jk_layout(nk, r).1 + 15;
    let rows = (j0, j1);
    out.data[i0 * plane..i1 * plane]
        .par_chunks_mut(plane)
        .for_each_init(
            || vec![0f32; tmp_len],
            |scratch, o| {
                // SAFETY: the build is available (asserted above)
                flushed(|| unsafe {
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx512 => blur_jk_avx512(o, nj, nk, w, scratch, rows),
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx => blur_jk_avx(o, nj, nk, w, scratch, rows),
                        Isa::Generic => blur_jk_generic(o, nj, nk, w, scratch, rows),
                    }
                })
            },
        );
}

/// `b` grown by `r` voxels on each side of each axis, within the grid `n` (an empty box
/// stays empty).
fn grow(b: [(usize, usize); 3], r: usize, n: [usize; 3]) -> [(usize, usize); 3] {
    std::array::from_fn(|a| match b[a].0 < b[a].1 {
        true => (b[a].0.saturating_sub(r), (b[a].1 + r).min(n[a])),
        false => (0, 0),
    })
}

/// [`blur_into`]'s output at the 27 voxels `c + d`, `d ∈ {−1, 0, 1}³` (each coordinate
/// clamped to the grid; index `(d0 + 1)·9 + (d1 + 1)·3 + d2 + 1`), computed from `src`
/// alone with the half-kernel `w`: the same passes (i, j, k; length-1 axes skipped), the
/// same replicated border and the same order of operations per voxel, so the values are
/// bit-identical to the full blur's. The scale space's top level is only ever read around
/// extremum candidates, so it is computed there instead of over the whole volume.
/// Subnormals are flushed, as in the full blur.
pub(crate) fn blur_at_neighbourhood(src: &Vol, w: &[f32], c: [usize; 3]) -> [f32; 27] {
    flushed(|| neighbourhood(src, w, c))
}

fn neighbourhood(src: &Vol, w: &[f32], c: [usize; 3]) -> [f32; 27] {
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
    /// acc = w0·x; acc += w[t]·(x[−t] + x[+t]) for t = 1..r, replicated border; every
    /// operation with subnormals flushed (FTZ and DAZ).
    fn reference_blur(v: &Vol, sigma: f32) -> Vol {
        let w = gaussian_half_kernel(sigma);
        flushed(|| reference_passes(v, &w))
    }

    fn reference_passes(v: &Vol, w: &[f32]) -> Vol {
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

    const ALL_ISAS: &[Isa] = &[
        Isa::Generic,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512,
    ];

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
                // every third shape near the subnormal range (products and sums flushed)
                if si % 3 == 1 {
                    *val *= if x % 5 == 0 { 1e-40 } else { 4e-38 };
                }
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
                // every instruction-set build this CPU runs gives the same bits
                for &isa in ALL_ISAS.iter().filter(|isa| isa.available()) {
                    let mut o = Vol::zeros([1, 1, 1]).unwrap();
                    blur_into_with(&v, sigma, &mut o, isa);
                    assert_eq!(o.data, out.data, "{n:?} σ={sigma} {isa:?}");
                }
            }
        }
    }

    /// The AVX-512 build against the AVX build (and the baseline) on shapes whose rows are
    /// longer than a step of 64 and not multiples of 16, with zeros, negatives and values
    /// that underflow to subnormals; skipped (with a note) where the CPU lacks AVX-512F.
    #[test]
    fn avx512_blur_is_bit_identical_to_the_avx_blur() {
        #[cfg(target_arch = "x86_64")]
        {
            if !Isa::Avx512.available() {
                eprintln!("no AVX-512F on this CPU: the AVX-512 blur is not compared");
                return;
            }
            for n in [
                [23, 45, 77],
                [8, 13, 200],
                [40, 3, 129],
                [2, 70, 16],
                [5, 9, 1],
            ] {
                let v = Vol::from_fn(n, |i, j, k| {
                    let u = ((((i * 131 + j) * 137 + k) * 7919) % 1013) as f32 / 1013.0;
                    match (i + j + k) % 7 {
                        0 => 0.0,
                        1 => u * 1e-37,
                        2 => -u * 3e-38,
                        3 => u * 1e-40,
                        _ => 100.0 * u - 20.0,
                    }
                })
                .unwrap();
                for sigma in [0.7f32, 1.03, 1.6, 2.45, 6.0] {
                    let run = |isa| {
                        let mut o = Vol::zeros([1, 1, 1]).unwrap();
                        blur_into_with(&v, sigma, &mut o, isa);
                        o.data.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
                    };
                    let wide = run(Isa::Avx512);
                    assert_eq!(wide, run(Isa::Avx), "{n:?} σ={sigma}");
                    assert_eq!(wide, run(Isa::Generic), "{n:?} σ={sigma}");
                }
            }
        }
    }

    /// The blur flushes: no subnormal in its output, subnormal inputs count as zeros, and
    /// it differs from the unflushed arithmetic where that one meets subnormals.
    #[test]
    fn blur_flushes_subnormals() {
        let n = [12, 17, 40];
        let v = Vol::from_fn(n, |i, j, k| {
            let u = ((((i * 131 + j) * 137 + k) * 7919) % 1013) as f32 / 1013.0;
            match (i + j + k) % 3 {
                0 => u * 3e-39,
                1 => -u * 1e-40,
                _ => u * 2e-38,
            }
        })
        .unwrap();
        let zeroed = Vol::new(
            n,
            v.data
                .iter()
                .map(|&x| {
                    if x.is_subnormal() {
                        0.0 * x.signum()
                    } else {
                        x
                    }
                })
                .collect(),
        );
        let w = gaussian_half_kernel(1.6);
        let ieee = reference_passes(&v, &w);
        assert!(ieee.data.iter().any(|x| x.is_subnormal()));
        for &isa in ALL_ISAS.iter().filter(|isa| isa.available()) {
            let (mut a, mut b) = (
                Vol::zeros([1, 1, 1]).unwrap(),
                Vol::zeros([1, 1, 1]).unwrap(),
            );
            blur_into_with(&v, 1.6, &mut a, isa);
            blur_into_with(&zeroed, 1.6, &mut b, isa);
            assert!(!a.data.iter().any(|x| x.is_subnormal()), "{isa:?}");
            assert_eq!(a.data, b.data, "{isa:?}");
            assert_ne!(a.data, ieee.data, "{isa:?}");
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
                if si == 1 {
                    *val *= 2e-38; // subnormal products and sums, flushed in both
                }
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
