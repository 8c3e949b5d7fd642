//! 3D/2D SIFT-Rank keypoint extraction.
