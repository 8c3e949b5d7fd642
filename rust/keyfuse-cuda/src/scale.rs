//! Scale space on the device: separable blur, DoG, 2×2×2 downsampling, strict extrema,
//! gradients and rotated patch sampling (kernels in `kernels/scale.cu`). The Gaussian taps,
//! the intensity normalisation, the blur schedule and the border margins come from
//! `keyfuse_core::extract`, so the GPU scale space cannot drift from the CPU extractor's.

use cudarc::driver::{CudaSlice, PushKernelArg};
use keyfuse_core::extract::ExtractParams;
use keyfuse_core::{KfError, Result};
use ndarray::{Array3, ArrayView3};

pub use keyfuse_core::extract::{gaussian_half_kernel, intensity_scale};

use crate::launch::{as_i32, grid};
use crate::runtime::{dev_err, Gpu};

/// What a blur reads beyond the volume's faces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Border {
    /// Repeat the face voxel (`…0 0 | 0 1 2`).
    #[default]
    Clamp = 0,
    /// Reflect including the face voxel (`…1 0 | 0 1 2`, scipy "reflect").
    Reflect = 1,
    /// Mirror about the face voxel (`…2 1 | 0 1 2`, scipy "mirror").
    Mirror = 2,
    /// Zeros outside.
    Zero = 3,
}

/// A float32 volume resident on the device, C-ordered.
pub struct DeviceVolume {
    pub data: CudaSlice<f32>,
    pub shape: [usize; 3],
}

impl Drop for DeviceVolume {
    fn drop(&mut self) {
        crate::runtime::bind_before_free(&self.data);
    }
}

impl DeviceVolume {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn dims(&self) -> Result<(i32, i32, i32)> {
        Ok((
            as_i32(self.shape[0], "axis 0")?,
            as_i32(self.shape[1], "axis 1")?,
            as_i32(self.shape[2], "axis 2")?,
        ))
    }
}

/// One strict DoG extremum: DoG `level` of `octave`, voxel (i, j, k) on that octave's grid,
/// polarity +1 (maximum) or -1 (minimum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Extremum {
    pub octave: usize,
    pub level: usize,
    pub ijk: [usize; 3],
    pub polarity: i8,
}

/// Parameters of the GPU scale space: the detection part of `keyfuse_core`'s
/// `ExtractParams` (same names, same defaults, same formulas).
#[derive(Clone, Debug)]
pub struct ScaleSpaceParams {
    pub sigma0: f64,
    pub scales_per_octave: usize,
    /// Blur assumed already present in the input (voxels).
    pub initial_blur: f64,
    /// Smallest side an octave must have to be searched.
    pub min_size: usize,
    /// Maximum number of octaves (0 = until `min_size`).
    pub max_octaves: usize,
    /// Minimum |DoG| of an extremum (strict).
    pub peak_threshold: f32,
    /// Descriptor half-width in units of scale (sets the border margin).
    pub descriptor_radius: f64,
    /// Extra border margin beyond the descriptor radius.
    pub border: f64,
    /// Download every Gaussian and DoG level (for CPU refinement/descriptors).
    pub keep_images: bool,
}

impl ScaleSpaceParams {
    /// The detection parameters of an extractor configuration (`keep_images` off).
    pub fn from_extract(p: &ExtractParams) -> Self {
        Self {
            sigma0: p.sigma0,
            scales_per_octave: p.scales_per_octave as usize,
            initial_blur: p.initial_blur,
            min_size: p.min_size as usize,
            max_octaves: p.max_octaves as usize,
            peak_threshold: p.peak_threshold as f32,
            descriptor_radius: p.descriptor_radius,
            border: p.border,
            keep_images: false,
        }
    }
}

impl Default for ScaleSpaceParams {
    /// The CPU extractor's defaults (`ExtractParams::default()`), images kept.
    fn default() -> Self {
        Self {
            keep_images: true,
            ..Self::from_extract(&ExtractParams::default())
        }
    }
}

impl ScaleSpaceParams {
    /// The extractor parameters these detection parameters stand for (others at default).
    fn extract_params(&self) -> ExtractParams {
        ExtractParams {
            sigma0: self.sigma0,
            scales_per_octave: self.scales_per_octave as f64,
            initial_blur: self.initial_blur,
            border: self.border,
            descriptor_radius: self.descriptor_radius,
            ..ExtractParams::default()
        }
    }

    /// Border margin (octave voxels) of DoG `level`: the CPU extractor's
    /// [`ExtractParams::level_margin`] in 3D.
    pub fn margin(&self, level: usize) -> usize {
        self.extract_params().level_margin(level, 3)
    }
}

/// One octave of the GPU scale space.
#[derive(Debug)]
pub struct Octave {
    pub shape: [usize; 3],
    /// The `scales_per_octave + 3` Gaussian levels G_0..G_{S+2} (empty unless `keep_images`).
    pub gaussians: Vec<Array3<f32>>,
    /// The `scales_per_octave + 2` DoG levels D_l = G_{l+1} − G_l (empty unless `keep_images`).
    pub dogs: Vec<Array3<f32>>,
    /// Strict extrema of the inner DoG levels 1..=S, sorted by (level, i, j, k); the CPU
    /// refines and describes DoG-level-l extrema with G_{l+1}.
    pub extrema: Vec<Extremum>,
}

impl Gpu {
    /// Copy a volume to the device.
    pub fn upload_volume(&self, v: ArrayView3<f32>) -> Result<DeviceVolume> {
        let shape = [v.shape()[0], v.shape()[1], v.shape()[2]];
        let host = v.as_standard_layout();
        let slice = host.as_slice().expect("standard layout is contiguous");
        let data = self.stream.clone_htod(slice).map_err(dev_err)?;
        Ok(DeviceVolume { data, shape })
    }

    /// Copy a device volume back.
    pub fn download_volume(&self, v: &DeviceVolume) -> Result<Array3<f32>> {
        let host = self.stream.clone_dtoh(&v.data).map_err(dev_err)?;
        Array3::from_shape_vec(v.shape, host).map_err(|e| KfError::InvalidArgument(e.to_string()))
    }

    fn alloc_volume(&self, shape: [usize; 3]) -> Result<DeviceVolume> {
        let n: usize = shape.iter().product();
        let data = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(dev_err)?;
        Ok(DeviceVolume { data, shape })
    }

    /// Separable Gaussian blur of σ `sigma` voxels, replicated border: bit-identical to the
    /// CPU extractor's blur (same half kernel, same summation order, no fused multiply-add).
    pub fn gaussian_blur(&self, v: &DeviceVolume, sigma: f32) -> Result<DeviceVolume> {
        self.blur_half_kernel(v, &gaussian_half_kernel(sigma), Border::Clamp)
    }

    /// Separable symmetric blur with an explicit half kernel (`half[t]` weighs offsets ±t),
    /// along axes 0, 1, 2 in turn (an axis of length 1 is left alone).
    pub fn blur_half_kernel(
        &self,
        v: &DeviceVolume,
        half: &[f32],
        border: Border,
    ) -> Result<DeviceVolume> {
        if half.is_empty() {
            return Err(KfError::InvalidArgument("empty blur kernel".into()));
        }
        let (n0, n1, n2) = v.dims()?;
        let radius = as_i32(half.len() - 1, "kernel radius")?;
        let taps_dev = self.stream.clone_htod(half).map_err(dev_err)?;
        let f = self.func("kf_blur_axis")?;
        let cfg = grid(v.len())?;
        let border = border as i32;
        let mut a = self.alloc_volume(v.shape)?;
        let mut b = self.alloc_volume(v.shape)?;
        // three passes through two scratch volumes: v → a (axis 0), a → b (1), b → a (2)
        for axis in 0..3i32 {
            let mut lb = self.stream.launch_builder(&f);
            match axis {
                0 => lb.arg(&v.data).arg(&mut a.data),
                1 => lb.arg(&a.data).arg(&mut b.data),
                _ => lb.arg(&b.data).arg(&mut a.data),
            };
            lb.arg(&n0)
                .arg(&n1)
                .arg(&n2)
                .arg(&axis)
                .arg(&taps_dev)
                .arg(&radius)
                .arg(&border);
            unsafe { lb.launch(cfg) }.map_err(dev_err)?;
        }
        Ok(a)
    }

    /// `a - b`, voxel by voxel.
    pub fn subtract(&self, a: &DeviceVolume, b: &DeviceVolume) -> Result<DeviceVolume> {
        if a.shape != b.shape {
            return Err(KfError::InvalidArgument("volumes differ in shape".into()));
        }
        let mut out = self.alloc_volume(a.shape)?;
        let n = a.len() as i64;
        let f = self.func("kf_sub")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(&a.data).arg(&b.data).arg(&mut out.data).arg(&n);
        unsafe { lb.launch(grid(a.len())?) }.map_err(dev_err)?;
        Ok(out)
    }

    /// Mean of each 2×2×2 block (2×2 for a flat `n × m × 1` image; odd trailing planes
    /// dropped), bit-identical to the CPU extractor's downsampling.
    pub fn downsample2(&self, v: &DeviceVolume) -> Result<DeviceVolume> {
        let (n0, n1, n2) = v.dims()?;
        let flat = v.shape[2] == 1;
        let m = [
            v.shape[0] / 2,
            v.shape[1] / 2,
            if flat { 1 } else { v.shape[2] / 2 },
        ];
        let mut out = self.alloc_volume(m)?;
        let cfg = grid(out.len())?;
        let (m0, m1, m2) = (m[0] as i32, m[1] as i32, m[2] as i32);
        let f = self.func("kf_downsample2")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(&v.data).arg(&mut out.data);
        lb.arg(&n0).arg(&n1).arg(&n2).arg(&m0).arg(&m1).arg(&m2);
        unsafe { lb.launch(cfg) }.map_err(dev_err)?;
        Ok(out)
    }

    /// Strict 80-neighbour extrema of `mid` against `below`/`above`, sorted by (i, j, k).
    /// Returns (i, j, k, polarity) rows.
    pub fn extrema(
        &self,
        below: &DeviceVolume,
        mid: &DeviceVolume,
        above: &DeviceVolume,
        margin: usize,
        threshold: f32,
    ) -> Result<Vec<([usize; 3], i8)>> {
        if below.shape != mid.shape || above.shape != mid.shape {
            return Err(KfError::InvalidArgument(
                "DoG levels differ in shape".into(),
            ));
        }
        let (n0, n1, n2) = mid.dims()?;
        let margin = as_i32(margin, "margin")?;
        let f = self.func("kf_extrema")?;
        // an extremum is strict over 26 spatial neighbours, so at most 1 voxel in 8 qualifies
        let mut capacity = (mid.len() / 64).clamp(1024, 1 << 24);
        loop {
            let mut count = self.stream.alloc_zeros::<u32>(1).map_err(dev_err)?;
            let mut out = self
                .stream
                .alloc_zeros::<i32>(4 * capacity)
                .map_err(dev_err)?;
            let cap = capacity as u32;
            let mut lb = self.stream.launch_builder(&f);
            lb.arg(&below.data).arg(&mid.data).arg(&above.data);
            lb.arg(&n0).arg(&n1).arg(&n2).arg(&margin).arg(&threshold);
            lb.arg(&mut count).arg(&mut out).arg(&cap);
            unsafe { lb.launch(grid(mid.len())?) }.map_err(dev_err)?;
            let n = self.stream.clone_dtoh(&count).map_err(dev_err)?[0] as usize;
            if n > capacity {
                capacity = n;
                continue;
            }
            let raw = self
                .stream
                .clone_dtoh(&out.slice(0..4 * n.max(1)))
                .map_err(dev_err)?;
            let mut found: Vec<([usize; 3], i8)> = raw
                .chunks_exact(4)
                .take(n)
                .map(|c| ([c[0] as usize, c[1] as usize, c[2] as usize], c[3] as i8))
                .collect();
            // the atomic counter hands out slots in scheduling order: sort for determinism
            found.sort_unstable();
            return Ok(found);
        }
    }

    /// The Gaussian/DoG scale space of `image` (already intensity-normalised, see
    /// [`intensity_scale`]) with strict extrema per octave, computed on the device with the
    /// CPU extractor's exact schedule: G_0 = blur(image, √(σ0² − initial²)), G_t =
    /// blur(G_{t−1}, σ0·√(κ^{2t} − κ^{2(t−1)})), D_l = G_{l+1} − G_l, extrema in D_1..D_S with
    /// margin [`ScaleSpaceParams::margin`], next octave = 2×2×2 mean of G_S. Images are
    /// downloaded only when `params.keep_images`.
    pub fn scale_space(
        &self,
        image: ArrayView3<f32>,
        params: &ScaleSpaceParams,
    ) -> Result<Vec<Octave>> {
        let s = params.scales_per_octave;
        if s == 0 || params.sigma0 <= 0.0 || params.initial_blur < 0.0 {
            return Err(KfError::InvalidArgument(
                "invalid scale-space parameters".into(),
            ));
        }
        if params.initial_blur >= params.sigma0 {
            return Err(KfError::InvalidArgument(
                "initial_blur must be below sigma0".into(),
            ));
        }
        if image.iter().any(|v| !v.is_finite()) {
            return Err(KfError::InvalidImage("image has non-finite values".into()));
        }
        let schedule = params.extract_params();
        let small = |shape: &[usize]| shape.iter().any(|&n| n < params.min_size);
        let mut octaves = Vec::new();
        if small(image.shape()) {
            return Ok(octaves);
        }
        let pre = schedule.initial_blur_sigma();
        let mut base = self.gaussian_blur(&self.upload_volume(image)?, pre as f32)?;
        let mut octave = 0usize;
        loop {
            if small(&base.shape) || (params.max_octaves > 0 && octave >= params.max_octaves) {
                break;
            }
            let mut gauss = vec![base];
            for t in 1..s + 3 {
                let inc = schedule.blur_increment(t);
                let next = self.gaussian_blur(gauss.last().expect("non-empty"), inc as f32)?;
                gauss.push(next);
            }
            let dogs: Vec<DeviceVolume> = gauss
                .windows(2)
                .map(|w| self.subtract(&w[1], &w[0]))
                .collect::<Result<_>>()?;
            let mut extrema = Vec::new();
            for level in 1..=s {
                let margin = params.margin(level);
                let [n0, n1, n2] = dogs[level].shape;
                if n0 <= 2 * margin || n1 <= 2 * margin || n2 <= 2 * margin {
                    continue;
                }
                for (ijk, polarity) in self.extrema(
                    &dogs[level - 1],
                    &dogs[level],
                    &dogs[level + 1],
                    margin,
                    params.peak_threshold,
                )? {
                    extrema.push(Extremum {
                        octave,
                        level,
                        ijk,
                        polarity,
                    });
                }
            }
            let shape = gauss[0].shape;
            let (gaussians, dog_images) = if params.keep_images {
                (
                    gauss
                        .iter()
                        .map(|g| self.download_volume(g))
                        .collect::<Result<_>>()?,
                    dogs.iter()
                        .map(|d| self.download_volume(d))
                        .collect::<Result<_>>()?,
                )
            } else {
                (Vec::new(), Vec::new())
            };
            octaves.push(Octave {
                shape,
                gaussians,
                dogs: dog_images,
                extrema,
            });
            base = self.downsample2(&gauss[s])?;
            octave += 1;
        }
        Ok(octaves)
    }

    /// Central-difference gradients (clamped at faces), shape (n0, n1, n2, 3) flattened.
    pub fn gradient(&self, v: &DeviceVolume) -> Result<Vec<f32>> {
        let (n0, n1, n2) = v.dims()?;
        let mut g = self
            .stream
            .alloc_zeros::<f32>(3 * v.len().max(1))
            .map_err(dev_err)?;
        let f = self.func("kf_gradient")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(&v.data).arg(&mut g).arg(&n0).arg(&n1).arg(&n2);
        unsafe { lb.launch(grid(v.len())?) }.map_err(dev_err)?;
        let mut out = self.stream.clone_dtoh(&g).map_err(dev_err)?;
        out.truncate(3 * v.len());
        Ok(out)
    }

    /// Rotated `side³` patches around keypoints, sampled like the CPU's descriptor and
    /// orientation code: sample (a, b, d) of keypoint p sits at
    /// `centre + u[a]·F[0] + u[b]·F[1] + u[d]·F[2]` (F = the keypoint's frame, rows = axes,
    /// u = `offsets[p]`, `side` values), read by clamped trilinear interpolation.
    /// Returns (K·side³) values in (p, a, b, d) order.
    pub fn sample_patches(
        &self,
        v: &DeviceVolume,
        centres: &[[f32; 3]],
        offsets: &[f32],
        frames: &[[[f32; 3]; 3]],
        side: usize,
    ) -> Result<Vec<f32>> {
        let k = centres.len();
        if frames.len() != k || side == 0 || offsets.len() != k * side {
            return Err(KfError::InvalidArgument(
                "centres, offsets (K·side) and frames must describe the same keypoints".into(),
            ));
        }
        if k == 0 {
            return Ok(Vec::new());
        }
        let (n0, n1, n2) = v.dims()?;
        let total = k * side * side * side;
        let c: Vec<f32> = centres.iter().flatten().copied().collect();
        let r: Vec<f32> = frames.iter().flatten().flatten().copied().collect();
        let c_dev = self.stream.clone_htod(&c).map_err(dev_err)?;
        let o_dev = self.stream.clone_htod(offsets).map_err(dev_err)?;
        let r_dev = self.stream.clone_htod(&r).map_err(dev_err)?;
        let mut out = self.stream.alloc_zeros::<f32>(total).map_err(dev_err)?;
        let (nkp, side_i) = (as_i32(k, "keypoints")?, as_i32(side, "side")?);
        let f = self.func("kf_sample_patch")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(&v.data).arg(&n0).arg(&n1).arg(&n2);
        lb.arg(&c_dev)
            .arg(&o_dev)
            .arg(&r_dev)
            .arg(&nkp)
            .arg(&side_i)
            .arg(&mut out);
        unsafe { lb.launch(grid(total)?) }.map_err(dev_err)?;
        self.stream.clone_dtoh(&out).map_err(dev_err)
    }
}
