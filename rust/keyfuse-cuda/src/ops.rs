//! Host-side wrappers: upload, launch, download. Each returns the same kind of value as the
//! CPU path (ndarray arrays, sorted candidate lists, f64 score matrices), deterministically.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use keyfuse_core::{KfError, Result, DESC_LEN};
use ndarray::{Array2, Array3, ArrayView2, ArrayView3};

use keyfuse_core::extract::ExtractParams;
use keyfuse_core::jaccard::jaccard_from;

use crate::runtime::{dev_err, Gpu};

/// The k-NN row filter, on the device.
struct DeviceFilter {
    owner: CudaSlice<i32>,
    exclude: CudaSlice<i32>,
    allowed: CudaSlice<u8>,
    mode: i32,
}

fn check_sj(sj: &SjParams) -> Result<()> {
    if sj.k == 0
        || sj.k > KNN_KMAX
        || sj.alpha2_floor.is_nan()
        || sj.alpha2_floor <= 0.0
        || sj.alpha2_cap_fraction.is_nan()
        || sj.alpha2_cap_fraction <= 0.0
    {
        return Err(KfError::InvalidArgument(format!(
            "soft Jaccard on the GPU needs 1 ≤ k ≤ {KNN_KMAX}, alpha2_floor > 0 and \
             alpha2_cap_fraction > 0"
        )));
    }
    Ok(())
}

/// Soft-Jaccard parameters of the GPU cohort engine (the exact-search subset of
/// `keyfuse_core::jaccard::SoftJaccardParams`, same defaults).
#[derive(Clone, Debug)]
pub struct SjParams {
    /// Nearest neighbours per keypoint (K ≤ 32).
    pub k: usize,
    /// Lower bound of α².
    pub alpha2_floor: f64,
    /// Upper bound of α² as a fraction of the data's mean squared pair distance.
    pub alpha2_cap_fraction: f64,
    /// k-NN kernel (None: [`Gpu::knn_kernel`], i.e. `KEYFUSE_CUDA_KNN`).
    pub kernel: Option<KnnKernel>,
}

impl Default for SjParams {
    fn default() -> Self {
        Self {
            k: 30,
            alpha2_floor: 1.0,
            alpha2_cap_fraction: 0.1,
            kernel: None,
        }
    }
}

/// The α² clamp `[floor, γ·E]` of the CPU's soft Jaccard, E = the mean squared distance
/// between two independent descriptors of `data` (`2 Σ_d Var_d`, from exact integer sums),
/// computed exactly as `keyfuse_core::jaccard` does so the bounds are bit-identical.
pub fn alpha2_bounds(data: ArrayView2<u8>, floor: f64, cap_fraction: f64) -> (f64, f64) {
    bounds_from(mean_sq_dist(data), floor, cap_fraction)
}

/// E = `2 Σ_d Var_d` of the rows of `data` (∞ for fewer than two rows).
fn mean_sq_dist(data: ArrayView2<u8>) -> f64 {
    let mut sum = [0u64; DESC_LEN];
    let mut sq = [0u64; DESC_LEN];
    for row in data.rows() {
        for (d, &v) in row.iter().enumerate() {
            sum[d] += v as u64;
            sq[d] += (v as u64) * (v as u64);
        }
    }
    let n = data.nrows() as u64;
    if n < 2 {
        return f64::INFINITY;
    }
    let n = n as f64;
    (0..DESC_LEN)
        .map(|d| {
            let m = sum[d] as f64 / n;
            2.0 * (sq[d] as f64 / n - m * m).max(0.0)
        })
        .sum()
}

fn bounds_from(e: f64, floor: f64, cap_fraction: f64) -> (f64, f64) {
    let cap = cap_fraction * e;
    let cap = if cap.is_nan() { f64::INFINITY } else { cap };
    (floor, cap.max(floor))
}

/// A cohort's descriptors resident on the device (upload once, search many times): the
/// GPU counterpart of `keyfuse_core::jaccard::Cohort` for exact search.
pub struct DeviceCohort {
    data: CudaSlice<u32>,
    owner: CudaSlice<i32>,
    owner_host: Vec<i32>,
    sizes: Vec<usize>,
    n_rows: usize,
    mean_sq: f64,
}

impl DeviceCohort {
    /// Number of subjects.
    pub fn n_subjects(&self) -> usize {
        self.sizes.len()
    }
    /// Number of descriptor rows.
    pub fn n_rows(&self) -> usize {
        self.n_rows
    }
    /// Rows per subject.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }
}

fn subject_sizes(owner: &[i32], n_subjects: usize) -> Vec<usize> {
    let mut sizes = vec![0usize; n_subjects];
    for &s in owner {
        sizes[s as usize] += 1;
    }
    sizes
}

const BLOCK: u32 = 256;
/// Descriptors per shared-memory tile in the k-NN kernels (KF_TILE in knn.cu).
const KNN_TILE: usize = 128;
/// Largest k the k-NN kernel keeps per query (KF_KMAX in knn.cu).
pub const KNN_KMAX: usize = 32;
/// Fixed-point scale of the score accumulators (KF_FIX in score.cu).
const FIX: f64 = 4294967296.0;

/// Which k-NN kernel runs: the brute-force `__dp4a` one, or the tensor-core one (integer
/// MMA, sm_80+), which gives the same results. Chosen by `KEYFUSE_CUDA_KNN=mma|dp4a`
/// (default dp4a until the MMA kernel's parity has been run on a GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnnKernel {
    Dp4a,
    Mma,
}

/// Environment variable choosing the k-NN kernel (`mma` or `dp4a`).
pub const KNN_KERNEL_ENV: &str = "KEYFUSE_CUDA_KNN";

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

fn grid(n: usize) -> Result<LaunchConfig> {
    let blocks = n.div_ceil(BLOCK as usize);
    if blocks > i32::MAX as usize {
        return Err(KfError::InvalidArgument(format!(
            "{n} elements is too many for one launch"
        )));
    }
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn as_i32(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| KfError::InvalidArgument(format!("{what} = {n} exceeds 2^31")))
}

/// A float32 volume resident on the device, C-ordered.
pub struct DeviceVolume {
    pub data: CudaSlice<f32>,
    pub shape: [usize; 3],
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

/// Half of a normalised Gaussian kernel, built exactly as the CPU extractor builds it
/// (f32 throughout): `w[0]` is the centre tap, `w[t]` the weight of offsets ±t, truncated at
/// 3σ (at least one tap each side), normalised by `w[0] + 2·Σw[1..]`.
pub fn gaussian_half_kernel(sigma: f32) -> Vec<f32> {
    let r = ((3.0 * sigma).ceil() as usize).max(1);
    let mut w: Vec<f32> = (0..=r)
        .map(|t| (-((t * t) as f32) / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = w[0] + 2.0 * w[1..].iter().sum::<f32>();
    for x in &mut w {
        *x /= sum;
    }
    w
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
    /// σ of the DoG extremum scale relative to the level's σ in 3D (the CPU's
    /// `scale_factor(3)`).
    fn scale_factor(&self) -> f64 {
        let k2 = 2f64.powf(2.0 / self.scales_per_octave as f64);
        let a = k2.powf(2.0 / 5.0);
        1.0 / ((a - 1.0) / (k2 - a)).sqrt()
    }

    /// Border margin (octave voxels) of DoG `level`, as the CPU computes it.
    pub fn margin(&self, level: usize) -> usize {
        let kappa = 2f64.powf(1.0 / self.scales_per_octave as f64);
        let sig = self.sigma0 * kappa.powi(level as i32) * self.scale_factor();
        ((self.descriptor_radius * sig + self.border).ceil() as usize).max(1)
    }
}

/// The intensity normalisation of the CPU extractor: the factor that maps the 99.5th
/// percentile of |value| (over a ≤ 1 M-voxel stride sample) to 1; `None` for an all-zero
/// image; `InvalidImage` for non-finite values.
pub fn intensity_scale(data: &[f32]) -> Result<Option<f32>> {
    if data.iter().any(|x| !x.is_finite()) {
        return Err(KfError::InvalidImage(
            "image contains NaN or infinite values".into(),
        ));
    }
    let stride = (data.len() / 1_000_000).max(1);
    let mut s: Vec<f32> = data.iter().step_by(stride).map(|x| x.abs()).collect();
    let max = s.iter().cloned().fold(0f32, f32::max);
    if max <= 0.0 {
        return Ok(None);
    }
    let q = ((s.len() as f64 * 0.995) as usize).min(s.len() - 1);
    let (_, &mut v, _) = s.select_nth_unstable_by(q, |a, b| a.total_cmp(b));
    let v = if v > 0.0 { v } else { max };
    Ok(Some(1.0 / v))
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
    /// The k-NN kernel calls will use (see [`KnnKernel`]); MMA needs compute capability 8.0+.
    pub fn knn_kernel(&self) -> KnnKernel {
        let want = std::env::var(KNN_KERNEL_ENV).unwrap_or_default();
        if want.eq_ignore_ascii_case("mma") && self.compute_capability.0 >= 8 {
            KnnKernel::Mma
        } else {
            KnnKernel::Dp4a
        }
    }

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
        let kappa = 2f64.powf(1.0 / s as f64);
        let small = |shape: &[usize]| shape.iter().any(|&n| n < params.min_size);
        let mut octaves = Vec::new();
        if small(image.shape()) {
            return Ok(octaves);
        }
        let pre =
            (params.sigma0 * params.sigma0 - params.initial_blur * params.initial_blur).sqrt();
        let mut base = self.gaussian_blur(&self.upload_volume(image)?, pre as f32)?;
        let mut octave = 0usize;
        loop {
            if small(&base.shape) || (params.max_octaves > 0 && octave >= params.max_octaves) {
                break;
            }
            let mut gauss = vec![base];
            for t in 1..s + 3 {
                let inc = params.sigma0
                    * (kappa.powi(2 * t as i32) - kappa.powi(2 * (t as i32 - 1))).sqrt();
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

    fn upload_descriptors(&self, d: ArrayView2<u8>, what: &str) -> Result<CudaSlice<u32>> {
        if d.ncols() != DESC_LEN {
            return Err(KfError::InvalidArgument(format!(
                "{what} must have {DESC_LEN} columns, not {}",
                d.ncols()
            )));
        }
        let host = d.as_standard_layout();
        let bytes = host.as_slice().expect("standard layout is contiguous");
        // 4 descriptor bytes per word; __dp4a works bytewise, so the byte order is immaterial
        let words: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if words.is_empty() {
            return self
                .stream
                .alloc_zeros::<u32>(DESC_LEN / 4)
                .map_err(dev_err);
        }
        self.stream.clone_htod(&words).map_err(dev_err)
    }

    /// The k-NN row filter on the device (mode 0 = none).
    fn device_filter(
        &self,
        db_owner: Option<&[i32]>,
        exclude: Option<&[i32]>,
        allowed: Option<&[bool]>,
    ) -> Result<DeviceFilter> {
        let mut mode = 0;
        if exclude.is_some() {
            mode |= 1;
        }
        if allowed.is_some() {
            mode |= 2;
        }
        if mode != 0 && db_owner.is_none() {
            return Err(KfError::InvalidArgument(
                "a k-NN filter needs row owners".into(),
            ));
        }
        let allowed: Vec<u8> =
            allowed.map_or_else(Vec::new, |a| a.iter().map(|&x| x as u8).collect());
        Ok(DeviceFilter {
            owner: self.upload_i32(db_owner.unwrap_or(&[]))?,
            exclude: self.upload_i32(exclude.unwrap_or(&[]))?,
            allowed: if allowed.is_empty() {
                self.stream.alloc_zeros::<u8>(1).map_err(dev_err)?
            } else {
                self.stream.clone_htod(&allowed).map_err(dev_err)?
            },
            mode,
        })
    }

    /// k nearest database rows per query on the device: (distances, indices), (nq·k) each,
    /// sorted by (distance, index); missing entries are (u32::MAX, -1). Rows rejected by
    /// `filter` are never candidates (as in the CPU's filtered search).
    #[allow(clippy::too_many_arguments)]
    fn knn_device(
        &self,
        q: &CudaSlice<u32>,
        nq: usize,
        db: &CudaSlice<u32>,
        nd: usize,
        k: usize,
        filter: &DeviceFilter,
        kernel: KnnKernel,
    ) -> Result<(CudaSlice<u32>, CudaSlice<i32>)> {
        if k == 0 || k > KNN_KMAX {
            return Err(KfError::InvalidArgument(format!(
                "k must be in 1..={KNN_KMAX}"
            )));
        }
        let (nq_i, nd_i, k_i) = (
            as_i32(nq, "queries")?,
            as_i32(nd, "database rows")?,
            k as i32,
        );
        let mma = kernel == KnnKernel::Mma && self.compute_capability.0 >= 8;
        // the MMA kernel's block holds 64 queries (4 warps × 16), the dp4a one 128
        let per_block = if mma { 64 } else { KNN_TILE };
        let qblocks = nq.div_ceil(per_block).max(1);
        // split the database across grid.y when there are too few queries to fill the GPU
        let want = (4 * self.sm_count).div_ceil(qblocks);
        let nsplit = want.clamp(1, nd.div_ceil(4 * KNN_TILE).clamp(1, 65535));
        let chunk = nd.div_ceil(nsplit).div_ceil(KNN_TILE).max(1) * KNN_TILE;
        let nsplit = nd.div_ceil(chunk).max(1);
        let chunk_i = as_i32(chunk, "chunk")?;
        let cfg = LaunchConfig {
            grid_dim: (qblocks as u32, nsplit as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let n_out = (nsplit * nq * k).max(1);
        let mut pd = self.stream.alloc_zeros::<u32>(n_out).map_err(dev_err)?;
        let mut pi = self.stream.alloc_zeros::<i32>(n_out).map_err(dev_err)?;
        let name = match (mma, k) {
            (true, _) => "kf_knn_mma",
            (false, 2) => "kf_knn2",
            (false, _) => "kf_knn",
        };
        let f = self.func(name)?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(q).arg(&nq_i).arg(db).arg(&nd_i);
        if name != "kf_knn2" {
            lb.arg(&k_i);
        }
        lb.arg(&chunk_i);
        lb.arg(&filter.owner)
            .arg(&filter.exclude)
            .arg(&filter.allowed)
            .arg(&filter.mode);
        lb.arg(&mut pd).arg(&mut pi);
        unsafe { lb.launch(cfg) }.map_err(dev_err)?;
        if nsplit == 1 {
            return Ok((pd, pi));
        }
        let mut od = self
            .stream
            .alloc_zeros::<u32>((nq * k).max(1))
            .map_err(dev_err)?;
        let mut oi = self
            .stream
            .alloc_zeros::<i32>((nq * k).max(1))
            .map_err(dev_err)?;
        let ns = nsplit as i32;
        let f = self.func("kf_knn_merge")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(&pd)
            .arg(&pi)
            .arg(&ns)
            .arg(&nq_i)
            .arg(&k_i)
            .arg(&mut od)
            .arg(&mut oi);
        unsafe { lb.launch(grid(nq)?) }.map_err(dev_err)?;
        Ok((od, oi))
    }

    /// Exact k-NN (k ≤ 32) of uint8 descriptors by brute force, as
    /// `keyfuse_core::knn::knn_exact`: squared distances (exact integers) and indices, each
    /// (nq, k), sorted by (distance, index); when the database has fewer than k rows the
    /// tail is (u32::MAX, -1).
    pub fn knn(
        &self,
        queries: ArrayView2<u8>,
        database: ArrayView2<u8>,
        k: usize,
    ) -> Result<(Array2<u32>, Array2<i64>)> {
        self.knn_with_kernel(queries, database, k, self.knn_kernel())
    }

    /// [`Self::knn`] with an explicit kernel (both give the same results).
    pub fn knn_with_kernel(
        &self,
        queries: ArrayView2<u8>,
        database: ArrayView2<u8>,
        k: usize,
        kernel: KnnKernel,
    ) -> Result<(Array2<u32>, Array2<i64>)> {
        if k == 0 || k > KNN_KMAX {
            return Err(KfError::InvalidArgument(format!(
                "k must be in 1..={KNN_KMAX}"
            )));
        }
        let (nq, nd) = (queries.nrows(), database.nrows());
        let q = self.upload_descriptors(queries, "queries")?;
        let db = self.upload_descriptors(database, "database")?;
        if nq == 0 || nd == 0 {
            return Ok((
                Array2::from_elem((nq, k), u32::MAX),
                Array2::from_elem((nq, k), -1),
            ));
        }
        let filter = self.device_filter(None, None, None)?;
        let (d, i) = self.knn_device(&q, nq, &db, nd, k, &filter, kernel)?;
        let mut d = self.stream.clone_dtoh(&d).map_err(dev_err)?;
        let mut i = self.stream.clone_dtoh(&i).map_err(dev_err)?;
        d.truncate(nq * k);
        i.truncate(nq * k);
        let shape = (nq, k);
        let d = Array2::from_shape_vec(shape, d)
            .map_err(|e| KfError::InvalidArgument(e.to_string()))?;
        let i = Array2::from_shape_vec(shape, i.into_iter().map(i64::from).collect())
            .map_err(|e| KfError::InvalidArgument(e.to_string()))?;
        Ok((d, i))
    }

    /// Accumulate soft intersections from neighbour lists on the device (see score.cu).
    #[allow(clippy::too_many_arguments)]
    fn sj_launch(
        &self,
        nn_i: &CudaSlice<i32>,
        nn_d: &CudaSlice<u32>,
        nq: usize,
        k: usize,
        subject: &CudaSlice<i32>,
        alpha2: Option<&[f32]>,
        bounds: (f64, f64),
        rows: &CudaSlice<i32>,
        n_rows: usize,
        n_subjects: usize,
        exclude_same: bool,
    ) -> Result<Array2<f64>> {
        let cells = n_rows * n_subjects;
        let mut acc = self
            .stream
            .alloc_zeros::<u64>(cells.max(1))
            .map_err(dev_err)?;
        let from_nn: i32 = alpha2.is_none() as i32;
        let a2 = match alpha2 {
            Some(a) if !a.is_empty() => self.stream.clone_htod(a).map_err(dev_err)?,
            _ => self.stream.alloc_zeros::<f32>(1).map_err(dev_err)?,
        };
        let (nq_i, k_i, ns_i, ex) = (
            as_i32(nq, "queries")?,
            k as i32,
            as_i32(n_subjects, "subjects")?,
            exclude_same as i32,
        );
        let f = self.func("kf_sj_accumulate")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(nn_i).arg(nn_d).arg(&nq_i).arg(&k_i).arg(subject);
        lb.arg(&a2).arg(&from_nn).arg(&bounds.0).arg(&bounds.1);
        lb.arg(rows).arg(&ns_i).arg(&ex).arg(&mut acc);
        unsafe { lb.launch(grid(nq)?) }.map_err(dev_err)?;
        let mut fixed = self.stream.clone_dtoh(&acc).map_err(dev_err)?;
        fixed.truncate(cells);
        let vals = fixed.into_iter().map(|v| v as f64 / FIX).collect();
        Array2::from_shape_vec((n_rows, n_subjects), vals)
            .map_err(|e| KfError::InvalidArgument(e.to_string()))
    }

    fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        if v.is_empty() {
            return self.stream.alloc_zeros::<i32>(1).map_err(dev_err);
        }
        self.stream.clone_htod(v).map_err(dev_err)
    }

    /// Upload a cohort: `data` holds every subject's rows, `owner[r]` the subject (0..n)
    /// of row r.
    pub fn upload_cohort(
        &self,
        data: ArrayView2<u8>,
        owner: &[i32],
        n_subjects: usize,
    ) -> Result<DeviceCohort> {
        if owner.len() != data.nrows() {
            return Err(KfError::InvalidArgument(
                "one owner (subject id) per descriptor row".into(),
            ));
        }
        if owner.iter().any(|&s| s < 0 || s as usize >= n_subjects) {
            return Err(KfError::InvalidArgument("subject id out of range".into()));
        }
        Ok(DeviceCohort {
            data: self.upload_descriptors(data, "cohort descriptors")?,
            owner: self.upload_i32(owner)?,
            owner_host: owner.to_vec(),
            sizes: subject_sizes(owner, n_subjects),
            n_rows: data.nrows(),
            mean_sq: mean_sq_dist(data),
        })
    }

    /// Soft intersections of a query set with every subject of a device cohort — the
    /// exact-search version of `keyfuse_core::jaccard::Cohort::intersections`: each query
    /// row's k nearest cohort rows (rows of subject `exclude` and of subjects not `allowed`
    /// are never candidates), α² = d² to the first clamped to [`alpha2_bounds`] of the cohort
    /// data, and per subject the nearest of its rows adds `exp(−d²/2α²)`. Sums are exact
    /// 32.32 fixed point (deterministic); they differ from the CPU's f64 sums by < 2⁻³² per
    /// term.
    pub fn cohort_intersections_on(
        &self,
        cohort: &DeviceCohort,
        queries: ArrayView2<u8>,
        exclude: Option<usize>,
        allowed: Option<&[bool]>,
        sj: &SjParams,
    ) -> Result<Vec<f64>> {
        let n_subjects = cohort.n_subjects();
        check_sj(sj)?;
        if allowed.is_some_and(|a| a.len() != n_subjects) {
            return Err(KfError::InvalidArgument(
                "restriction mask length differs from the number of subjects".into(),
            ));
        }
        if exclude.is_some_and(|e| e >= n_subjects) {
            return Err(KfError::InvalidArgument("exclude is not a subject".into()));
        }
        let nq = queries.nrows();
        let q = self.upload_descriptors(queries, "queries")?;
        if nq == 0 || cohort.n_rows == 0 {
            return Ok(vec![0.0; n_subjects]);
        }
        let bounds = bounds_from(cohort.mean_sq, sj.alpha2_floor, sj.alpha2_cap_fraction);
        let ex: Vec<i32> = exclude.map_or_else(Vec::new, |e| vec![e as i32; nq]);
        let filter = self.device_filter(
            Some(&cohort.owner_host),
            exclude.map(|_| ex.as_slice()),
            allowed,
        )?;
        let kernel = sj.kernel.unwrap_or_else(|| self.knn_kernel());
        let (nn_d, nn_i) =
            self.knn_device(&q, nq, &cohort.data, cohort.n_rows, sj.k, &filter, kernel)?;
        let rows = self.stream.alloc_zeros::<i32>(nq).map_err(dev_err)?;
        let inter = self.sj_launch(
            &nn_i,
            &nn_d,
            nq,
            sj.k,
            &cohort.owner,
            None,
            bounds,
            &rows,
            1,
            n_subjects,
            false,
        )?;
        Ok(inter.into_raw_vec_and_offset().0)
    }

    /// Soft-Jaccard of a query set against every subject of a device cohort (exact-search
    /// version of `Cohort::search`).
    pub fn cohort_search_on(
        &self,
        cohort: &DeviceCohort,
        queries: ArrayView2<u8>,
        exclude: Option<usize>,
        allowed: Option<&[bool]>,
        sj: &SjParams,
    ) -> Result<Vec<f64>> {
        let inter = self.cohort_intersections_on(cohort, queries, exclude, allowed, sj)?;
        let nq = queries.nrows();
        Ok(inter
            .iter()
            .zip(&cohort.sizes)
            .map(|(&i, &n)| jaccard_from(i, nq, n))
            .collect())
    }

    /// [`Self::cohort_search_on`] for a cohort given as host arrays (uploaded for this call).
    #[allow(clippy::too_many_arguments)]
    pub fn cohort_search(
        &self,
        data: ArrayView2<u8>,
        owner: &[i32],
        n_subjects: usize,
        queries: ArrayView2<u8>,
        exclude: Option<usize>,
        allowed: Option<&[bool]>,
        sj: &SjParams,
    ) -> Result<Vec<f64>> {
        let cohort = self.upload_cohort(data, owner, n_subjects)?;
        self.cohort_search_on(&cohort, queries, exclude, allowed, sj)
    }

    /// N×N soft-Jaccard matrix of a device cohort (row = query subject, its own rows excluded
    /// from its neighbours; diagonal 1; `symmetric` averages the two intersections) — the
    /// exact-search version of `Cohort::pairwise`, row-major. All subjects' rows are queried
    /// in one k-NN launch; the neighbour lists never leave the device.
    pub fn cohort_pairwise_on(
        &self,
        cohort: &DeviceCohort,
        sj: &SjParams,
        symmetric: bool,
    ) -> Result<Vec<f64>> {
        let inter = self.pairwise_intersections_on(cohort, sj)?;
        let sizes = &cohort.sizes;
        let n = cohort.n_subjects();
        let mut out = vec![0.0f64; n * n];
        for a in 0..n {
            for b in 0..n {
                out[a * n + b] = if a == b {
                    1.0
                } else {
                    let i = if symmetric {
                        0.5 * (inter[[a, b]] + inter[[b, a]])
                    } else {
                        inter[[a, b]]
                    };
                    jaccard_from(i, sizes[a], sizes[b])
                };
            }
        }
        Ok(out)
    }

    /// [`Self::cohort_pairwise_on`] for a cohort given as host arrays.
    pub fn cohort_pairwise(
        &self,
        data: ArrayView2<u8>,
        owner: &[i32],
        n_subjects: usize,
        sj: &SjParams,
        symmetric: bool,
    ) -> Result<Vec<f64>> {
        let cohort = self.upload_cohort(data, owner, n_subjects)?;
        self.cohort_pairwise_on(&cohort, sj, symmetric)
    }

    /// The (n_subjects, n_subjects) soft-intersection matrix behind
    /// [`Self::cohort_pairwise_on`]: `I[a, b]` = soft intersection of a's rows with subject b.
    pub fn pairwise_intersections_on(
        &self,
        cohort: &DeviceCohort,
        sj: &SjParams,
    ) -> Result<Array2<f64>> {
        check_sj(sj)?;
        let (n, n_subjects) = (cohort.n_rows, cohort.n_subjects());
        if n == 0 {
            return Ok(Array2::zeros((n_subjects, n_subjects)));
        }
        let bounds = bounds_from(cohort.mean_sq, sj.alpha2_floor, sj.alpha2_cap_fraction);
        let owner = &cohort.owner_host;
        let filter = self.device_filter(Some(owner), Some(owner), None)?;
        let kernel = sj.kernel.unwrap_or_else(|| self.knn_kernel());
        let (nn_d, nn_i) =
            self.knn_device(&cohort.data, n, &cohort.data, n, sj.k, &filter, kernel)?;
        self.sj_launch(
            &nn_i,
            &nn_d,
            n,
            sj.k,
            &cohort.owner,
            None,
            bounds,
            &cohort.owner,
            n_subjects,
            n_subjects,
            false,
        )
    }

    /// Per-class kernel sums of the fusion model (ALGORITHMS.md §4): for each query row q,
    /// `out[q, c] = Σ_{j: class[j]=c} exp(-d²(q, j) / denom[q])` over every database row.
    /// Rows with a negative class are skipped, and so are terms with d²/denom ≥ `cutoff`.
    /// Exact 32.32 fixed-point sums (deterministic). At most 6,000 classes.
    pub fn kde_class_sums(
        &self,
        queries: ArrayView2<u8>,
        database: ArrayView2<u8>,
        db_class: &[i32],
        n_class: usize,
        denom: &[f32],
        cutoff: f64,
    ) -> Result<Array2<f64>> {
        let (nq, nd) = (queries.nrows(), database.nrows());
        if db_class.len() != nd || denom.len() != nq {
            return Err(KfError::InvalidArgument(
                "class/denominator lengths disagree".into(),
            ));
        }
        if n_class == 0 || n_class > 6000 {
            return Err(KfError::InvalidArgument(
                "n_class must be in 1..=6000".into(),
            ));
        }
        if nq == 0 {
            return Ok(Array2::zeros((0, n_class)));
        }
        let q = self.upload_descriptors(queries, "queries")?;
        let db = self.upload_descriptors(database, "database")?;
        let cls = self.upload_i32(db_class)?;
        let den = self.stream.clone_htod(denom).map_err(dev_err)?;
        let mut out = self
            .stream
            .alloc_zeros::<u64>(nq * n_class)
            .map_err(dev_err)?;
        let (nq_i, nd_i, nc_i) = (
            as_i32(nq, "queries")?,
            as_i32(nd, "database")?,
            n_class as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (nq as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: (n_class * 8) as u32,
        };
        let f = self.func("kf_kde_class")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(&q)
            .arg(&nq_i)
            .arg(&db)
            .arg(&nd_i)
            .arg(&cls)
            .arg(&nc_i)
            .arg(&den)
            .arg(&cutoff)
            .arg(&mut out);
        unsafe { lb.launch(cfg) }.map_err(dev_err)?;
        let fixed = self.stream.clone_dtoh(&out).map_err(dev_err)?;
        let vals = fixed.into_iter().map(|v| v as f64 / FIX).collect();
        Array2::from_shape_vec((nq, n_class), vals)
            .map_err(|e| KfError::InvalidArgument(e.to_string()))
    }

    /// The fusion model's keypoint term on the GPU, as
    /// `keyfuse_core::kde::keypoint_log_likelihood`: Σ_i ln(S_ik/N_k + b) per class k, with
    /// S_ik = Σ_{j ∈ k} exp(−d²(f_i, f_j) / (1 + dNN_i²)) over every training keypoint
    /// (`k = None`) or over the k ≤ 32 nearest (`Some(k)`), training sample
    /// `exclude_sample` left out everywhere. With `Some(k)` the neighbour lists come from the
    /// GPU and the sums are formed on the host in the CPU's order (bit-identical); with
    /// `None` they are 32.32 fixed-point sums on the GPU (within ~1e-9 of the CPU's).
    #[allow(clippy::too_many_arguments)]
    pub fn keypoint_log_likelihood(
        &self,
        query: ArrayView2<u8>,
        train: ArrayView2<u8>,
        train_sample: &[i64],
        sample_class: &[i64],
        n_classes: usize,
        exclude_sample: Option<usize>,
        k: Option<usize>,
        background: f64,
    ) -> Result<Vec<f64>> {
        // the CPU's EXP_CUTOFF: a term below e^-40 cannot change an f64 sum that holds b
        const EXP_CUTOFF: f64 = 40.0;
        if !(background.is_finite() && background > 0.0) {
            return Err(KfError::InvalidArgument(format!(
                "background must be a finite number > 0, got {background}"
            )));
        }
        if query.ncols() != DESC_LEN || train.ncols() != DESC_LEN {
            return Err(KfError::InvalidArgument(
                "descriptors must have 64 columns".into(),
            ));
        }
        if train_sample.len() != train.nrows() {
            return Err(KfError::InvalidArgument(
                "train_sample needs one entry per training keypoint".into(),
            ));
        }
        if n_classes == 0 || n_classes > 6000 {
            return Err(KfError::InvalidArgument(
                "n_classes must be in 1..=6000".into(),
            ));
        }
        if k == Some(0) || k.is_some_and(|k| k > KNN_KMAX) {
            return Err(KfError::InvalidArgument(format!(
                "k must be in 1..={KNN_KMAX} on the GPU (or None for all)"
            )));
        }
        if sample_class
            .iter()
            .any(|&c| c < 0 || c as u64 >= n_classes as u64)
        {
            return Err(KfError::InvalidArgument(
                "sample_class outside 0..n_classes".into(),
            ));
        }
        let n_samples = sample_class.len();
        if train_sample
            .iter()
            .any(|&s| s < 0 || s as u64 >= n_samples as u64)
        {
            return Err(KfError::InvalidArgument(
                "train_sample outside 0..n_samples".into(),
            ));
        }
        let kp_class: Vec<i32> = train_sample
            .iter()
            .map(|&s| {
                if exclude_sample == Some(s as usize) {
                    -1
                } else {
                    sample_class[s as usize] as i32
                }
            })
            .collect();
        let mut n_per_class = vec![0usize; n_classes];
        for &c in kp_class.iter().filter(|&&c| c >= 0) {
            n_per_class[c as usize] += 1;
        }
        let b = background;
        let nq = query.nrows();
        if nq == 0 {
            return Ok(vec![0.0; n_classes]);
        }
        let active = kp_class.iter().filter(|&&c| c >= 0).count();
        if active == 0 {
            return Ok(vec![nq as f64 * b.ln(); n_classes]);
        }
        let q = self.upload_descriptors(query, "query")?;
        let t = self.upload_descriptors(train, "train")?;
        // excluded keypoints are never neighbours: owner = sample, allowed = not excluded
        let owner: Vec<i32> = train_sample.iter().map(|&s| s as i32).collect();
        let allowed: Vec<bool> = (0..n_samples).map(|s| Some(s) != exclude_sample).collect();
        let filter = self.device_filter(Some(&owner), None, Some(&allowed))?;
        let kernel = self.knn_kernel();
        let nt = train.nrows();
        let mut sums = vec![0.0f64; nq * n_classes];
        match k {
            Some(k) if k < active => {
                let (d, i) = self.knn_device(&q, nq, &t, nt, k, &filter, kernel)?;
                let d = self.stream.clone_dtoh(&d).map_err(dev_err)?;
                let i = self.stream.clone_dtoh(&i).map_err(dev_err)?;
                for (qi, out) in sums.chunks_exact_mut(n_classes).enumerate() {
                    let row = (0..k)
                        .map(|s| (i[qi * k + s], d[qi * k + s]))
                        .filter(|&(j, _)| j >= 0);
                    let width = 1.0 + row.clone().next().map_or(0.0, |(_, d)| d as f64);
                    for (j, d2) in row {
                        let x = d2 as f64 / width;
                        if x < EXP_CUTOFF {
                            out[kp_class[j as usize] as usize] += (-x).exp();
                        }
                    }
                }
            }
            _ => {
                let (d1, _) = self.knn_device(&q, nq, &t, nt, 1, &filter, kernel)?;
                let d1 = self.stream.clone_dtoh(&d1).map_err(dev_err)?;
                // 1 + dNN² ≤ 1 + 64·255² is exact in f32
                let denom: Vec<f32> = d1[..nq].iter().map(|&d| 1.0 + d as f32).collect();
                let s =
                    self.kde_class_sums(query, train, &kp_class, n_classes, &denom, EXP_CUTOFF)?;
                sums = s.into_raw_vec_and_offset().0;
            }
        }
        let mut ll = vec![0.0f64; n_classes];
        for row in sums.chunks_exact(n_classes) {
            for (c, &s) in row.iter().enumerate() {
                ll[c] += if n_per_class[c] == 0 {
                    b.ln()
                } else {
                    b.ln() + ((s / n_per_class[c] as f64) / b).ln_1p()
                };
            }
        }
        Ok(ll)
    }
}
