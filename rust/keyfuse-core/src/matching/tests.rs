use super::*;

fn rot(ax: f64, ay: f64, az: f64) -> [[f64; 3]; 3] {
    let (sx, cx) = ax.sin_cos();
    let (sy, cy) = ay.sin_cos();
    let (sz, cz) = az.sin_cos();
    let rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]];
    let ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
    let rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]];
    let mul = |a: [[f64; 3]; 3], b: [[f64; 3]; 3]| {
        let mut c = [[0.0; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                c[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
            }
        }
        c
    };
    mul(rz, mul(ry, rx))
}

#[test]
fn ransac_recovers_similarity_with_outliers() {
    let truth = Similarity {
        r: rot(0.2, -0.3, 0.5),
        s: 1.15,
        t: [10.0, -4.0, 7.5],
    };
    let mut rng = SplitMix(5);
    let mut u = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for i in 0..300 {
        let x = [u() * 150.0 - 75.0, u() * 180.0 - 90.0, u() * 150.0 - 75.0];
        let y = if i % 10 < 6 {
            [
                u() * 200.0 - 100.0,
                u() * 200.0 - 100.0,
                u() * 200.0 - 100.0,
            ] // 60% outliers
        } else {
            let y = truth.apply(x);
            [y[0] + u() - 0.5, y[1] + u() - 0.5, y[2] + u() - 0.5]
        };
        src.push(x);
        dst.push(y);
    }
    let res = ransac_similarity(&src, &dst, &AlignParams::default()).unwrap();
    let m = res.transform;
    assert!((m.s - truth.s).abs() < 0.01, "{}", m.s);
    for i in 0..3 {
        assert!((m.t[i] - truth.t[i]).abs() < 1.0);
        for j in 0..3 {
            assert!((m.r[i][j] - truth.r[i][j]).abs() < 0.01);
        }
    }
    for (i, &k) in res.inliers.iter().enumerate() {
        if i % 10 >= 6 {
            assert!(k);
        }
    }
    assert!(res.rmse < 1.0);
    let again = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| ransac_similarity(&src, &dst, &AlignParams::default()).unwrap());
    assert_eq!(again.transform, res.transform);
}

#[test]
fn ratio_and_scale_tests() {
    let d0: Vec<u8> = (0..64).collect();
    let mut d1 = d0.clone();
    d1.swap(0, 1); // d² = 2 from d0
    let mut d2 = d0.clone();
    d2.swap(0, 2); // d² = 8 from d0
    let a = KeypointView::new(&d0, &[[0.0; 3]], &[2.0]);
    let bd = [d1.clone(), d2.clone()].concat();
    let b = KeypointView {
        desc: &bd,
        xyz: &[[1.0, 2.0, 3.0], [0.0; 3]],
        scale: &[2.0, 2.0],
    };
    // d1/d2 = sqrt(2/8) = 0.5
    let m = match_sets(
        &a,
        &b,
        &MatchParams {
            ratio: 0.6,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((m.ia.clone(), m.ib.clone()), (vec![0], vec![0]));
    assert_eq!(m.translation, vec![[1.0, 2.0, 3.0]]);
    assert!((m.distance[0] - 2f64.sqrt()).abs() < 1e-12);
    let m = match_sets(
        &a,
        &b,
        &MatchParams {
            ratio: 0.4,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(m.ia.is_empty());
    // the best candidate's scale is 5× larger: gated out, the other one is left alone
    let b2 = KeypointView {
        scale: &[10.0, 2.0],
        ..b
    };
    let m = match_sets(
        &a,
        &b2,
        &MatchParams {
            ratio: 0.6,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(m.ib, vec![1]);
}

#[test]
fn hough_mode_finds_the_dominant_translation() {
    let mut t = vec![[5.0, -3.0, 2.0]; 30];
    for (i, v) in t.iter_mut().enumerate() {
        v[0] += (i % 3) as f64 * 0.3;
    }
    for i in 0..20 {
        t.push([i as f64 * 7.0 - 70.0, 40.0 - i as f64 * 5.0, (i * i) as f64]);
    }
    let m = hough_mode(&t, 3.0);
    assert!((m[0] - 5.3).abs() < 0.5 && (m[1] + 3.0).abs() < 0.5 && (m[2] - 2.0).abs() < 0.5);
    let p = kde3(&t, 3.0);
    assert!(p[0] > 10.0 * p[40]);
}

/// The Hough mode as first written: a binary search per neighbour bin and its weight
/// computed at every use.
fn densest_bin_by_search(t: &[[f64; 3]], sigma: f64) -> ([i64; 3], f64) {
    let bins = count_bins(t, sigma);
    let mut best = (f64::MIN, 0usize);
    for (i, (k, _)) in bins.iter().enumerate() {
        let mut s = 0.0;
        for dx in -2i64..=2 {
            for dy in -2i64..=2 {
                for dz in -2i64..=2 {
                    let nk = [k[0] + dx, k[1] + dy, k[2] + dz];
                    if let Ok(j) = bins.binary_search_by(|b| b.0.cmp(&nk)) {
                        s += bins[j].1 * (-0.5 * (dx * dx + dy * dy + dz * dz) as f64).exp();
                    }
                }
            }
        }
        if s > best.0 {
            best = (s, i);
        }
    }
    (bins[best.1].0, best.0)
}

#[test]
fn hough_mode_bins_as_a_search_per_neighbour() {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 10_000) as f64 / 100.0
    };
    for n in [1, 7, 60, 800] {
        // a cluster and scattered outliers, so that neighbour bins are dense and sparse
        let t: Vec<[f64; 3]> = (0..n)
            .map(|i| {
                let s = if i % 3 == 0 { 1.0 } else { 0.1 };
                [next() * s - 20.0, next() * s + 5.0, -next() * s]
            })
            .collect();
        assert_eq!(densest_bin(&t, 3.0), densest_bin_by_search(&t, 3.0));
        assert_eq!(densest_bin(&t, 0.7), densest_bin_by_search(&t, 0.7));
    }
}

#[test]
fn kde3_leaves_each_match_out() {
    let h = 3.0;
    let peak = 1.0 / ((2.0 * std::f64::consts::PI).powf(1.5) * h * h * h);
    // one match alone: no other match supports it
    assert_eq!(kde3(&[[4.0, 5.0, 6.0]], h), vec![0.0]);
    // perfect consensus: every match at the kernel's peak
    let p = kde3(&[[1.0, 2.0, 3.0]; 20], h);
    assert!(p.iter().all(|&v| (v - peak).abs() < 1e-12 * peak));
    // a lone match 60 mm away from 19 consistent ones
    let mut t = vec![[1.0, 2.0, 3.0]; 19];
    t.push([61.0, 2.0, 3.0]);
    let p = kde3(&t, h);
    assert_eq!(p[19], 0.0);
    assert!(p[..19].iter().all(|&v| v > 0.9 * peak));
}
