//! Host-side wrappers: upload, launch, download. Each returns the same kind of value as the
//! CPU path (ndarray arrays, sorted candidate lists, f64 score matrices), deterministically.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use keyfuse_core::{KfError, Result, DESC_LEN};
use ndarray::{Array2, Array3, ArrayView2, ArrayView3};

use crate::runtime::{dev_err, Gpu};

const BLOCK: u32 = 256;
/// Descriptors per shared-memory tile in the k-NN kernels (KF_TILE in knn.cu).
const KNN_TILE: usize = 128;
/// Largest k the k-NN kernel keeps per query (KF_KMAX in knn.cu).
pub const KNN_KMAX: usize = 32;
/// Fixed-point scale of the score accumulators (KF_FIX in score.cu).
const FIX: f64 = 4294967296.0;

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

/// Normalised Gaussian taps for `sigma` (radius `ceil(truncate * sigma)`, computed in f64).
/// The CPU extractor's own taps should be passed to [`Gpu::gaussian_blur`] for parity; this is
/// the default for standalone use.
pub fn gaussian_taps(sigma: f64, truncate: f64) -> Vec<f32> {
    if sigma <= 0.0 {
        return vec![1.0];
    }
    let radius = (truncate * sigma).ceil().max(1.0) as i64;
    let w: Vec<f64> = (-radius..=radius)
        .map(|x| (-(x * x) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f64 = w.iter().sum();
    w.iter().map(|v| (v / total) as f32).collect()
}

/// Parameters of the GPU scale space (defaults: featExtract's, ALGORITHMS.md §1).
#[derive(Clone, Debug)]
pub struct ScaleSpaceParams {
    pub sigma0: f64,
    pub scales_per_octave: usize,
    /// Blur assumed already present in the input.
    pub initial_blur: f64,
    /// Stop when an octave's smallest side would be below this.
    pub min_size: usize,
    pub max_octaves: usize,
    pub border: Border,
    /// Candidates closer than this to a face are ignored (at least 1).
    pub margin: usize,
    /// Keep an extremum only if |DoG| >= threshold.
    pub threshold: f32,
    /// Download every Gaussian and DoG level (needed by CPU refinement/descriptors).
    pub keep_images: bool,
    /// Taps for a blur of `sigma`; defaults to [`gaussian_taps`] with truncate 4.
    pub taps: fn(f64) -> Vec<f32>,
}

fn default_taps(sigma: f64) -> Vec<f32> {
    gaussian_taps(sigma, 4.0)
}

impl Default for ScaleSpaceParams {
    fn default() -> Self {
        Self {
            sigma0: 1.6,
            scales_per_octave: 3,
            initial_blur: 0.5,
            min_size: 8,
            max_octaves: 16,
            border: Border::Clamp,
            margin: 1,
            threshold: 0.0,
            keep_images: true,
            taps: default_taps,
        }
    }
}

/// One octave of the GPU scale space.
#[derive(Debug)]
pub struct Octave {
    pub shape: [usize; 3],
    /// The `scales_per_octave + 3` Gaussian levels (empty unless `keep_images`).
    pub gaussians: Vec<Array3<f32>>,
    /// The `scales_per_octave + 2` DoG levels (empty unless `keep_images`).
    pub dogs: Vec<Array3<f32>>,
    /// Extrema of the inner DoG levels, sorted.
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

    /// Separable blur with the given taps (odd length, applied along axes 0, 1, 2 in turn).
    pub fn gaussian_blur(
        &self,
        v: &DeviceVolume,
        taps: &[f32],
        border: Border,
    ) -> Result<DeviceVolume> {
        if taps.is_empty() || taps.len().is_multiple_of(2) {
            return Err(KfError::InvalidArgument(
                "blur taps must have odd length".into(),
            ));
        }
        let (n0, n1, n2) = v.dims()?;
        let radius = (taps.len() / 2) as i32;
        let taps_dev = self.stream.clone_htod(taps).map_err(dev_err)?;
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

    /// Mean of each 2×2×2 block (odd trailing planes dropped).
    pub fn downsample2(&self, v: &DeviceVolume) -> Result<DeviceVolume> {
        let (n0, n1, n2) = v.dims()?;
        let m = [v.shape[0] / 2, v.shape[1] / 2, v.shape[2] / 2];
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

    /// The Gaussian/DoG scale space of `image` with extrema per octave, all on the device;
    /// images are downloaded only when `params.keep_images`.
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
        if image.iter().any(|v| !v.is_finite()) {
            return Err(KfError::InvalidImage("image has non-finite values".into()));
        }
        let min_size = params.min_size.max(3);
        let sigma_at = |level: usize| params.sigma0 * 2f64.powf(level as f64 / s as f64);
        let incr: Vec<Vec<f32>> = (0..s + 2)
            .map(|l| {
                let (a, b) = (sigma_at(l), sigma_at(l + 1));
                (params.taps)((b * b - a * a).sqrt())
            })
            .collect();
        let mut octaves = Vec::new();
        if image.shape().iter().any(|&n| n < min_size) {
            return Ok(octaves);
        }
        let mut base = {
            let v = self.upload_volume(image)?;
            let pre = params.sigma0 * params.sigma0 - params.initial_blur * params.initial_blur;
            if pre > 0.0 {
                self.gaussian_blur(&v, &(params.taps)(pre.sqrt()), params.border)?
            } else {
                v
            }
        };
        for octave in 0..params.max_octaves {
            if base.shape.iter().any(|&n| n < min_size) {
                break;
            }
            let mut gauss = vec![base];
            for taps in &incr {
                let next =
                    self.gaussian_blur(gauss.last().expect("non-empty"), taps, params.border)?;
                gauss.push(next);
            }
            let dogs: Vec<DeviceVolume> = gauss
                .windows(2)
                .map(|w| self.subtract(&w[1], &w[0]))
                .collect::<Result<_>>()?;
            let mut extrema = Vec::new();
            for level in 1..=s {
                for (ijk, polarity) in self.extrema(
                    &dogs[level - 1],
                    &dogs[level],
                    &dogs[level + 1],
                    params.margin,
                    params.threshold,
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
            // the next octave starts from the level at twice sigma0
            base = self.downsample2(&gauss[s])?;
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

    /// Rotated `side³` patches around keypoints (trilinear, zero outside), flattened
    /// (K, side, side, side). `rotations` rows are each keypoint's axes.
    pub fn sample_patches(
        &self,
        v: &DeviceVolume,
        centres: &[[f32; 3]],
        radii: &[f32],
        rotations: &[[f32; 9]],
        side: usize,
    ) -> Result<Vec<f32>> {
        let k = centres.len();
        if radii.len() != k || rotations.len() != k || side == 0 {
            return Err(KfError::InvalidArgument(
                "centres, radii and rotations must have one row per keypoint".into(),
            ));
        }
        if k == 0 {
            return Ok(Vec::new());
        }
        let (n0, n1, n2) = v.dims()?;
        let total = k * side * side * side;
        let c: Vec<f32> = centres.iter().flatten().copied().collect();
        let r: Vec<f32> = rotations.iter().flatten().copied().collect();
        let c_dev = self.stream.clone_htod(&c).map_err(dev_err)?;
        let rad_dev = self.stream.clone_htod(radii).map_err(dev_err)?;
        let r_dev = self.stream.clone_htod(&r).map_err(dev_err)?;
        let mut out = self.stream.alloc_zeros::<f32>(total).map_err(dev_err)?;
        let (nkp, side_i) = (as_i32(k, "keypoints")?, as_i32(side, "side")?);
        let f = self.func("kf_sample_patch")?;
        let mut lb = self.stream.launch_builder(&f);
        lb.arg(&v.data).arg(&n0).arg(&n1).arg(&n2);
        lb.arg(&c_dev)
            .arg(&rad_dev)
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

    /// k nearest database rows per query on the device: (distances, indices), (nq·k) each,
    /// sorted by (distance, index); missing entries are (u32::MAX, -1).
    fn knn_device(
        &self,
        q: &CudaSlice<u32>,
        nq: usize,
        db: &CudaSlice<u32>,
        nd: usize,
        k: usize,
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
        let qblocks = nq.div_ceil(KNN_TILE).max(1);
        // split the database across grid.y when there are too few queries to fill the GPU
        let want = (4 * self.sm_count).div_ceil(qblocks);
        let nsplit = want.clamp(1, nd.div_ceil(4 * KNN_TILE).clamp(1, 65535));
        let chunk = nd.div_ceil(nsplit).div_ceil(KNN_TILE) * KNN_TILE;
        let nsplit = nd.div_ceil(chunk.max(1)).max(1);
        let chunk_i = as_i32(chunk.max(KNN_TILE), "chunk")?;
        let cfg = LaunchConfig {
            grid_dim: (qblocks as u32, nsplit as u32, 1),
            block_dim: (KNN_TILE as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let n_out = (nsplit * nq * k).max(1);
        let mut pd = self.stream.alloc_zeros::<u32>(n_out).map_err(dev_err)?;
        let mut pi = self.stream.alloc_zeros::<i32>(n_out).map_err(dev_err)?;
        if k == 2 {
            let f = self.func("kf_knn2")?;
            let mut lb = self.stream.launch_builder(&f);
            lb.arg(q)
                .arg(&nq_i)
                .arg(db)
                .arg(&nd_i)
                .arg(&chunk_i)
                .arg(&mut pd)
                .arg(&mut pi);
            unsafe { lb.launch(cfg) }.map_err(dev_err)?;
        } else {
            let f = self.func("kf_knn")?;
            let mut lb = self.stream.launch_builder(&f);
            lb.arg(q)
                .arg(&nq_i)
                .arg(db)
                .arg(&nd_i)
                .arg(&k_i)
                .arg(&chunk_i);
            lb.arg(&mut pd).arg(&mut pi);
            unsafe { lb.launch(cfg) }.map_err(dev_err)?;
        }
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

    /// Exact k-NN (k ≤ 32) of uint8 descriptors by brute force: squared distances (exact
    /// integers) and indices, each (nq, k), sorted by (distance, index); when the database
    /// has fewer than k rows the tail is (u32::MAX, -1).
    pub fn knn(
        &self,
        queries: ArrayView2<u8>,
        database: ArrayView2<u8>,
        k: usize,
    ) -> Result<(Array2<u32>, Array2<i64>)> {
        let (nq, nd) = (queries.nrows(), database.nrows());
        let q = self.upload_descriptors(queries, "queries")?;
        let db = self.upload_descriptors(database, "database")?;
        if nq == 0 || nd == 0 {
            if k == 0 || k > KNN_KMAX {
                return Err(KfError::InvalidArgument(format!(
                    "k must be in 1..={KNN_KMAX}"
                )));
            }
            return Ok((
                Array2::from_elem((nq, k), u32::MAX),
                Array2::from_elem((nq, k), -1),
            ));
        }
        let (d, i) = self.knn_device(&q, nq, &db, nd, k)?;
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

    #[allow(clippy::too_many_arguments)]
    fn sj_launch(
        &self,
        nn_i: &CudaSlice<i32>,
        nn_d: &CudaSlice<u32>,
        nq: usize,
        k: usize,
        subject: &CudaSlice<i32>,
        alpha2: Option<&[f32]>,
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
        lb.arg(nn_i)
            .arg(nn_d)
            .arg(&nq_i)
            .arg(&k_i)
            .arg(subject)
            .arg(&a2)
            .arg(&from_nn);
        lb.arg(rows).arg(&ns_i).arg(&ex).arg(&mut acc);
        unsafe { lb.launch(grid(nq)?) }.map_err(dev_err)?;
        let mut fixed = self.stream.clone_dtoh(&acc).map_err(dev_err)?;
        fixed.truncate(cells);
        let vals = fixed.into_iter().map(|v| v as f64 / FIX).collect();
        Array2::from_shape_vec((n_rows, n_subjects), vals)
            .map_err(|e| KfError::InvalidArgument(e.to_string()))
    }

    /// Soft intersections |A∩B| from precomputed neighbour lists (ALGORITHMS.md §3): for each
    /// query feature, its nearest neighbour in each subject s among its k neighbours adds
    /// `exp(-d² / 2α²)` to `out[row[q], s]`. `alpha2` per query, or `None` to use the squared
    /// distance of each query's first eligible neighbour. Sums are exact 32.32 fixed point
    /// (deterministic); they differ from an f64 sum by < 1e-9 per term.
    #[allow(clippy::too_many_arguments)]
    pub fn soft_intersections(
        &self,
        nn_i: ArrayView2<i64>,
        nn_d: ArrayView2<u32>,
        db_subject: &[i32],
        alpha2: Option<&[f32]>,
        row: &[i32],
        n_rows: usize,
        n_subjects: usize,
        exclude_same: bool,
    ) -> Result<Array2<f64>> {
        let (nq, k) = nn_i.dim();
        if nn_d.dim() != (nq, k) || row.len() != nq || alpha2.is_some_and(|a| a.len() != nq) {
            return Err(KfError::InvalidArgument(
                "neighbour arrays disagree in shape".into(),
            ));
        }
        if k > KNN_KMAX {
            return Err(KfError::InvalidArgument(format!(
                "k must be at most {KNN_KMAX}"
            )));
        }
        if row.iter().any(|&r| r < 0 || r as usize >= n_rows) {
            return Err(KfError::InvalidArgument("row index out of range".into()));
        }
        if nn_i.iter().any(|&j| j >= db_subject.len() as i64) {
            return Err(KfError::InvalidArgument(
                "neighbour index out of range".into(),
            ));
        }
        if nq == 0 || k == 0 {
            return Ok(Array2::zeros((n_rows, n_subjects)));
        }
        let idx: Vec<i32> = nn_i
            .iter()
            .map(|&j| if j < 0 { -1 } else { j as i32 })
            .collect();
        let dist: Vec<u32> = nn_d.iter().copied().collect();
        let idx = self.stream.clone_htod(&idx).map_err(dev_err)?;
        let dist = self.stream.clone_htod(&dist).map_err(dev_err)?;
        let subj = self.upload_i32(db_subject)?;
        let rows = self.upload_i32(row)?;
        self.sj_launch(
            &idx,
            &dist,
            nq,
            k,
            &subj,
            alpha2,
            &rows,
            n_rows,
            n_subjects,
            exclude_same,
        )
    }

    fn upload_i32(&self, v: &[i32]) -> Result<CudaSlice<i32>> {
        if v.is_empty() {
            return self.stream.alloc_zeros::<i32>(1).map_err(dev_err);
        }
        self.stream.clone_htod(v).map_err(dev_err)
    }

    /// All-pairs soft intersections of a cohort in one pass on the device: `descriptors` holds
    /// every subject's rows, `subject[r]` says whose row r is (0..n_subjects). Each row's k
    /// nearest neighbours over the whole set (its own subject's rows excluded from the scores;
    /// α² = the squared distance to its nearest row of another subject) feed
    /// [`Self::soft_intersections`]. Returns the (n_subjects, n_subjects) matrix I with
    /// `I[a, b]` = the soft intersection of a's features in b. The neighbour lists never leave
    /// the device.
    pub fn pairwise_intersections(
        &self,
        descriptors: ArrayView2<u8>,
        subject: &[i32],
        n_subjects: usize,
        k: usize,
    ) -> Result<Array2<f64>> {
        let n = descriptors.nrows();
        if subject.len() != n {
            return Err(KfError::InvalidArgument(
                "one subject id per descriptor row".into(),
            ));
        }
        if subject.iter().any(|&s| s < 0 || s as usize >= n_subjects) {
            return Err(KfError::InvalidArgument("subject id out of range".into()));
        }
        if n == 0 {
            return Ok(Array2::zeros((n_subjects, n_subjects)));
        }
        let d = self.upload_descriptors(descriptors, "descriptors")?;
        let (nn_d, nn_i) = self.knn_device(&d, n, &d, n, k)?;
        let subj = self.upload_i32(subject)?;
        self.sj_launch(
            &nn_i, &nn_d, n, k, &subj, None, &subj, n_subjects, n_subjects, true,
        )
    }

    /// Per-class kernel sums of the fusion model (ALGORITHMS.md §4): for each query row q,
    /// `out[q, c] = Σ_{j: class[j]=c} exp(-d²(q, j) / denom[q])` over every database row.
    /// Exact 32.32 fixed-point sums (deterministic). At most 6,000 classes.
    pub fn kde_class_sums(
        &self,
        queries: ArrayView2<u8>,
        database: ArrayView2<u8>,
        db_class: &[i32],
        n_class: usize,
        denom: &[f32],
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
            .arg(&mut out);
        unsafe { lb.launch(cfg) }.map_err(dev_err)?;
        let fixed = self.stream.clone_dtoh(&out).map_err(dev_err)?;
        let vals = fixed.into_iter().map(|v| v as f64 / FIX).collect();
        Array2::from_shape_vec((nq, n_class), vals)
            .map_err(|e| KfError::InvalidArgument(e.to_string()))
    }
}
