//! SIMD helpers for 64-byte descriptors, and the run-time CPU feature detection that
//! picks them. Every kernel gives the same exact integer distances as the portable code,
//! so results never depend on the machine. The AMX tile kernel and its detection live in
//! `knn/amx.rs` (inline assembly and a Linux permission request).

use crate::DESC_LEN;

/// Whether the CPU runs AVX2 (the dot-product and difference kernels).
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Squared distance of two descriptors, portable.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))] // x86-64 runs the SSE2 kernel
#[allow(clippy::needless_range_loop)]
#[inline(always)]
pub(crate) fn dist2_scalar(a: &[u8; DESC_LEN], b: &[u8; DESC_LEN]) -> u32 {
    let mut s = 0u32;
    for i in 0..DESC_LEN {
        let d = a[i] as i32 - b[i] as i32;
        s += (d * d) as u32;
    }
    s
}

/// The sum of the four i32 lanes of an `__m128i`, as u32.
#[cfg(target_arch = "x86_64")]
macro_rules! hsum_epi32_128 {
    ($s:expr) => {{
        use ::std::arch::x86_64::{_mm_add_epi32 as add, _mm_shuffle_epi32 as shuffle};
        let s = $s;
        let s = add(s, shuffle(s, 0b01_00_11_10));
        let s = add(s, shuffle(s, 0b10_11_00_01));
        ::std::arch::x86_64::_mm_cvtsi128_si32(s) as u32
    }};
}

/// The sum of the eight i32 lanes of an `__m256i`, as u32 (AVX2 callers only).
#[cfg(target_arch = "x86_64")]
macro_rules! hsum_epi32_256 {
    ($s:expr) => {{
        use ::std::arch::x86_64 as arch;
        let s = $s;
        $crate::simd::hsum_epi32_128!(arch::_mm_add_epi32(
            arch::_mm256_castsi256_si128(s),
            arch::_mm256_extracti128_si256(s, 1)
        ))
    }};
}

/// The dot product of a 64-byte row (`$b0`, `$b1`: its two halves) with a query
/// (`$q0`, `$q1`) as eight i32 partial sums, by `maddubs` (u8 × i8: exact while every
/// query byte is ≤ 127; rank descriptors are 0..63). `$ones` is `_mm256_set1_epi16(1)`.
/// A macro, not a function: closures and helpers do not inherit `target_feature`, and
/// the intrinsics would become calls (AVX2 callers only).
#[cfg(target_arch = "x86_64")]
macro_rules! dot64_avx2 {
    ($b0:expr, $b1:expr, $q0:expr, $q1:expr, $ones:expr) => {{
        use ::std::arch::x86_64 as arch;
        arch::_mm256_add_epi32(
            arch::_mm256_madd_epi16(arch::_mm256_maddubs_epi16($b0, $q0), $ones),
            arch::_mm256_madd_epi16(arch::_mm256_maddubs_epi16($b1, $q1), $ones),
        )
    }};
}

#[cfg(target_arch = "x86_64")]
pub(crate) use {dot64_avx2, hsum_epi32_128, hsum_epi32_256};

/// Squared distance by SSE2: |a−b| per byte (max − min), widened to i16 and
/// squared-and-paired by `pmaddwd`.
///
/// # Safety
/// None beyond x86-64 (SSE2 is part of its baseline); kept `unsafe` like the intrinsics.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn dist2_sse2(a: &[u8; DESC_LEN], b: &[u8; DESC_LEN]) -> u32 {
    use std::arch::x86_64::*;
    let zero = _mm_setzero_si128();
    let mut acc = _mm_setzero_si128();
    for c in 0..4 {
        let x = _mm_loadu_si128(a.as_ptr().add(16 * c) as *const __m128i);
        let y = _mm_loadu_si128(b.as_ptr().add(16 * c) as *const __m128i);
        let d = _mm_sub_epi8(_mm_max_epu8(x, y), _mm_min_epu8(x, y));
        let lo = _mm_unpacklo_epi8(d, zero);
        let hi = _mm_unpackhi_epi8(d, zero);
        acc = _mm_add_epi32(acc, _mm_madd_epi16(lo, lo));
        acc = _mm_add_epi32(acc, _mm_madd_epi16(hi, hi));
    }
    hsum_epi32_128!(acc)
}

/// Squared distance by AVX2, as [`dist2_sse2`] on 32 bytes at a time.
///
/// # Safety
/// AVX2 must be available; `a` and `b` must hold at least 64 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn dist2_avx2(a: &[u8], b: &[u8]) -> u32 {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= DESC_LEN && b.len() >= DESC_LEN);
    let zero = _mm256_setzero_si256();
    let mut acc = _mm256_setzero_si256();
    for c in 0..2 {
        let x = _mm256_loadu_si256(a.as_ptr().add(32 * c) as *const __m256i);
        let y = _mm256_loadu_si256(b.as_ptr().add(32 * c) as *const __m256i);
        let d = _mm256_sub_epi8(_mm256_max_epu8(x, y), _mm256_min_epu8(x, y));
        let lo = _mm256_unpacklo_epi8(d, zero);
        let hi = _mm256_unpackhi_epi8(d, zero);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(lo, lo));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(hi, hi));
    }
    hsum_epi32_256!(acc)
}
