//! The blur's AVX-512 row kernels (extract/blur.rs chooses them at run time where the CPU
//! has AVX-512F): per lane the same multiplies and adds in the same order as the portable
//! kernel (`blur::sym_conv`, no fused multiply-add), so the same bits, and multiplies
//! that would take a subnormal operand or result computed exactly without one.

use super::blur::{kconv_pairs, Pairs};
use std::arch::x86_64::*;

/// `w·s` per lane, rounded as IEEE f32 multiplication rounds it (subnormals included):
/// the hardware product where no lane of `s` lies in `0 < |s| < T` (`tb` = the bits of
/// `T` minus one, [`tiny_bound`]), else [`mul512_exact`]. This CPU family runs a multiply
/// with a subnormal operand or result through a microcode assist (~140 cycles), and the
/// scale space's Gaussians hold subnormals at the fringe of the blurred head
/// (docs/decisions.md); the result is the same bits either way.
#[target_feature(enable = "avx512f")]
#[inline]
fn mul512(w: __m512, wd: __m512d, s: __m512, tb: __m512i) -> __m512 {
    let mag = _mm512_and_si512(_mm512_castps_si512(s), _mm512_set1_epi32(0x7fff_ffff));
    // 0 < |s| < T, as |s| − 1 < T − 1 (0 − 1 wraps to the largest)
    let tiny = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(mag, _mm512_set1_epi32(1)), tb);
    if tiny == 0 {
        _mm512_mul_ps(w, s)
    } else {
        mul512_exact(wd, s)
    }
}

/// The bound `T` of [`mul512`] for the (positive) weight `w`: `w·s` is normal whenever
/// `|s| ≥ T` (a factor 2 above 2^−126 / w, for the division's rounding); returned as the
/// bits of `T` minus one.
fn tiny_bound(w: f32) -> u32 {
    (2.0 * f32::MIN_POSITIVE / w).to_bits().wrapping_sub(1)
}

/// `wd·s` per lane (`wd` the f32 weight as f64) with IEEE f32 rounding, computed without a
/// subnormal operand or result in any floating-point instruction: `s` goes to f64 exactly
/// (a subnormal as its integer significand times 2^−149), the f64 product of two f32 is
/// exact, a normal result is rounded by the f64 → f32 conversion, a subnormal one to the
/// grid of 2^−149 by adding and subtracting 1.5·2^−97 (round half to even, as the f32
/// multiply) and written as its integer significand.
#[target_feature(enable = "avx512f")]
#[cold]
#[inline(never)]
fn mul512_exact(wd: __m512d, s: __m512) -> __m512 {
    let bits = _mm512_castps_si512(s);
    let sign = _mm512_and_si512(bits, _mm512_set1_epi32(i32::MIN));
    let mag = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fff_ffff));
    // subnormal or zero lanes; the others' magnitudes (the subnormal ones zeroed)
    let sub = _mm512_cmplt_epu32_mask(mag, _mm512_set1_epi32(0x0080_0000));
    let norm = _mm512_maskz_mov_epi32(!sub, mag);
    let (lim, c) = (
        _mm512_set1_pd(f64::powi(2.0, -126)),
        _mm512_set1_pd(1.5 * f64::powi(2.0, -97)),
    );
    let (up, down) = (
        _mm512_set1_pd(f64::powi(2.0, 149)),
        _mm512_set1_pd(f64::powi(2.0, -149)),
    );
    let half = |v: __m512i, h: usize| {
        if h == 0 {
            _mm512_castsi512_si256(v)
        } else {
            _mm512_extracti64x4_epi64::<1>(v)
        }
    };
    let mut parts = [(_mm256_setzero_si256(), _mm256_setzero_si256(), 0u8); 2];
    for (h, part) in parts.iter_mut().enumerate() {
        let sn = _mm512_cvtps_pd(_mm256_castsi256_ps(half(norm, h)));
        let sd = _mm512_mul_pd(_mm512_cvtepi32_pd(half(mag, h)), down);
        let p = _mm512_mul_pd(wd, _mm512_mask_blend_pd((sub >> (8 * h)) as u8, sn, sd));
        let small = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(p, lim);
        let normal = _mm512_cvtpd_ps(_mm512_maskz_mov_pd(!small, p));
        let grid = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_sub_pd(_mm512_add_pd(p, c), c), up));
        *part = (_mm256_castps_si256(normal), grid, small);
    }
    let join = |a: __m256i, b: __m256i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
    let small = parts[0].2 as u16 | (parts[1].2 as u16) << 8;
    let r = _mm512_mask_blend_epi32(
        small,
        join(parts[0].0, parts[1].0),
        join(parts[0].1, parts[1].1),
    );
    _mm512_castsi512_ps(_mm512_or_si512(r, sign))
}

/// The AVX-512 row convolution: `o[x] = w[0]·c[x] + Σ_t w[t]·(a_t[x] + b_t[x])`, `x <
/// n`, with `(a_t, b_t) = pair(t)`: four 16-wide vectors per step (the last step masked,
/// no overlapping block), the weights broadcast from memory; per lane the same
/// multiplies and adds in the same order as `blur::sym_conv` (no fused multiply-add), so
/// the same bits.
///
/// # Safety
/// AVX-512F is available; `o`, `c` and every row of `pair` hold `n` values.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn conv512(
    o: *mut f32,
    c: *const f32,
    n: usize,
    w: &[f32],
    pair: impl Fn(usize) -> (*const f32, *const f32),
) {
    /// One step of four vectors at `x`, the lanes of `m` (all of them unless `MASKED`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn step<const MASKED: bool>(
        o: *mut f32,
        c: *const f32,
        x: usize,
        m: [__mmask16; 4],
        w: &[f32],
        tb: &[u32],
        pair: &impl Fn(usize) -> (*const f32, *const f32),
    ) {
        // SAFETY: the caller's contract; masked lanes are neither read nor written
        unsafe {
            let ld = |p: *const f32, i: usize| {
                if MASKED {
                    _mm512_maskz_loadu_ps(m[i], p.add(x + 16 * i))
                } else {
                    _mm512_loadu_ps(p.add(x + 16 * i))
                }
            };
            let mul = |t: usize, s| {
                let wt = *w.get_unchecked(t);
                let tb = _mm512_set1_epi32(tb.get(t).map_or(0, |&b| b as i32));
                mul512(_mm512_set1_ps(wt), _mm512_set1_pd(wt as f64), s, tb)
            };
            let mut acc: [__m512; 4] = std::array::from_fn(|i| mul(0, ld(c, i)));
            for t in 1..w.len() {
                let (a, b) = pair(t);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let s = _mm512_add_ps(ld(a, i), ld(b, i));
                    *acc = _mm512_add_ps(*acc, mul(t, s));
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                if MASKED {
                    _mm512_mask_storeu_ps(o.add(x + 16 * i), m[i], *acc);
                } else {
                    _mm512_storeu_ps(o.add(x + 16 * i), *acc);
                }
            }
        }
    }
    // (taps beyond the table get 0: the hardware product, same bits, maybe slower)
    let tb: [u32; 32] = std::array::from_fn(|t| w.get(t).map_or(0, |&wt| tiny_bound(wt)));
    let tb = &tb[..];
    // SAFETY: the caller's contract
    unsafe {
        let mut x = 0;
        while x + 64 <= n {
            step::<false>(o, c, x, [!0; 4], w, tb, &pair);
            x += 64;
        }
        if x < n {
            let m = std::array::from_fn(|i| {
                let left = n.saturating_sub(x + 16 * i).min(16) as u32;
                ((1u32 << left) - 1) as u16
            });
            step::<true>(o, c, x, m, w, tb, &pair);
        }
    }
}

/// `blur::sym_conv_pairs` in AVX-512 ([`conv512`]).
#[target_feature(enable = "avx512f")]
pub(super) fn sym_conv_avx512(out: &mut [f32], c: &[f32], w: &[f32], prs: &Pairs) {
    let n = out.len();
    assert!(c.len() >= n && prs.len() + 1 == w.len());
    assert!(prs.iter().all(|(a, b)| a.len() >= n && b.len() >= n));
    // SAFETY: AVX-512F is enabled here; every row holds n values (asserted)
    unsafe {
        conv512(out.as_mut_ptr(), c.as_ptr(), n, w, |t| {
            let (a, b) = prs.get_unchecked(t - 1);
            (a.as_ptr(), b.as_ptr())
        })
    }
}

/// The `k` pass of one padded row in AVX-512 with aligned reads: the row is read as
/// 64-byte-aligned vectors and the shifted vectors `c[x ± t..]` are formed by two-source
/// permutes instead of unaligned (cache-line-splitting) loads; per lane the same
/// multiplies and adds in the same order as `blur::sym_conv`, so the same bits.
#[target_feature(enable = "avx512f")]
pub(super) fn kconv_avx512(out: &mut [f32], row: &[f32], lead: usize, w: &[f32]) {
    let (n, r) = (out.len(), w.len() - 1);
    if r > 16 {
        let mut prs = Vec::new();
        return kconv_pairs(
            &|o, c, w, p| sym_conv_avx512(o, c, w, p),
            out,
            row,
            lead,
            w,
            &mut prs,
        );
    }
    let c = row[lead..].as_ptr();
    assert!(lead >= 16 && c.align_offset(64) == 0);
    assert!(row.len() >= lead + n.next_multiple_of(16) + 16);
    // the permute indices: lanes l + t of (cur, next) and 16 + l − t of (prev, cur)
    let idx = |d: i32| {
        _mm512_add_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(d),
        )
    };
    // SAFETY: aligned reads from c − 16 to c + n.next_multiple_of(16) + 16 (asserted inside
    // `row`); the store is masked to the lanes below n
    unsafe {
        let tbs: [u32; 32] = std::array::from_fn(|t| w.get(t).map_or(0, |&wt| tiny_bound(wt)));
        let mul = |t: usize, s| {
            let wt = *w.get_unchecked(t);
            let tb = _mm512_set1_epi32(tbs.get(t).map_or(0, |&b| b as i32));
            mul512(_mm512_set1_ps(wt), _mm512_set1_pd(wt as f64), s, tb)
        };
        let mut prev = _mm512_load_ps(c.sub(16));
        let mut cur = _mm512_load_ps(c);
        let mut x = 0;
        while x < n {
            let next = _mm512_load_ps(c.add(x + 16));
            let mut acc = mul(0, cur);
            for t in 1..=r {
                let a = _mm512_permutex2var_ps(prev, idx(16 - t as i32), cur);
                let b = _mm512_permutex2var_ps(cur, idx(t as i32), next);
                acc = _mm512_add_ps(acc, mul(t, _mm512_add_ps(a, b)));
            }
            let left = (n - x).min(16) as u32;
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(x), ((1u32 << left) - 1) as u16, acc);
            (prev, cur) = (cur, next);
            x += 16;
        }
    }
}

#[cfg(test)]
#[test]
fn mul512_is_the_f32_product() {
    if !std::is_x86_feature_detected!("avx512f") {
        return;
    }
    let ws = [0.4f32, 0.2417, 0.0031, 1.0, 0.123_456_79];
    let mut n = 0u64;
    let mut bad = 0;
    for &w in &ws {
        let tb = tiny_bound(w);
        for k in 0..20_000u32 {
            let vals: [f32; 16] = std::array::from_fn(|l| {
                let b =
                    (k.wrapping_mul(2_654_435_761) ^ (l as u32).wrapping_mul(40_503)) % 0x0200_0000;
                let x = f32::from_bits(b);
                if l % 2 == 0 {
                    -x
                } else {
                    x
                }
            });
            let got: [f32; 16] = unsafe {
                let s = _mm512_loadu_ps(vals.as_ptr());
                let r = mul512(
                    _mm512_set1_ps(w),
                    _mm512_set1_pd(w as f64),
                    s,
                    _mm512_set1_epi32(tb as i32),
                );
                std::mem::transmute(r)
            };
            for l in 0..16 {
                n += 1;
                if got[l].to_bits() != (w * vals[l]).to_bits() {
                    bad += 1;
                }
            }
        }
    }
    assert_eq!(bad, 0, "{bad} of {n}");
}
