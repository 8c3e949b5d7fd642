use super::shares::{add_best_shares_dense, add_best_shares_sorted};
use super::*;
use crate::knn::SplitMix;

use crate::knn::tests::random_perms as perms;

fn exact() -> SoftJaccardParams {
    SoftJaccardParams {
        exact: true,
        ..Default::default()
    }
}

#[test]
fn identical_sets_score_one() {
    let a = perms(50, 1);
    let j = soft_jaccard_pair(&a, &a, &exact(), false, None).unwrap();
    assert!((j - 1.0).abs() < 1e-12, "{j}");
    let post = SoftJaccardParams {
        exact: true,
        ..SoftJaccardParams::posterior()
    };
    let j = soft_jaccard_pair(&a, &a, &post, false, None).unwrap();
    assert!((j - 1.0).abs() < 1e-12, "{j}");
}

#[test]
fn far_apart_sets_score_near_zero() {
    // A: small perturbations of the identity ranking, B: of its reverse
    let mut rng = SplitMix(3);
    let mut mk = |rev: bool| {
        let mut out = Vec::new();
        for _ in 0..40 {
            let mut p: Vec<u8> = (0..64).collect();
            if rev {
                p.reverse();
            }
            for _ in 0..3 {
                let i = rng.below(63);
                p.swap(i, i + 1);
            }
            out.extend(p);
        }
        out
    };
    let (a, b) = (mk(false), mk(true));
    let j = soft_jaccard_pair(&a, &b, &exact(), true, None).unwrap();
    assert!(j < 1e-6, "{j}");
    let post = SoftJaccardParams {
        exact: true,
        ..SoftJaccardParams::posterior()
    };
    let j = soft_jaccard_pair(&a, &b, &post, true, None).unwrap();
    assert!(j < 1e-6, "{j}");
}

#[test]
fn hand_computed_tiny_sets() {
    // one keypoint each: A∖{f} is empty, so α² = d²(a,b) and |A∩B| = exp(−½)
    let a: Vec<u8> = (0..64).collect();
    let mut b = a.clone();
    b.swap(0, 1); // d² = 2
    let uncapped = SoftJaccardParams {
        alpha2_cap_fraction: f64::INFINITY,
        ..exact()
    };
    let j = soft_jaccard_pair(&a, &b, &uncapped, false, None).unwrap();
    let i = (-0.5f64).exp();
    assert!((j - i / (2.0 - i)).abs() < 1e-12);
    // two keypoints in A: a0, a1 (d²(a0,a1)=8); B = {a0 with one swap}
    let mut a1: Vec<u8> = (0..64).collect();
    a1.swap(10, 12); // d² = 2·4 = 8
    let aa = [a.clone(), a1.clone()].concat();
    let jj = soft_jaccard_pair(&aa, &b, &uncapped, false, None).unwrap();
    // a0: α² = min(8, 2) = 2, kernel exp(−2/4); a1: d²(a1,b)=10, α²=min(8,10)=8,
    // kernel exp(−10/16)
    let inter = (-0.5f64).exp() + (-10.0f64 / 16.0).exp();
    assert!((jj - inter / (3.0 - inter)).abs() < 1e-12, "{jj}");
}

#[test]
fn hand_computed_posterior() {
    let a0: Vec<u8> = (0..64).collect();
    let mut b0 = a0.clone();
    b0.swap(0, 1); // d²(a0,b0) = 2
    let mut a1 = a0.clone();
    a1.swap(10, 12); // d²(a0,a1) = 8, d²(a1,b0) = 10
    let aa = [a0.clone(), a1.clone()].concat();
    let p = SoftJaccardParams {
        exact: true,
        ..SoftJaccardParams::posterior()
    };
    let j = soft_jaccard_pair(&aa, &b0, &p, false, None).unwrap();
    // α = half the nearest distance: a0: α² = 2/4, raised to the floor 1, shares
    // e^{-2/2} : e^{-8/2} (b0 : a1); a1: α² = 8/4, e^{-8/4} : e^{-10/4} (a0 : b0);
    // b0 keeps its best share (a0's)
    let s0 = (-1.0f64).exp() / ((-1.0f64).exp() + (-4.0f64).exp());
    let s1 = (-2.5f64).exp() / ((-2.0f64).exp() + (-2.5f64).exp());
    let inter = s0.max(s1);
    assert!((j - inter / (3.0 - inter)).abs() < 1e-12, "{j}");
}

#[test]
fn cohort_pairwise_is_deterministic_and_ranks_relatives() {
    // 6 subjects: 0/1 share a prototype (relatives), the others are unrelated
    let proto = perms(300, 11);
    let mut rng = SplitMix(12);
    let mut noisy = |src: &[u8]| {
        let mut v = src.to_vec();
        for row in v.chunks_exact_mut(64) {
            for _ in 0..4 {
                let i = rng.below(63);
                row.swap(i, i + 1);
            }
        }
        v
    };
    let mut c = Cohort::new(ForestParams::default());
    c.add(&noisy(&proto)).unwrap();
    c.add(&noisy(&proto)).unwrap();
    for s in 0..4 {
        c.add(&perms(300, 20 + s)).unwrap();
    }
    c.build_forest().unwrap();
    let p = SoftJaccardParams::default();
    let run = |t: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
            .install(|| c.pairwise(&p, false).unwrap())
    };
    let run_with = |t: usize, p: &SoftJaccardParams| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
            .install(|| c.pairwise(p, false).unwrap())
    };
    let m = run(1);
    assert_eq!(m, run(2));
    for b in 2..6 {
        assert!(m[1] > 2.0 * m[b], "{m:?}");
    }
    let ex = c.pairwise(&exact(), false).unwrap();
    assert!((ex[1] - m[1]).abs() < 0.05);
    let post = SoftJaccardParams::posterior();
    let mp = run_with(1, &post);
    assert_eq!(mp, run_with(2, &post));
    for b in 2..6 {
        assert!(mp[1] > 2.0 * mp[b], "{mp:?}");
    }
    let v = c.reference_votes(&p).unwrap();
    assert!(v[1] > v[2] && v[1] > v[3]);
    let s = c
        .search(&c.descriptors()[..300 * 64], Some(0), None, &p)
        .unwrap();
    assert_eq!(s[0], 0.0);
    assert_eq!(s[1], m[1]);
    let mask = [true, false, true, true, true, true];
    let r = c
        .search(&c.descriptors()[..300 * 64], None, Some(&mask), &p)
        .unwrap();
    assert_eq!(r[1], 0.0);
}

/// The dense and the sorting reductions of the posterior shares add the same values in the
/// same order: bit-identical sums, ties, repeated ids, zero and NaN shares included.
#[test]
fn best_share_reductions_agree_bit_for_bit() {
    let mut rng = SplitMix(5);
    let owner = |c: u32| c / 50;
    for n in [1usize, 7, 300, 2000] {
        let mut shares: Vec<(u32, f64)> = (0..n)
            .map(|_| {
                (
                    rng.below(400) as u32,
                    (rng.below(1000) as f64 / 997.0).powi(3),
                )
            })
            .collect();
        shares.push((3, 0.0));
        shares.push((3, f64::NAN));
        shares.push((9, 0.25));
        shares.push((9, 0.25));
        let top = shares.iter().map(|s| s.0 as usize).max().unwrap();
        let (mut dense, mut sorted) = (vec![0.0f64; 8], vec![0.0f64; 8]);
        add_best_shares_dense(shares.clone(), top, &owner, &mut dense);
        add_best_shares_sorted(shares, &owner, &mut sorted);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dense), bits(&sorted), "n = {n}");
    }
}
