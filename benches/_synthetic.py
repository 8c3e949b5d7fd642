"""Synthetic keypoint sets shared by the benchmark scripts (not a benchmark itself)."""

from __future__ import annotations

import numpy as np

import keyfuse as kf


def rerank(x: np.ndarray) -> np.ndarray:
    """Each row's ranks 0..63: rank descriptors from real-valued ones."""
    order = np.argsort(x, axis=1)
    out = np.empty(x.shape, dtype=np.uint8)
    np.put_along_axis(out, order, np.arange(x.shape[1], dtype=np.uint8)[None], axis=1)
    return out


class SharedGeometry:
    """One set of keypoint geometry for ``n`` keypoints, given to many synthetic subjects
    that differ only in their descriptors: a KeypointSet keeps arrays of the right dtype
    without copying them, so a subject costs little beyond its descriptors."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.ijk = rng.uniform(0, 180, (n, 3))
        self.scale = rng.uniform(1.5, 5, n).astype(np.float32)
        self.orientation = np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3)).copy()
        self.polarity = np.ones(n, np.int8)
        self.response = np.ones(n, np.float32)
        self.eigenvalues = np.ones((n, 3), np.float32)
        self.flags = np.zeros(n, np.uint8)

    def keypoints(self, descriptors: np.ndarray) -> kf.KeypointSet:
        """A KeypointSet of these keypoints with the given (n, 64) uint8 descriptors."""
        return kf.KeypointSet(
            self.ijk,
            self.scale,
            self.orientation,
            descriptors,
            self.polarity,
            self.response,
            self.eigenvalues,
            self.flags,
        )
