//! Cubic B-spline reslicing of a volume onto another grid (an affine map between voxel
//! indices): how an oblique or off-lattice scan is brought onto the world lattice before
//! extraction, so that its keypoints do not depend on how it was stored.
//!
//! Interpolation is the cubic B-spline of Unser (1999): a recursive prefilter along each
//! axis (mirror boundary) turns samples into spline coefficients, then each output voxel
//! is the 4 × 4 × 4 weighted sum around its source position. Points outside the source
//! grid are 0. The result is deterministic whatever the thread count (every output voxel
//! is computed alone).

use ndarray::ArrayView3;
use rayon::prelude::*;

use crate::error::{KfError, Result};

/// The pole of the cubic B-spline prefilter, √3 − 2.
const POLE: f64 = -0.267_949_192_431_122_7;

/// In-place cubic B-spline prefilter of `lanes` independent lines at once: line `l`'s
/// sample `k` is `c[k·stride + l]` (mirror boundary). Lanes are contiguous, so every step
/// is one vectorisable pass over a row.
fn prefilter_lanes(c: &mut [f32], len: usize, stride: usize, lanes: usize) {
    if len < 2 {
        return;
    }
    let z = POLE as f32;
    let row = |k: usize| k * stride..k * stride + lanes;
    // gain (1 − z)(1 − 1/z) = 6
    for k in 0..len {
        c[row(k)].iter_mut().for_each(|x| *x *= 6.0);
    }
    // causal initialisation: the mirror-extended sum, truncated where z^k < 1e-9, or in
    // closed form (Unser) for a short line
    let horizon = ((1e-9f64).ln() / POLE.abs().ln()).ceil() as usize;
    let mut first = vec![0f64; lanes];
    if horizon < len {
        let mut zn = 1.0f64;
        for k in 0..horizon {
            for (f, &x) in first.iter_mut().zip(&c[row(k)]) {
                *f += zn * x as f64;
            }
            zn *= POLE;
        }
    } else {
        let iz = 1.0 / POLE;
        let mut zn = POLE;
        let mut z2n = POLE.powi(len as i32 - 1);
        for (l, f) in first.iter_mut().enumerate() {
            *f = c[l] as f64 + z2n * c[(len - 1) * stride + l] as f64;
        }
        z2n = z2n * z2n * iz; // z^(2n − 3)
        for k in 1..len - 1 {
            for (f, &x) in first.iter_mut().zip(&c[row(k)]) {
                *f += (zn + z2n) * x as f64;
            }
            zn *= POLE;
            z2n *= iz;
        }
        first.iter_mut().for_each(|f| *f /= 1.0 - zn * zn);
    }
    for (x, f) in c[row(0)].iter_mut().zip(&first) {
        *x = *f as f32;
    }
    for k in 1..len {
        let (done, rest) = c.split_at_mut(k * stride);
        let prev = &done[(k - 1) * stride..(k - 1) * stride + lanes];
        for (x, &p) in rest[..lanes].iter_mut().zip(prev) {
            *x += z * p;
        }
    }
    // anticausal
    let g = z / (z * z - 1.0);
    {
        let (head, last) = c.split_at_mut((len - 1) * stride);
        let before = &head[(len - 2) * stride..(len - 2) * stride + lanes];
        for (x, &p) in last[..lanes].iter_mut().zip(before) {
            *x = g * (*x + z * p);
        }
    }
    for k in (0..len - 1).rev() {
        let (head, tail) = c.split_at_mut((k + 1) * stride);
        let next = &tail[..lanes];
        for (x, &nx) in head[k * stride..k * stride + lanes].iter_mut().zip(next) {
            *x = z * (nx - *x);
        }
    }
}

/// Spline coefficients of `v` (shape `n`, C order), prefiltered along every axis.
fn coefficients(v: ArrayView3<f32>) -> Vec<f32> {
    let (ni, nj, nk) = v.dim();
    let plane = nj * nk;
    let mut c: Vec<f32> = v.iter().copied().collect();
    // axis 2: one line per (i, j), contiguous
    c.par_chunks_mut(nk)
        .for_each(|line| prefilter_lanes(line, nk, 1, 1));
    // axis 1: within each i slab, all k lanes at once
    c.par_chunks_mut(plane)
        .for_each(|slab| prefilter_lanes(slab, nj, nk, nk));
    // axis 0: lanes of the (j, k) plane in chunks, each filtered in a compact copy
    const CHUNK: usize = 2048;
    let filtered: Vec<(usize, Vec<f32>)> = (0..plane)
        .step_by(CHUNK)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|start| {
            let w = CHUNK.min(plane - start);
            let mut buf = vec![0f32; ni * w];
            for i in 0..ni {
                buf[i * w..(i + 1) * w].copy_from_slice(&c[i * plane + start..][..w]);
            }
            prefilter_lanes(&mut buf, ni, w, w);
            (start, buf)
        })
        .collect();
    for (start, buf) in filtered {
        let w = buf.len() / ni;
        for i in 0..ni {
            c[i * plane + start..][..w].copy_from_slice(&buf[i * w..(i + 1) * w]);
        }
    }
    c
}

/// Cubic B-spline weights at fractional offset `t` ∈ [0, 1).
#[inline]
fn weights(t: f64) -> [f32; 4] {
    let s = 1.0 - t;
    [
        (s * s * s / 6.0) as f32,
        ((4.0 - 6.0 * t * t + 3.0 * t * t * t) / 6.0) as f32,
        ((1.0 + 3.0 * t + 3.0 * t * t - 3.0 * t * t * t) / 6.0) as f32,
        (t * t * t / 6.0) as f32,
    ]
}

/// Mirror an index into `0..n` (whole-sample symmetric, as the prefilter's boundary).
#[inline]
fn mirror(i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let mut r = i.rem_euclid(period);
    if r >= n {
        r = period - r;
    }
    r as usize
}

/// The spline (coefficients `coef`, shape `n`, strides `[si, sj]`) at source position
/// `x`, which lies inside the grid (at most 1e-3 outside).
#[inline]
fn sample(coef: &[f32], n: [usize; 3], [si, sj]: [usize; 2], x: [f64; 3]) -> f32 {
    // floor without a libm call (x > −1)
    let cell = x.map(|v| if v < 0.0 { -1i64 } else { v as i64 });
    let w = [0, 1, 2].map(|a| weights(x[a] - cell[a] as f64));
    let first = cell.map(|c| c - 1);
    let interior = (0..3).all(|a| first[a] >= 0 && first[a] + 3 < n[a] as i64);
    let mut acc = 0f32;
    if interior {
        let base = first[0] as usize * si + first[1] as usize * sj + first[2] as usize;
        for (a, wi) in w[0].iter().enumerate() {
            let mut acc_j = 0f32;
            for (b, wj) in w[1].iter().enumerate() {
                let l = &coef[base + a * si + b * sj..][..4];
                acc_j += wj * (w[2][0] * l[0] + w[2][1] * l[1] + w[2][2] * l[2] + w[2][3] * l[3]);
            }
            acc += wi * acc_j;
        }
        return acc;
    }
    let idx = [0, 1, 2].map(|a| [0, 1, 2, 3].map(|d| mirror(first[a] + d, n[a])));
    for (wi, &ii) in w[0].iter().zip(&idx[0]) {
        let mut acc_j = 0f32;
        for (wj, &jj) in w[1].iter().zip(&idx[1]) {
            let line = ii * si + jj * sj;
            let v: f32 = (0..4).map(|d| w[2][d] * coef[line + idx[2][d]]).sum();
            acc_j += wj * v;
        }
        acc += wi * acc_j;
    }
    acc
}

/// `src` resliced onto a grid of shape `shape` whose voxel `q` sits at source index
/// `m · [q, 1]` (`m` is 3 × 4). Cubic B-spline interpolation; 0 outside the source grid
/// (more than 1e-3 voxel beyond its first or last sample). A grid of more than
/// `max_voxels` voxels is refused before anything is allocated (the extractor's
/// `max_voxels` parameter, which bounds its isotropic resampling the same way).
pub fn reslice(
    src: ArrayView3<f32>,
    m: [[f64; 4]; 3],
    shape: [usize; 3],
    max_voxels: f64,
) -> Result<Vec<f32>> {
    let n = {
        let (a, b, c) = src.dim();
        [a, b, c]
    };
    if n.contains(&0) || shape.contains(&0) {
        return Err(KfError::InvalidImage("reslice of an empty grid".into()));
    }
    if m.iter().flatten().any(|x| !x.is_finite()) {
        return Err(KfError::InvalidArgument(
            "reslice matrix has non-finite entries".into(),
        ));
    }
    let total: f64 = shape.iter().map(|&s| s as f64).product();
    if total > max_voxels {
        return Err(KfError::InvalidImage(format!(
            "reslicing onto the world lattice gives {shape:?}, over the limit of {max_voxels} voxels (parameter max_voxels)"
        )));
    }
    let coef = coefficients(src);
    let (sj, si) = (n[2], n[1] * n[2]);
    let [oi, oj, ok] = shape;
    let hi = n.map(|v| (v - 1) as f64 + 1e-3);
    let mut out = vec![0f32; oi * oj * ok];
    out.par_chunks_mut(oj * ok)
        .enumerate()
        .for_each(|(p, slab)| {
            for q in 0..oj {
                // source position of (p, q, r) = row + r·step
                let row = [0, 1, 2].map(|a| m[a][0] * p as f64 + m[a][1] * q as f64 + m[a][3]);
                let step = [m[0][2], m[1][2], m[2][2]];
                for (r, o) in slab[q * ok..(q + 1) * ok].iter_mut().enumerate() {
                    let x = [0, 1, 2].map(|a| row[a] + step[a] * r as f64);
                    if (0..3).any(|a| x[a] < -1e-3 || x[a] > hi[a]) {
                        continue;
                    }
                    *o = sample(&coef, n, [si, sj], x);
                }
            }
        });
    crate::cancel::check()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    const LIMIT: f64 = 1e9;

    fn translate(t: [f64; 3]) -> [[f64; 4]; 3] {
        [
            [1.0, 0.0, 0.0, t[0]],
            [0.0, 1.0, 0.0, t[1]],
            [0.0, 0.0, 1.0, t[2]],
        ]
    }

    #[test]
    fn interpolates_its_samples() {
        let v = Array3::from_shape_fn((7, 9, 6), |(i, j, k)| {
            ((i * 31 + j * 7 + k * 13) % 17) as f32
        });
        let out = reslice(v.view(), translate([0.0; 3]), [7, 9, 6], LIMIT).unwrap();
        for (a, b) in out.iter().zip(v.iter()) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn reproduces_cubic_polynomials_inside() {
        // a cubic B-spline interpolant is exact on polynomials of degree ≤ 3 away from the
        // boundary; half-voxel shifts are the hardest case
        let f = |x: f64, y: f64, z: f64| 0.01 * x * x * x - 0.2 * y * y + 0.5 * z + x * y * 0.1;
        let n = 40;
        let v = Array3::from_shape_fn((n, n, n), |(i, j, k)| {
            f(i as f64, j as f64, k as f64) as f32
        });
        let t = [0.5, 0.25, -0.5];
        let out = reslice(v.view(), translate(t), [n, n, n], LIMIT).unwrap();
        for p in 15..25 {
            for q in 15..25 {
                for r in 15..25 {
                    let want = f(p as f64 + t[0], q as f64 + t[1], r as f64 + t[2]);
                    let got = out[(p * n + q) * n + r] as f64;
                    assert!(
                        (got - want).abs() < 2e-3 * want.abs().max(1.0),
                        "{got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn outside_the_source_is_zero_and_bad_input_is_refused() {
        let v = Array3::from_elem((5, 5, 5), 2.0f32);
        let out = reslice(v.view(), translate([10.0, 0.0, 0.0]), [3, 3, 3], LIMIT).unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
        let mut bad = translate([0.0; 3]);
        bad[0][0] = f64::NAN;
        assert!(reslice(v.view(), bad, [3, 3, 3], LIMIT).is_err());
        let empty = Array3::<f32>::zeros((0, 4, 4));
        assert!(reslice(empty.view(), translate([0.0; 3]), [3, 3, 3], LIMIT).is_err());
        // over the voxel limit: refused before the output is allocated
        let err = reslice(v.view(), translate([0.0; 3]), [3, 3, 3], 26.0).unwrap_err();
        assert!(err.to_string().contains("max_voxels"), "{err}");
    }

    #[test]
    fn same_result_on_any_thread_count() {
        let v = Array3::from_shape_fn((20, 18, 16), |(i, j, k)| ((i * 7 + j * 3 + k) % 11) as f32);
        let c = 0.3f64.cos();
        let s = 0.3f64.sin();
        let m = [[c, -s, 0.0, 3.2], [s, c, 0.0, -1.7], [0.0, 0.0, 1.0, 0.4]];
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let a = one.install(|| reslice(v.view(), m, [20, 18, 16], LIMIT).unwrap());
        let b = reslice(v.view(), m, [20, 18, 16], LIMIT).unwrap();
        assert_eq!(a, b);
    }
}
