//! 3D/2D SIFT-Rank keypoint extraction.
//!
//! Pipeline (3D, see ALGORITHMS.md §1): robust intensity normalisation → isotropic
//! resampling when voxels are anisotropic → Gaussian scale space (σ0 = 1.6, 4 scales
//! per octave, S+3 Gaussians / S+2 DoGs per octave, next octave = 2×2×2 average of the
//! σ = 2σ0 image) → strict 80-neighbour DoG extrema (maxima and minima) in the inner
//! DoGs above a contrast threshold → edge test on the DoG Hessian → quadratic sub-voxel
//! and sub-scale fit → (optional) structure-tensor blob test on a normalised patch,
//! whose eigenvalues are reported → 3D orientations → 64-bin
//! SIFT-Rank descriptors (2×2×2 cells × 8 octant bins, rank-transformed).
//!
//! The scale space is streamed: only four Gaussians of the current octave are alive at
//! once (the three DoGs searched are their differences), and keypoints are described as soon as their DoG level is
//! complete. Work is split over `i`-planes and over candidates with rayon and collected
//! in order, so the output is bit-identical whatever the thread count.
//!
//! ```
//! use keyfuse_core::extract::{extract3d, ExtractParams};
//! use ndarray::Array3;
//! let vol = Array3::<f32>::from_shape_fn((40, 40, 40), |(i, j, k)| {
//!     let r2 = ((i as f32 - 20.0).powi(2) + (j as f32 - 20.0).powi(2) + (k as f32 - 20.0).powi(2));
//!     (-r2 / (2.0 * 3.0 * 3.0)).exp()
//! });
//! let kps = extract3d(vol.view(), [1.0, 1.0, 1.0], &ExtractParams::default()).unwrap();
//! assert!(kps.len() >= 1);
//! ```

mod block;
mod blur;
#[cfg(target_arch = "x86_64")]
mod blur_avx512;
mod describe;
mod detect;
#[cfg(target_arch = "x86_64")]
mod detect_avx512;
mod flush;
mod intensity;
pub mod reslice;
mod transpose;
mod two_d;
mod volume;
mod workspace;

use crate::{KfError, Result, DESC_LEN};
use describe::Analysis;
use ndarray::ArrayView3;
use rayon::prelude::*;
use volume::Vol;

pub use blur::gaussian_half_kernel;
pub use intensity::intensity_scale;
pub use two_d::extract2d;

/// The extractor's Gaussian blur of a C-ordered `shape` volume (σ `sigma` voxels,
/// replicated border, subnormals flushed to zero): the CPU reference of the CUDA blur.
pub fn gaussian_blur(data: &[f32], shape: [usize; 3], sigma: f32) -> Result<Vec<f32>> {
    if shape.iter().product::<usize>() != data.len() {
        return Err(KfError::InvalidArgument(format!(
            "{} values for a volume of shape {shape:?}",
            data.len()
        )));
    }
    let v = Vol::new(shape, data.to_vec());
    Ok(blur::blur(&v, sigma)?.data)
}

/// Runs `f` on this thread with subnormals flushed to zero (x86-64: MXCSR FTZ and DAZ) as
/// the scale space computes, for reference code that spells its arithmetic out (the CUDA
/// parity tests); the caller's floating-point state is restored afterwards.
pub fn with_flushed_subnormals<R>(f: impl FnOnce() -> R) -> R {
    flush::flushed(f)
}

/// Every extraction parameter, with its default. Lengths are in voxels of the
/// (isotropic) extraction grid unless stated; "scale" is the keypoint's characteristic
/// scale σ (the standard deviation of the Gaussian blob it responds to most).
#[derive(Clone, Debug, PartialEq)]
pub struct ExtractParams {
    /// σ of the first Gaussian of each octave (octave voxels). Default 1.6.
    pub sigma0: f64,
    /// DoG levels searched per octave (κ = 2^(1/S)). Default 4 (Lowe and featExtract use
    /// 3; 4 repeats better on the MNI rotation benchmark, see docs/decisions.md).
    pub scales_per_octave: f64,
    /// Blur the input is assumed to have already (voxels). Default 0 (Lowe and
    /// featExtract assume 0.5; assuming none, i.e. blurring the input by the full σ0,
    /// repeats better on the MNI rotation benchmark, see docs/decisions.md).
    pub initial_blur: f64,
    /// Smallest side (voxels) an octave must have to be searched. Default 8.
    pub min_size: f64,
    /// Maximum number of octaves (0 = until `min_size`). Default 0.
    pub max_octaves: f64,
    /// Minimum |DoG| of an extremum, on intensities scaled so that the image's 99.5th
    /// percentile of |value| is 1. Default 0.008.
    pub peak_threshold: f64,
    /// Edge test on the DoG Hessian (Lowe's r, generalised to 3D): keep if
    /// (Σλ)³/Πλ < (r+2)³/r (2D: (Σλ)²/Πλ < (r+1)²/r). Default 10.
    pub edge_ratio: f64,
    /// featExtract's blob test on the structure tensor of the normalised patch: keep if
    /// (e1+e2+e3)³ < ratio·e1·e2·e3 (featExtract: 140). Default 0 = off: with the DoG
    /// Hessian test in place it only removes repeatable points (see docs/decisions.md).
    pub tensor_ratio: f64,
    /// Extra border margin (octave voxels) beyond the descriptor radius. Default 2.
    pub border: f64,
    /// Descriptor half-width, in units of the keypoint scale. Default 3.
    pub descriptor_radius: f64,
    /// Radius of the orientation / structure-tensor patch, in units of scale. Default 2.5.
    pub orientation_radius: f64,
    /// Primary axes: sphere-histogram peaks ≥ this fraction of the maximum. Default 0.8.
    pub primary_peak: f64,
    /// Secondary axes: in-plane histogram peaks ≥ this fraction of its maximum. Default 0.5
    /// (as featExtract).
    pub secondary_peak: f64,
    /// Most orientations (output rows) per keypoint. Default 4.
    pub max_orientations: f64,
    /// Largest extraction grid accepted (voxels, after isotropic resampling); larger
    /// inputs are refused with `InvalidImage` instead of exhausting memory. Default 2^28.
    pub max_voxels: f64,
}

impl Default for ExtractParams {
    fn default() -> Self {
        ExtractParams {
            sigma0: 1.6,
            scales_per_octave: 4.0,
            initial_blur: 0.0,
            min_size: 8.0,
            max_octaves: 0.0,
            peak_threshold: 0.008,
            edge_ratio: 10.0,
            tensor_ratio: 0.0,
            border: 2.0,
            descriptor_radius: 3.0,
            orientation_radius: 2.5,
            primary_peak: 0.8,
            secondary_peak: 0.5,
            max_orientations: 4.0,
            max_voxels: (1u64 << 28) as f64,
        }
    }
}

impl ExtractParams {
    /// `(name, default)` for every parameter, in a fixed order.
    pub fn defaults() -> Vec<(&'static str, f64)> {
        let d = ExtractParams::default();
        Self::NAMES
            .iter()
            .map(|&n| (n, *d.field(n).unwrap()))
            .collect()
    }

    pub const NAMES: [&'static str; 15] = [
        "sigma0",
        "scales_per_octave",
        "initial_blur",
        "min_size",
        "max_octaves",
        "peak_threshold",
        "edge_ratio",
        "tensor_ratio",
        "border",
        "descriptor_radius",
        "orientation_radius",
        "primary_peak",
        "secondary_peak",
        "max_orientations",
        "max_voxels",
    ];

    fn field(&self, name: &str) -> Option<&f64> {
        Some(match name {
            "sigma0" => &self.sigma0,
            "scales_per_octave" => &self.scales_per_octave,
            "initial_blur" => &self.initial_blur,
            "min_size" => &self.min_size,
            "max_octaves" => &self.max_octaves,
            "peak_threshold" => &self.peak_threshold,
            "edge_ratio" => &self.edge_ratio,
            "tensor_ratio" => &self.tensor_ratio,
            "border" => &self.border,
            "descriptor_radius" => &self.descriptor_radius,
            "orientation_radius" => &self.orientation_radius,
            "primary_peak" => &self.primary_peak,
            "secondary_peak" => &self.secondary_peak,
            "max_orientations" => &self.max_orientations,
            "max_voxels" => &self.max_voxels,
            _ => return None,
        })
    }

    /// Set one parameter by name; unknown names and out-of-range values are
    /// `InvalidArgument` (the message lists the valid names).
    pub fn set(&mut self, name: &str, value: f64) -> Result<()> {
        let cur = self.field(name).copied().ok_or_else(|| {
            KfError::InvalidArgument(format!(
                "unknown extraction parameter {name:?}; valid: {}",
                Self::NAMES.join(", ")
            ))
        })?;
        let _ = cur;
        let slot: &mut f64 = match name {
            "sigma0" => &mut self.sigma0,
            "scales_per_octave" => &mut self.scales_per_octave,
            "initial_blur" => &mut self.initial_blur,
            "min_size" => &mut self.min_size,
            "max_octaves" => &mut self.max_octaves,
            "peak_threshold" => &mut self.peak_threshold,
            "edge_ratio" => &mut self.edge_ratio,
            "tensor_ratio" => &mut self.tensor_ratio,
            "border" => &mut self.border,
            "descriptor_radius" => &mut self.descriptor_radius,
            "orientation_radius" => &mut self.orientation_radius,
            "primary_peak" => &mut self.primary_peak,
            "secondary_peak" => &mut self.secondary_peak,
            "max_orientations" => &mut self.max_orientations,
            _ => &mut self.max_voxels,
        };
        *slot = value;
        self.validate()
    }

    /// Check every parameter's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |n: &str, why: &str| Err(KfError::InvalidArgument(format!("{n} {why}")));
        for n in Self::NAMES {
            if !self.field(n).unwrap().is_finite() {
                return bad(n, "must be finite");
            }
        }
        if self.sigma0 <= 0.0 || self.sigma0 > 20.0 {
            return bad("sigma0", "must be in (0, 20]");
        }
        if self.scales_per_octave < 1.0
            || self.scales_per_octave > 10.0
            || self.scales_per_octave.fract() != 0.0
        {
            return bad("scales_per_octave", "must be an integer in [1, 10]");
        }
        if self.initial_blur < 0.0 || self.initial_blur >= self.sigma0 {
            return bad("initial_blur", "must be in [0, sigma0)");
        }
        if self.min_size < 3.0 {
            return bad("min_size", "must be ≥ 3");
        }
        if self.max_octaves < 0.0 {
            return bad("max_octaves", "must be ≥ 0");
        }
        if self.peak_threshold < 0.0 {
            return bad("peak_threshold", "must be ≥ 0");
        }
        if self.edge_ratio < 1.0 {
            return bad("edge_ratio", "must be ≥ 1");
        }
        if self.tensor_ratio < 0.0 {
            return bad("tensor_ratio", "must be ≥ 0 (0 = off)");
        }
        if self.border < 0.0 {
            return bad("border", "must be ≥ 0");
        }
        if self.descriptor_radius <= 0.0 || self.descriptor_radius > 20.0 {
            return bad("descriptor_radius", "must be in (0, 20]");
        }
        if self.orientation_radius <= 0.0 || self.orientation_radius > 20.0 {
            return bad("orientation_radius", "must be in (0, 20]");
        }
        if !(0.0..=1.0).contains(&self.primary_peak) || !(0.0..=1.0).contains(&self.secondary_peak)
        {
            return bad("primary_peak/secondary_peak", "must be in [0, 1]");
        }
        if self.max_orientations < 1.0 || self.max_orientations > 64.0 {
            return bad("max_orientations", "must be in [1, 64]");
        }
        if self.max_voxels < 1.0 {
            return bad("max_voxels", "must be ≥ 1");
        }
        Ok(())
    }

    /// κ = 2^(1/S) and the factor from the lower σ of a DoG pair to the characteristic
    /// scale of the blob it responds to most: in `dim` dimensions the DoG
    /// G(κσ) − G(σ) of a Gaussian blob of σ_b peaks at σ = σ_b·√t with
    /// t = (a − 1)/(κ² − a), a = κ^(4/(dim+2)).
    pub(crate) fn scale_factor(&self, dim: usize) -> f64 {
        let k2 = 2f64.powf(2.0 / self.scales_per_octave);
        let a = k2.powf(2.0 / (dim as f64 + 2.0));
        1.0 / ((a - 1.0) / (k2 - a)).sqrt()
    }

    /// κ = 2^(1/S): the σ ratio between consecutive Gaussian levels of an octave.
    pub fn kappa(&self) -> f64 {
        2f64.powf(1.0 / (self.scales_per_octave as usize) as f64)
    }

    /// σ of the blur that takes the input (assumed blurred by `initial_blur`) to the first
    /// Gaussian level, σ0: `√(σ0² − initial_blur²)`.
    pub fn initial_blur_sigma(&self) -> f64 {
        (self.sigma0 * self.sigma0 - self.initial_blur * self.initial_blur).sqrt()
    }

    /// σ of the blur that takes Gaussian level `t − 1` of an octave to level `t` (t ≥ 1):
    /// `σ0·√(κ^{2t} − κ^{2(t−1)})`. The CUDA scale space follows the same schedule.
    pub fn blur_increment(&self, t: usize) -> f64 {
        let kappa = self.kappa();
        self.sigma0 * (kappa.powi(2 * t as i32) - kappa.powi(2 * (t as i32 - 1))).sqrt()
    }

    /// Border margin (octave voxels, at least 1) of DoG `level` in `dim` dimensions: the
    /// descriptor radius at the level's characteristic scale plus [`Self::border`].
    /// Extrema closer to a face are not searched; the CUDA scale space uses the same
    /// margins.
    pub fn level_margin(&self, level: usize, dim: usize) -> usize {
        let sig_lvl = self.sigma0 * self.kappa().powi(level as i32) * self.scale_factor(dim);
        let margin = (self.descriptor_radius * sig_lvl + self.border).ceil() as usize;
        margin.max(1)
    }
}

/// Extracted keypoints, one row per (detection, orientation).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Keypoints {
    /// Voxel coordinates in the input grid (array-index order, centre at the index).
    pub ijk: Vec<[f64; 3]>,
    /// Characteristic scale σ in mm.
    pub scale: Vec<f32>,
    /// Rotation matrices; rows are the keypoint axes in voxel-index space (for
    /// anisotropic voxels: in the isotropic physical frame aligned with the voxel axes).
    pub orientation: Vec<[[f32; 3]; 3]>,
    /// Rank descriptors: each a permutation of 0..63.
    pub descriptors: Vec<[u8; DESC_LEN]>,
    /// +1 DoG maximum, −1 DoG minimum.
    pub polarity: Vec<i8>,
    /// Interpolated DoG value (normalised intensities).
    pub response: Vec<f32>,
    /// Structure-tensor eigenvalues, descending.
    pub eigenvalues: Vec<[f32; 3]>,
    /// Index of the detection each row belongs to.
    pub point: Vec<i64>,
}

impl Keypoints {
    pub fn len(&self) -> usize {
        self.ijk.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ijk.is_empty()
    }
    /// Number of distinct detections.
    pub fn n_points(&self) -> usize {
        self.point.last().map_or(0, |&p| p as usize + 1)
    }
}

/// A described detection in extraction-grid coordinates.
pub(crate) struct Described {
    pub pos: [f64; 3],
    pub sigma: f64,
    pub response: f32,
    pub polarity: i8,
    pub eigenvalues: [f32; 3],
    pub rows: Vec<([[f32; 3]; 3], [u8; DESC_LEN])>,
}

pub(crate) fn check_spacing(spacing: &[f64]) -> Result<()> {
    if spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(KfError::InvalidArgument(format!(
            "voxel spacing must be finite and > 0, got {spacing:?}"
        )));
    }
    Ok(())
}

/// Extract 3D SIFT-Rank keypoints from `volume` (index order i, j, k) with voxel sizes
/// `spacing` (mm). An image that is constant, all zero or too small for one octave
/// gives an empty result; non-finite values are `InvalidImage`.
pub fn extract3d(
    volume: ArrayView3<f32>,
    spacing: [f64; 3],
    params: &ExtractParams,
) -> Result<Keypoints> {
    params.validate()?;
    check_spacing(&spacing)?;
    let (ni, nj, nk) = volume.dim();
    let n = [ni, nj, nk];
    let total = ni.checked_mul(nj).and_then(|x| x.checked_mul(nk));
    if total.is_none_or(|t| t as f64 > params.max_voxels) {
        return Err(KfError::InvalidImage(format!(
            "volume {n:?} exceeds the limit of {} voxels (parameter max_voxels)",
            params.max_voxels
        )));
    }
    if n.contains(&0) {
        return Ok(Keypoints::default());
    }
    // KF_TRACE: the input copy and intensity normalisation's seconds too
    let trace = std::env::var_os("KF_TRACE").is_some();
    let (t0, mut t_wall, mut t_cpu) = (Stamp::now(trace), 0f64, 0f64);
    let Some(mut vol) = intensity::scaled_copy(volume)? else {
        return Ok(Keypoints::default());
    };
    if trace {
        t0.add_to(&mut t_wall, &mut t_cpu);
        eprintln!("TRACE input copy+scale seconds {t_wall:.3} cpu {t_cpu:.3}");
    }

    // anisotropic voxels: resample to an isotropic grid at the finest spacing
    let iso = spacing.iter().cloned().fold(f64::INFINITY, f64::min);
    let aniso = spacing.iter().any(|&s| (s - iso).abs() > 1e-6 * iso);
    let step = spacing.map(|s| iso / s); // new index q sits at old index q·step
    if aniso {
        let m = [0, 1, 2].map(|a| (((n[a] - 1) as f64 * spacing[a] / iso).floor() as usize) + 1);
        if (m[0] as f64) * (m[1] as f64) * (m[2] as f64) > params.max_voxels {
            return Err(KfError::InvalidImage(format!(
                "isotropic resampling of {n:?} at {iso} mm gives {m:?}, over the limit of {} voxels (parameter max_voxels)",
                params.max_voxels
            )));
        }
        let iso_vol = volume::resample(&vol, m, step)?;
        Vol::give_back([std::mem::replace(&mut vol, iso_vol)]);
    }
    let found = scale_space(vol, params, 3)?;
    let step = if aniso { step } else { [1.0; 3] };
    Ok(assemble(
        found,
        |p| [p[0] * step[0], p[1] * step[1], p[2] * step[2]],
        iso,
    ))
}

/// Flatten described detections into rows; `to_input` maps extraction-grid voxel
/// coordinates to input-grid ones, `mm` is the extraction grid's voxel size.
pub(crate) fn assemble(
    found: Vec<Described>,
    to_input: impl Fn([f64; 3]) -> [f64; 3],
    mm: f64,
) -> Keypoints {
    let mut out = Keypoints::default();
    for (pi, d) in found.into_iter().enumerate() {
        let ijk = to_input(d.pos);
        for (frame, desc) in d.rows {
            out.ijk.push(ijk);
            out.scale.push((d.sigma * mm) as f32);
            out.orientation.push(frame);
            out.descriptors.push(desc);
            out.polarity.push(d.polarity);
            out.response.push(d.response);
            out.eigenvalues.push(d.eigenvalues);
            out.point.push(pi as i64);
        }
    }
    out
}

/// The streamed scale space (`dim` 3, or 2 for a `ni × nj × 1` image): detection,
/// refinement and description, octave by octave.
pub(crate) fn scale_space(mut vol: Vol, p: &ExtractParams, dim: usize) -> Result<Vec<Described>> {
    let s_n = p.scales_per_octave as usize;
    let kappa = p.kappa();
    let cf = p.scale_factor(dim);
    let min_size = p.min_size as usize;
    let mut found = Vec::new();
    let small = |v: &Vol| v.n[..dim].iter().any(|&x| x < min_size);
    if small(&vol) {
        Vol::give_back([vol]);
        return Ok(found);
    }
    // KF_TRACE: per-stage seconds on stderr (blur+DoG, detection, description), wall
    // and CPU (all threads)
    let trace = std::env::var_os("KF_TRACE").is_some();
    let mut times = [0f64; 3];
    let mut cpu = [0f64; 3];
    let clock = || Stamp::now(trace);
    let t0 = clock();
    if dim == 3 {
        // the box outside which the input is +0.0 (a skull-stripped or padded image's
        // background): the blurs skip what stays exactly zero
        vol.measure_support();
    }
    let mut base = blur::blur(&vol, p.initial_blur_sigma() as f32)?;
    t0.add_to(&mut times[0], &mut cpu[0]);
    // full-size buffers are recycled (the input copy included) rather than freed and
    // reallocated: every fresh buffer costs a page fault per 4 KiB; at the end they go
    // to the process's workspace pool for the next extraction
    let mut pool: Vec<Vol> = vec![vol];
    let take = |pool: &mut Vec<Vol>, n: [usize; 3]| match pool.pop() {
        Some(v) => Ok(v),
        None => Vol::scratch(n),
    };
    let mut octave = 0usize;
    loop {
        crate::cancel::check()?;
        if small(&base) || (p.max_octaves > 0.0 && octave >= p.max_octaves as usize) {
            pool.push(base);
            break;
        }
        let mut next_base: Option<Vol> = None;
        // G_{t−3} .. G_t: the three DoGs around level t − 2 are differences of these four
        let mut gs: Vec<Vol> = Vec::with_capacity(4);
        gs.push(base);
        for t in 1..s_n + 3 {
            let inc = p.blur_increment(t);
            // 3D: the top level (t = S + 2) is only read by detection, around the voxels
            // that beat their neighbours in the two DoGs below it, and is computed there
            // (detect::Upper::Top) instead of blurred whole
            let top = dim == 3 && t == s_n + 2;
            let top_kernel = if top {
                blur::gaussian_half_kernel(inc as f32)
            } else {
                Vec::new()
            };
            if top {
                if let Some(g) = (gs.len() == 4).then(|| gs.remove(0)) {
                    pool.push(g);
                }
            } else {
                let mut g_cur = if gs.len() == 4 {
                    gs.remove(0)
                } else {
                    take(&mut pool, gs[0].n)?
                };
                let t0 = clock();
                blur::blur_into(&gs[gs.len() - 1], inc as f32, &mut g_cur);
                if t == s_n {
                    next_base = Some(volume::downsample(&g_cur)?);
                }
                t0.add_to(&mut times[0], &mut cpu[0]);
                gs.push(g_cur);
            }
            if gs.len() == 4 || (top && gs.len() == 3) {
                let level = t - 2; // DoG index of the middle one
                let (thr, m) = (p.peak_threshold as f32, p.level_margin(level, dim));
                let t0 = clock();
                let [prev, cur] = [1, 2].map(|i| detect::Dog::new(&gs[i], &gs[i - 1]));
                let next = if top {
                    detect::Upper::Top {
                        g: &gs[2],
                        w: &top_kernel,
                    }
                } else {
                    detect::Upper::Stored(detect::Dog::new(&gs[3], &gs[2]))
                };
                let cands = detect::extrema([prev, cur], next, dim, thr, m, p.edge_ratio);
                t0.add_to(&mut times[1], &mut cpu[1]);
                let t0 = clock();
                // describe with G_{level+1}
                let g = &gs[2];
                let order = cache_order(&cands);
                let described: Vec<Option<Described>> = order
                    .par_iter()
                    .map(|&ci| {
                        let c = &cands[ci];
                        let s = level as f64 + c.ds as f64;
                        let sigma = p.sigma0 * kappa.powf(s) * cf; // octave voxels
                        let sg = sigma as f32;
                        // a block covering every rotated sample (+2 for gradients)
                        let reach =
                            p.descriptor_radius.max(p.orientation_radius) * sigma * 3f64.sqrt();
                        let blk = block::Block::new(g, c.pos, reach.ceil() as usize + 3);
                        let cl = [0, 1, 2].map(|a| c.pos[a] - blk.origin[a] as f32);
                        let at = describe::Patch {
                            g: blk,
                            c: cl,
                            sigma: sg,
                        };
                        let an = if dim == 3 {
                            describe::analyse(&at, p)?
                        } else {
                            two_d::analyse(&at, p)?
                        };
                        let rows: Vec<_> = an
                            .frames
                            .iter()
                            .filter_map(|f| {
                                let d = if dim == 3 {
                                    describe::descriptor(&at, f, p)
                                } else {
                                    two_d::descriptor(&at, f, p)
                                };
                                d.map(|d| (*f, d))
                            })
                            .collect();
                        if rows.is_empty() {
                            return None;
                        }
                        let o = (1u64 << octave) as f64;
                        let mut pos = c.pos.map(|x| x as f64 * o + (o - 1.0) * 0.5);
                        if dim == 2 {
                            pos[2] = 0.0;
                        }
                        Some(Described {
                            pos,
                            sigma: sigma * o,
                            response: c.response,
                            polarity: c.polarity,
                            eigenvalues: an.eigenvalues,
                            rows,
                        })
                    })
                    .collect();
                // back in the candidates' order
                let mut slots: Vec<Option<Described>> = (0..cands.len()).map(|_| None).collect();
                for (&ci, d) in order.iter().zip(described) {
                    slots[ci] = d;
                }
                let described = slots;
                t0.add_to(&mut times[2], &mut cpu[2]);
                if trace {
                    eprintln!(
                        "TRACE oct {octave} lvl {level} cands {} kept {}",
                        cands.len(),
                        described.iter().flatten().count()
                    );
                }
                found.extend(described.into_iter().flatten());
            }
        }
        pool.extend(gs);
        match next_base {
            Some(b) => base = b,
            None => break,
        }
        octave += 1;
    }
    Vol::give_back(pool);
    if trace {
        eprintln!(
            "TRACE seconds: blur+dog {:.3} detect {:.3} describe {:.3}",
            times[0], times[1], times[2]
        );
        eprintln!(
            "TRACE cpu seconds: blur+dog {:.3} detect {:.3} describe {:.3}",
            cpu[0], cpu[1], cpu[2]
        );
    }
    Ok(found)
}

/// The order in which candidates are described: by the Morton code of their 16-voxel
/// tile, so that consecutive keypoints (on a thread) read overlapping parts of the
/// Gaussian while they are still cached (the candidates come in scan order, where
/// neighbours in the list lie far apart in the plane). Each keypoint's description does
/// not depend on the order: only the speed does.
fn cache_order(cands: &[detect::Candidate]) -> Vec<usize> {
    let spread = |v: u64| {
        // the bits of a 21-bit value three apart
        let mut x = v & 0x1f_ffff;
        x = (x | x << 32) & 0x1f_0000_0000_ffff;
        x = (x | x << 16) & 0x1f_0000_ff00_00ff;
        x = (x | x << 8) & 0x100f_00f0_0f00_f00f;
        x = (x | x << 4) & 0x10c3_0c30_c30c_30c3;
        (x | x << 2) & 0x1249_2492_4924_9249
    };
    let key = |c: &detect::Candidate| {
        let t = c.pos.map(|x| (x.max(0.0) as u64) >> 4);
        spread(t[0]) << 2 | spread(t[1]) << 1 | spread(t[2])
    };
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by_key(|&i| (key(&cands[i]), i));
    order
}

/// A KF_TRACE time stamp: wall clock and the process's CPU time (the sum over its
/// threads of `/proc/self/task/*/schedstat`, in ns; 0 where unavailable or not tracing).
struct Stamp {
    wall: std::time::Instant,
    cpu: f64,
}

impl Stamp {
    fn now(trace: bool) -> Stamp {
        Stamp {
            wall: std::time::Instant::now(),
            cpu: if trace { process_cpu_seconds() } else { 0.0 },
        }
    }
    /// Add the wall and CPU seconds since the stamp.
    fn add_to(&self, wall: &mut f64, cpu: &mut f64) {
        *wall += self.wall.elapsed().as_secs_f64();
        if self.cpu > 0.0 {
            *cpu += process_cpu_seconds() - self.cpu;
        }
    }
}

fn process_cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 * 1e-9
}

#[cfg(test)]
mod tests;
