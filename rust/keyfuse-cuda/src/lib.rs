//! keyfuse-cuda: CUDA versions of keyfuse's hot loops, on cudarc with NVRTC at run time.
//!
//! Builds on machines with no CUDA toolkit and no GPU; availability is checked at run time
//! ([`cuda_available`], [`gpu`]) and a missing library is reported, never a panic. The
//! kernels (`src/kernels/*.cu`) are compiled once per process for the device's own compute
//! capability, with `fmad=false` so float results round like the CPU reference.
//!
//! The host wrappers (upload, launch, download; methods of [`Gpu`]) are split like the
//! kernel files, and take every formula they share with the CPU from `keyfuse-core`:
//!
//! * [`scale`]: Gaussian/DoG scale space and extrema, gradients, rotated patch sampling.
//! * [`knn`]: brute-force k-NN over uint8 descriptors (`__dp4a` and tensor-core kernels).
//! * [`cohort`]: soft-Jaccard cohort scoring ([`cohort::DeviceCohort`]).
//! * [`kde`]: the fusion model's keypoint likelihood.
//! * [`runtime`]: the probe, NVRTC loading and compilation, [`runtime::compile_check`].
//! * [`ops`]: the public types and helpers of all four in one namespace.

pub mod cohort;
pub mod kde;
pub mod kernels;
pub mod knn;
mod launch;
pub mod runtime;
pub mod scale;

pub use runtime::{compile_check, cuda_available, cuda_info, gpu, preload_nvrtc, CudaInfo, Gpu};

/// The public types and helpers of every host wrapper, in one namespace (the path the
/// Python binding and the parity tests import from).
pub mod ops {
    pub use crate::cohort::{alpha2_bounds, DeviceCohort, SjParams};
    pub use crate::knn::{KnnKernel, KNN_KERNEL_ENV, KNN_KMAX};
    pub use crate::scale::{
        gaussian_half_kernel, intensity_scale, Border, DeviceVolume, Extremum, Octave,
        ScaleSpaceParams,
    };
}
