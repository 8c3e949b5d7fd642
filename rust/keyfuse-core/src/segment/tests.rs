//! Tests of the segmentation stages.

use super::*;
use ndarray::s;
use ndarray::Array3;

/// A transfer of `label` from atlas 0.
fn from_atlas0(label: i32, shift: [i32; 3], weight: f64) -> Transfer {
    Transfer {
        atlas: 0,
        label,
        shift,
        weight,
    }
}

fn cube_atlas() -> (Array3<i32>, Array3<f32>) {
    let mut l = Array3::<i32>::zeros((12, 10, 9));
    l.slice_mut(s![3..7, 2..6, 1..5]).fill(2);
    l.slice_mut(s![8..10, 6..9, 5..8]).fill(5);
    let i = l.mapv(|v| v as f32 * 100.0);
    (l, i)
}

#[test]
fn shifted_copy_is_reproduced_exactly() {
    let (l, i) = cube_atlas();
    let set = AtlasSet::new(&[l.view()], &[i.view()]).unwrap();
    assert_eq!(set.labels(), &[2, 5]);
    assert_eq!(set.organ_size(0, 2), 64);
    // the test image is the atlas moved by (1, 1, 2)
    let shift = [1, 1, 2];
    let mut test_l = Array3::<i32>::zeros((12, 10, 9));
    for ((z, y, x), &v) in l.indexed_iter() {
        let (zt, yt, xt) = (z + 1, y + 1, x + 2);
        if zt < 12 && yt < 10 && xt < 9 {
            test_l[[zt, yt, xt]] = v;
        }
    }
    let test_i = test_l.mapv(|v| v as f32 * 100.0);
    let t = [
        from_atlas0(2, shift, 0.5),
        from_atlas0(5, shift, 2.0),
        from_atlas0(2, shift, 0.25),
    ];
    let out = set.transfer(test_i.view(), &t, &[50.0], 0.15).unwrap();
    assert_eq!(out.labels, test_l);
    assert_eq!(out.n_groups, 2);
    assert_eq!(out.total_weight, vec![0.75, 2.0]);
    assert!((out.probabilities[[0, 4, 3, 3]] - 1.0).abs() < 1e-6);
}

#[test]
fn intensity_likelihood_and_background_rule() {
    let (l, i) = cube_atlas();
    let set = AtlasSet::new(&[l.view()], &[i.view()]).unwrap();
    // test intensities far from the atlas' organ intensity: weight ≈ 0 -> background
    let test = Array3::<f32>::from_elem((12, 10, 9), 1000.0);
    let t = [from_atlas0(2, [0, 0, 0], 1.0)];
    let out = set.transfer(test.view(), &t, &[50.0], 0.15).unwrap();
    assert!(out.labels.iter().all(|&v| v == 0));
    // intensity term off: the organ is transferred whatever the intensities
    let out = set
        .transfer(test.view(), &t, &[f32::INFINITY], 0.15)
        .unwrap();
    assert_eq!(out.labels[[4, 3, 2]], 2);
    // one standard deviation away gives exp(-1/2)
    let test = i.mapv(|v| v + 50.0);
    let out = set.transfer(test.view(), &t, &[50.0, 50.0], 0.15).unwrap();
    let p = out.probabilities[[0, 4, 3, 2]];
    assert!((p - (-0.5f32).exp()).abs() < 2e-3, "{p}");
    // two weaker transfers disagreeing: the voxel covered by one of 10 is background
    let t = [
        from_atlas0(2, [0, 0, 0], 9.0),
        from_atlas0(2, [0, 0, 4], 1.0),
    ];
    let out = set.transfer(i.view(), &t, &[f32::INFINITY], 0.15).unwrap();
    assert_eq!(out.labels[[4, 3, 2]], 2);
    assert_eq!(out.labels[[4, 3, 7]], 0);
    assert!((out.probabilities[[0, 4, 3, 7]] - 0.1).abs() < 1e-6);
}

#[test]
fn shifts_outside_the_grid_are_clipped() {
    let (l, i) = cube_atlas();
    let set = AtlasSet::new(&[l.view()], &[i.view()]).unwrap();
    let test = Array3::<f32>::zeros((5, 4, 3));
    let t = [
        from_atlas0(2, [-4, -3, -2], 1.0),
        from_atlas0(5, [100, -100, 7], 1.0),
    ];
    let out = set
        .transfer(test.view(), &t, &[f32::INFINITY], 0.15)
        .unwrap();
    // organ 2 spans z 3..7 -> -1..3, y 2..6 -> -1..3, x 1..5 -> -1..3
    assert_eq!(out.labels[[0, 0, 0]], 2);
    assert_eq!(out.labels[[2, 2, 2]], 2);
    assert_eq!(out.labels[[3, 0, 0]], 0);
    assert_eq!(out.labels.iter().filter(|&&v| v == 2).count(), 3 * 3 * 3);
}

#[test]
fn deterministic_across_thread_counts() {
    let (l, i) = cube_atlas();
    let set = AtlasSet::new(&[l.view(), l.view()], &[i.view(), i.view()]).unwrap();
    let t: Vec<Transfer> = (0..200)
        .map(|k| Transfer {
            atlas: (k % 2) as u32,
            label: if k % 3 == 0 { 5 } else { 2 },
            shift: [k % 5 - 2, k % 7 - 3, k % 3 - 1],
            weight: 0.1 + (k as f64 * 0.37).sin().abs(),
        })
        .collect();
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| set.transfer(i.view(), &t, &[80.0], 0.15).unwrap())
    };
    let (a, b) = (run(1), run(4));
    assert_eq!(a.labels, b.labels);
    assert_eq!(
        a.probabilities
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        b.probabilities
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    );
}

#[test]
fn bad_inputs_are_rejected() {
    let (l, i) = cube_atlas();
    let small = Array3::<f32>::zeros((2, 2, 2));
    assert!(AtlasSet::new(&[l.view()], &[small.view()]).is_err());
    assert!(AtlasSet::new(&[], &[]).is_err());
    let neg = l.mapv(|v| -v);
    assert!(AtlasSet::new(&[neg.view()], &[i.view()]).is_err());
    let set = AtlasSet::new(&[l.view()], &[i.view()]).unwrap();
    let t = |atlas, label, weight| {
        [Transfer {
            atlas,
            label,
            shift: [0; 3],
            weight,
        }]
    };
    assert!(set.transfer(i.view(), &t(1, 2, 1.0), &[1.0], 0.15).is_err());
    assert!(set.transfer(i.view(), &t(0, 3, 1.0), &[1.0], 0.15).is_err());
    assert!(set
        .transfer(i.view(), &t(0, 2, f64::NAN), &[1.0], 0.15)
        .is_err());
    assert!(set
        .transfer(i.view(), &t(0, 2, 1.0), &[1.0, 2.0, 3.0], 0.15)
        .is_err());
    assert!(set.transfer(i.view(), &t(0, 2, 1.0), &[1.0], 1.5).is_err());
    let nan = i.mapv(|_| f32::NAN);
    assert!(set
        .transfer(nan.view(), &t(0, 2, 1.0), &[1.0], 0.15)
        .is_err());
}

fn random_set(n: usize, seed: u64) -> (Vec<u8>, Vec<[f64; 3]>, Vec<f64>) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let desc: Vec<u8> = (0..n * crate::DESC_LEN)
        .map(|_| (next() % 64) as u8)
        .collect();
    // coarse positions so that distance ties occur
    let xyz: Vec<[f64; 3]> = (0..n)
        .map(|_| {
            [
                (next() % 40) as f64 * 2.0,
                (next() % 40) as f64 * 2.0,
                (next() % 30) as f64 * 2.0,
            ]
        })
        .collect();
    let scale: Vec<f64> = (0..n).map(|_| 1.0 + (next() % 100) as f64 / 25.0).collect();
    (desc, xyz, scale)
}

#[test]
fn match_all_equals_match_sets_per_atlas() {
    use crate::matching::{match_sets, KeypointView, MatchParams};
    let (qd, mut qx, mut qs) = random_set(300, 1);
    // several oriented rows at one position (as extraction gives): every third query
    // repeats its predecessor's position and scale with its own descriptor
    for q in (2..300).step_by(3) {
        qx[q] = qx[q - 1];
        qs[q] = qs[q - 1];
    }
    let a = KeypointView::new(&qd, &qx, &qs);
    let atlases: Vec<_> = [(250, 2), (0, 3), (1, 4), (400, 5)]
        .iter()
        .map(|&(n, seed)| {
            let (d, x, s) = random_set(n, seed);
            let l = (0..n).map(|i| 1 + (i % 3) as i32).collect::<Vec<_>>();
            (d, x, s, l)
        })
        .collect();
    let set = AtlasKeypoints::new(atlases.clone()).unwrap();
    for (hough, keep) in [(true, 0.1), (true, 0.37), (true, 1.0), (false, 0.1)] {
        let p = MatchParams {
            hough,
            keep_fraction: keep,
            ..MatchParams::default()
        };
        let all = set.match_all(&a, &p, 0).unwrap();
        let mut k = 0;
        for (i, (d, x, s, l)) in atlases.iter().enumerate() {
            let b = KeypointView::new(d, x, s);
            let r = match_sets(&a, &b, &p).unwrap();
            let n = r.ia.len();
            assert_eq!(&all.query[k..k + n], &r.ia[..]);
            assert_eq!(&all.index[k..k + n], &r.ib[..]);
            assert!(all.atlas[k..k + n].iter().all(|&v| v == i as u32));
            for m in 0..n {
                assert_eq!(all.label[k + m], l[r.ib[m] as usize]);
                assert_eq!((all.dist2[k + m] as f64).sqrt(), r.distance[m]);
                assert_eq!(all.p[k + m], r.p[m]);
                let t = r.translation[m];
                assert_eq!(all.shift[k + m], [-t[0], -t[1], -t[2]]);
            }
            k += n;
        }
        assert_eq!(k, all.query.len());
        assert!(k > 0);
    }
    // a Hough vote on a sample: same matches whenever it finds the same mode
    let p = MatchParams {
        hough: true,
        ..MatchParams::default()
    };
    let all = set.match_all(&a, &p, 1000).unwrap();
    assert_eq!(all, set.match_all(&a, &p, 0).unwrap());
    let sampled = set.match_all(&a, &p, 100).unwrap();
    assert!(!sampled.query.is_empty());
    // in atlas order, each atlas' queries ascending (at most one match per query)
    for k in 1..sampled.query.len() {
        let (a0, a1) = (sampled.atlas[k - 1], sampled.atlas[k]);
        assert!(a0 < a1 || (a0 == a1 && sampled.query[k - 1] < sampled.query[k]));
    }
    // bytes above 127: the portable distance kernel, same matches
    let wide: Vec<u8> = qd.iter().map(|&v| v * 3).collect();
    let aw = KeypointView::new(&wide, &qx, &qs);
    let (d, x, s) = random_set(200, 11);
    let d: Vec<u8> = d.iter().map(|&v| v * 3).collect();
    let l = vec![1; 200];
    let set = AtlasKeypoints::new(vec![(d.clone(), x.clone(), s.clone(), l)]).unwrap();
    let all = set.match_all(&aw, &p, 0).unwrap();
    let b = KeypointView::new(&d, &x, &s);
    let r = match_sets(&aw, &b, &p).unwrap();
    assert_eq!(all.query, r.ia);
    assert_eq!(all.index, r.ib);
    assert!(!r.ia.is_empty());
    // the same matches whatever the thread count, sampled Hough vote included
    let (d, x, s) = random_set(2000, 21);
    let l = vec![2; 2000];
    let big = AtlasKeypoints::new(vec![(d.clone(), x.clone(), s.clone(), l.clone()); 3]).unwrap();
    let (qd2, qx2, qs2) = random_set(1500, 22);
    let a2 = KeypointView::new(&qd2, &qx2, &qs2);
    let run = |threads, hq| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| big.match_all(&a2, &p, hq).unwrap())
    };
    assert_eq!(run(1, 0), run(4, 0));
    assert_eq!(run(1, 500), run(3, 500));
    assert!(AtlasKeypoints::new(vec![]).is_err());
    let (d, x, s) = random_set(3, 9);
    assert!(AtlasKeypoints::new(vec![(d, x, s, vec![1, 0, 2])]).is_err());
}

#[test]
fn closest_points_equal_a_full_sort_with_and_without_avx2() {
    use super::grid::{Grid, Near};
    use crate::linalg::sq_dist;
    let (_, mut xyz, _) = random_set(600, 7);
    // several keypoints at one position (as extraction gives)
    for i in (1..600).step_by(3) {
        xyz[i] = xyz[i - 1];
    }
    let grids = [Grid::new(&xyz), Grid::new(&xyz).with_simd(false)];
    let mut near = Near::default();
    let mut cand = Vec::new();
    for q in 0..40 {
        let y = [q as f64 * 2.0, 78.0 - q as f64 * 1.5, (q % 9) as f64 * 6.0];
        let mut sorted: Vec<(f64, u32)> =
            (0..600).map(|i| (sq_dist(xyz[i], y), i as u32)).collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (r, keep) in [(6.0, 3), (20.0, 40), (35.0, 150), (200.0, 599)] {
            let mut got = Vec::new();
            for g in &grids {
                g.ball(y, r, r * r, &mut near);
                let dk = near.select(g, keep, r * r, &mut cand);
                cand.sort_unstable();
                got.push((dk, cand.clone()));
            }
            assert_eq!(got[0], got[1]);
            if let (Some(dk), cand) = &got[0] {
                let mut want: Vec<u32> = sorted[..keep].iter().map(|e| e.1).collect();
                want.sort_unstable();
                assert_eq!(*dk, sorted[keep - 1].0);
                assert_eq!(cand, &want);
            } else {
                assert!(sorted[keep - 1].0 > r * r * (1.0 - 1e-9));
            }
            let top = grids[1].all(y, &mut near);
            let dk = near.select(&grids[1], keep, top, &mut cand);
            assert_eq!(dk, Some(sorted[keep - 1].0));
        }
    }
}

#[test]
fn voting_follows_the_descriptor_likelihood() {
    // keypoint 0: two weak matches to label 1 lose to a close match to label 2?
    // d² = 0 (lik 1) for label 2; d² = τ² (lik e^-1/2 ≈ 0.61) twice for label 1 -> 1.21
    let (l, c) = vote_labels(
        3,
        &[0, 0, 0, 2],
        &[1, 1, 2, 7],
        &[4.0, 4.0, 0.0, 9.0],
        &[1.0, 1.0, 1.0, 0.5],
    )
    .unwrap();
    assert_eq!(l, vec![1, 0, 7]);
    let e = (-0.5f64).exp();
    assert!((c[0] as f64 - 2.0 * e / (2.0 * e + 1.0)).abs() < 1e-6);
    assert_eq!(c[1], 0.0);
    assert_eq!(c[2], 1.0);
    // p(m) tips the balance
    let (l, _) = vote_labels(
        1,
        &[0, 0, 0],
        &[1, 1, 2],
        &[4.0, 4.0, 0.0],
        &[0.1, 0.1, 1.0],
    )
    .unwrap();
    assert_eq!(l, vec![2]);
    assert!(vote_labels(1, &[1], &[1], &[0.0], &[1.0]).is_err());
    assert!(vote_labels(1, &[0], &[0], &[0.0], &[1.0]).is_err());
    assert!(vote_labels(1, &[0], &[1], &[0.0], &[1.0, 2.0]).is_err());
}

#[test]
fn max_vote_rule_keeps_one_weak_transfer_out() {
    // organ 2 transferred with weight 9, organ 5 by one spurious transfer of weight 1
    let (l, i) = cube_atlas();
    let set = AtlasSet::new(&[l.view()], &[i.view()]).unwrap();
    let t = [
        from_atlas0(2, [0, 0, 0], 9.0),
        from_atlas0(5, [0, 0, 0], 1.0),
    ];
    let inf = [f32::INFINITY];
    // per label: the lone transfer is 100% of organ 5's weight, so it fills the organ
    let per = set.transfer(i.view(), &t, &inf, 0.15).unwrap();
    assert_eq!(per.labels[[9, 7, 6]], 5);
    assert_eq!(per.labels[[4, 3, 2]], 2);
    // max vote: 1 is below 15% of the largest vote (9), so organ 5 is background
    let mv = set
        .transfer_with(i.view(), &t, &inf, 0.15, BackgroundRule::MaxVote)
        .unwrap();
    assert_eq!(mv.labels[[9, 7, 6]], 0);
    assert_eq!(mv.labels[[4, 3, 2]], 2);
    assert!((mv.probabilities[[1, 9, 7, 6]] - 1.0 / 9.0).abs() < 1e-6);
    assert!((mv.probabilities[[0, 4, 3, 2]] - 1.0).abs() < 1e-6);
}

#[test]
fn shared_pair_density_equals_kde3_bit_for_bit() {
    use super::atlas_matching::kde3_pairs;
    for (n, seed, spread) in [
        (0, 1, 1.0),
        (1, 2, 1.0),
        (2, 3, 1.0),
        (300, 4, 0.37),
        (900, 5, 1.3),
    ] {
        let (_, xyz, scale) = random_set(n, seed);
        // clustered translations with ties in x, sub-millimetre offsets and points near
        // the window edges (multiples of the 15 mm cut)
        let t: Vec<[f64; 3]> = xyz
            .iter()
            .zip(&scale)
            .map(|(p, s)| [p[0] * spread * 0.5, p[1] * 0.25 + s, p[2] * 0.3 - s * 0.1])
            .collect();
        for h in [3.0, 0.7] {
            let want = crate::matching::kde3(&t, h);
            let got = kde3_pairs(&t, h);
            assert_eq!(want.len(), got.len());
            for (a, b) in want.iter().zip(&got) {
                assert_eq!(a.to_bits(), b.to_bits(), "n {n} h {h}");
            }
        }
    }
}

#[test]
fn posterior_divides_by_the_label_sum_where_it_exceeds_one() {
    let (shape, n) = ((3usize, 5usize, 4usize, 7usize), 5 * 4 * 7);
    let vals: Vec<f32> = (0..3 * n)
        .map(|i| ((i * 37 % 101) as f32) / 150.0)
        .collect();
    let mut p = ndarray::Array4::from_shape_vec(shape, vals.clone()).unwrap();
    posterior_in_place(&mut p);
    let p = p.as_slice().unwrap();
    for v in 0..n {
        let s = (vals[v] + vals[n + v]) + vals[2 * n + v];
        for l in 0..3 {
            assert_eq!(
                p[l * n + v].to_bits(),
                (vals[l * n + v] / s.max(1.0)).to_bits()
            );
        }
    }
    // a non-standard layout is handled too
    let mut t = ndarray::Array4::from_shape_vec((7, 4, 5, 3), vals).unwrap();
    t.swap_axes(0, 3);
    posterior_in_place(&mut t);
    assert!(t.iter().all(|&x| (0.0..=1.0).contains(&x)));
}
