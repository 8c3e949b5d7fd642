//! Small dense linear algebra shared by the stages: 3-vectors and the symmetric
//! eigen-solver (cyclic Jacobi rotations) used by the structure-tensor and Hessian blob
//! tests of extraction and by the quaternion fit of [`crate::matching::fit_similarity`].
//!
//! Plain `f64` arithmetic in a fixed order, so every caller gets bit-identical results
//! on every machine.

/// `x − y`.
#[inline]
pub(crate) fn sub(x: [f64; 3], y: [f64; 3]) -> [f64; 3] {
    [x[0] - y[0], x[1] - y[1], x[2] - y[2]]
}

/// `|x|²`.
#[inline]
pub(crate) fn norm2(x: [f64; 3]) -> f64 {
    x[0] * x[0] + x[1] * x[1] + x[2] * x[2]
}

/// `|x − y|²`.
#[inline]
pub(crate) fn sq_dist(x: [f64; 3], y: [f64; 3]) -> f64 {
    norm2(sub(x, y))
}

/// One cyclic Jacobi sweep over the upper triangle of the symmetric matrix `a`: a
/// rotation in each (p, q) plane, p < q in row order, that zeroes `a[p][q]`
/// (`A' = Jᵀ A J`). The rotations are accumulated into `v` when given (its columns are
/// then the eigenvectors).
#[allow(clippy::needless_range_loop)] // index loops mirror the matrix algebra
fn jacobi_sweep<const N: usize>(a: &mut [[f64; N]; N], mut v: Option<&mut [[f64; N]; N]>) {
    for p in 0..N - 1 {
        for q in p + 1..N {
            if a[p][q].abs() < 1e-300 {
                continue;
            }
            let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
            let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
            let t = if theta == 0.0 { 1.0 } else { t };
            let c = 1.0 / (t * t + 1.0).sqrt();
            let s = t * c;
            for r in 0..N {
                let (arp, arq) = (a[r][p], a[r][q]);
                a[r][p] = c * arp - s * arq;
                a[r][q] = s * arp + c * arq;
            }
            for r in 0..N {
                let (apr, aqr) = (a[p][r], a[q][r]);
                a[p][r] = c * apr - s * aqr;
                a[q][r] = s * apr + c * aqr;
            }
            if let Some(v) = v.as_deref_mut() {
                for row in v.iter_mut() {
                    let (vp, vq) = (row[p], row[q]);
                    row[p] = c * vp - s * vq;
                    row[q] = s * vp + c * vq;
                }
            }
        }
    }
}

/// Eigenvalues of a symmetric 3×3 matrix, descending (at most 12 sweeps; stops once the
/// off-diagonal magnitudes sum below 1e-30).
pub(crate) fn sym3_eigenvalues(m: [[f64; 3]; 3]) -> [f64; 3] {
    let mut a = m;
    for _ in 0..12 {
        let off = a[0][1].abs() + a[0][2].abs() + a[1][2].abs();
        if off < 1e-30 {
            break;
        }
        jacobi_sweep(&mut a, None);
    }
    let mut e = [a[0][0], a[1][1], a[2][2]];
    e.sort_by(|x, y| y.total_cmp(x));
    e
}

/// The eigenvector of the largest eigenvalue of a symmetric 4×4 matrix (at most 50
/// sweeps; stops once the off-diagonal squares sum below 1e-30). Ties go to the first
/// diagonal position.
pub(crate) fn sym4_top_eigenvector(mut a: [[f64; 4]; 4]) -> [f64; 4] {
    let mut v = [[0.0; 4]; 4];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for _ in 0..50 {
        let off: f64 = (0..4)
            .flat_map(|i| (0..4).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off < 1e-30 {
            break;
        }
        jacobi_sweep(&mut a, Some(&mut v));
    }
    let best = (0..4)
        .max_by(|&i, &j| a[i][i].total_cmp(&a[j][j]).then(j.cmp(&i)))
        .expect("four candidates");
    [v[0][best], v[1][best], v[2][best], v[3][best]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigenvalues_of_a_known_matrix() {
        // rotation of diag(5, 2, 1)
        let e = sym3_eigenvalues([[3.5, 1.5, 0.0], [1.5, 3.5, 0.0], [0.0, 0.0, 1.0]]);
        assert!(
            (e[0] - 5.0).abs() < 1e-9 && (e[1] - 2.0).abs() < 1e-9 && (e[2] - 1.0).abs() < 1e-9
        );
    }

    #[test]
    fn top_eigenvector_of_a_known_matrix() {
        // diag(1, 2, 7, 3) rotated in the (1, 2) plane by 45°: top vector (0, 1, 1, 0)/√2
        let h = 0.5 * (2.0 + 7.0);
        let d = 0.5 * (7.0 - 2.0);
        let a = [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, h, d, 0.0],
            [0.0, d, h, 0.0],
            [0.0, 0.0, 0.0, 3.0],
        ];
        let v = sym4_top_eigenvector(a);
        let s = if v[1] < 0.0 { -1.0 } else { 1.0 };
        let r = std::f64::consts::FRAC_1_SQRT_2;
        for (x, y) in v.iter().zip([0.0, r, r, 0.0]) {
            assert!((s * x - y).abs() < 1e-12, "{v:?}");
        }
    }
}
