//! GPU vs CPU parity of every kernel. Each test returns early (and says so) when no GPU is
//! usable, so the suite passes on CPU-only machines; on a GPU machine it is the check.
//! The CPU references below spell out the arithmetic the kernels must reproduce.

use keyfuse_core::extract::{gaussian_blur as core_blur, with_flushed_subnormals};
use keyfuse_core::jaccard::{Cohort, SoftJaccardParams};
use keyfuse_core::kde::{keypoint_log_likelihood, KdeOptions};
use keyfuse_core::knn::{knn_exact, ForestParams};
use keyfuse_cuda::ops::{gaussian_half_kernel, KnnKernel, ScaleSpaceParams, SjParams};

/// Both k-NN kernels must give the CPU's results (MMA runs on sm_80+, else falls back).
const KERNELS: [KnnKernel; 2] = [KnnKernel::Dp4a, KnnKernel::Mma];
use keyfuse_cuda::Gpu;
use ndarray::{Array2, Array3};

fn gpu_or_skip(test: &str) -> Option<&'static Gpu> {
    match keyfuse_cuda::gpu() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("{test}: skipped ({e})");
            None
        }
    }
}

/// A deterministic pseudo-random stream (xorshift), so tests need no extra crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// A random permutation of 0..64 (a SIFT-Rank descriptor).
    fn ranks(&mut self) -> [u8; 64] {
        let mut d: [u8; 64] = std::array::from_fn(|i| i as u8);
        for i in (1..64).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            d.swap(i, j);
        }
        d
    }
}

fn random_volume(shape: (usize, usize, usize), seed: u64) -> Array3<f32> {
    let mut rng = Rng(seed);
    Array3::from_shape_simple_fn(shape, || rng.unit())
}

/// A volume of values near and below the smallest normal f32 (2^−126 ≈ 1.2e−38): zeros,
/// subnormals of both signs and tiny normals, so that the blur's products and sums meet
/// subnormals, which the scale space flushes to zero.
fn tiny_volume(shape: (usize, usize, usize), seed: u64) -> Array3<f32> {
    let mut rng = Rng(seed);
    Array3::from_shape_simple_fn(shape, || {
        let u = rng.unit();
        match rng.next() % 5 {
            0 => 0.0,
            1 => u * 3e-39,
            2 => -u * 1e-40,
            3 => u * 2e-38,
            _ => u * 1e-36,
        }
    })
}

/// CPU reference blur, written as keyfuse-core's extractor blurs (`extract/blur.rs`):
/// axes 0, 1, 2 in turn (length-1 axes skipped), replicated border,
/// `acc = w0·x; acc += w[t]·(x[p−t] + x[p+t])`, no fused multiply-add, every operation
/// with subnormals flushed to zero (FTZ and DAZ, `extract/flush.rs`).
/// `cpu_reference_blur_is_the_extractor_blur` checks it against the extractor's blur.
fn cpu_blur(v: &Array3<f32>, sigma: f32) -> Array3<f32> {
    let w = gaussian_half_kernel(sigma);
    with_flushed_subnormals(|| reference_passes(v, &w))
}

fn reference_passes(v: &Array3<f32>, w: &[f32]) -> Array3<f32> {
    let mut cur = v.clone();
    for axis in 0..3 {
        let n = cur.shape()[axis] as i64;
        if n == 1 {
            continue;
        }
        let mut out = cur.clone();
        for ((i, j, k), o) in out.indexed_iter_mut() {
            let pos = [i, j, k][axis] as i64;
            let at = |p: i64| {
                let mut idx = [i, j, k];
                idx[axis] = p.clamp(0, n - 1) as usize;
                cur[idx]
            };
            let mut acc = w[0] * at(pos);
            for (t, &wt) in w.iter().enumerate().skip(1) {
                acc += wt * (at(pos - t as i64) + at(pos + t as i64));
            }
            *o = acc;
        }
        cur = out;
    }
    cur
}

/// The extractor's own CPU blur (keyfuse-core), as an array.
fn extractor_blur(v: &Array3<f32>, sigma: f32) -> Array3<f32> {
    let (a, b, c) = v.dim();
    let data = core_blur(v.as_standard_layout().as_slice().unwrap(), [a, b, c], sigma).unwrap();
    Array3::from_shape_vec((a, b, c), data).unwrap()
}

/// Runs without a GPU: the reference above is the extractor's blur, bit for bit, on
/// ordinary values and on values that meet subnormals (which both flush).
#[test]
fn cpu_reference_blur_is_the_extractor_blur() {
    for (shape, sigma) in [((17, 12, 9), 1.7f32), ((20, 11, 1), 1.2), ((5, 6, 7), 4.0)] {
        for v in [random_volume(shape, 7), tiny_volume(shape, 8)] {
            let want = cpu_blur(&v, sigma);
            let got = extractor_blur(&v, sigma);
            let bits = |a: &Array3<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&got), bits(&want), "shape {shape:?} sigma {sigma}");
            assert!(!got.iter().any(|x| x.is_subnormal()));
        }
    }
}

#[test]
fn blur_matches_cpu_bit_for_bit() {
    let Some(gpu) = gpu_or_skip("blur") else {
        return;
    };
    for (shape, sigma) in [((17, 12, 9), 1.7f32), ((20, 11, 1), 1.2), ((5, 6, 7), 4.0)] {
        for v in [random_volume(shape, 7), tiny_volume(shape, 8)] {
            let want = cpu_blur(&v, sigma);
            assert_eq!(extractor_blur(&v, sigma), want);
            let dv = gpu.upload_volume(v.view()).unwrap();
            let got = gpu
                .download_volume(&gpu.gaussian_blur(&dv, sigma).unwrap())
                .unwrap();
            let bits = |a: &Array3<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&got), bits(&want), "shape {shape:?} sigma {sigma}");
        }
    }
}

/// Single flushed products `w·x` (a one-tap kernel along the only long axis) within
/// ±3,000 ulps of the smallest normal: the GPU's `.ftz` flushes exactly the products the
/// CPU's MXCSR FTZ flushes (a result tiny after rounding), signs of zeros included.
#[test]
fn flushed_products_at_the_normal_boundary_match_cpu() {
    let Some(gpu) = gpu_or_skip("flushed products") else {
        return;
    };
    for w in [0.75f32, 0.3, 0.123_456_8, 0.0023, 0.398_9, 0.041_1] {
        let x0 = (f32::MIN_POSITIVE / w).to_bits();
        let xs: Vec<f32> = (0..6000u32)
            .map(|d| f32::from_bits(x0 - 3000 + d))
            .flat_map(|x| [x, -x])
            .collect();
        let v = Array3::from_shape_vec((xs.len(), 1, 1), xs).unwrap();
        let want = with_flushed_subnormals(|| v.mapv(|x| std::hint::black_box(w) * x));
        let dv = gpu.upload_volume(v.view()).unwrap();
        let got = gpu
            .download_volume(
                &gpu.blur_half_kernel(&dv, &[w], keyfuse_cuda::ops::Border::Clamp)
                    .unwrap(),
            )
            .unwrap();
        let bits = |a: &Array3<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&got), bits(&want), "w = {w}");
        // both sides of the boundary occur
        assert!(want.iter().any(|&x| x == 0.0) && want.iter().any(|&x| x != 0.0));
    }
}

#[test]
fn downsample_and_dog_match_cpu() {
    let Some(gpu) = gpu_or_skip("downsample") else {
        return;
    };
    for v in [random_volume((9, 8, 7), 3), tiny_volume((9, 8, 7), 9)] {
        let dv = gpu.upload_volume(v.view()).unwrap();
        let got = gpu.download_volume(&gpu.downsample2(&dv).unwrap()).unwrap();
        // the extractor's order, subnormals flushed (extract/volume.rs `downsample`)
        let want = with_flushed_subnormals(|| {
            Array3::from_shape_fn((4, 4, 3), |(i, j, k)| {
                let mut acc = 0.0f32;
                for a in 0..2 {
                    for b in 0..2 {
                        acc +=
                            v[[2 * i + a, 2 * j + b, 2 * k]] + v[[2 * i + a, 2 * j + b, 2 * k + 1]];
                    }
                }
                acc * 0.125
            })
        });
        let bits = |a: &Array3<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&got), bits(&want));
    }
    let v = random_volume((9, 8, 7), 3);
    let dv = gpu.upload_volume(v.view()).unwrap();
    let w = random_volume((9, 8, 7), 4);
    let dw = gpu.upload_volume(w.view()).unwrap();
    let diff = gpu
        .download_volume(&gpu.subtract(&dw, &dv).unwrap())
        .unwrap();
    assert_eq!(diff, &w - &v);
}

/// CPU reference extrema, with keyfuse-core's rule (`detect::extrema_3d`): |v| > threshold,
/// positive v a strict maximum over the 80 neighbours, otherwise a strict minimum.
fn cpu_extrema(dogs: [&Array3<f32>; 3], margin: usize, threshold: f32) -> Vec<([usize; 3], i8)> {
    let (n0, n1, n2) = dogs[1].dim();
    let m = margin.max(1);
    let mut out = Vec::new();
    if n0 <= 2 * m || n1 <= 2 * m || n2 <= 2 * m {
        return out;
    }
    for i in m..n0 - m {
        for j in m..n1 - m {
            for k in m..n2 - m {
                let v = dogs[1][[i, j, k]];
                if v.abs() <= threshold {
                    continue;
                }
                let mut ok = true;
                for (l, dog) in dogs.iter().enumerate() {
                    for a in 0..3 {
                        for b in 0..3 {
                            for c in 0..3 {
                                if l == 1 && (a, b, c) == (1, 1, 1) {
                                    continue;
                                }
                                let w = dog[[i + a - 1, j + b - 1, k + c - 1]];
                                ok &= if v > 0.0 { w < v } else { w > v };
                            }
                        }
                    }
                }
                if ok {
                    out.push(([i, j, k], if v > 0.0 { 1 } else { -1 }));
                }
            }
        }
    }
    out
}

#[test]
fn extrema_match_cpu() {
    let Some(gpu) = gpu_or_skip("extrema") else {
        return;
    };
    let d: Vec<Array3<f32>> = (0..3)
        .map(|s| random_volume((14, 13, 12), 11 + s))
        .collect();
    for (margin, threshold) in [(1, 0.0), (3, 0.3)] {
        let d: Vec<Array3<f32>> = d.iter().map(|v| v - 0.5).collect();
        let want = cpu_extrema([&d[0], &d[1], &d[2]], margin, threshold);
        let dv: Vec<_> = d
            .iter()
            .map(|v| gpu.upload_volume(v.view()).unwrap())
            .collect();
        let got = gpu
            .extrema(&dv[0], &dv[1], &dv[2], margin, threshold)
            .unwrap();
        assert_eq!(got, want);
        assert!(!want.is_empty());
    }
}

#[test]
fn scale_space_is_deterministic_and_consistent() {
    let Some(gpu) = gpu_or_skip("scale_space") else {
        return;
    };
    let v = random_volume((40, 36, 32), 5);
    let p = ScaleSpaceParams {
        descriptor_radius: 1.0,
        border: 0.0,
        ..Default::default()
    };
    let a = gpu.scale_space(v.view(), &p).unwrap();
    let b = gpu.scale_space(v.view(), &p).unwrap();
    assert_eq!(a.len(), b.len());
    assert!(a.len() >= 2);
    // G_0 of octave 0 is the CPU blur of the input to sigma0
    let pre = (p.sigma0 * p.sigma0 - p.initial_blur * p.initial_blur).sqrt() as f32;
    assert_eq!(a[0].gaussians[0], cpu_blur(&v, pre));
    for (oa, ob) in a.iter().zip(&b) {
        assert_eq!(oa.extrema, ob.extrema);
        assert_eq!(oa.gaussians.len(), p.scales_per_octave + 3);
        assert_eq!(oa.dogs.len(), p.scales_per_octave + 2);
        for (l, dog) in oa.dogs.iter().enumerate() {
            assert_eq!(dog, &(&oa.gaussians[l + 1] - &oa.gaussians[l]));
        }
        let want: Vec<_> = (1..=p.scales_per_octave)
            .flat_map(|l| {
                cpu_extrema(
                    [&oa.dogs[l - 1], &oa.dogs[l], &oa.dogs[l + 1]],
                    p.margin(l),
                    p.peak_threshold,
                )
                .into_iter()
                .map(move |(ijk, pol)| (l, ijk, pol))
            })
            .collect();
        let got: Vec<_> = oa
            .extrema
            .iter()
            .map(|e| (e.level, e.ijk, e.polarity))
            .collect();
        assert_eq!(got, want);
    }
}

#[test]
fn gradient_and_patches_match_cpu() {
    let Some(gpu) = gpu_or_skip("gradient") else {
        return;
    };
    let v = random_volume((10, 9, 8), 21);
    let dv = gpu.upload_volume(v.view()).unwrap();
    let g = gpu.gradient(&dv).unwrap();
    let (n0, n1, n2) = v.dim();
    for ((i, j, k), _) in v.indexed_iter() {
        let at = |a: usize, b: usize, c: usize| v[[a, b, c]];
        let gi = 0.5 * (at((i + 1).min(n0 - 1), j, k) - at(i.saturating_sub(1), j, k));
        let gj = 0.5 * (at(i, (j + 1).min(n1 - 1), k) - at(i, j.saturating_sub(1), k));
        let gk = 0.5 * (at(i, j, (k + 1).min(n2 - 1)) - at(i, j, k.saturating_sub(1)));
        let o = 3 * ((i * n1 + j) * n2 + k);
        assert_eq!([g[o], g[o + 1], g[o + 2]], [gi, gj, gk]);
    }
    // identity frame, integer offsets: the patch reads voxels exactly, clamped at faces
    let eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    let u = [-5.0f32, -1.0, 0.0, 1.0, 5.0];
    let p = gpu
        .sample_patches(&dv, &[[4.0, 4.0, 3.0]], &u, &[eye], 5)
        .unwrap();
    let cl = |x: f32, n: usize| (x.clamp(0.0, (n - 1) as f32)) as usize;
    for a in 0..5 {
        for b in 0..5 {
            for c in 0..5 {
                let want = v[[cl(4.0 + u[a], n0), cl(4.0 + u[b], n1), cl(3.0 + u[c], n2)]];
                assert_eq!(p[(a * 5 + b) * 5 + c], want);
            }
        }
    }
}

/// CPU reference of keyfuse-core's `Vol::sample`: clamp each coordinate to the grid
/// (non-finite → 0), then `lerp(a, b, f) = a + f·(b − a)` along axis 2, 1, 0.
fn cpu_trilinear(v: &Array3<f32>, p: [f32; 3]) -> f32 {
    let n = v.dim();
    let n = [n.0, n.1, n.2];
    let (mut i0, mut i1, mut f) = ([0usize; 3], [0usize; 3], [0f32; 3]);
    for a in 0..3 {
        let x = if p[a].is_finite() {
            p[a].clamp(0.0, (n[a] - 1) as f32)
        } else {
            0.0
        };
        let fl = x.floor();
        i0[a] = fl as usize;
        i1[a] = (i0[a] + 1).min(n[a] - 1);
        f[a] = x - fl;
    }
    let l = |i: usize, j: usize| {
        let a = v[[i, j, i0[2]]];
        a + f[2] * (v[[i, j, i1[2]]] - a)
    };
    let c0 = l(i0[0], i0[1]) + f[1] * (l(i0[0], i1[1]) - l(i0[0], i0[1]));
    let c1 = l(i1[0], i0[1]) + f[1] * (l(i1[0], i1[1]) - l(i1[0], i0[1]));
    c0 + f[0] * (c1 - c0)
}

#[test]
fn rotated_patches_match_cpu_sampler_bit_for_bit() {
    let Some(gpu) = gpu_or_skip("rotated patches") else {
        return;
    };
    let v = random_volume((12, 11, 10), 33);
    let dv = gpu.upload_volume(v.view()).unwrap();
    // a rotated frame (rows = axes) and fractional offsets reaching past the faces
    let (s, c) = 0.6f32.sin_cos();
    let frame = [
        [c, s, 0.0],
        [-s * 0.8, c * 0.8, 0.6],
        [s * 0.6, -c * 0.6, 0.8],
    ];
    let u: Vec<f32> = (0..7).map(|t| -6.3 + 2.1 * t as f32).collect();
    let centre = [5.3f32, 4.7, 4.1];
    let p = gpu.sample_patches(&dv, &[centre], &u, &[frame], 7).unwrap();
    for a in 0..7 {
        for b in 0..7 {
            for d in 0..7 {
                // the CPU descriptor's sample position, summed left to right
                let q = [0, 1, 2].map(|x| {
                    centre[x] + u[a] * frame[0][x] + u[b] * frame[1][x] + u[d] * frame[2][x]
                });
                let want = cpu_trilinear(&v, q);
                assert_eq!(p[(a * 7 + b) * 7 + d].to_bits(), want.to_bits(), "{q:?}");
            }
        }
    }
}

fn cpu_knn(q: &Array2<u8>, db: &Array2<u8>, k: usize) -> (Array2<u32>, Array2<i64>) {
    let mut d = Array2::from_elem((q.nrows(), k), u32::MAX);
    let mut idx = Array2::from_elem((q.nrows(), k), -1i64);
    for (qi, qr) in q.rows().into_iter().enumerate() {
        let mut all: Vec<(u32, i64)> = db
            .rows()
            .into_iter()
            .enumerate()
            .map(|(j, r)| {
                let s = qr
                    .iter()
                    .zip(r.iter())
                    .map(|(&a, &b)| (a as i32 - b as i32).pow(2) as u32)
                    .sum();
                (s, j as i64)
            })
            .collect();
        all.sort_unstable();
        for (s, &(dist, j)) in all.iter().take(k).enumerate() {
            d[[qi, s]] = dist;
            idx[[qi, s]] = j;
        }
    }
    (d, idx)
}

fn rank_descriptors(n: usize, seed: u64) -> Array2<u8> {
    let mut rng = Rng(seed);
    let mut a = Array2::zeros((n, 64));
    for mut row in a.rows_mut() {
        let r = rng.ranks();
        row.iter_mut().zip(r).for_each(|(x, v)| *x = v);
    }
    a
}

#[test]
fn knn_matches_brute_force_exactly() {
    let Some(gpu) = gpu_or_skip("knn") else {
        return;
    };
    // sizes that are not multiples of the tiles (8, 16, 64, 128 rows)
    let db = rank_descriptors(5003, 9);
    let mut q = rank_descriptors(301, 10);
    // exact duplicates and ties: queries equal to database rows, and a duplicated row
    q.row_mut(0).assign(&db.row(17));
    let mut db2 = db.clone();
    db2.row_mut(500).assign(&db.row(17));
    for kernel in KERNELS {
        for k in [1, 2, 5, 30] {
            let (wd, wi) = cpu_knn(&q, &db2, k);
            let (gd, gi) = gpu
                .knn_with_kernel(q.view(), db2.view(), k, kernel)
                .unwrap();
            assert_eq!(gd, wd, "{kernel:?} k={k}");
            assert_eq!(gi, wi, "{kernel:?} k={k}");
            // and the core's exact search, the CPU path itself
            let core = knn_exact(db2.as_slice().unwrap(), q.as_slice().unwrap(), k, |_, _| {
                true
            })
            .unwrap();
            assert_eq!(gd.as_slice().unwrap(), core.dist2.as_slice(), "k={k}");
        }
        // a handful of queries: the database is split across blocks and merged
        let few = q.slice(ndarray::s![..3, ..]).to_owned();
        let (wd, wi) = cpu_knn(&few, &db2, 4);
        let got = gpu
            .knn_with_kernel(few.view(), db2.view(), 4, kernel)
            .unwrap();
        assert_eq!(got, (wd, wi), "{kernel:?} split");
        // arbitrary bytes (not permutations) and a database smaller than k
        let mut rng = Rng(3);
        let raw = Array2::from_shape_simple_fn((40, 64), || (rng.next() & 255) as u8);
        let (wd, wi) = cpu_knn(&raw, &raw.slice(ndarray::s![..7, ..]).to_owned(), 9);
        let got = gpu
            .knn_with_kernel(raw.view(), raw.slice(ndarray::s![..7, ..]), 9, kernel)
            .unwrap();
        assert_eq!(got, (wd, wi), "{kernel:?} raw bytes");
    }
}

/// A small cohort: subject s is a base set with 2·s random swaps per row.
fn cohort(n_subjects: usize, per: usize) -> (Array2<u8>, Vec<i32>) {
    let base = rank_descriptors(per, 1);
    let mut rng = Rng(2);
    let mut all = Array2::zeros((n_subjects * per, 64));
    for s in 0..n_subjects {
        for r in 0..per {
            let mut row = base.row(r).to_owned();
            for _ in 0..s * 2 {
                let (a, b) = ((rng.next() % 64) as usize, (rng.next() % 64) as usize);
                row.swap(a, b);
            }
            all.row_mut(s * per + r).assign(&row);
        }
    }
    let owner = (0..n_subjects * per).map(|r| (r / per) as i32).collect();
    (all, owner)
}

#[test]
fn cohort_scores_match_the_cpu_engine() {
    let Some(gpu) = gpu_or_skip("cohort") else {
        return;
    };
    let (n_subjects, per) = (6usize, 120usize);
    let (all, owner) = cohort(n_subjects, per);
    let mut cpu = Cohort::new(ForestParams::default());
    for s in 0..n_subjects {
        cpu.add(
            all.slice(ndarray::s![s * per..(s + 1) * per, ..])
                .as_standard_layout()
                .as_slice()
                .unwrap(),
        )
        .unwrap();
    }
    for (k, kernel) in [1, 5, 30]
        .into_iter()
        .flat_map(|k| KERNELS.map(|kn| (k, kn)))
    {
        let p = SoftJaccardParams {
            k,
            exact: true,
            ..Default::default()
        };
        // the CPU defaults: α² clamped to [1, 0.1·E]
        let sj = SjParams {
            k,
            kernel: Some(kernel),
            ..Default::default()
        };
        for symmetric in [false, true] {
            let want = cpu.pairwise(&p, symmetric).unwrap();
            let got = gpu
                .cohort_pairwise(all.view(), &owner, n_subjects, &sj, symmetric)
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-9, "k={k}: {g} vs {w}");
            }
            let again = gpu
                .cohort_pairwise(all.view(), &owner, n_subjects, &sj, symmetric)
                .unwrap();
            assert_eq!(got, again, "bit-identical run to run");
        }
        // a query set against the cohort, excluding and restricting subjects
        let q = all.slice(ndarray::s![..per, ..]);
        let allowed = [true, true, false, true, true, true];
        let want = cpu
            .search(
                q.as_standard_layout().as_slice().unwrap(),
                Some(0),
                Some(&allowed),
                &p,
            )
            .unwrap();
        let got = gpu
            .cohort_search(
                all.view(),
                &owner,
                n_subjects,
                q,
                Some(0),
                Some(&allowed),
                &sj,
            )
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-9, "search k={k}: {g} vs {w}");
        }
    }
}

/// Device buffers dropped on a thread that never used the GPU (the Python thread dropping a
/// `GpuCohort`) leave the GPU usable: cudarc frees without making the context current, and a
/// failed free would poison every later call of the process.
#[test]
fn buffers_dropped_on_another_thread_leave_the_gpu_usable() {
    let Some(gpu) = gpu_or_skip("drop on another thread") else {
        return;
    };
    let (all, owner) = cohort(3, 40);
    let sj = SjParams {
        k: 5,
        ..Default::default()
    };
    let want = gpu
        .cohort_pairwise(all.view(), &owner, 3, &sj, false)
        .unwrap();
    let cohort = gpu.upload_cohort(all.view(), &owner, 3).unwrap();
    let volume = gpu
        .upload_volume(random_volume((6, 5, 4), 1).view())
        .unwrap();
    std::thread::spawn(move || drop((cohort, volume)))
        .join()
        .unwrap();
    let got = gpu
        .cohort_pairwise(all.view(), &owner, 3, &sj, false)
        .unwrap();
    assert_eq!(got, want);
}

#[test]
fn kde_class_sums_match_cpu() {
    let Some(gpu) = gpu_or_skip("kde") else {
        return;
    };
    let q = rank_descriptors(20, 30);
    let db = rank_descriptors(300, 31);
    let class: Vec<i32> = (0..300).map(|j| j % 7).collect();
    let denom: Vec<f32> = (0..20).map(|i| 20000.0 + 500.0 * i as f32).collect();
    let got = gpu
        .kde_class_sums(q.view(), db.view(), &class, 7, &denom, f64::INFINITY)
        .unwrap();
    let (d, idx) = cpu_knn(&q, &db, 1);
    assert!(d[[0, 0]] > 0 && idx[[0, 0]] >= 0);
    for qi in 0..20 {
        let mut want = [0.0f64; 7];
        for (j, r) in db.rows().into_iter().enumerate() {
            let d2: f64 = q
                .row(qi)
                .iter()
                .zip(r.iter())
                .map(|(&a, &b)| ((a as f64) - (b as f64)).powi(2))
                .sum();
            want[class[j] as usize] += (-d2 / denom[qi] as f64).exp();
        }
        for c in 0..7 {
            assert!((got[[qi, c]] - want[c]).abs() <= 1e-6 * want[c].max(1.0));
        }
    }
}

#[test]
#[allow(clippy::field_reassign_with_default)]
fn keypoint_log_likelihood_matches_the_cpu_kde() {
    let Some(gpu) = gpu_or_skip("keypoint_log_likelihood") else {
        return;
    };
    let (train, owner) = cohort(6, 80);
    let train_sample: Vec<i64> = owner.iter().map(|&s| s as i64).collect();
    let sample_class = ndarray::arr1(&[0i64, 1, 0, 2, 1, 2]);
    let query = rank_descriptors(40, 77);
    let ts = ndarray::Array1::from(train_sample.clone());
    for exclude in [None, Some(3)] {
        for k in [None, Some(5)] {
            // field by field: the options struct gains fields as the CPU engine grows
            let mut opts = KdeOptions::default();
            opts.background = 1.0;
            opts.k = k;
            let want = keypoint_log_likelihood(
                query.view(),
                train.view(),
                ts.view(),
                sample_class.view(),
                3,
                exclude,
                &opts,
            )
            .unwrap();
            let got = gpu
                .keypoint_log_likelihood(
                    query.view(),
                    train.view(),
                    &train_sample,
                    sample_class.as_slice().unwrap(),
                    3,
                    exclude,
                    k,
                    1.0,
                )
                .unwrap();
            for (g, w) in got.iter().zip(want.iter()) {
                if k.is_some() {
                    assert_eq!(g, w, "k-NN sums are formed on the host in the CPU's order");
                } else {
                    assert!((g - w).abs() <= 1e-9 * w.abs().max(1.0), "{g} vs {w}");
                }
            }
        }
    }
}

#[test]
fn no_gpu_means_a_clear_error_not_a_panic() {
    if keyfuse_cuda::cuda_available() {
        return;
    }
    let err = keyfuse_cuda::gpu().err().expect("unavailable");
    assert!(matches!(err, keyfuse_core::KfError::DeviceUnavailable(_)));
    let info = keyfuse_cuda::cuda_info();
    assert!(info.reason.is_some());
}

/// The test's own brute-force reference agrees with the core's exact search (runs without
/// a GPU, so the reference the GPU is held to is itself checked everywhere).
#[test]
fn reference_knn_agrees_with_core() {
    let db = rank_descriptors(200, 40);
    let q = rank_descriptors(30, 41);
    let (d, i) = cpu_knn(&q, &db, 7);
    let core = knn_exact(db.as_slice().unwrap(), q.as_slice().unwrap(), 7, |_, _| {
        true
    })
    .unwrap();
    assert_eq!(d.as_slice().unwrap(), core.dist2.as_slice());
    let core_i: Vec<i64> = core.idx.iter().map(|&x| x as i64).collect();
    assert_eq!(i.as_slice().unwrap(), core_i.as_slice());
}
