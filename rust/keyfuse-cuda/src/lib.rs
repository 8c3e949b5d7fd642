//! keyfuse-cuda: CUDA versions of keyfuse's hot loops, on cudarc with NVRTC at run time.
//! Builds on machines with no CUDA toolkit and no GPU; availability is checked at run time.
