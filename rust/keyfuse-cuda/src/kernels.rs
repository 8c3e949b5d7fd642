//! The CUDA C++ sources of every kernel, compiled at run time by NVRTC into one module.

/// Scale space: blur, DoG, downsampling, extrema, gradients, patch sampling.
pub const SCALE_SRC: &str = include_str!("kernels/scale.cu");
/// Brute-force k-NN over uint8 descriptors.
pub const KNN_SRC: &str = include_str!("kernels/knn.cu");
/// Tensor-core (integer MMA, sm_80+) k-NN, same results as the brute-force kernel.
pub const KNN_MMA_SRC: &str = include_str!("kernels/knn_mma.cu");
/// Soft-Jaccard and KDE score accumulation.
pub const SCORE_SRC: &str = include_str!("kernels/score.cu");

/// Every `extern "C"` kernel entry point of the module (checked by the compile test).
pub const KERNEL_NAMES: &[&str] = &[
    "kf_blur_axis",
    "kf_sub",
    "kf_downsample2",
    "kf_extrema",
    "kf_gradient",
    "kf_sample_patch",
    "kf_knn",
    "kf_knn2",
    "kf_knn_merge",
    "kf_knn_mma",
    "kf_sj_accumulate",
    "kf_kde_class",
];

/// The whole module's source: the files concatenated (one NVRTC compile, one module).
pub fn module_source() -> String {
    [SCALE_SRC, KNN_SRC, KNN_MMA_SRC, SCORE_SRC].join("\n")
}
