//! keyfuse-cuda: CUDA versions of keyfuse's hot loops, on cudarc with NVRTC at run time.
//!
//! Builds on machines with no CUDA toolkit and no GPU; availability is checked at run time
//! ([`cuda_available`], [`gpu`]) and a missing library is reported, never a panic. The
//! kernels (`src/kernels/*.cu`) are compiled once per process for the device's own compute
//! capability, with `fmad=false` so float results round like the CPU reference.
//!
//! * [`ops`]: host wrappers — Gaussian/DoG scale space and extrema, gradients and rotated
//!   patch sampling, brute-force k-NN over uint8 descriptors, soft-Jaccard and KDE scoring.
//! * [`runtime`]: the probe, NVRTC loading and compilation, [`runtime::compile_check`].

pub mod kernels;
pub mod ops;
pub mod runtime;

pub use runtime::{compile_check, cuda_available, cuda_info, gpu, preload_nvrtc, CudaInfo, Gpu};
