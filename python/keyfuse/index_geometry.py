"""Compact keypoint geometry of an index part (``kf.Index(..., geometry="compact")``, the
default for new indexes; ``geometry="exact"`` keeps format 5's lossless columns).

No search, pairwise or fused score reads the geometry (they read the descriptors and the
subjects); only :meth:`keyfuse.Index.keypoints` returns it. A compact part stores:

- **positions** (``ijk``) as three uint16 per keypoint, steps of ``extent / 65535`` from a
  per-subject origin (the subject's smallest coordinate on each axis; origin and step are
  float64 columns of the subjects table): error ≤ half a step, ``extent / 131070`` per
  axis (0.002 voxel for keypoints spread over 256 voxels, 0.002 mm at 1 mm);
- **scales, responses and eigenvalues** as float32 rounded to 10 mantissa bits
  (float16's precision over float32's range; the zeroed low bytes cost nothing once
  compressed): relative error ≤ 2⁻¹¹ (0.05%), infinities and NaN kept;
- **orientation frames** as a unit quaternion in 32 bits ("smallest three": the index of
  the largest component in 2 bits, the other three in 10 bits each, steps of
  (1/√2)/511, the largest rebuilt as √(1 − a² − b² − c²)): rotation error ≤ 0.23°
  (measured on real keypoints and random rotations, tests/retrieval/test_index_geometry.py).
  A subject whose frames are reflections (a mirrored storage) stores ``−R`` and a sign in
  the subjects table;
- polarity and flags exactly, as format 5 does.

On real 1 mm keypoints (benches/disk.py) this is 13.3 bytes a keypoint where format 5
took 28.0: positions 3.5 (delta-coded), frames 4.0, scales, responses and eigenvalues
4.2; errors measured there: positions ≤ 0.0015 voxel, frames ≤ 0.22° (mean 0.08°).

Nothing is silently corrupted: a frame that does not come back within the bound (not
finite, not orthonormal within 10⁻⁴, of the other handedness than its subject's, or
otherwise) and a position that is not finite are kept exactly, in nullable exception
columns (``orientation_x0`` … ``_x8``, ``ijk_x0`` … ``_x2``; null on every other row).
Rows that repeat their predecessor's code (the orientations of one detection share its
position and scale) are stored as nulls, as in format 5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

GEOMETRIES = ("compact", "exact")
POSITION_STEPS = 65535
SCALE_MANTISSA = 10  # mantissa bits of scales, responses and eigenvalues
ROUNDED = ("scale", "response", "eigenvalues")
FRAME_LEVELS = 511  # a small component is k / 511 / √2, k in −511..511
ORTHO_TOL = 1e-4  # frames further from orthonormal are kept exactly
FRAME_BOUND = 0.005  # largest element-wise frame error allowed after the round trip
_SQRT_HALF = float(np.sqrt(0.5))


def round_mantissa(x: np.ndarray, keep: int) -> np.ndarray:
    """Float32 values rounded (to nearest, ties to even) to ``keep`` mantissa bits; values
    that are not finite, and any that would round to infinity, keep their bits."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    drop = 23 - keep
    half = np.uint64((1 << (drop - 1)) - 1)
    rounded = (bits + half + ((bits >> np.uint64(drop)) & np.uint64(1))) & ~np.uint64(
        (1 << drop) - 1
    )
    out = rounded.astype(np.uint32)
    exp_all = np.uint32(0x7F800000)
    keep_bits = ((bits.astype(np.uint32) & exp_all) == exp_all) | ((out & exp_all) == exp_all)
    return np.where(keep_bits, bits.astype(np.uint32), out).view(np.float32)


def _quaternions(m: np.ndarray) -> np.ndarray:
    """Unit quaternions (w, x, y, z) of rotation matrices ``m`` ((n, 3, 3) float64),
    Shepperd's method (each from its largest diagonal form)."""
    t = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    d = np.stack([t, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], axis=1)
    case = np.argmax(d, axis=1)
    q = np.empty((len(m), 4))
    with np.errstate(invalid="ignore", divide="ignore"):
        s = 2.0 * np.sqrt(np.maximum(1e-300, 1.0 + 2.0 * d[np.arange(len(m)), case] - t))
        a, b = m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0]
        c = m[:, 1, 0] - m[:, 0, 1]
        xy, xz, yz = m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1]
        forms = (
            (s / 4, a / s, b / s, c / s),
            (a / s, s / 4, xy / s, xz / s),
            (b / s, xy / s, s / 4, yz / s),
            (c / s, xz / s, yz / s, s / 4),
        )
        for k, form in enumerate(forms):
            sel = case == k
            q[sel] = np.stack([f[sel] for f in form], axis=1)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q


def _matrices(q: np.ndarray) -> np.ndarray:
    """Rotation matrices (n, 3, 3) float64 of unit quaternions (w, x, y, z)."""
    w, x, y, z = q.T
    return np.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - z * w),
            2 * (x * z + y * w),
            2 * (x * y + z * w),
            1 - 2 * (x * x + z * z),
            2 * (y * z - x * w),
            2 * (x * z - y * w),
            2 * (y * z + x * w),
            1 - 2 * (x * x + y * y),
        ],
        axis=1,
    ).reshape(-1, 3, 3)


def pack_frames(frames: np.ndarray) -> np.ndarray:
    """32-bit codes (uint32) of proper rotations ``frames`` ((n, 3, 3)): the largest
    quaternion component's index in the top 2 bits, the other three as k + 511 (10 bits
    each, k = round(c·√2·511)) with the largest made positive."""
    q = _quaternions(np.asarray(frames, np.float64))
    big = np.argmax(np.abs(q), axis=1)
    q *= np.where(np.take_along_axis(q, big[:, None], 1) < 0, -1.0, 1.0)
    others = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])[big]
    k = np.rint(np.take_along_axis(q, others, 1) / _SQRT_HALF * FRAME_LEVELS)
    k = np.clip(k, -FRAME_LEVELS, FRAME_LEVELS).astype(np.int64) + FRAME_LEVELS
    code = (big.astype(np.int64) << 30) | (k[:, 0] << 20) | (k[:, 1] << 10) | k[:, 2]
    return code.astype(np.uint32)


def unpack_frames(codes: np.ndarray) -> np.ndarray:
    """The frames (n, 3, 3) float32 of :func:`pack_frames` codes."""
    c = np.asarray(codes).astype(np.int64)
    k = np.stack([(c >> 20) & 1023, (c >> 10) & 1023, c & 1023], axis=1)
    if len(c) and k.max() > 2 * FRAME_LEVELS:
        raise ValueError("bad orientation code")
    small = (k - FRAME_LEVELS) * (_SQRT_HALF / FRAME_LEVELS)
    big = c >> 30
    q = np.empty((len(c), 4))
    q[np.arange(len(c)), big] = np.sqrt(np.maximum(0.0, 1.0 - (small * small).sum(axis=1)))
    others = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])[big]
    np.put_along_axis(q, others, small, 1)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return _matrices(q).astype(np.float32)


def frame_sign(frames: np.ndarray) -> int:
    """−1 when most of a subject's finite frames are reflections (a mirrored storage),
    else +1: the compact code stores ``sign · frame``."""
    f = np.asarray(frames, np.float64)
    ok = np.isfinite(f).all(axis=(1, 2))
    det = np.linalg.det(f[ok]) if ok.any() else np.zeros(0)
    return -1 if (det < 0).sum() > (det > 0).sum() else 1


def encode_frames(frames: np.ndarray, sign: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, exceptions) of one subject's frames: ``exceptions`` marks the frames kept
    exactly (see the module documentation); their codes are 0."""
    f = np.asarray(frames, np.float32).reshape(-1, 3, 3)
    g = sign * f.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.asarray(np.isfinite(g).all(axis=(1, 2)), bool)
        g = np.where(finite[:, None, None], g, np.eye(3))
        gram = np.abs(g @ g.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2))
        proper = finite & (gram <= ORTHO_TOL) & (np.linalg.det(g) > 0)
    g = np.where(proper[:, None, None], g, np.eye(3))
    codes = pack_frames(g)
    err = np.abs(unpack_frames(codes).astype(np.float64) - g).max(axis=(1, 2))
    exceptions = np.asarray(~proper | ~(err <= FRAME_BOUND), bool)
    codes[exceptions] = 0
    return codes, exceptions


def position_grid(ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(origin, step) per axis of one subject's positions: the smallest finite coordinate
    and ``extent / 65535`` (0 where all are equal; an axis whose extent is not finite gets
    step ``inf``, so that its positions are all kept exactly)."""
    x = np.asarray(ijk, np.float64).reshape(-1, 3)
    ok = np.isfinite(x).all(axis=1)
    if not ok.any():
        return np.zeros(3), np.zeros(3)
    lo, hi = x[ok].min(axis=0), x[ok].max(axis=0)
    with np.errstate(over="ignore", invalid="ignore"):
        step = (hi - lo) / POSITION_STEPS
    return lo, np.where(np.isfinite(step), step, np.inf)


def encode_positions(
    ijk: np.ndarray, origin: np.ndarray, step: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(codes (n, 3) uint16, exceptions (n,) bool): positions on the subject's grid; a
    position that is not finite, or on an axis of infinite step, is an exception (code 0)."""
    x = np.asarray(ijk, np.float64).reshape(-1, 3)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        q = np.where(step > 0, (x - origin) / np.where(step > 0, step, 1.0), 0.0)
        exceptions = np.asarray(~np.isfinite(x).all(axis=1) | ~np.isfinite(q).all(axis=1))
        q = np.clip(np.rint(np.where(exceptions[:, None], 0.0, q)), 0, POSITION_STEPS)
    return q.astype(np.uint16), exceptions


def decode_positions(codes: np.ndarray, origin: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Positions (n, 3) float64 of :func:`encode_positions` codes."""
    step = np.where(np.isfinite(step), step, 0.0)
    return np.asarray(origin, np.float64) + codes.astype(np.float64) * step


def subject_grids(staged: Sequence[Any]) -> dict[str, list[Any]]:
    """The subjects-table columns of a compact part: ``ijk_origin``, ``ijk_step`` and
    ``frame_sign`` per staged subject (``s[1]``: its KeypointSet)."""
    cols: dict[str, list[Any]] = {"ijk_origin": [], "ijk_step": [], "frame_sign": []}
    for s in staged:
        origin, step = position_grid(s[1].ijk)
        cols["ijk_origin"].append(origin.tolist())
        cols["ijk_step"].append(step.tolist())
        cols["frame_sign"].append(frame_sign(s[1].orientation))
    return cols
