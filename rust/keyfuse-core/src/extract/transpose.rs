//! The input copy of a Fortran-ordered volume (NIfTI arrays as nibabel loads them) into
//! the extractor's C order: a transpose of each `j`-slice (`src(·, j, ·)`, `nk` runs of
//! `ni` values, into `out(·, j, ·)`, `ni` runs of `nk` values), in 16×16 (AVX-512) or
//! 8×8 (AVX) blocks transposed in registers, else in the portable blocked copy. It only
//! moves values: every build gives the same bits.
//!
//! The copy is bound by the latency of the cache lines it misses, not by arithmetic: a
//! slice's source runs lie a `k`-plane (`ni·nj` values) apart and its destination runs an
//! `i`-plane apart, so the hardware prefetchers do not follow them. The register builds
//! therefore prefetch the next slice's lines (each of its runs follows the current
//! slice's run in memory) while transposing the current one (docs/decisions.md).

use super::blur::Isa;
use super::volume::Vol;
use rayon::prelude::*;

/// Fill `out` (C order, shape `out.n`) from `src`, the same volume in Fortran order (`i`
/// fastest), each value multiplied by `scale` (one IEEE product per voxel, in every build).
pub(crate) fn copy_fortran(src: &[f32], out: &mut Vol, scale: f32) {
    copy_fortran_with(src, out, scale, Isa::best())
}

/// The destination of the register builds' slices.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint voxels (each its own `j`-slices)
#[cfg(target_arch = "x86_64")]
unsafe impl Send for OutPtr {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for OutPtr {}

#[cfg(target_arch = "x86_64")]
impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// [`copy_fortran`] with a chosen instruction-set build (`isa` must be available).
pub(crate) fn copy_fortran_with(src: &[f32], out: &mut Vol, scale: f32, isa: Isa) {
    assert!(isa.available());
    let n = out.n;
    let plane = n[1] * n[2];
    assert_eq!(src.len(), n[0] * plane);
    assert_eq!(out.data.len(), n[0] * plane);
    if plane == 0 || n[0] == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Generic {
        let op = OutPtr(out.data.as_mut_ptr());
        (0..n[1]).into_par_iter().for_each(|j| {
            // SAFETY: `out` holds the volume (asserted above), this task alone writes
            // slice `j`, and the build is available
            unsafe {
                match isa {
                    Isa::Avx512 => slice_avx512(src, n, j, scale, op.get()),
                    _ => slice_avx(src, n, j, scale, op.get()),
                }
            }
        });
        return;
    }
    const TILE: usize = 32;
    out.data
        .par_chunks_mut(TILE * plane)
        .enumerate()
        .for_each(|(t, o)| tile_generic::<TILE>(src, n, scale, t * TILE, o));
}

/// The portable copy of the `i`-planes `i0..` held by `o`, in blocks of `TILE` `i` × 16
/// `k`: for each `j`, sixteen runs of `src` (one per `k`) are read and `TILE` runs of `o`
/// (one per `i`) written whole.
fn tile_generic<const TILE: usize>(
    src: &[f32],
    [ni, nj, nk]: [usize; 3],
    scale: f32,
    i0: usize,
    o: &mut [f32],
) {
    const TK: usize = 16;
    let plane = nj * nk;
    let m = o.len() / plane;
    // block[dk][di] = src(i0 + di, j, k0 + dk)
    let mut block = [[0f32; TILE]; TK];
    for k0 in (0..nk).step_by(TK) {
        let kn = TK.min(nk - k0);
        for j in 0..nj {
            for (dk, b) in block[..kn].iter_mut().enumerate() {
                b[..m].copy_from_slice(&src[i0 + ni * (j + nj * (k0 + dk))..][..m]);
            }
            for di in 0..m {
                let row = &mut o[di * plane + j * nk + k0..][..kn];
                for (dk, x) in row.iter_mut().enumerate() {
                    *x = block[dk][di] * scale;
                }
            }
        }
    }
}

/// The 16×16 transpose of `r` in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [std::arch::x86_64::__m512; 16]) {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_ps(); 16];
    for p in 0..8 {
        t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    let lo = |a: __m512, b: __m512| {
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
    };
    let hi = |a: __m512, b: __m512| {
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
    };
    for q in 0..4 {
        let b = 4 * q;
        r[b] = lo(t[b], t[b + 2]);
        r[b + 1] = hi(t[b], t[b + 2]);
        r[b + 2] = lo(t[b + 1], t[b + 3]);
        r[b + 3] = hi(t[b + 1], t[b + 3]);
    }
    for h in 0..2 {
        let b = 8 * h;
        for x in 0..4 {
            t[b + x] = _mm512_shuffle_f32x4::<0x88>(r[b + x], r[b + 4 + x]);
            t[b + 4 + x] = _mm512_shuffle_f32x4::<0xdd>(r[b + x], r[b + 4 + x]);
        }
    }
    for x in 0..8 {
        r[x] = _mm512_shuffle_f32x4::<0x88>(t[x], t[8 + x]);
        r[8 + x] = _mm512_shuffle_f32x4::<0xdd>(t[x], t[8 + x]);
    }
}

/// Slice `j` of [`copy_fortran`] with AVX-512: blocks of 16 `i` × 16 `k`, sixteen runs of
/// 16 `i` loaded (masked at the ends), transposed in registers and stored as sixteen runs
/// of 16 `k` (masked at the ends); `i` blocks outer, so each destination run is written
/// whole. The next slice's source and destination lines are prefetched into L2 meanwhile.
///
/// # Safety
/// AVX-512F is available, `src` and `op` hold `ni·nj·nk` values, and no other thread
/// touches slice `j` of `op`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn slice_avx512(src: &[f32], [ni, nj, nk]: [usize; 3], j: usize, scale: f32, op: *mut f32) {
    use std::arch::x86_64::*;
    let plane = nj * nk;
    let sp = src.as_ptr();
    let next = j + 1 < nj;
    let vs = _mm512_set1_ps(scale);
    let mask = |n: usize| -> __mmask16 { (u32::MAX >> (32 - n)) as u16 };
    for i0 in (0..ni).step_by(16) {
        let (mi, imask) = (16.min(ni - i0), mask(16.min(ni - i0)));
        for k0 in (0..nk).step_by(16) {
            let kn = 16.min(nk - k0);
            let mut r = [_mm512_setzero_ps(); 16];
            for (dk, row) in r[..kn].iter_mut().enumerate() {
                // SAFETY (all pointers): inside the volumes, by the loop bounds
                let s = sp.add(i0 + ni * (j + nj * (k0 + dk)));
                if next {
                    _mm_prefetch::<_MM_HINT_T1>(s.add(ni) as *const i8);
                }
                *row = _mm512_maskz_loadu_ps(imask, s);
            }
            transpose16(&mut r);
            let kmask = mask(kn);
            for (di, row) in r[..mi].iter().enumerate() {
                let d = op.add((i0 + di) * plane + j * nk + k0);
                if next {
                    _mm_prefetch::<_MM_HINT_ET1>(d.add(nk) as *const i8);
                }
                _mm512_mask_storeu_ps(d, kmask, _mm512_mul_ps(*row, vs));
            }
        }
    }
}

/// The 8×8 transpose of `r` in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose8(r: &mut [std::arch::x86_64::__m256; 8]) {
    use std::arch::x86_64::*;
    let mut t = [_mm256_setzero_ps(); 8];
    for p in 0..4 {
        t[2 * p] = _mm256_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm256_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    let mut u = [_mm256_setzero_ps(); 8];
    for h in 0..2 {
        let b = 4 * h;
        u[b] = _mm256_shuffle_ps::<0x44>(t[b], t[b + 2]);
        u[b + 1] = _mm256_shuffle_ps::<0xee>(t[b], t[b + 2]);
        u[b + 2] = _mm256_shuffle_ps::<0x44>(t[b + 1], t[b + 3]);
        u[b + 3] = _mm256_shuffle_ps::<0xee>(t[b + 1], t[b + 3]);
    }
    for x in 0..4 {
        r[x] = _mm256_permute2f128_ps::<0x20>(u[x], u[4 + x]);
        r[4 + x] = _mm256_permute2f128_ps::<0x31>(u[x], u[4 + x]);
    }
}

/// [`slice_avx512`] with AVX: 8×8 blocks, the ends masked with AVX's masked loads and
/// stores.
///
/// # Safety
/// AVX is available, `src` and `op` hold `ni·nj·nk` values, and no other thread touches
/// slice `j` of `op`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn slice_avx(src: &[f32], [ni, nj, nk]: [usize; 3], j: usize, scale: f32, op: *mut f32) {
    use std::arch::x86_64::*;
    let plane = nj * nk;
    let sp = src.as_ptr();
    let next = j + 1 < nj;
    let vs = _mm256_set1_ps(scale);
    // lane masks `lane < n`, from float comparisons of small exact integers (AVX has no
    // 256-bit integer compare)
    let lanes = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
    let mask = |n: usize| {
        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(lanes, _mm256_set1_ps(n as f32)))
    };
    for i0 in (0..ni).step_by(8) {
        let mi = 8.min(ni - i0);
        let imask = mask(mi);
        for k0 in (0..nk).step_by(8) {
            let kn = 8.min(nk - k0);
            let mut r = [_mm256_setzero_ps(); 8];
            for (dk, row) in r[..kn].iter_mut().enumerate() {
                // SAFETY (all pointers): inside the volumes, by the loop bounds
                let s = sp.add(i0 + ni * (j + nj * (k0 + dk)));
                if next {
                    _mm_prefetch::<_MM_HINT_T1>(s.add(ni) as *const i8);
                }
                *row = if mi == 8 {
                    _mm256_loadu_ps(s)
                } else {
                    _mm256_maskload_ps(s, imask)
                };
            }
            transpose8(&mut r);
            let kmask = mask(kn);
            for (di, row) in r[..mi].iter().enumerate() {
                let d = op.add((i0 + di) * plane + j * nk + k0);
                if next {
                    _mm_prefetch::<_MM_HINT_ET1>(d.add(nk) as *const i8);
                }
                let v = _mm256_mul_ps(*row, vs);
                if kn == 8 {
                    _mm256_storeu_ps(d, v);
                } else {
                    _mm256_maskstore_ps(d, kmask, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every build copies every voxel times the scale (the scalar product's bits), on shapes
    /// that are and are not multiples of the blocks (16, 8, the portable copy's 32), with
    /// axes of one voxel.
    #[test]
    fn fortran_copy_transposes() {
        for n in [
            [37, 5, 9],
            [16, 3, 4],
            [1, 7, 2],
            [33, 1, 1],
            [70, 6, 35],
            [64, 2, 32],
            [1, 1, 1],
            [1, 1, 40],
            [17, 1, 17],
            [15, 9, 33],
            [48, 3, 16],
            [31, 4, 47],
            [8, 8, 8],
        ] {
            let len = n[0] * n[1] * n[2];
            // Fortran order: element (i, j, k) at i + ni·(j + nj·k); any bits (NaNs with
            // payloads, subnormals, signed zeros)
            let f: Vec<f32> = (0..len as u32)
                .map(|x| f32::from_bits(x.wrapping_mul(0x9e37_79b9) ^ (x << 29)))
                .collect();
            for (isa, scale) in Isa::all_available()
                .into_iter()
                .flat_map(|i| [(i, 1.0), (i, 0.37), (i, 3e-39)])
            {
                let mut out = Vol::zeros(n).unwrap();
                out.data.fill(f32::NAN);
                copy_fortran_with(&f, &mut out, scale, isa);
                for i in 0..n[0] {
                    for j in 0..n[1] {
                        for k in 0..n[2] {
                            let x = std::hint::black_box(f[i + n[0] * (j + n[1] * k)]);
                            assert_eq!(
                                out.at(i, j, k).to_bits(),
                                (x * scale).to_bits(),
                                "{n:?} {isa:?} {scale}"
                            );
                        }
                    }
                }
            }
        }
    }
}
