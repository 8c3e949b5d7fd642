"""Small keypoint sets with CNN-like vectors in families (shared by the vector-search
tests)."""

from __future__ import annotations

import numpy as np

import keyfuse as kf

N_KP = 120


def rerank(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values, axis=1), axis=1).astype(np.uint8)


def keypoints(desc: np.ndarray, rng: np.random.Generator) -> kf.KeypointSet:
    n = len(desc)
    return kf.KeypointSet(
        rng.uniform(0, 63, (n, 3)),
        rng.uniform(1.5, 4, n),
        orientation=np.tile(np.eye(3, dtype=np.float32), (n, 1, 1)),
        descriptors=desc,
        affine=np.eye(4),
        shape=(64, 64, 64),
    )


def family_index(
    n_families: int = 4, size: int = 4, dim: int = 16, vec_noise: float = 0.3, seed: int = 0
) -> tuple[kf.Index, dict[str, np.ndarray]]:
    """Families whose members share a keypoint prototype and a vector prototype."""
    rng = np.random.default_rng(seed)
    ix = kf.Index()
    vecs = {}
    for f in range(n_families):
        proto = rng.random((N_KP, 64)) * 64
        vproto = rng.standard_normal(dim)
        for m in range(size):
            kps = keypoints(rerank(proto + 6.0 * rng.standard_normal(proto.shape)), rng)
            v = (vproto + vec_noise * rng.standard_normal(dim)).astype(np.float32)
            sid = f"f{f}m{m}"
            vecs[sid] = v
            ix.add(sid, kps, vector=v, family=f"F{f}", half="A" if f < n_families // 2 else "B")
    return ix, vecs
