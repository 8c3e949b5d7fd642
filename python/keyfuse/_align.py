"""The robust similarity estimator behind :func:`keyfuse.align` (private).

Three stages, all deterministic (no random sampling):

1. *One-point hypotheses.* Every putative match carries a full similarity: the two
   keypoints' orientation frames give the rotation, their scales the scale, their
   positions the translation. Each is scored by the matches that agree with it in
   position (a tolerance growing with the distance from the seed, since the frames are
   only accurate to 10–20°) *and* in frame and scale, which leaves chance agreement
   rare even when only a few percent of the matches are right.
2. *Local optimisation.* The best hypotheses are refitted by least squares on their
   consensus, at tightening thresholds; the one with the lowest truncated cost wins.
3. *Guided re-matching.* Under the found transform every moving keypoint is matched
   again among only the fixed keypoints near its predicted position (scale-compatible,
   best descriptor), and the similarity is refitted by iteratively reweighted least
   squares (Tukey weights on the residuals), a few rounds at a shrinking radius.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: frames of a right match agree within this angle (degrees) in stage 1
FRAME_DEG = 35.0
#: position tolerance growth with the distance from the seed (the frames' error)
TOL_SLOPE = 0.3
#: hypotheses refitted in stage 2
N_LOCAL = 12
#: stage 3: rounds, search radius and Tukey cut-off (× inlier_mm), and the least match
#: quality 1 − d1/d2 kept
REFINE_ROUNDS = 3
REFINE_RADIUS = 1.0
REFINE_CUTOFF = 2.0
REFINE_QUALITY = 0.1


@dataclass
class Fit:
    """A similarity ``y = s R x + t`` and the matches it was fitted on."""

    matrix: FloatArray
    inliers: npt.NDArray[np.bool_]
    rmse: float
    scale: float


def world_frames(orientation: npt.ArrayLike, affine: FloatArray) -> FloatArray:
    """(N, 3, 3) keypoint axes as rows in world coordinates (orthonormalised)."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    d = a / np.linalg.norm(a, axis=0)
    w = np.asarray(orientation, dtype=np.float64) @ d.T
    u, _, vt = np.linalg.svd(w)
    return np.asarray(u @ vt, dtype=np.float64)


def fit_similarity(
    x: FloatArray, y: FloatArray, w: FloatArray | None = None, with_scale: bool = True
) -> FloatArray | None:
    """Weighted least-squares similarity (Umeyama) x → y as a 4×4 matrix; None when
    degenerate."""
    if len(x) < 3:
        return None
    ww = np.ones(len(x)) if w is None else np.asarray(w, dtype=np.float64)
    tot = ww.sum()
    if not tot > 0:
        return None
    ww = ww / tot
    mx, my = ww @ x, ww @ y
    xc, yc = x - mx, y - my
    var = float(ww @ (xc * xc).sum(axis=1))
    if not var > 1e-9:
        return None
    cov = (yc * ww[:, None]).T @ xc
    u, sv, vt = np.linalg.svd(cov)
    if sv[1] < 1e-9 * max(sv[0], 1e-300):
        return None  # collinear
    sign = np.array([1.0, 1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    r = (u * sign) @ vt
    s = float((sv * sign).sum() / var) if with_scale else 1.0
    if not (s > 0 and np.isfinite(s)):
        return None
    m = np.eye(4)
    m[:3, :3] = s * r
    m[:3, 3] = my - s * r @ mx
    return m


def _apply(m: FloatArray, x: FloatArray) -> FloatArray:
    return np.asarray(x @ m[:3, :3].T + m[:3, 3], dtype=np.float64)


def similarity_scale(m: Any) -> float:
    """The isotropic scale of a 4×4 similarity: the cube root of |det| of its 3×3 part."""
    return float(abs(np.linalg.det(np.asarray(m)[:3, :3])) ** (1.0 / 3.0))


def one_point_hypotheses(
    xa: FloatArray,
    xb: FloatArray,
    fa: FloatArray,
    fb: FloatArray,
    ratio: FloatArray,
    with_scale: bool,
    max_scale: float,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per match: rotation (N, 3, 3), scale (N,), translation (N, 3)."""
    rot = np.einsum("nji,njk->nik", fb, fa)  # Rb^T Ra: moving axes onto fixed axes
    s = np.clip(ratio, 1.0 / max_scale, max_scale) if with_scale else np.ones(len(xa))
    t = xb - s[:, None] * np.einsum("nij,nj->ni", rot, xa)
    return rot, s, t


def consensus(
    xa: FloatArray,
    xb: FloatArray,
    rot: FloatArray,
    s: FloatArray,
    t: FloatArray,
    det_id: npt.NDArray[np.int64],
    tol0: float,
    chunk: int = 256,
) -> npt.NDArray[np.int64]:
    """For each one-point hypothesis, the number of distinct moving detections whose
    match agrees with it in position (tolerance ``tol0 + TOL_SLOPE·distance``), frame
    (within ``FRAME_DEG``) and scale (within 1.4×)."""
    n = len(xa)
    cos_min = 1.0 + 2.0 * np.cos(np.deg2rad(FRAME_DEG))  # trace threshold
    logs = np.log(s)
    flat = rot.reshape(n, 9).astype(np.float32)
    n_det = int(det_id.max()) + 1 if n else 0
    out = np.zeros(n, dtype=np.int64)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        # frame and scale gates first (a matrix product), positions only where they pass
        h, c = np.nonzero(flat[lo:hi] @ flat.T >= cos_min)  # trace(R_h^T R_n)
        keep = np.abs(logs[lo + h] - logs[c]) <= np.log(1.4)
        h, c = h[keep], c[keep]
        pred = s[lo + h, None] * np.einsum("kij,kj->ki", rot[lo + h], xa[c]) + t[lo + h]
        res = np.linalg.norm(pred - xb[c], axis=1)
        dist = np.linalg.norm(xa[c] - xa[lo + h], axis=1)
        good = res <= tol0 + TOL_SLOPE * dist
        # distinct detections: a detection's several rows or candidates count once
        hit = np.zeros((hi - lo, n_det), dtype=bool)
        hit[h[good], det_id[c[good]]] = True
        out[lo:hi] = hit.sum(axis=1)
    return out


def local_fit(
    xa: FloatArray,
    xb: FloatArray,
    m: FloatArray,
    thresholds: tuple[float, ...],
    with_scale: bool,
    max_scale: float,
) -> FloatArray:
    """Least-squares refits of ``m`` on its inliers at each threshold in turn."""

    def refit(cur: FloatArray, thr: float) -> FloatArray | None:
        inl = np.linalg.norm(_apply(cur, xa) - xb, axis=1) <= thr
        nxt = fit_similarity(xa[inl], xb[inl], with_scale=with_scale)
        if nxt is None or not 1.0 / max_scale <= similarity_scale(nxt) <= max_scale:
            return None
        return nxt

    cur = m
    for thr in thresholds:
        cur = _until_settled(functools.partial(refit, thr=thr), cur, 4)
    return cur


def _until_settled(
    step: Callable[[FloatArray], FloatArray | None], start: FloatArray, rounds: int
) -> FloatArray:
    """Apply ``step`` up to ``rounds`` times, stopping when it gives up (None) or the
    matrix no longer moves (1e-6)."""
    cur = start
    for _ in range(rounds):
        nxt = step(cur)
        if nxt is None:
            break
        done = np.allclose(nxt, cur, atol=1e-6)
        cur = nxt
        if done:
            break
    return cur


def truncated_cost(xa: FloatArray, xb: FloatArray, m: FloatArray, thr: float) -> float:
    """MSAC cost: squared residuals truncated at ``thr²``."""
    r2 = ((_apply(m, xa) - xb) ** 2).sum(axis=1)
    return float(np.minimum(r2, thr * thr).sum())


def guided_pairs(
    m: FloatArray,
    xyz_a: FloatArray,
    scale_a: FloatArray,
    desc_a: npt.NDArray[np.uint8],
    xyz_b: FloatArray,
    scale_b: FloatArray,
    desc_b: npt.NDArray[np.uint8],
    radius: float,
    scale_factor: float,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], FloatArray]:
    """Each moving keypoint's best-descriptor partner among the fixed keypoints within
    ``radius`` mm of its predicted position (scale-compatible under ``m``'s scale):
    (ia, ib, quality), quality = 1 − d1/d2 of the two best local distances (1 when
    alone)."""
    from scipy.spatial import cKDTree

    s = similarity_scale(m)
    pred = _apply(m, xyz_a)
    tree = cKDTree(xyz_b)
    near = tree.query_ball_point(pred, radius)
    da = desc_a.astype(np.int32)
    db = desc_b.astype(np.int32)
    ia, ib, q = [], [], []
    for i, cand in enumerate(near):
        if not cand:
            continue
        c = np.asarray(sorted(cand), dtype=np.int64)
        r = scale_b[c] / (s * scale_a[i])
        c = c[(r <= scale_factor) & (r * scale_factor >= 1.0)]
        if len(c) == 0:
            continue
        d2 = ((db[c] - da[i]) ** 2).sum(axis=1)
        order = np.lexsort((c, d2))
        best = c[order[0]]
        qual = 1.0
        if len(c) > 1:
            qual = 1.0 - float(np.sqrt(d2[order[0]] / max(d2[order[1]], 1)))
        ia.append(i)
        ib.append(int(best))
        q.append(qual)
    return (
        np.asarray(ia, dtype=np.int64),
        np.asarray(ib, dtype=np.int64),
        np.asarray(q, dtype=np.float64),
    )


def irls(
    xa: FloatArray,
    xb: FloatArray,
    m: FloatArray,
    quality: FloatArray,
    c: float,
    with_scale: bool,
    rounds: int = 5,
) -> FloatArray:
    """Similarity refitted by iteratively reweighted least squares: Tukey biweight of
    the residual (cut-off ``c`` mm) times the match quality."""

    def reweighted(cur: FloatArray) -> FloatArray | None:
        r = np.linalg.norm(_apply(cur, xa) - xb, axis=1)
        w = np.where(r < c, (1.0 - (r / c) ** 2) ** 2, 0.0) * quality
        return fit_similarity(xa, xb, w, with_scale=with_scale)

    return _until_settled(reweighted, m, rounds)


def candidate_pairs(
    idx: npt.NDArray[np.int64],
    dist2: npt.NDArray[Any],
    scale_a: FloatArray,
    scale_b: FloatArray,
    k: int,
    scale_factor: float,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], FloatArray]:
    """Each moving keypoint's ``k`` nearest scale-compatible descriptors among the
    neighbour lists ``idx`` (rows sorted by distance): (ia, ib, distance)."""
    ratio = scale_b[idx] / scale_a[:, None]
    ok = (ratio <= scale_factor) & (ratio * scale_factor >= 1.0) & (idx >= 0)
    rank = np.cumsum(ok, axis=1)
    ok &= rank <= k
    ia, col = np.nonzero(ok)
    return ia.astype(np.int64), idx[ia, col].astype(np.int64), np.sqrt(dist2[ia, col])


def translation_density(t: FloatArray, h: float) -> FloatArray:
    """Gaussian kernel density (mm⁻³) of each translation among all (itself included),
    as ``kf.match``'s p(m)."""
    from scipy.spatial import cKDTree

    n = len(t)
    if n == 0:
        return np.zeros(0)
    tree = cKDTree(t)
    pairs = tree.query_pairs(5.0 * h, output_type="ndarray")
    w = np.exp(-0.5 * ((t[pairs[:, 0]] - t[pairs[:, 1]]) ** 2).sum(axis=1) / (h * h))
    s = np.ones(n) + np.bincount(pairs[:, 0], w, n) + np.bincount(pairs[:, 1], w, n)
    return np.asarray(s / ((2.0 * np.pi) ** 1.5 * h**3 * n), dtype=np.float64)


def robust_similarity(
    xa: FloatArray,
    xb: FloatArray,
    fa: FloatArray,
    fb: FloatArray,
    scale_ratio: FloatArray,
    det_id: npt.NDArray[np.int64],
    inlier_mm: float,
    with_scale: bool,
    max_scale: float,
    extra: list[FloatArray],
) -> FloatArray | None:
    """Stages 1 and 2: the best locally optimised one-point hypothesis (``extra``:
    further starting transforms, e.g. a three-point RANSAC's)."""
    rot, s, t = one_point_hypotheses(xa, xb, fa, fb, scale_ratio, with_scale, max_scale)
    cons = consensus(xa, xb, rot, s, t, det_id, inlier_mm)
    top = np.lexsort((np.arange(len(cons)), -cons))[:N_LOCAL]
    starts: list[FloatArray] = []
    for h in top:
        m = np.eye(4)
        m[:3, :3] = s[h] * rot[h]
        m[:3, 3] = t[h]
        starts.append(m)
    starts.extend(extra)
    best: tuple[float, int, FloatArray] | None = None
    for n, m0 in enumerate(starts):
        m = local_fit(xa, xb, m0, (3 * inlier_mm, 2 * inlier_mm, inlier_mm), with_scale, max_scale)
        if not 1.0 / max_scale <= similarity_scale(m) <= max_scale:
            continue
        cost = truncated_cost(xa, xb, m, inlier_mm)
        if best is None or cost < best[0]:
            best = (cost, n, m)
    return None if best is None else best[2]


def refine(
    m: FloatArray, moving: Any, fixed: Any, inlier_mm: float, with_scale: bool, max_scale: float
) -> FloatArray:
    """Stage 3: guided re-matching within ``inlier_mm`` of the predicted positions
    (ratio 0.9 among the local candidates) and Tukey-reweighted least squares, three
    rounds; ``m`` unchanged when too few pairs remain."""
    cur = m
    xyz_a = np.asarray(moving.xyz, dtype=np.float64)
    xyz_b = np.asarray(fixed.xyz, dtype=np.float64)
    sa = np.asarray(moving.scale, dtype=np.float64)
    sb = np.asarray(fixed.scale, dtype=np.float64)
    for _ in range(REFINE_ROUNDS):
        ia, ib, q = guided_pairs(
            cur,
            xyz_a,
            sa,
            moving.descriptors,
            xyz_b,
            sb,
            fixed.descriptors,
            REFINE_RADIUS * inlier_mm,
            2.0,
        )
        keep = q >= REFINE_QUALITY
        if keep.sum() < 3:
            break
        nxt = irls(
            xyz_a[ia[keep]],
            xyz_b[ib[keep]],
            cur,
            np.ones(int(keep.sum())),
            REFINE_CUTOFF * inlier_mm,
            with_scale,
        )
        if not 1.0 / max_scale <= similarity_scale(nxt) <= max_scale:
            break
        cur = nxt
    return cur


def average(
    forward: FloatArray, backward: FloatArray, xyz: FloatArray, inlier_mm: float, with_scale: bool
) -> FloatArray:
    """The similarity closest (least squares over ``xyz``) to the mean of two estimates
    of the same map; ``forward`` when they disagree by more than ``inlier_mm`` on
    average."""
    x = np.unique(np.asarray(xyz, dtype=np.float64), axis=0)
    y1, y2 = _apply(forward, x), _apply(backward, x)
    if len(x) < 3 or float(np.linalg.norm(y1 - y2, axis=1).mean()) > inlier_mm:
        return forward
    mean = fit_similarity(x, 0.5 * (y1 + y2), with_scale=with_scale)
    return forward if mean is None else mean
