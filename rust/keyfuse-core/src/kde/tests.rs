use super::*;
use ndarray::{array, Array2};

fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

/// [`keypoint_log_likelihood`] on owned test arrays, unwrapped.
fn kp_ll(
    q: &Array2<u8>,
    t: &Array2<u8>,
    ts: &[i64],
    sc: &[i64],
    n_classes: usize,
    exclude: Option<usize>,
    opts: &KdeOptions,
) -> Array1<f64> {
    keypoint_log_likelihood(
        q.view(),
        t.view(),
        ArrayView1::from(ts),
        ArrayView1::from(sc),
        n_classes,
        exclude,
        opts,
    )
    .unwrap()
}

fn random_desc(n: usize, seed: u64) -> Array2<u8> {
    let mut s = seed;
    Array2::from_shape_fn((n, 64), |_| (lcg(&mut s) % 64) as u8)
}

/// Direct transcription of eq. 7 in f64, for comparison.
fn naive_kp(q: &Array2<u8>, t: &Array2<u8>, ts: &[i64], sc: &[i64], nc: usize) -> Vec<f64> {
    let mut out = vec![0.0; nc];
    let mut n = vec![0.0; nc];
    for &s in ts {
        n[sc[s as usize] as usize] += 1.0;
    }
    for qi in q.rows() {
        let d2: Vec<f64> = t
            .rows()
            .into_iter()
            .map(|tj| {
                qi.iter()
                    .zip(tj)
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                    .sum()
            })
            .collect();
        let dnn = d2.iter().cloned().fold(f64::INFINITY, f64::min);
        for (c, o) in out.iter_mut().enumerate() {
            let s: f64 = d2
                .iter()
                .zip(ts)
                .filter(|(_, &s)| sc[s as usize] as usize == c)
                .map(|(&d, _)| (-d / (1.0 + dnn)).exp())
                .sum();
            *o += (s / n[c] + 1.0).ln();
        }
    }
    out
}

#[test]
fn keypoint_matches_direct_formula() {
    let q = random_desc(7, 1);
    let mut t = random_desc(30, 2);
    // make some training keypoints near query keypoints so kernels are not all ~0
    for r in 0..5 {
        let mut row = q.row(r).to_owned();
        row[0] = row[0].saturating_add(1);
        t.row_mut(r * 3).assign(&row);
    }
    let ts: Vec<i64> = (0..30).map(|j| j / 10).collect();
    let sc = vec![0_i64, 1, 0];
    let got = kp_ll(&q, &t, &ts, &sc, 2, None, &KdeOptions::default());
    let want = naive_kp(&q, &t, &ts, &sc, 2);
    for c in 0..2 {
        assert!(
            (got[c] - want[c]).abs() < 1e-9 * want[c].abs().max(1.0),
            "{got} {want:?}"
        );
    }
}

#[test]
fn keypoint_exclusion_equals_removal() {
    let q = random_desc(5, 3);
    let t = random_desc(40, 4);
    let ts: Vec<i64> = (0..40).map(|j| j / 10).collect();
    let sc = vec![0_i64, 1, 1, 0];
    let ex = kp_ll(&q, &t, &ts, &sc, 2, Some(2), &KdeOptions::default());
    let keep: Vec<usize> = (0..40).filter(|j| j / 10 != 2).collect();
    let t2 = t.select(ndarray::Axis(0), &keep);
    let ts2: Vec<i64> = keep.iter().map(|&j| ts[j]).collect();
    let rm = kp_ll(&q, &t2, &ts2, &sc, 2, None, &KdeOptions::default());
    assert_eq!(ex, rm);
    // k = all equals the exact sum
    let all = kp_ll(
        &q,
        &t2,
        &ts2,
        &sc,
        2,
        None,
        &KdeOptions {
            k: Some(1000),
            ..Default::default()
        },
    );
    assert_eq!(all, rm);
}

#[test]
fn vector_kde_and_errors() {
    let train = array![[0.0, 0.0], [1.0, 0.0], [4.0, 3.0]];
    let cls = array![0_i64, 0, 1];
    let q = array![[0.0, 0.0]];
    let ll = vector_log_likelihood(
        q.view(),
        train.view(),
        cls.view(),
        2,
        None,
        &KdeOptions::default(),
    )
    .unwrap();
    let mu: f64 = (0.0 + 1.0 + 5.0) / 3.0;
    let want0 = (0.5 * (1.0 + (-1.0 / (mu * mu)).exp()) + 1.0).ln();
    let want1 = ((-25.0 / (mu * mu)).exp() + 1.0).ln();
    assert!((ll[[0, 0]] - want0).abs() < 1e-12 && (ll[[0, 1]] - want1).abs() < 1e-12);
    assert!(vector_log_likelihood(
        q.view(),
        train.view(),
        array![0_i64, 0, 2].view(),
        2,
        None,
        &KdeOptions::default()
    )
    .is_err());
    let bad = array![[1u8, 2]];
    assert!(vector_log_likelihood(
        bad.view(),
        bad.view(),
        array![0_i64].view(),
        1,
        None,
        &KdeOptions::default()
    )
    .is_err());
}

#[test]
fn binary_equals_hamming_formula() {
    let train = array![[0u8, 0, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0]];
    let cls = array![0_i64, 1, 1];
    let ll = vector_log_likelihood(
        train.view(),
        train.view(),
        cls.view(),
        2,
        Some(&[0, 1, 2]),
        &KdeOptions::default(),
    )
    .unwrap();
    // query 0 against 1 (d=1) and 2 (d=4): μ = 2.5; class 0 empty after exclusion
    let mu2: f64 = 2.5 * 2.5;
    let want = (0.5 * ((-1.0 / mu2).exp() + (-16.0 / mu2).exp()) + 1.0).ln();
    assert_eq!(ll[[0, 0]], 0.0);
    assert!((ll[[0, 1]] - want).abs() < 1e-12);
}

#[test]
fn k_nearest_and_thread_count_independence() {
    let q = random_desc(40, 11);
    let t = random_desc(300, 12);
    let ts: Vec<i64> = (0..300).map(|j| j / 30).collect();
    let sc: Vec<i64> = (0..10).map(|s| s % 3).collect();
    // sample 4 left out
    let ll = |opts: KdeOptions| kp_ll(&q, &t, &ts, &sc, 3, Some(4), &opts);
    let run = |threads: usize, k: Option<usize>| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            ll(KdeOptions {
                k,
                ..Default::default()
            })
        })
    };
    for k in [None, Some(7)] {
        assert_eq!(run(1, k), run(4, k));
    }
    // the kd-forest with enough checks finds the exact neighbours
    let approx = ll(KdeOptions {
        k: Some(7),
        checks: Some(10_000),
        ..Default::default()
    });
    assert_eq!(approx, run(2, Some(7)));
    // k nearest: a direct top-k transcription (excluding sample 4)
    let mut want = [0.0f64; 3];
    let n_k: Vec<f64> = (0..3)
        .map(|c| (0..300).filter(|&j| j / 30 != 4 && sc[j / 30] == c).count() as f64)
        .collect();
    for qi in q.rows() {
        let mut d: Vec<(u32, usize)> = (0..300)
            .filter(|&j| j / 30 != 4)
            .map(|j| {
                let s: u32 = qi
                    .iter()
                    .zip(t.row(j))
                    .map(|(&a, &b)| (a as i32 - b as i32).pow(2) as u32)
                    .sum();
                (s, j)
            })
            .collect();
        d.sort_unstable();
        let width = 1.0 + d[0].0 as f64;
        let mut s = [0.0f64; 3];
        for &(d2, j) in &d[..7] {
            s[sc[j / 30] as usize] += (-(d2 as f64) / width).exp();
        }
        for c in 0..3 {
            want[c] += (s[c] / n_k[c] + 1.0).ln();
        }
    }
    let got = run(2, Some(7));
    for c in 0..3 {
        assert!((got[c] - want[c]).abs() < 1e-9 * want[c].abs().max(1.0));
    }
}

/// The likelihood from an index's merged neighbour lists equals the k-nearest search's
/// likelihood bit for bit, however the training points are split into shards, for b = 1
/// (the sparse sum) and b ≠ 1 (the dense one); a shorter k takes each list's prefix.
#[test]
fn neighbor_likelihood_from_merged_shards_equals_the_search() {
    let q = random_desc(25, 21);
    let t = random_desc(240, 22);
    let ts: Vec<i64> = (0..240).map(|j| j / 20).collect(); // 12 subjects of 20
    let sc: Vec<i64> = (0..12).collect();
    let ex = 5usize;
    let (k, qs, tsl) = (6usize, q.as_slice().unwrap(), t.as_slice().unwrap());
    // three shards (subjects 0..4, 4..9, 9..12), global ids, the excluded subject skipped
    let mut parts = Vec::new();
    for (lo, hi) in [(0usize, 80usize), (80, 180), (180, 240)] {
        let mut nb = knn::knn_exact(&tsl[lo * DESC_LEN..hi * DESC_LEN], qs, k, |_, c| {
            (lo + c as usize) / 20 != ex
        })
        .unwrap();
        nb.idx
            .iter_mut()
            .filter(|i| **i != knn::NONE)
            .for_each(|i| *i += lo as u32);
        parts.push(nb);
    }
    let nb = knn::merge_neighbors(&parts, k).unwrap();
    let counts: Vec<usize> = (0..12).map(|s| if s == ex { 0 } else { 20 }).collect();
    let class_of = |j: u32| Some(j as usize / 20);
    for b in [1.0, 0.5] {
        for kk in [k, 3] {
            let opts = KdeOptions {
                k: Some(kk),
                background: b,
                ..Default::default()
            };
            let want = kp_ll(&q, &t, &ts, &sc, 12, Some(ex), &opts);
            let got = neighbor_log_likelihood(&nb, kk, class_of, &counts, b).unwrap();
            assert_eq!(got, want.to_vec(), "b = {b}, k = {kk}");
        }
    }
    // bad input: k beyond the lists, a class outside the counts, a bad background
    assert!(neighbor_log_likelihood(&nb, k + 1, class_of, &counts, 1.0).is_err());
    assert!(neighbor_log_likelihood(&nb, 0, class_of, &counts, 1.0).is_err());
    assert!(neighbor_log_likelihood(&nb, k, class_of, &counts[..11], 1.0).is_err());
    assert!(neighbor_log_likelihood(&nb, k, class_of, &counts, 0.0).is_err());
}
