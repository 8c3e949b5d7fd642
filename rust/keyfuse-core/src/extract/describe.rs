//! Per-keypoint analysis: the structure-tensor blob test, 3D orientations and the
//! 64-bin SIFT-Rank descriptor, all sampled from the Gaussian image of the keypoint's
//! octave by trilinear interpolation.

use super::block::Block;
use super::ExtractParams;
use crate::linalg::sym3_eigenvalues;
use std::sync::OnceLock;

/// A keypoint frame: rows are the keypoint's axes in (octave) voxel-index space.
pub(crate) type Frame = [[f32; 3]; 3];

/// A keypoint where it is described: `g`, a block of its Gaussian level; `c`, its position
/// in the block's voxels; `sigma`, its scale (voxels).
#[derive(Clone, Copy)]
pub(crate) struct Patch<'a> {
    pub g: Block<'a>,
    pub c: [f32; 3],
    pub sigma: f32,
}

/// Whether the per-keypoint code runs its AVX2 builds: the CPU has AVX2 and
/// `KEYFUSE_EXTRACT_ISA` allows it. They are the same Rust code compiled for wider
/// vectors: LLVM neither reorders nor fuses floating-point operations (and FMA is not
/// enabled), so they give the same bits.
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    super::blur::isa_cap() >= 1 && std::is_x86_feature_detected!("avx2")
}

/// Samples per axis of the analysis patch (gradients on the inner `N-2`³).
const NA: usize = 11;
/// Descriptor samples per axis (2 cells × 6), plus one ring for central differences.
const ND: usize = 8;

#[inline]
fn dot(a: [f32; 3], b: [f32; 3]) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
#[inline]
fn cross(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}
#[inline]
fn normalise(a: [f32; 3]) -> Option<[f32; 3]> {
    let n = dot(a, a).sqrt();
    (n > 1e-12 && n.is_finite()).then(|| [a[0] / n, a[1] / n, a[2] / n])
}

/// The equal-area direction bins of the orientation sphere and their smoothing kernel.
struct Sphere {
    centres: Vec<[f32; 3]>,
    /// for each bin, (neighbour, weight) pairs of the smoothing kernel
    kernel: Vec<Vec<(usize, f32)>>,
    /// for each bin, the bins within the peak-suppression angle
    near: Vec<Vec<usize>>,
}

const NZ: usize = 8;
const NPHI: usize = 16;

fn sphere() -> &'static Sphere {
    static S: OnceLock<Sphere> = OnceLock::new();
    S.get_or_init(|| {
        let mut centres = Vec::with_capacity(NZ * NPHI);
        for zi in 0..NZ {
            let z = -1.0 + (zi as f32 + 0.5) * 2.0 / NZ as f32;
            let r = (1.0 - z * z).max(0.0).sqrt();
            for pi in 0..NPHI {
                let phi = (pi as f32 + 0.5) * std::f32::consts::TAU / NPHI as f32;
                centres.push([r * phi.cos(), r * phi.sin(), z]);
            }
        }
        let near_cos = 35f32.to_radians().cos();
        let mut kernel = Vec::new();
        let mut near = Vec::new();
        for a in &centres {
            let mut k = Vec::new();
            let mut nb = Vec::new();
            for (j, b) in centres.iter().enumerate() {
                let c = dot(*a, *b);
                let w = ((c - 1.0) / 0.06).exp();
                if w > 1e-3 {
                    k.push((j, w));
                }
                if c > near_cos && c < 0.99999 {
                    nb.push(j);
                }
            }
            kernel.push(k);
            near.push(nb);
        }
        Sphere {
            centres,
            kernel,
            near,
        }
    })
}

#[inline]
fn sphere_bin(g: [f32; 3], mag: f32) -> usize {
    let z = (g[2] / mag).clamp(-1.0, 1.0);
    let zi = (((z + 1.0) * 0.5 * NZ as f32) as usize).min(NZ - 1);
    zi * NPHI + phi_bin(g[1], g[0])
}

/// The azimuth bin `⌊atan2(y, x) / 2π · NPHI⌋` (angles in [0, 2π), the last bin also taking
/// what rounds up to 2π): from [`atan_approx`] where its error cannot change the bin (more
/// than 1/1000 of a bin from a boundary), else from `atan2`, so always `atan2`'s bin.
#[inline]
fn phi_bin(y: f32, x: f32) -> usize {
    let t = atan2_approx(y, x) * (NPHI as f32 / std::f32::consts::TAU);
    let t = if t < 0.0 { t + NPHI as f32 } else { t };
    let i = t as i32;
    let fr = t - i as f32;
    if fr > 1e-3 && fr < 1.0 - 1e-3 && (0..NPHI as i32).contains(&i) {
        return i as usize;
    }
    phi_bin_exact(y, x)
}

#[cold]
#[inline(never)]
fn phi_bin_exact(y: f32, x: f32) -> usize {
    let mut phi = y.atan2(x);
    if phi < 0.0 {
        phi += std::f32::consts::TAU;
    }
    ((phi / std::f32::consts::TAU * NPHI as f32) as usize).min(NPHI - 1)
}

/// `atan(a)` for `a` in [0, 1], error below 2e-6 rad (checked by
/// `phi_bin_equals_the_atan2_bin`; the bins need it below 4e-4).
#[inline(always)]
fn atan_approx(a: f32) -> f32 {
    let s = a * a;
    a * (0.999_977_26
        + s * (-0.332_623_47
            + s * (0.193_543_46 + s * (-0.116_432_87 + s * (0.052_653_32 - s * 0.011_721_2)))))
}

/// `atan2(y, x)` in [−π, π] from [`atan_approx`] by octant symmetry; NaN for `(0, 0)`.
#[inline(always)]
fn atan2_approx(y: f32, x: f32) -> f32 {
    use std::f32::consts::{FRAC_PI_2, PI};
    let (ax, ay) = (x.abs(), y.abs());
    let a = atan_approx(ax.min(ay) / ax.max(ay));
    let a = if ay > ax { FRAC_PI_2 - a } else { a };
    let a = if x < 0.0 { PI - a } else { a };
    if y < 0.0 {
        -a
    } else {
        a
    }
}

/// An analysis-patch gradient: its components, Gaussian weight and magnitude.
#[derive(Clone, Copy)]
struct Grad {
    g: [f32; 3],
    w: f32,
    m: f32,
}

/// The Gaussian weights (σ_w = radius / 2) of the analysis patch's inner `(NA − 2)³`
/// gradients, in their order: the same for every keypoint, so computed once.
fn analysis_weights() -> &'static [f32] {
    static W: OnceLock<Vec<f32>> = OnceLock::new();
    W.get_or_init(|| {
        let half = (NA / 2) as f32;
        let sw = (NA - 1) as f32 / 4.0; // radius/2 in sample units
        let mut w = Vec::new();
        for a in 1..NA - 1 {
            for b in 1..NA - 1 {
                for d in 1..NA - 1 {
                    let r2 = (a as f32 - half).powi(2)
                        + (b as f32 - half).powi(2)
                        + (d as f32 - half).powi(2);
                    w.push((-r2 / (2.0 * sw * sw)).exp());
                }
            }
        }
        w
    })
}

/// Result of analysing a candidate: structure-tensor eigenvalues and its frames.
pub(crate) struct Analysis {
    pub eigenvalues: [f32; 3],
    pub frames: Vec<Frame>,
}

/// Normalise a sampled patch to mean 0 and unit L2 norm, in place (sums in f64). False,
/// and the patch untouched, when it is flat (variance below 1e-12): nothing to describe.
pub(crate) fn normalise_patch(v: &mut [f32]) -> bool {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let ss = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>();
    if ss / n < 1e-12 {
        return false;
    }
    let inv = 1.0 / ss.sqrt();
    for x in v.iter_mut() {
        *x = ((*x as f64 - mean) * inv) as f32;
    }
    true
}

/// Structure-tensor blob test and orientation estimation around `c` (octave voxel
/// coordinates) at characteristic scale `sigma` (octave voxels). `None` when the patch
/// is flat, the point is not blob-like, or no stable orientation exists.
#[inline(never)]
pub(crate) fn analyse(kp: &Patch, p: &ExtractParams) -> Option<Analysis> {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 was detected
        return unsafe { analyse_avx2(kp, p) };
    }
    analyse_body(kp, p)
}

/// [`analyse`] compiled for AVX2 (without FMA: the same IEEE operations, wider).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn analyse_avx2(kp: &Patch, p: &ExtractParams) -> Option<Analysis> {
    analyse_body(kp, p)
}

#[inline(always)]
fn analyse_body(kp: &Patch, p: &ExtractParams) -> Option<Analysis> {
    let Patch { g, c, sigma } = *kp;
    let radius = p.orientation_radius as f32 * sigma;
    let h = 2.0 * radius / (NA - 1) as f32;
    let half = (NA / 2) as f32;
    let mut v = vec![0f32; NA * NA * NA];
    let axes: [[f32; NA]; 3] =
        std::array::from_fn(|x| std::array::from_fn(|a| c[x] + (a as f32 - half) * h));
    g.sample_grid([&axes[0], &axes[1], &axes[2]], &mut v);
    if !normalise_patch(&mut v) {
        return None;
    }
    // gradients on the inner grid, Gaussian-weighted (σ_w = radius / 2)
    let inner = NA - 2;
    let mut grads: Vec<Grad> = Vec::with_capacity(inner * inner * inner);
    let mut t = [[0f64; 3]; 3];
    let weights = analysis_weights();
    for a in 1..NA - 1 {
        for b in 1..NA - 1 {
            for d in 1..NA - 1 {
                let at = |x: usize, y: usize, z: usize| v[(x * NA + y) * NA + z];
                let gv = [
                    0.5 * (at(a + 1, b, d) - at(a - 1, b, d)),
                    0.5 * (at(a, b + 1, d) - at(a, b - 1, d)),
                    0.5 * (at(a, b, d + 1) - at(a, b, d - 1)),
                ];
                let w = weights[grads.len()];
                for (x, row) in t.iter_mut().enumerate() {
                    for (y, cell) in row.iter_mut().enumerate() {
                        *cell += (w * gv[x] * gv[y]) as f64;
                    }
                }
                grads.push(Grad {
                    g: gv,
                    w,
                    m: dot(gv, gv).sqrt(),
                });
            }
        }
    }
    let e = sym3_eigenvalues(t);
    let (tr, det) = (e[0] + e[1] + e[2], e[0] * e[1] * e[2]);
    if p.tensor_ratio > 0.0
        && (e[2] <= 0.0
            || (tr * tr * tr).partial_cmp(&(p.tensor_ratio * det))
                != Some(std::cmp::Ordering::Less))
    {
        return None;
    }
    let frames = orientations(&grads, p);
    if frames.is_empty() {
        return None;
    }
    Some(Analysis {
        eigenvalues: [e[0] as f32, e[1] as f32, e[2] as f32],
        frames,
    })
}

/// Mean-shift refinement of a direction: the weighted mean of the gradient directions
/// within 25° of it, three times.
#[inline(always)]
fn refine_direction(grads: &[Grad], mut d: [f32; 3]) -> [f32; 3] {
    let cos_lim = 25f32.to_radians().cos();
    for _ in 0..3 {
        let mut acc = [0f32; 3];
        for &Grad { g: gv, w, m } in grads {
            if m <= 0.0 || dot(gv, d) < cos_lim * m {
                continue;
            }
            for x in 0..3 {
                acc[x] += w * gv[x];
            }
        }
        match normalise(acc) {
            Some(n) => d = n,
            None => break,
        }
    }
    d
}

/// Bins of the circular histograms of in-plane gradient angles (3D secondary axes, 2D
/// orientations).
pub(crate) const ANGLE_BINS: usize = 36;

/// Add `weight` at the angle `atan2(y, x)` of a circular histogram whose bin `i` is
/// centred on `(i + ½)·2π/36`, split linearly between the two nearest bins.
#[inline]
pub(crate) fn add_angle(h: &mut [f32; ANGLE_BINS], y: f32, x: f32, weight: f32) {
    const NB: usize = ANGLE_BINS;
    let mut ang = y.atan2(x) / std::f32::consts::TAU * NB as f32;
    if ang < 0.0 {
        ang += NB as f32;
    }
    let f = ang - 0.5;
    // ⌊f⌋ without a libm call (f is in [−0.5, 35.5], or NaN, which gives 0 either way)
    let t = f as i32 as f32;
    let lo = if t > f { t - 1.0 } else { t };
    let frac = f - lo;
    let i0 = (lo as isize).rem_euclid(NB as isize) as usize;
    h[i0] += weight * (1.0 - frac);
    h[(i0 + 1) % NB] += weight * frac;
}

/// The peaks of a circular angle histogram after a circular [1 4 6 4 1]/16 smoothing:
/// local maxima of at least `rel` times the largest smoothed bin, each as (angle refined
/// by a parabola through its neighbours, smoothed height), in bin order. Also returns the
/// largest smoothed bin; no peaks when it is not positive.
pub(crate) fn angle_peaks(h: &[f32; ANGLE_BINS], rel: f32) -> (f32, Vec<(f32, f32)>) {
    const NB: usize = ANGLE_BINS;
    let mut hs = [0f32; NB];
    for (i, out) in hs.iter_mut().enumerate() {
        let g = |o: isize| h[(i as isize + o).rem_euclid(NB as isize) as usize];
        *out = (g(-2) + 4.0 * g(-1) + 6.0 * g(0) + 4.0 * g(1) + g(2)) / 16.0;
    }
    let hmax = hs.iter().cloned().fold(0f32, f32::max);
    let mut peaks = Vec::new();
    if hmax <= 0.0 {
        return (hmax, peaks);
    }
    for i in 0..NB {
        let (l, c, r) = (hs[(i + NB - 1) % NB], hs[i], hs[(i + 1) % NB]);
        if !(c > l && c >= r && c >= rel * hmax) {
            continue;
        }
        let den = l - 2.0 * c + r;
        let off = if den.abs() > 1e-20 {
            (0.5 * (l - r) / den).clamp(-0.5, 0.5)
        } else {
            0.0
        };
        peaks.push((
            (i as f32 + 0.5 + off) / NB as f32 * std::f32::consts::TAU,
            c,
        ));
    }
    (hmax, peaks)
}

/// Full 3D orientations: primary axes from the peaks of a smoothed histogram of
/// gradient directions on the sphere (≥ `primary_peak`·max), then for each primary
/// axis the in-plane peaks of the projected gradients (≥ `secondary_peak`·max); the
/// third axis is their cross product. Strongest first, at most `max_orientations`.
#[inline(always)]
fn orientations(grads: &[Grad], p: &ExtractParams) -> Vec<Frame> {
    let sph = sphere();
    let nb = sph.centres.len();
    let mut hist = vec![0f32; nb];
    for &Grad { g: gv, w, m } in grads {
        if m > 0.0 {
            hist[sphere_bin(gv, m)] += w * m;
        }
    }
    let smooth: Vec<f32> = (0..nb)
        .map(|b| sph.kernel[b].iter().map(|&(j, w)| w * hist[j]).sum())
        .collect();
    let max = smooth.iter().cloned().fold(0f32, f32::max);
    if max <= 0.0 {
        return Vec::new();
    }
    let mut peaks: Vec<(usize, f32)> = (0..nb)
        .filter(|&b| {
            smooth[b] >= p.primary_peak as f32 * max
                && sph.near[b]
                    .iter()
                    .all(|&j| smooth[b] > smooth[j] || (smooth[b] == smooth[j] && b < j))
        })
        .map(|b| (b, smooth[b] / max))
        .collect();
    peaks.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max_o = p.max_orientations.max(1.0) as usize;
    let mut primaries: Vec<([f32; 3], f32)> = Vec::new();
    for (b, s) in peaks {
        if primaries.len() == max_o {
            break; // the frames below use the first max_o primaries only
        }
        let d = refine_direction(grads, sph.centres[b]);
        if primaries
            .iter()
            .all(|(q, _)| dot(*q, d) < 10f32.to_radians().cos())
        {
            primaries.push((d, s));
        }
    }
    let mut frames: Vec<(Frame, f32)> = Vec::new();
    for (a1, s1) in primaries.into_iter().take(max_o) {
        // a deterministic basis of the plane orthogonal to a1
        let helper = if a1[0].abs() <= a1[1].abs() && a1[0].abs() <= a1[2].abs() {
            [1.0, 0.0, 0.0]
        } else if a1[1].abs() <= a1[2].abs() {
            [0.0, 1.0, 0.0]
        } else {
            [0.0, 0.0, 1.0]
        };
        let Some(e1) = normalise(cross(a1, helper)) else {
            continue;
        };
        let e2 = cross(a1, e1);
        let mut h = [0f32; ANGLE_BINS];
        for &Grad { g: gv, w, .. } in grads {
            let x = dot(gv, e1);
            let y = dot(gv, e2);
            let m = (x * x + y * y).sqrt();
            if m <= 0.0 {
                continue;
            }
            add_angle(&mut h, y, x, w * m);
        }
        let (hmax, peaks) = angle_peaks(&h, p.secondary_peak as f32);
        for (ang, c) in peaks {
            let Some(a2) = normalise([
                ang.cos() * e1[0] + ang.sin() * e2[0],
                ang.cos() * e1[1] + ang.sin() * e2[1],
                ang.cos() * e1[2] + ang.sin() * e2[2],
            ]) else {
                continue;
            };
            let a3 = cross(a1, a2);
            frames.push(([a1, a2, a3], s1 * c / hmax));
        }
    }
    frames.sort_by(|a, b| b.1.total_cmp(&a.1));
    frames.truncate(max_o);
    frames.into_iter().map(|(f, _)| f).collect()
}

/// Per-sample spatial weights of the descriptor grid: for each of the `ND`³ samples,
/// its Gaussian window (σ = half the window) times its trilinear weight on each of the
/// 2×2×2 cells. The same for every keypoint, so computed once.
#[allow(clippy::needless_range_loop)]
fn desc_weights() -> &'static Vec<[f32; 8]> {
    static W: OnceLock<Vec<[f32; 8]>> = OnceLock::new();
    W.get_or_init(|| {
        let cell = ND as f32 / 2.0;
        let mut out = Vec::with_capacity(ND * ND * ND);
        for a in 0..ND {
            for b in 0..ND {
                for d in 0..ND {
                    let pos = [a, b, d].map(|i| (i as f32 + 0.5) / cell - 0.5); // cell coords
                    let u = [a, b, d].map(|i| (i as f32 + 0.5) / (ND as f32 / 2.0) - 1.0); // [-1, 1]
                    let gw = (-(u[0] * u[0] + u[1] * u[1] + u[2] * u[2]) / 2.0).exp();
                    let w1 = pos.map(|x| x.clamp(0.0, 1.0));
                    let mut ws = [0f32; 8];
                    for (ci, wsc) in ws.iter_mut().enumerate() {
                        let mut w = gw;
                        for ax in 0..3 {
                            let bit = (ci >> (2 - ax)) & 1;
                            w *= if bit == 1 { w1[ax] } else { 1.0 - w1[ax] };
                        }
                        *wsc = w;
                    }
                    out.push(ws);
                }
            }
        }
        out
    })
}

/// The 64-bin SIFT-Rank descriptor of the patch of radius `descriptor_radius`·σ in the
/// keypoint frame: gradients (components in the rotated frame) soft-binned into 2×2×2
/// cells × 8 octant directions, gradient-magnitude weighted, then rank-transformed.
/// `None` for a patch without gradient energy (nothing to rank).
#[inline(never)]
pub(crate) fn descriptor(kp: &Patch, f: &Frame, p: &ExtractParams) -> Option<[u8; 64]> {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 was detected
        return unsafe { descriptor_avx2(kp, f, p) };
    }
    descriptor_body(kp, f, p)
}

/// [`descriptor`] compiled for AVX2 (without FMA: the same IEEE operations, wider).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn descriptor_avx2(kp: &Patch, f: &Frame, p: &ExtractParams) -> Option<[u8; 64]> {
    descriptor_body(kp, f, p)
}

#[inline(always)]
fn descriptor_body(kp: &Patch, f: &Frame, p: &ExtractParams) -> Option<[u8; 64]> {
    let Patch { g, c, sigma } = *kp;
    let radius = p.descriptor_radius as f32 * sigma;
    let h = 2.0 * radius / ND as f32;
    const NS: usize = ND + 2;
    let mut pts = Vec::with_capacity(NS * NS * NS);
    for a in 0..NS {
        let ua = -radius + (a as f32 - 0.5) * h;
        for b in 0..NS {
            let ub = -radius + (b as f32 - 0.5) * h;
            for d in 0..NS {
                let ud = -radius + (d as f32 - 0.5) * h;
                pts.push([0, 1, 2].map(|x| c[x] + ua * f[0][x] + ub * f[1][x] + ud * f[2][x]));
            }
        }
    }
    let mut v = vec![0f32; NS * NS * NS];
    g.sample_points(&pts, &mut v);
    let s = 1.0 / 3f32.sqrt();
    let weights = desc_weights();
    let mut hist = [0f32; 64];
    let mut n = 0;
    for a in 1..=ND {
        for b in 1..=ND {
            for d in 1..=ND {
                let at = |x: usize, y: usize, z: usize| v[(x * NS + y) * NS + z];
                let gv = [
                    at(a + 1, b, d) - at(a - 1, b, d),
                    at(a, b + 1, d) - at(a, b - 1, d),
                    at(a, b, d + 1) - at(a, b, d - 1),
                ];
                // soft octant binning: the positive part of the projection on each
                // of the 8 directions (±1, ±1, ±1)/√3
                let mut ob = [0f32; 8];
                for (bi, o) in ob.iter_mut().enumerate() {
                    let sx = if bi & 4 != 0 { s } else { -s };
                    let sy = if bi & 2 != 0 { s } else { -s };
                    let sz = if bi & 1 != 0 { s } else { -s };
                    *o = (sx * gv[0] + sy * gv[1] + sz * gv[2]).max(0.0);
                }
                let ws = &weights[n];
                n += 1;
                for (ci, &wc) in ws.iter().enumerate() {
                    for (bi, &o) in ob.iter().enumerate() {
                        hist[ci * 8 + bi] += wc * o;
                    }
                }
            }
        }
    }
    ranked(&hist)
}

/// The rank transform of a descriptor histogram, or `None` for a patch without gradient
/// energy (nothing to rank).
pub(crate) fn ranked(hist: &[f32; 64]) -> Option<[u8; 64]> {
    let total: f32 = hist.iter().sum();
    if total.is_nan() || total <= 1e-9 {
        return None;
    }
    Some(rank64(hist))
}

/// Rank transform: each value replaced by its rank (0..63) in the vector, ties broken by
/// position, so every descriptor is a permutation of 0..63.
pub(crate) fn rank64(h: &[f32; 64]) -> [u8; 64] {
    let mut idx: [u8; 64] = std::array::from_fn(|i| i as u8);
    idx.sort_by(|&a, &b| h[a as usize].total_cmp(&h[b as usize]).then(a.cmp(&b)));
    let mut out = [0u8; 64];
    for (r, &i) in idx.iter().enumerate() {
        out[i as usize] = r as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 builds of the analysis and the descriptor give the portable build's bits,
    /// on smooth blobs of many scales and positions (inside the volume and across its
    /// faces) with random frames.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_builds_give_the_same_bits() {
        use super::super::volume::Vol;
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut next = super::super::volume::tests::uniform(0x5851_f42d_4c95_7f2d);
        let n = [48, 44, 40];
        let centres: Vec<([f32; 3], f32)> = (0..40)
            .map(|_| {
                (
                    [44.0 * next(), 40.0 * next(), 36.0 * next()],
                    1.0 + 4.0 * next(),
                )
            })
            .collect();
        let g = Vol::from_fn(n, |i, j, k| {
            let mut v = 0.0;
            for &(c, s) in &centres {
                let d = [i as f32 - c[0], j as f32 - c[1], k as f32 - c[2]];
                v += (-(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) / (2.0 * s * s)).exp();
            }
            v
        })
        .unwrap();
        let p = ExtractParams::default();
        let (mut analysed, mut described) = (0, 0);
        for t in 0..400 {
            let pos = [47.0 * next(), 43.0 * next(), 39.0 * next()];
            let sigma = 0.8 + 3.0 * next();
            let blk = Block::new(&g, pos, (9.0 * sigma).ceil() as usize + 3);
            let c = [0, 1, 2].map(|a| pos[a] - blk.origin[a] as f32);
            let kp = Patch { g: blk, c, sigma };
            // SAFETY: AVX2 was detected
            let (a, b) = (analyse_body(&kp, &p), unsafe { analyse_avx2(&kp, &p) });
            assert_eq!(a.is_some(), b.is_some(), "{t}");
            if let (Some(a), Some(b)) = (a, b) {
                analysed += 1;
                let bits = |x: &Analysis| {
                    let f = x.frames.iter().flatten().flatten().map(|v| v.to_bits());
                    x.eigenvalues
                        .map(f32::to_bits)
                        .into_iter()
                        .chain(f)
                        .collect::<Vec<_>>()
                };
                assert_eq!(bits(&a), bits(&b), "{t}");
            }
            let f = normalise(cross(
                [next() - 0.5, next() - 0.5, 0.3],
                [0.2, next(), next()],
            ))
            .map(|e0| {
                let e1 = normalise(cross(e0, [next(), 0.1, next() - 0.5])).unwrap();
                [e0, e1, cross(e0, e1)]
            });
            if let Some(f) = f {
                // SAFETY: AVX2 was detected
                let (a, b) = (descriptor_body(&kp, &f, &p), unsafe {
                    descriptor_avx2(&kp, &f, &p)
                });
                assert_eq!(a, b, "{t}");
                described += a.is_some() as usize;
            }
        }
        assert!(analysed > 50 && described > 200, "{analysed} {described}");
    }

    #[test]
    fn rank_is_a_permutation() {
        let mut h = [0f32; 64];
        for (i, x) in h.iter_mut().enumerate() {
            *x = ((i * 37) % 11) as f32;
        }
        let r = rank64(&h);
        let mut seen = [false; 64];
        for &x in &r {
            seen[x as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        // larger value → larger rank
        assert!(r[1] > r[0]);
    }

    #[test]
    fn atan_approx_error_is_below_2e_6() {
        let mut worst = 0f64;
        for i in 0..=1_000_000 {
            let a = i as f32 / 1e6;
            worst = worst.max((atan_approx(a) as f64 - (a as f64).atan()).abs());
        }
        assert!(worst < 2e-6, "{worst}");
    }

    #[test]
    fn phi_bin_equals_the_atan2_bin() {
        let mut u = super::super::volume::tests::uniform(0x2545_f491_4f6c_dd1du64);
        let mut next = move || 2.0 * u() - 1.0;
        let check = |y: f32, x: f32| assert_eq!(phi_bin(y, x), phi_bin_exact(y, x), "{y} {x}");
        for _ in 0..2_000_000 {
            check(next(), next());
        }
        // on and beside every bin boundary, the axes, signed zeros and tiny components
        for k in 0..NPHI {
            let b = k as f64 * std::f64::consts::TAU / NPHI as f64;
            for e in [-1e-4, -1e-6, -1e-7, 0.0, 1e-7, 1e-6, 1e-4] {
                let (s, c) = (b + e).sin_cos();
                check(s as f32, c as f32);
                check(3e-3 * s as f32, 3e-3 * c as f32);
            }
        }
        for (y, x) in [
            (0.0, 1.0),
            (-0.0, 1.0),
            (0.0, -1.0),
            (-0.0, -1.0),
            (1.0, 0.0),
        ] {
            check(y, x);
            check(x, y);
        }
        for (y, x) in [(-1e-30, 1.0), (1e-30, -1.0), (-1e-30, -1.0), (-1.0, -0.0)] {
            check(y, x);
        }
    }
}
