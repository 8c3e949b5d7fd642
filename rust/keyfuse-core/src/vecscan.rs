//! The memory-light scan behind exact vector search: dot products of one query with
//! int8-quantised vectors (row r ≈ `scale[r] × code[r]`), a quarter of the bytes of a
//! float32 matrix. The caller bounds the error of each product (quantisation and float
//! rounding) and re-scores every row that the bound cannot rule out exactly, so the
//! search stays exact; this module only has to be fast and deterministic.

use crate::{KfError, Result};
use rayon::prelude::*;

/// Rows per rayon task (a few hundred KB of codes at 512 dimensions).
const BLOCK: usize = 1024;

/// `scale[r] × Σ_j query[j] × code[r, j]` for every row of `codes` (row-major,
/// `scale.len()` rows of `query.len()` values), in float32.
///
/// The summation order is fixed per row (eight interleaved partial sums, then a fixed
/// reduction), so the result does not depend on the thread count; the AVX2+FMA kernel and
/// the portable one may differ in the last bits (fused vs separate rounding), which the
/// caller's error bound covers.
pub fn dots_i8(codes: &[i8], scale: &[f32], query: &[f32]) -> Result<Vec<f32>> {
    let d = query.len();
    let n = scale.len();
    if d == 0 {
        return Err(KfError::InvalidArgument("the query vector is empty".into()));
    }
    if codes.len() != n * d {
        return Err(KfError::InvalidArgument(format!(
            "codes hold {} values, expected {n} rows × {d}",
            codes.len()
        )));
    }
    let fast = has_avx2_fma();
    let mut out = vec![0f32; n];
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(b, chunk)| {
            let r0 = b * BLOCK;
            for (i, o) in chunk.iter_mut().enumerate() {
                let r = r0 + i;
                let row = &codes[r * d..(r + 1) * d];
                *o = scale[r] * dot(row, query, fast);
            }
        });
    Ok(out)
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[inline]
fn dot(row: &[i8], q: &[f32], fast: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fast {
        // SAFETY: AVX2 and FMA were detected at run time
        return unsafe { dot_avx2(row, q) };
    }
    let _ = fast;
    dot_portable(row, q)
}

/// Eight partial sums over interleaved elements, reduced in a fixed order.
fn dot_portable(row: &[i8], q: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut rc = row.chunks_exact(8);
    let mut qc = q.chunks_exact(8);
    for (r, qq) in (&mut rc).zip(&mut qc) {
        for l in 0..8 {
            acc[l] += qq[l] * r[l] as f32;
        }
    }
    let mut s = reduce8(&acc);
    for (r, qq) in rc.remainder().iter().zip(qc.remainder()) {
        s += qq * *r as f32;
    }
    s
}

#[inline(always)]
fn reduce8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(row: &[i8], q: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let d = q.len();
    let (rp, qp) = (row.as_ptr(), q.as_ptr());
    // four accumulators of eight lanes over 32 elements per step; lane l of accumulator
    // a holds the elements ≡ 8a + l (mod 32)
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut j = 0;
    while j + 32 <= d {
        for (a, acc_a) in acc.iter_mut().enumerate() {
            let off = j + 8 * a;
            let codes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(rp.add(off) as *const __m128i));
            let x = _mm256_cvtepi32_ps(codes);
            *acc_a = _mm256_fmadd_ps(x, _mm256_loadu_ps(qp.add(off)), *acc_a);
        }
        j += 32;
    }
    while j + 8 <= d {
        let codes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(rp.add(j) as *const __m128i));
        acc[0] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(codes),
            _mm256_loadu_ps(qp.add(j)),
            acc[0],
        );
        j += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut s = reduce8(&lanes);
    while j < d {
        s += *qp.add(j) * *rp.add(j) as f32;
        j += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    #[test]
    fn dots_match_float64_within_rounding() {
        let mut seed = 7;
        for d in [1usize, 7, 8, 31, 32, 33, 100, 512] {
            let n = 2 * BLOCK + 5;
            let codes: Vec<i8> = (0..n * d).map(|_| (lcg(&mut seed) * 127.0) as i8).collect();
            let scale: Vec<f32> = (0..n).map(|_| lcg(&mut seed).abs() + 0.01).collect();
            let q: Vec<f32> = (0..d).map(|_| lcg(&mut seed)).collect();
            let got = dots_i8(&codes, &scale, &q).unwrap();
            for r in 0..n {
                let row = &codes[r * d..(r + 1) * d];
                let exact: f64 = row.iter().zip(&q).map(|(&c, &x)| c as f64 * x as f64).sum();
                let exact = exact * scale[r] as f64;
                let mag: f64 = row
                    .iter()
                    .zip(&q)
                    .map(|(&c, &x)| (c as f64 * x as f64).abs())
                    .sum();
                let tol = 1e-6 * d as f64 * mag * scale[r] as f64 + 1e-6;
                assert!((got[r] as f64 - exact).abs() <= tol, "d={d} row {r}");
                // both kernels within the same bound
                let p = scale[r] * dot_portable(row, &q);
                assert!((p as f64 - exact).abs() <= tol);
            }
        }
    }

    #[test]
    fn same_result_whatever_the_thread_count() {
        let mut seed = 3;
        let (n, d) = (5000, 64);
        let codes: Vec<i8> = (0..n * d).map(|_| (lcg(&mut seed) * 127.0) as i8).collect();
        let scale = vec![0.5f32; n];
        let q: Vec<f32> = (0..d).map(|_| lcg(&mut seed)).collect();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let a = one.install(|| dots_i8(&codes, &scale, &q).unwrap());
        let b = dots_i8(&codes, &scale, &q).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(dots_i8(&[1, 2, 3], &[1.0], &[1.0, 2.0]).is_err());
        assert!(dots_i8(&[], &[], &[]).is_err());
    }
}
