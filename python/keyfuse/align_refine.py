"""A final local intensity fit of a similarity transform (used by :func:`keyfuse.align`).

The keypoint alignment (:mod:`keyfuse._align`) finds a similarity from any starting
pose but, between two different subjects, only to a few millimetres: too few of the
matches are right to pin the rotation and scale down. This module refines such an
estimate on the images themselves: the 7 parameters (rotation, isotropic scale,
translation) are fitted by L-BFGS-B to maximise the normalised cross-correlation
between the fixed image and the moving image warped onto it, over the fixed image's
foreground and a margin around it, on a coarse-to-fine pyramid, with analytic gradients
(the exact gradient of the trilinear interpolant of the moving image).

The fit is local and guarded: the parameters are bounded to a trust region around the
keypoint estimate, and the refined transform is kept only when it raises the
correlation at the finest level and moves the foreground by at most ``trust_mm`` (RMS),
so a wrong local optimum cannot undo a right keypoint fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage, optimize

from keyfuse.errors import InvalidArgumentError
from keyfuse.image import Image, load_image

__all__ = ["IntensityFit", "refine_intensity"]

FloatArray = npt.NDArray[np.float64]

#: pyramid levels as multiples of the coarser voxel size of the two images
LEVELS = (2.0, 1.0)
#: L-BFGS-B iterations per level
MAX_ITER = 20
#: sample points per level at most (a regular sub-grid of the fixed foreground)
MAX_POINTS = 10_000
#: margin (mm) around the fixed foreground included in the samples (the edge)
MARGIN_MM = 12.0


@dataclass
class IntensityFit:
    """Result of :func:`refine_intensity`: the kept matrix (moving → fixed world), the
    starting one and the figures of the guard (correlations at the finest level, RMS
    displacement of the fixed foreground in mm)."""

    matrix: FloatArray
    start: FloatArray
    accepted: bool
    ncc_before: float
    ncc_after: float
    shift_mm: float


def _foreground(data: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Voxels above half of Otsu's threshold (the image's foreground and its edge)."""
    from keyfuse.plotting._slices import _otsu

    return np.asarray(data > 0.5 * _otsu(data[::2, ::2, ::2]), dtype=bool)


class _Level:
    """One pyramid level: fixed sample points and values, the smoothed moving image."""

    def __init__(self, moving: Image, fixed: Image, mask: npt.NDArray[np.bool_], step: float):
        fsp = np.asarray(fixed.spacing, np.float64)
        msp = np.asarray(moving.spacing, np.float64)
        stride = np.maximum(1, np.round(step / fsp).astype(int))
        fsig = np.where(stride > 1, 0.5 * step / fsp, 0.0)
        msig = np.where(step / msp > 1.01, 0.5 * step / msp, 0.0)
        fdata = np.asarray(fixed.data, np.float32)
        if fsig.any():
            fdata = ndimage.gaussian_filter(fdata, fsig)
        sl = tuple(slice(0, None, int(s)) for s in stride)
        idx = np.argwhere(mask[sl]) * stride
        if len(idx) > MAX_POINTS:
            idx = idx[:: int(np.ceil(len(idx) / MAX_POINTS))]
        if len(idx) < 64:
            raise InvalidArgumentError("intensity refinement: the fixed image has no foreground")
        f = fdata[tuple(idx.T)].astype(np.float64)
        f -= f.mean()
        nf = float(np.linalg.norm(f))
        if not nf > 0:
            raise InvalidArgumentError("intensity refinement: the fixed image is constant")
        self.fz = f / nf
        aff = np.asarray(fixed.affine, np.float64)
        self.points = idx @ aff[:3, :3].T + aff[:3, 3]
        mdata = np.asarray(moving.data, np.float32)
        if msig.any():
            mdata = ndimage.gaussian_filter(mdata, msig)
        self.moving = np.ascontiguousarray(mdata)


def _trilinear(vol: npt.NDArray[np.float32], vox: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Trilinear samples of ``vol`` at (N, 3) voxel coordinates and their exact gradient
    (N, 3) in voxel units; 0 outside the grid (one gather of the 8 corners)."""
    shape = np.asarray(vol.shape)
    inside = np.all((vox >= 0) & (vox <= shape - 1), axis=1)
    i0 = np.clip(np.floor(vox).astype(np.int64), 0, np.maximum(shape - 2, 0))
    f = vox - i0
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    base = i0 @ strides
    flat = vol.reshape(-1)
    c = [
        flat[base + dx * strides[0] + dy * strides[1] + dz * strides[2]].astype(np.float64)
        for dx in (0, 1)
        for dy in (0, 1)
        for dz in (0, 1)
    ]
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    # along z, then y, then x
    c00, c01 = c[0] + fz * (c[1] - c[0]), c[2] + fz * (c[3] - c[2])
    c10, c11 = c[4] + fz * (c[5] - c[4]), c[6] + fz * (c[7] - c[6])
    c0, c1 = c00 + fy * (c01 - c00), c10 + fy * (c11 - c10)
    val = c0 + fx * (c1 - c0)
    gx = c1 - c0
    gy = (1 - fx) * (c01 - c00) + fx * (c11 - c10)
    d0 = (1 - fy) * (c[1] - c[0]) + fy * (c[3] - c[2])
    d1 = (1 - fy) * (c[5] - c[4]) + fy * (c[7] - c[6])
    gz = (1 - fx) * d0 + fx * d1
    grad = np.stack([gx, gy, gz], axis=1)
    val[~inside] = 0.0
    grad[~inside] = 0.0
    return val, grad


class _Problem:
    """NCC of one level as a function of θ = (ω·r, σ·r, t) in mm: the fixed point p goes
    to q = c + e^σ R(ω)(p − c) + t, then through ``fixed_to_moving_vox`` into the moving
    voxel grid."""

    def __init__(self, level: _Level, centre: FloatArray, radius: float, to_vox: FloatArray):
        self.level = level
        self.c = centre
        self.r = radius
        self.v = level.points - centre
        self.lin = to_vox[:3, :3]
        self.off = to_vox[:3, 3]

    def transform(self, theta: FloatArray) -> FloatArray:
        """The 4×4 fixed-world map q(p) of θ."""
        from scipy.spatial.transform import Rotation

        rot = Rotation.from_rotvec(theta[:3] / self.r).as_matrix()
        a = np.exp(theta[3] / self.r) * rot
        m = np.eye(4)
        m[:3, :3] = a
        m[:3, 3] = self.c + theta[4:] - a @ self.c
        return m

    def __call__(self, theta: FloatArray) -> tuple[float, FloatArray]:
        from scipy.spatial.transform import Rotation

        w = theta[:3] / self.r
        es = np.exp(theta[3] / self.r)
        rot = Rotation.from_rotvec(w).as_matrix()
        q = self.c + es * self.v @ rot.T + theta[4:]
        vox = q @ self.lin.T + self.off
        lv = self.level
        m, g = _trilinear(lv.moving, vox)
        m -= m.mean()
        nm = float(np.linalg.norm(m))
        if not nm > 0:
            return 1.0, np.zeros(7)
        mz = m / nm
        ncc = float(lv.fz @ mz)
        dm = (lv.fz - ncc * mz) / nm  # d ncc / d m_i
        gq = (g @ self.lin) * dm[:, None]  # d ncc / d q_i (world)
        grad = np.empty(7)
        rv = self.v @ rot.T
        eps = 1e-6
        for j in range(3):
            dw = w.copy()
            dw[j] += eps
            drot = (Rotation.from_rotvec(dw).as_matrix() - rot) / eps
            grad[j] = float(np.einsum("ij,ij->", gq, es * self.v @ drot.T)) / self.r
        grad[3] = float(np.einsum("ij,ij->", gq, es * rv)) / self.r
        grad[4:] = gq.sum(axis=0)
        return -ncc, -grad


def refine_intensity(
    moving: Image | str,
    fixed: Image | str,
    init: npt.ArrayLike,
    *,
    trust_mm: float = 10.0,
    levels: tuple[float, ...] = LEVELS,
    max_iter: int = MAX_ITER,
) -> IntensityFit:
    """Refine a similarity moving → fixed (world mm) by a local intensity fit.

    Parameters
    ----------
    moving, fixed : Image or path
        3-D images; their contrasts may differ by gain, gamma and a smooth bias.
    init : (4, 4) array
        The starting similarity moving world → fixed world (e.g. :func:`keyfuse.align`'s).
    trust_mm : float, default 10
        Trust region: each parameter is bounded to move the foreground by at most this
        much, and the result is kept only if its RMS displacement of the fixed
        foreground from ``init`` is at most this.
    levels : tuple of float
        Pyramid steps as multiples of the coarser voxel size of the two images.
    max_iter : int
        L-BFGS-B iterations per level.

    Returns
    -------
    IntensityFit
        ``matrix`` is the refinement when it raised the correlation and stayed within
        the trust region, else ``init``.
    """
    moving, fixed = load_image(moving), load_image(fixed)
    if moving.ndim != 3 or fixed.ndim != 3:
        raise InvalidArgumentError("intensity refinement needs two 3-D images")
    init = np.asarray(init, np.float64)
    if init.shape != (4, 4) or not np.all(np.isfinite(init)):
        raise InvalidArgumentError("intensity refinement: init must be a finite 4×4 matrix")
    if not trust_mm > 0 or not levels or max_iter < 1:
        raise InvalidArgumentError("intensity refinement needs trust_mm > 0, levels, max_iter ≥ 1")
    vox = max(float(np.max(fixed.spacing)), float(np.max(moving.spacing)))
    fg = _foreground(np.asarray(fixed.data, np.float32))
    grow = int(np.ceil(MARGIN_MM / float(np.min(fixed.spacing))))
    mask = ndimage.binary_dilation(fg, iterations=grow) if grow > 0 else fg
    to_vox = np.linalg.inv(np.asarray(moving.affine, np.float64)) @ np.linalg.inv(init)
    theta = np.zeros(7)
    bounds = [(-trust_mm, trust_mm)] * 7
    probs: list[_Problem] = []
    for lev in sorted(levels, reverse=True):
        level = _Level(moving, fixed, mask, lev * vox)
        if not probs:
            centre = level.points.mean(axis=0)
            radius = float(np.sqrt(((level.points - centre) ** 2).sum(axis=1).mean()))
        prob = _Problem(level, centre, radius, to_vox)
        probs.append(prob)
        res = optimize.minimize(
            prob, theta, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": max_iter}
        )
        theta = np.asarray(res.x, np.float64)
    fine = probs[-1]
    before = -fine(np.zeros(7))[0]
    after = -fine(theta)[0]
    delta = fine.transform(theta)
    moved = fine.level.points @ delta[:3, :3].T + delta[:3, 3] - fine.level.points
    shift = float(np.sqrt((moved**2).sum(axis=1).mean()))
    ok = bool(after > before and shift <= trust_mm)
    mat = np.linalg.inv(delta) @ init if ok else init
    return IntensityFit(np.asarray(mat, np.float64), init, ok, float(before), float(after), shift)


def _moments(img: Image) -> tuple[FloatArray, FloatArray]:
    """Centroid (world mm) and covariance (mm²) of an image's foreground voxels."""
    data = np.asarray(img.data, np.float32)
    ijk = np.argwhere(_foreground(data))
    if len(ijk) < 64:
        raise InvalidArgumentError("intensity refinement: an image has no foreground")
    aff = np.asarray(img.affine, np.float64)
    xyz = ijk[:: max(1, len(ijk) // 50_000)] @ aff[:3, :3].T + aff[:3, 3]
    return xyz.mean(axis=0), np.cov(xyz.T)


#: rotations (degrees) about each principal axis tried around each principal-axes pose
_TILTS_DEG = (-30.0, 30.0)


def moment_starts(moving: Image, fixed: Image) -> list[FloatArray]:
    """Starts for :func:`refine_intensity` from the foregrounds' moments alone, for any
    initial rotation: the centroids matched, the isotropic scale of the two
    covariances, and each of the four proper rotations taking the moving principal
    axes onto the fixed ones (their signs are unknown), each also tilted by ±30° about
    every principal axis (nearly equal axes are ill-defined); the first start is the
    centroids matched without rotation or scale (SimpleITK's centred initialisation, by
    mass)."""
    from scipy.spatial.transform import Rotation

    cm, covm = _moments(moving)
    cf, covf = _moments(fixed)
    em, vm = np.linalg.eigh(covm)
    ef, vf = np.linalg.eigh(covf)
    scale = float((np.prod(np.maximum(ef, 1e-12)) / np.prod(np.maximum(em, 1e-12))) ** (1 / 6))
    tilts = [np.eye(3)] + [
        Rotation.from_rotvec(np.deg2rad(d) * vf[:, a]).as_matrix()
        for a in range(3)
        for d in _TILTS_DEG
    ]
    rotations = [np.eye(3)]
    for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
        base = vf @ np.diag(signs) @ vm.T
        if np.linalg.det(base) < 0:  # eigh's columns may form a left-handed frame
            base = vf @ np.diag(signs) @ np.diag((1, 1, -1)) @ vm.T
        rotations += [tilt @ base for tilt in tilts]
    starts = []
    for k, rot in enumerate(rotations):
        mat = np.eye(4)
        mat[:3, :3] = (1.0 if k == 0 else scale) * rot
        mat[:3, 3] = cf - mat[:3, :3] @ cm
        starts.append(mat)
    return starts


def coarse_correlations(
    moving: Image, fixed: Image, starts: list[FloatArray], step_mm: float
) -> FloatArray:
    """NCC of each start (moving world → fixed world) over the fixed foreground, sampled
    every ``step_mm`` with both images smoothed to that scale."""
    fg = _foreground(np.asarray(fixed.data, np.float32))
    level = _Level(moving, fixed, fg, step_mm)
    inv_aff = np.linalg.inv(np.asarray(moving.affine, np.float64))
    out = np.empty(len(starts))
    for k, mat in enumerate(starts):
        to_vox = inv_aff @ np.linalg.inv(mat)
        vals = _trilinear(level.moving, level.points @ to_vox[:3, :3].T + to_vox[:3, 3])[0]
        vals -= vals.mean()
        norm = float(np.linalg.norm(vals))
        out[k] = float(level.fz @ vals) / norm if norm > 0 else -1.0
    return out


def global_fit(moving: Image, fixed: Image, trust_mm: float, *, keep: int = 3) -> IntensityFit:
    """The intensity fit when no keypoint start can be trusted: the moment starts
    (:func:`moment_starts`) ranked by their correlation at 4 × the voxel size, the best
    ``keep`` refined (:func:`refine_intensity`, a trust region of at least 30 mm since
    the starts are rough), and the best correlating result kept."""
    moving, fixed = load_image(moving), load_image(fixed)
    starts = moment_starts(moving, fixed)
    vox = max(float(np.max(fixed.spacing)), float(np.max(moving.spacing)))
    ncc = coarse_correlations(moving, fixed, starts, 4.0 * vox)
    best: IntensityFit | None = None
    for k in np.argsort(-ncc, kind="stable")[:keep]:
        fit = refine_intensity(moving, fixed, starts[int(k)], trust_mm=max(trust_mm, 30.0))
        if best is None or fit.ncc_after > best.ncc_after:
            best = fit
    assert best is not None
    return best
