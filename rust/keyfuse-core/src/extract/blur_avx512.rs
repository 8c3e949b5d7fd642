//! The blur's AVX-512 row kernels (extract/blur.rs chooses them at run time where the CPU
//! has AVX-512F): per lane the same multiplies and adds in the same order as the portable
//! kernel (`blur::sym_conv`, no fused multiply-add), so the same bits (subnormals are
//! flushed by the caller's MXCSR in every build, extract/flush.rs).

use super::blur::{kconv_pairs, Pairs};
use std::arch::x86_64::*;

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
            let mul = |t: usize, s| _mm512_mul_ps(_mm512_set1_ps(*w.get_unchecked(t)), s);
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
    // SAFETY: the caller's contract
    unsafe {
        let mut x = 0;
        while x + 64 <= n {
            step::<false>(o, c, x, [!0; 4], w, &pair);
            x += 64;
        }
        if x < n {
            let m = std::array::from_fn(|i| {
                let left = n.saturating_sub(x + 16 * i).min(16) as u32;
                ((1u32 << left) - 1) as u16
            });
            step::<true>(o, c, x, m, w, &pair);
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
        let mul = |t: usize, s| _mm512_mul_ps(_mm512_set1_ps(*w.get_unchecked(t)), s);
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
