use super::*;
use ndarray::{Array2, Array3, Axis, ShapeBuilder};

fn blob(n: [usize; 3], c: [f32; 3], s: [f32; 3]) -> Array3<f32> {
    Array3::from_shape_fn((n[0], n[1], n[2]), |(i, j, k)| {
        let d = [i as f32 - c[0], j as f32 - c[1], k as f32 - c[2]];
        (-(d[0] * d[0] / (2.0 * s[0] * s[0])
            + d[1] * d[1] / (2.0 * s[1] * s[1])
            + d[2] * d[2] / (2.0 * s[2] * s[2])))
            .exp()
    })
}

/// A reproducible textured volume: anisotropic blobs of both signs at random places.
fn texture(n: [usize; 3], count: usize, seed: u64) -> Array3<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut rnd = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) as f32
    };
    let mut v = Array3::<f32>::zeros((n[0], n[1], n[2]));
    for _ in 0..count {
        let c = [0, 1, 2].map(|a| 6.0 + rnd() * (n[a] as f32 - 12.0));
        let s = [0, 1, 2].map(|_| 1.5 + 3.0 * rnd());
        let amp = if rnd() < 0.5 { -1.0 } else { 1.0 } * (0.5 + rnd());
        v.zip_mut_with(&blob(n, c, s), |a, b| *a += amp * b);
    }
    v
}

fn assert_permutations(k: &Keypoints) {
    for d in &k.descriptors {
        let mut seen = [false; 64];
        for &x in d {
            assert!(!seen[x as usize], "duplicate rank");
            seen[x as usize] = true;
        }
    }
}

#[test]
fn gaussian_blob_found_at_centre_and_scale() {
    for (sigma, c) in [(3.0f32, [24.3f32, 23.6, 24.0]), (4.5, [32.2, 31.6, 32.4])] {
        let n = [64, 64, 64];
        let v = blob(n, c, [sigma; 3]);
        let k = extract3d(v.view(), [1.0; 3], &ExtractParams::default()).unwrap();
        assert!(!k.is_empty(), "blob σ={sigma} not found");
        // the strongest detection is the blob
        let best = (0..k.len())
            .max_by(|&a, &b| k.response[a].abs().total_cmp(&k.response[b].abs()))
            .unwrap();
        let p = k.ijk[best];
        let err = ((p[0] - c[0] as f64).powi(2)
            + (p[1] - c[1] as f64).powi(2)
            + (p[2] - c[2] as f64).powi(2))
        .sqrt();
        assert!(err < 0.35, "σ={sigma}: found at {p:?}, want {c:?}");
        let rel = (k.scale[best] / sigma - 1.0).abs();
        assert!(rel < 0.15, "σ={sigma}: scale {} ({rel})", k.scale[best]);
        // bright blob: more blur lowers its centre, so a DoG minimum
        assert_eq!(k.polarity[best], -1);
        assert_permutations(&k);
        for o in &k.orientation {
            let det = o[0][0] * (o[1][1] * o[2][2] - o[1][2] * o[2][1])
                - o[0][1] * (o[1][0] * o[2][2] - o[1][2] * o[2][0])
                + o[0][2] * (o[1][0] * o[2][1] - o[1][1] * o[2][0]);
            assert!((det - 1.0).abs() < 1e-3, "not a rotation: det {det}");
        }
    }
    // a dark blob is a maximum
    let v = blob([48; 3], [24.0; 3], [3.0; 3]).mapv(|x| 1.0 - x);
    let k = extract3d(v.view(), [1.0; 3], &ExtractParams::default()).unwrap();
    assert!(k.polarity.contains(&1));
}

#[test]
fn rotation_by_90_degrees_gives_the_same_keypoints() {
    let n = [64, 72, 56];
    let a = texture(n, 120, 7);
    // C[x, y, z] = A[y, nj-1-x, z]: a 90° rotation about the third axis
    let mut c = a.view().permuted_axes([1, 0, 2]);
    c.invert_axis(Axis(0));
    let c = c.as_standard_layout().to_owned();
    let p = ExtractParams::default();
    let ka = extract3d(a.view(), [1.0; 3], &p).unwrap();
    let kc = extract3d(c.view(), [1.0; 3], &p).unwrap();
    assert!(ka.n_points() >= 10, "only {} detections", ka.n_points());
    let mut found = 0;
    let mut same_desc = 0;
    for r in 0..ka.len() {
        if r > 0 && ka.point[r] == ka.point[r - 1] {
            continue;
        }
        let q = ka.ijk[r];
        let m = [(n[1] - 1) as f64 - q[1], q[0], q[2]];
        let hits: Vec<usize> = (0..kc.len())
            .filter(|&s| (0..3).map(|x| (kc.ijk[s][x] - m[x]).powi(2)).sum::<f64>() < 0.25)
            .collect();
        if hits.is_empty() {
            continue;
        }
        found += 1;
        let rows_a: Vec<usize> = (0..ka.len())
            .filter(|&s| ka.point[s] == ka.point[r])
            .collect();
        let best = rows_a
            .iter()
            .flat_map(|&x| hits.iter().map(move |&y| (x, y)))
            .map(|(x, y)| {
                ka.descriptors[x]
                    .iter()
                    .zip(kc.descriptors[y].iter())
                    .map(|(&u, &v)| (u as f64 - v as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .fold(f64::INFINITY, f64::min);
        if best < 20.0 {
            same_desc += 1;
        }
    }
    let np = ka.n_points();
    assert!(
        found as f64 >= 0.9 * np as f64,
        "{found}/{np} detections repeated"
    );
    assert!(
        same_desc as f64 >= 0.85 * found as f64,
        "{same_desc}/{found} with matching descriptors"
    );
}

#[test]
fn deterministic_across_thread_counts() {
    let v = texture([40, 44, 36], 30, 3);
    let p = ExtractParams::default();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| extract3d(v.view(), [1.0; 3], &p).unwrap())
    };
    let (a, b, c) = (run(1), run(3), run(3));
    assert!(!a.is_empty());
    assert_eq!(a, b);
    assert_eq!(b, c);
    assert_permutations(&a);
}

/// The workspace pool hands out buffers that hold an earlier extraction's values: every
/// voxel is overwritten, so results are the same with an empty pool, a pool of NaN-filled
/// buffers of every size used, and for C-ordered, Fortran-ordered and anisotropic input.
#[test]
fn results_do_not_depend_on_the_workspace_pool() {
    let v = texture([40, 44, 36], 30, 5);
    let vf = {
        let mut f = Array3::<f32>::zeros(v.raw_dim().f());
        f.assign(&v);
        f
    };
    let p = ExtractParams::default();
    let runs = |tag: &str| {
        let c = extract3d(v.view(), [1.0; 3], &p).unwrap();
        let f = extract3d(vf.view(), [1.0; 3], &p).unwrap();
        let a = extract3d(v.view(), [1.0, 1.0, 1.3], &p).unwrap();
        assert!(!c.is_empty() && !a.is_empty(), "{tag}");
        (c, f, a)
    };
    workspace::clear();
    let fresh = runs("fresh");
    assert_eq!(fresh.0, fresh.1);
    for round in 0..3 {
        // the previous round's buffers are pooled now; spoil them
        workspace::poison(if round == 1 { -1e30 } else { f32::NAN });
        assert!(runs("pooled") == fresh, "round {round}");
    }
}

#[test]
fn degenerate_inputs_are_empty_or_errors() {
    let p = ExtractParams::default();
    let zero = Array3::<f32>::zeros((20, 20, 20));
    assert!(extract3d(zero.view(), [1.0; 3], &p).unwrap().is_empty());
    let constant = Array3::<f32>::from_elem((20, 21, 22), 7.5);
    assert!(extract3d(constant.view(), [1.0; 3], &p).unwrap().is_empty());
    for shape in [(1, 1, 1), (0, 5, 5), (3, 40, 40), (7, 7, 7)] {
        let t = Array3::<f32>::from_shape_fn(shape, |(i, j, k)| (i * 31 + j * 7 + k) as f32 % 5.0);
        assert!(
            extract3d(t.view(), [1.0; 3], &p).unwrap().is_empty(),
            "{shape:?}"
        );
    }
    let mut nan = blob([20; 3], [10.0; 3], [2.0; 3]);
    nan[[3, 4, 5]] = f32::NAN;
    assert!(matches!(
        extract3d(nan.view(), [1.0; 3], &p),
        Err(KfError::InvalidImage(_))
    ));
    nan[[3, 4, 5]] = f32::INFINITY;
    assert!(matches!(
        extract3d(nan.view(), [1.0; 3], &p),
        Err(KfError::InvalidImage(_))
    ));
    let ok = blob([20; 3], [10.0; 3], [2.0; 3]);
    assert!(matches!(
        extract3d(ok.view(), [1.0, 0.0, 1.0], &p),
        Err(KfError::InvalidArgument(_))
    ));
    assert!(matches!(
        extract3d(ok.view(), [1.0, f64::NAN, 1.0], &p),
        Err(KfError::InvalidArgument(_))
    ));
    let mut small = p.clone();
    small.max_voxels = 1000.0;
    assert!(matches!(
        extract3d(ok.view(), [1.0; 3], &small),
        Err(KfError::InvalidImage(_))
    ));
    // zero padding (a flat region) next to structure: no keypoint inside the flat part
    let mut pad = Array3::<f32>::zeros((48, 48, 48));
    pad.slice_mut(ndarray::s![..24, .., ..])
        .assign(&texture([24, 48, 48], 20, 5));
    let k = extract3d(pad.view(), [1.0; 3], &p).unwrap();
    assert_permutations(&k);
    assert!(k.ijk.iter().all(|q| q[0] < 24.0 + 8.0));
}

#[test]
fn parameters_are_checked() {
    let mut p = ExtractParams::default();
    assert!(matches!(p.set("nope", 1.0), Err(KfError::InvalidArgument(m)) if m.contains("sigma0")));
    assert!(p.set("sigma0", -1.0).is_err());
    let mut p = ExtractParams::default();
    p.set("peak_threshold", 0.02).unwrap();
    assert_eq!(p.peak_threshold, 0.02);
    assert_eq!(ExtractParams::defaults().len(), ExtractParams::NAMES.len());
}

#[test]
fn anisotropic_voxels_map_back_to_the_input_grid() {
    // a blob of σ = 3 mm sampled with 1 × 1 × 2 mm voxels
    let c = [24.2f32, 22.7, 12.3];
    let v = blob([48, 48, 24], c, [3.0, 3.0, 1.5]);
    let k = extract3d(v.view(), [1.0, 1.0, 2.0], &ExtractParams::default()).unwrap();
    let best = (0..k.len())
        .max_by(|&a, &b| k.response[a].abs().total_cmp(&k.response[b].abs()))
        .unwrap();
    let p = k.ijk[best];
    assert!(
        (p[0] - 24.2).abs() < 0.4 && (p[1] - 22.7).abs() < 0.4 && (p[2] - 12.3).abs() < 0.25,
        "{p:?}"
    );
    assert!(
        (k.scale[best] / 3.0 - 1.0).abs() < 0.15,
        "scale {}",
        k.scale[best]
    );
}

#[test]
fn two_dimensional_blob() {
    let (c, s) = ([30.4f32, 25.7], 3.5f32);
    let img = Array2::from_shape_fn((64, 60), |(i, j)| {
        let d2 = (i as f32 - c[0]).powi(2) + (j as f32 - c[1]).powi(2);
        (-d2 / (2.0 * s * s)).exp()
    });
    let k = extract2d(img.view(), [1.0, 1.0], &ExtractParams::default()).unwrap();
    assert!(!k.is_empty());
    let best = (0..k.len())
        .max_by(|&a, &b| k.response[a].abs().total_cmp(&k.response[b].abs()))
        .unwrap();
    let p = k.ijk[best];
    assert!(
        (p[0] - c[0] as f64).abs() < 0.3 && (p[1] - c[1] as f64).abs() < 0.3 && p[2] == 0.0,
        "{p:?}"
    );
    assert!(
        (k.scale[best] / s - 1.0).abs() < 0.15,
        "scale {}",
        k.scale[best]
    );
    assert_permutations(&k);
    assert!(extract2d(
        Array2::<f32>::zeros((30, 30)).view(),
        [1.0, 1.0],
        &ExtractParams::default()
    )
    .unwrap()
    .is_empty());
    assert!(extract2d(
        Array2::<f32>::zeros((2, 3)).view(),
        [1.0, 1.0],
        &ExtractParams::default()
    )
    .unwrap()
    .is_empty());
}

/// Stage timings on a real volume (wall and process CPU time):
/// `KF_BENCH_VOLUME=path.raw KF_BENCH_SHAPE=197,233,189 cargo test --release -p
/// keyfuse-core stage_timings -- --ignored --nocapture`.
#[test]
#[ignore]
fn stage_timings() {
    use std::time::Instant;
    let (Ok(path), Ok(shape)) = (
        std::env::var("KF_BENCH_VOLUME"),
        std::env::var("KF_BENCH_SHAPE"),
    ) else {
        return;
    };
    let cpu = || {
        // process user + system time (clock ticks of 10 ms) from /proc/self/stat
        std::fs::read_to_string("/proc/self/stat")
            .ok()
            .map_or(f64::NAN, |s| {
                let f: Vec<&str> = s
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                (f[11].parse::<f64>().unwrap_or(f64::NAN)
                    + f[12].parse::<f64>().unwrap_or(f64::NAN))
                    * 0.01
            })
    };
    let n: Vec<usize> = shape
        .split(',')
        .map(|x| x.trim().parse().unwrap())
        .collect();
    let bytes = std::fs::read(path).unwrap();
    let data: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let a = Array3::from_shape_vec((n[0], n[1], n[2]), data).unwrap();
    let p = ExtractParams::default();
    let repeats: usize = std::env::var("KF_BENCH_REPEATS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(3);
    let mut q = p.clone();
    q.peak_threshold = 1e9;
    let runs = [("default", p.clone()), ("scale space only", q)];
    for (name, q) in runs {
        // the fastest of a few runs: the machine is shared, load only ever adds time
        let (mut wall, mut cpu_s) = (std::time::Duration::MAX, f64::INFINITY);
        let mut k = Keypoints::default();
        for _ in 0..repeats {
            let (t, c) = (Instant::now(), cpu());
            k = extract3d(a.view(), [1.0; 3], &q).unwrap();
            wall = wall.min(t.elapsed());
            cpu_s = cpu_s.min(cpu() - c);
        }
        // a checksum of the output, to see at a glance whether a change altered it
        let mut h = 0xcbf29ce484222325u64;
        for r in 0..k.len() {
            let words = k.ijk[r]
                .iter()
                .map(|x| x.to_bits())
                .chain(k.descriptors[r].iter().map(|&d| d as u64));
            for x in words {
                h = (h ^ x).wrapping_mul(0x100000001b3);
            }
        }
        eprintln!(
            "{name}: min of {repeats}: wall {wall:?} cpu {cpu_s:.3}s rows {} points {} checksum {h:016x}",
            k.len(),
            k.n_points()
        );
    }
}

/// Blur timings (fastest of 10, one thread):
/// `cargo test --release -p keyfuse-core blur_timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn blur_timing() {
    let n = [197, 233, 189];
    let mut v = Vol::zeros(n).unwrap();
    for (x, val) in v.data.iter_mut().enumerate() {
        *val = ((x * 7919) % 1013) as f32 / 97.0;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut out = Vol::zeros(n).unwrap();
    for sigma in [1.03f32, 2.45] {
        let mut best = std::time::Duration::MAX;
        for _ in 0..10 {
            let t = std::time::Instant::now();
            pool.install(|| super::blur::blur_into(&v, sigma, &mut out));
            best = best.min(t.elapsed());
        }
        eprintln!("blur σ={sigma}: {best:?}");
    }
}

/// The intensity normalisation's factor is the one of a sort-based 99.5th percentile of
/// the stride sample (the formula it replaced), on sizes around the stride's steps, with
/// zeros, negatives, repeated values and all-but-one zero; non-finite values are refused.
#[test]
fn intensity_scale_is_the_sample_percentile() {
    fn by_sorting(data: &[f32]) -> Option<f32> {
        let stride = (data.len() / 1_000_000).max(1);
        let mut s: Vec<f32> = data.iter().step_by(stride).map(|x| x.abs()).collect();
        let max = s.iter().cloned().fold(0f32, f32::max);
        if max <= 0.0 {
            return None;
        }
        let q = ((s.len() as f64 * 0.995) as usize).min(s.len() - 1);
        let (_, &mut v, _) = s.select_nth_unstable_by(q, |a, b| a.total_cmp(b));
        Some(1.0 / if v > 0.0 { v } else { max })
    }
    let mut next = super::volume::tests::uniform(0x9e37_79b9_7f4a_7c15);
    for (case, len) in [1usize, 7, 1000, 999_999, 1_000_000, 2_000_001, 3_100_007]
        .into_iter()
        .enumerate()
    {
        let data: Vec<f32> = (0..len)
            .map(|x| {
                let u = next();
                match (x + case) % 6 {
                    0 => 0.0,
                    1 => -u * 300.0,
                    2 => (u * 8.0).floor(),
                    _ => u * u * 1000.0,
                }
            })
            .collect();
        let want = by_sorting(&data);
        assert_eq!(intensity_scale(&data).unwrap(), want, "len {len}");
        assert!(want.is_some() || len == 1);
        // mostly zeros: the percentile is 0 and the maximum is used
        let mut sparse = vec![0f32; len];
        sparse[len / 2] = -3.5;
        assert_eq!(intensity_scale(&sparse).unwrap(), by_sorting(&sparse));
    }
    assert_eq!(intensity_scale(&[0.0; 50]).unwrap(), None);
    assert!(intensity_scale(&[1.0, f32::NAN]).is_err());
    assert!(intensity_scale(&vec![f32::INFINITY; 3_000_000]).is_err());
}

/// A volume that is +0.0 outside a box is blurred only inside the box grown by the
/// kernel radius: the same bits as the blur of the whole grid in every instruction-set
/// build, into a buffer of NaN (everything is written); the support follows the blurs
/// and the downsampling. Boxes inside, at the faces, of one voxel, and none.
#[test]
fn blurs_skip_only_what_is_exactly_zero() {
    use blur::{blur_into_with, Isa};
    use volume::Vol;
    let mut next = volume::tests::uniform(0x9e37_79b9_7f4a_7c15);
    let isas = Isa::all_available();
    let cases = [
        ([30, 28, 33], [5, 7, 9], [20, 15, 25]),
        ([25, 40, 21], [0, 0, 0], [3, 40, 21]),
        ([24, 24, 24], [23, 0, 11], [24, 1, 12]),
        ([20, 22, 18], [0, 0, 0], [0, 0, 0]),
    ];
    for (n, lo, hi) in cases {
        let mut v = Vol::zeros(n).unwrap();
        for i in lo[0]..hi[0] {
            for j in lo[1]..hi[1] {
                for k in lo[2]..hi[2] {
                    let x = next() - 0.5;
                    let at = v.idx(i, j, k);
                    // −0.0 has a bit set: it is inside the support
                    v.data[at] = if x.abs() < 0.05 { -0.0 } else { x };
                }
            }
        }
        v.measure_support();
        let empty = lo == hi;
        let want: [(usize, usize); 3] = match empty {
            true => [(0, 0); 3],
            false => std::array::from_fn(|a| (lo[a], hi[a])),
        };
        assert_eq!(v.support, want, "{n:?}");
        let mut whole = v.clone();
        whole.support = Vol::full(n);
        for &isa in &isas {
            let (mut a, mut b) = (whole.clone(), v.clone());
            for sigma in [1.2f32, 2.6] {
                let mut fa = Vol::new(n, vec![f32::NAN; a.data.len()]);
                let mut fb = Vol::new(n, vec![f32::NAN; b.data.len()]);
                blur_into_with(&a, sigma, &mut fa, isa);
                blur_into_with(&b, sigma, &mut fb, isa);
                let bits = |v: &Vol| v.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fa), bits(&fb), "{n:?} {isa:?} σ {sigma}");
                // everything outside the support is +0.0
                let s = fb.support;
                for i in 0..n[0] {
                    for j in 0..n[1] {
                        for k in 0..n[2] {
                            let inside = [i, j, k]
                                .iter()
                                .zip(&s)
                                .all(|(&x, &(l, h))| l <= x && x < h);
                            assert!(inside || fb.at(i, j, k).to_bits() == 0);
                        }
                    }
                }
                (a, b) = (fa, fb);
            }
            // into buffers that hold a blur already (their support known): a smaller one
            // (only the new ring is written) and a larger one (its outside is cleared)
            let bits = |v: &Vol| v.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (src, dst) in [(&b, v.clone()), (&v, b.clone())] {
                let mut want = Vol::new(n, vec![f32::NAN; v.data.len()]);
                let mut src_whole = src.clone();
                src_whole.support = Vol::full(n);
                blur_into_with(&src_whole, 1.7, &mut want, isa);
                let mut got = dst;
                blur_into_with(src, 1.7, &mut got, isa);
                assert_eq!(bits(&want), bits(&got), "{n:?} {isa:?} recycled");
            }
            let (da, db) = (
                volume::downsample(&a).unwrap(),
                volume::downsample(&b).unwrap(),
            );
            assert_eq!(da.data, db.data);
            let mut measured = db.clone();
            measured.measure_support();
            for ax in 0..3 {
                let (m, s) = (measured.support[ax], db.support[ax]);
                assert!(
                    m.0 >= m.1 || (s.0 <= m.0 && m.1 <= s.1),
                    "{n:?} {m:?} ⊄ {s:?}"
                );
            }
        }
    }
}
