"""Keypoint matching, robust alignment and soft-Jaccard similarity of keypoint sets.

* :func:`match` — nearest-neighbour matches with Lowe's ratio test and a scale gate,
  optional Hough translation voting with spatially constrained re-matching (keypoint
  transfer), and p(m), a kernel density of each match's translation.
* :func:`align` — a robust 3D similarity transform (rotation, isotropic scale,
  translation) between two keypoint sets: one-point hypotheses from the keypoints'
  frames, local least-squares refits and guided re-matching (:mod:`keyfuse._align`),
  then, when the two 3-D images are known, a final local intensity fit
  (:mod:`keyfuse.align_refine`).
* :func:`soft_jaccard` — the keypoint-signature similarity of Chauvin et al.
* :func:`reference_votes` — the reference large-scale matcher's (``featMatchMultiple``)
  voting, re-implemented deterministically, for comparisons.

Every result is deterministic: the same inputs give bit-identical outputs on every run
and thread count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse import _core
from keyfuse._align import similarity_scale
from keyfuse.device import choose_backend
from keyfuse.errors import InvalidArgumentError
from keyfuse.image import Image, load_image
from keyfuse.keypoints import KeypointSet, read_key

__all__ = [
    "Alignment",
    "Matches",
    "align",
    "match",
    "reference_votes",
    "soft_jaccard",
    "votes_to_jaccard",
]


def _stored_keypoints(obj: Any, name: str) -> KeypointSet | None:
    """A KeypointSet as is; a keypoint file (``.kfk``, ``.key``) read; None for an Image
    or an image path (to be extracted). A bare array is refused: it has no affine, and a
    descriptor array passed by mistake would otherwise be taken for a 2D image."""
    if isinstance(obj, KeypointSet):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if path.endswith(".kfk"):
            return KeypointSet.load(path)
        if path.endswith(".key"):
            return read_key(path)
    if obj is None or isinstance(obj, (np.ndarray, list, tuple)):
        what = (
            f"a {type(obj).__name__}"
            + (f" of shape {obj.shape}" if isinstance(obj, np.ndarray) else "")
            if obj is not None
            else "None"
        )
        hint = (
            " (that looks like descriptors: pass the KeypointSet itself)"
            if isinstance(obj, np.ndarray) and obj.ndim == 2 and obj.shape[1:] == (64,)
            else " (wrap an image array as kf.Image(array, affine))"
        )
        raise InvalidArgumentError(
            f"{name}: expected a KeypointSet, a keypoint file (.kfk/.key), an Image or an "
            f"image path; got {what}{hint}"
        )
    return None


def _as_keypoints(obj: Any, device: str = "auto", name: str = "keypoints") -> KeypointSet:
    """:func:`_stored_keypoints`, an Image or an image path extracted first."""
    kps = _stored_keypoints(obj, name)
    if kps is not None:
        return kps
    from keyfuse.extraction import extract

    return extract(obj, device=device)


def _inputs_with_image(
    obj: Any, image: Any, device: str, name: str
) -> tuple[KeypointSet, Image | None]:
    """:func:`align`'s input as keypoints and, when known, the 3-D image they came from
    (``image`` if given, else ``obj`` when it is an image or an image path)."""
    img = None if image is None else load_image(image)
    kps = _stored_keypoints(obj, name)
    if kps is None:
        if img is None:
            img = obj = load_image(obj)
        kps = _as_keypoints(obj, device, name)
    return kps, img if img is not None and img.ndim == 3 else None


def _check_same_dims(a: KeypointSet, b: KeypointSet) -> None:
    """2D and 3D SIFT-Rank descriptors are not comparable: refuse a mix."""
    da, db = len(a.shape), len(b.shape)
    if da in (2, 3) and db in (2, 3) and da != db:
        raise InvalidArgumentError(
            f"cannot compare keypoints of a {da}D image (shape {a.shape}) with those of a "
            f"{db}D image (shape {b.shape}): 2D and 3D descriptors are not comparable"
        )


def _desc(kps: KeypointSet) -> np.ndarray:
    return np.ascontiguousarray(kps.descriptors, dtype=np.uint8)


@dataclass(frozen=True)
class Matches:
    """Matches from keypoint set A to B (at most one per keypoint of A).

    Attributes
    ----------
    ia, ib : (N,) int64
        Row indices into A and B.
    distance : (N,) float64
        Euclidean descriptor distance of each match.
    translation : (N, 3) float64
        ``B.xyz[ib] − A.xyz[ia]`` in mm (where A's keypoint lands in B).
    p : (N,) float64
        p(m): leave-one-out Gaussian kernel density (mm⁻³, bandwidth ``kde_bandwidth``)
        of each match's translation among the other N − 1 translations — high for matches
        that agree with many others, 0 for a lone match (its own translation does not
        count). Comparable across calls with the same bandwidth.
    mode : (3,) float64 or None
        The Hough translation mode (mm) when ``hough=True``.
    """

    ia: npt.NDArray[np.int64]
    ib: npt.NDArray[np.int64]
    distance: npt.NDArray[np.float64]
    translation: npt.NDArray[np.float64]
    p: npt.NDArray[np.float64]
    mode: npt.NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.ia)

    def __repr__(self) -> str:
        mode = "" if self.mode is None else f", mode={np.round(self.mode, 2).tolist()}"
        return f"Matches({len(self)} matches{mode})"

    @property
    def pairs(self) -> npt.NDArray[np.int64]:
        """(N, 2) array of ``(ia, ib)``."""
        return np.stack([self.ia, self.ib], axis=1)

    def __getitem__(self, index: Any) -> Matches:
        """A subset of the matches (mask, indices or slice); p is kept as computed."""
        return Matches(
            self.ia[index],
            self.ib[index],
            self.distance[index],
            self.translation[index],
            self.p[index],
            self.mode,
        )


def match(
    a: KeypointSet,
    b: KeypointSet,
    ratio: float = 0.9,
    scale_factor: float = 2.0,
    hough: bool = False,
    *,
    hough_sigma: float = 3.0,
    keep_fraction: float = 0.1,
    kde_bandwidth: float = 3.0,
    device: str = "auto",
) -> Matches:
    """Match every keypoint of ``a`` to its nearest neighbour in ``b``.

    Parameters
    ----------
    a, b : KeypointSet, keypoint file (``.kfk``/``.key``), Image or image path
        Images are extracted first (with ``device``); bare arrays are refused.
    ratio : float, default 0.9
        Lowe's test: keep a match when d1/d2 ≤ ratio (d1, d2: the two nearest descriptor
        distances among the scale-compatible candidates). 1.0 keeps all.
    scale_factor : float, default 2.0
        Candidates must have a scale within this factor of the query's (``inf`` disables).
    hough : bool, default False
        Vote the matches' translations in a Gaussian-smoothed histogram (bins of
        ``hough_sigma`` mm); from its mode, re-match each keypoint of ``a`` among only the
        ``keep_fraction`` of ``b``'s keypoints closest to its predicted position.
    hough_sigma : float, default 3.0
        Bin width and smoothing σ (mm) of the Hough vote.
    keep_fraction : float, default 0.1
        Fraction of ``b`` kept as candidates when re-matching (the 10% closest).
    kde_bandwidth : float, default 3.0
        Bandwidth (mm) of the translation kernel density that gives ``p``.
    device : {"auto", "cpu", "cuda"}
        Backend; matching runs on the CPU (exact brute force, rayon): ``"cuda"`` raises
        :class:`~keyfuse.DeviceUnavailableError`.

    Returns
    -------
    Matches
    """
    choose_backend(device, "match", no_gpu_path="matching is CPU-only")
    a = _as_keypoints(a, device, "a")
    b = _as_keypoints(b, device, "b")
    _check_same_dims(a, b)
    ia, ib, dist, tr, p, mode = _core.match_sets(
        _desc(a),
        np.ascontiguousarray(a.xyz, dtype=np.float64),
        np.ascontiguousarray(a.scale, dtype=np.float64),
        _desc(b),
        np.ascontiguousarray(b.xyz, dtype=np.float64),
        np.ascontiguousarray(b.scale, dtype=np.float64),
        ratio=float(ratio),
        scale_factor=float(scale_factor),
        hough=bool(hough),
        hough_sigma=float(hough_sigma),
        keep_fraction=float(keep_fraction),
        kde_bandwidth=float(kde_bandwidth),
    )
    return Matches(ia, ib, dist, tr, p, None if mode is None else np.asarray(mode))


@dataclass(frozen=True)
class Alignment:
    """A 3D similarity transform in world mm, ``y = scale · R · x + t``, from ``moving``
    keypoints to ``fixed`` keypoints.

    Attributes
    ----------
    matrix : (4, 4) float64
        Homogeneous matrix; ``matrix @ [x, y, z, 1]`` maps a moving point to fixed space.
    inliers : (M,) bool
        Which of ``matches`` agree with the transform.
    matches : Matches
        The putative matches (moving → fixed) the transform was estimated from.
    rmse : float
        Root-mean-square residual (mm) over the inliers.
    scale : float
        Isotropic scale factor.
    """

    matrix: npt.NDArray[np.float64]
    inliers: npt.NDArray[np.bool_]
    matches: Matches
    rmse: float
    scale: float
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rotation(self) -> npt.NDArray[np.float64]:
        """(3, 3) rotation matrix R."""
        return self.matrix[:3, :3] / self.scale

    @property
    def translation(self) -> npt.NDArray[np.float64]:
        """(3,) translation t (mm)."""
        return self.matrix[:3, 3].copy()

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())

    def apply(self, points: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map (N, 3) world points (mm) from moving to fixed space."""
        pts = np.asarray(points, dtype=np.float64)
        if pts.shape[-1] != 3:
            raise InvalidArgumentError(f"points must have shape (..., 3), got {pts.shape}")
        return pts @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    __call__ = apply

    def inverse(self) -> Alignment:
        """The fixed → moving transform (same inliers and matches)."""
        inv = np.asarray(np.linalg.inv(self.matrix), dtype=np.float64)
        return Alignment(inv, self.inliers, self.matches, self.rmse, 1.0 / self.scale)

    def transform_keypoints(self, kps: KeypointSet) -> KeypointSet:
        """``kps`` with world coordinates mapped into fixed space (scales unchanged)."""
        return kps.transformed(self.matrix)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.matrix, dtype=dtype)

    def __repr__(self) -> str:
        return (
            f"Alignment(scale={self.scale:.4f}, inliers={self.n_inliers}/{len(self.inliers)}, "
            f"rmse={self.rmse:.3f} mm)"
        )


def _align_one_way(
    moving: KeypointSet,
    fixed: KeypointSet,
    candidates: int,
    scale_factor: float,
    inlier_mm: float,
    iterations: int,
    max_scale: float,
    with_scale: bool,
    refine: bool,
    seed: int,
) -> tuple[npt.NDArray[np.float64], Matches, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """:func:`align`'s estimate moving → fixed: (matrix, candidate matches, their moving
    and fixed positions)."""
    from keyfuse import _align
    from keyfuse.neighbors import knn

    ia = ib = np.zeros(0, dtype=np.int64)
    dist = np.zeros(0)
    if len(moving) and len(fixed):
        k = min(len(fixed), 4 * int(candidates) + 4)
        idx, d2 = knn(_desc(fixed), _desc(moving), k, device="cpu")
        scale_a = np.asarray(moving.scale, dtype=np.float64)
        scale_b = np.asarray(fixed.scale, dtype=np.float64)
        ia, ib, dist = _align.candidate_pairs(
            np.asarray(idx, dtype=np.int64), d2, scale_a, scale_b, int(candidates), scale_factor
        )
    if len(np.unique(ia)) < 3:
        raise InvalidArgumentError(
            f"align found only {len(np.unique(ia))} keypoints with a match (need ≥ 3); are "
            "these images of the same kind of anatomy?"
        )
    xa = np.ascontiguousarray(moving.xyz[ia], dtype=np.float64)
    xb = np.ascontiguousarray(fixed.xyz[ib], dtype=np.float64)
    tr = xb - xa
    m = Matches(ia, ib, dist, tr, _align.translation_density(tr, 3.0))
    extra = []
    # the three-point RANSAC serves keypoints without orientation frames (all identity)
    if any(np.allclose(k.orientation, np.eye(3, dtype=np.float32)) for k in (moving, fixed)):
        try:
            mat3, *_ = _core.ransac_similarity(
                xa,
                xb,
                iterations=int(iterations),
                inlier_mm=float(inlier_mm),
                max_scale=float(max_scale),
                with_scale=bool(with_scale),
                seed=int(seed),
            )
            extra.append(np.asarray(mat3, dtype=np.float64))
        except (InvalidArgumentError, ValueError):
            pass  # degenerate samples only: the one-point hypotheses remain
    fa = _align.world_frames(moving.orientation, moving.affine)[ia]
    fb = _align.world_frames(fixed.orientation, fixed.affine)[ib]
    _, det = np.unique(moving.xyz, axis=0, return_inverse=True)
    mat = _align.robust_similarity(
        xa,
        xb,
        fa,
        fb,
        np.asarray(fixed.scale, np.float64)[ib] / np.asarray(moving.scale, np.float64)[ia],
        np.asarray(det, dtype=np.int64).ravel()[ia],
        float(inlier_mm),
        bool(with_scale),
        float(max_scale),
        extra,
    )
    if mat is None:
        raise InvalidArgumentError("no valid similarity hypothesis (degenerate or too few matches)")
    if refine:
        mat = _align.refine(mat, moving, fixed, float(inlier_mm), bool(with_scale), max_scale)
    return mat, m, xa, xb


def align(
    moving: KeypointSet,
    fixed: KeypointSet,
    *,
    candidates: int = 3,
    scale_factor: float = 2.0,
    inlier_mm: float | None = None,
    iterations: int = 4000,
    max_scale: float = 2.0,
    with_scale: bool = True,
    refine: bool = True,
    symmetric: bool | None = None,
    intensity: bool | None = None,
    moving_image: Any = None,
    fixed_image: Any = None,
    seed: int = 0x616C69676E21,
    device: str = "auto",
) -> Alignment:
    """Robust similarity transform moving → fixed from keypoint matches.

    Every moving keypoint is paired with its ``candidates`` nearest descriptors in
    ``fixed`` (scale-compatible). Each pair is itself a hypothesis — the keypoints'
    orientation frames give the rotation, their scales the scale — scored by the pairs
    that agree with it in position, frame and scale; the best are refitted by least
    squares on their consensus at tightening thresholds (together with the result of a
    three-point RANSAC, for keypoints without orientation frames), and the lowest
    truncated cost wins. With ``refine``, every moving keypoint is then matched again
    among only the fixed keypoints near its predicted position and the similarity is
    refitted by reweighted least squares. No random choice is left: the result is
    reproducible, and rotations of any size are found when the frames are present.

    Parameters
    ----------
    moving, fixed : KeypointSet (or Image / path, extracted first)
    candidates : int, default 3
        Nearest descriptors per moving keypoint taken as putative matches.
    scale_factor : float, default 2.0
        Candidates must have a scale within this factor of the query's.
    inlier_mm : float, optional
        Inlier distance (mm). Default: 5 × the larger voxel size of the two images, at
        least 6 mm (two subjects differ by a few mm of anatomy).
    iterations : int, default 4000
        Hypotheses of the three-point RANSAC.
    max_scale : float, default 2.0
        Transforms scaling by more than this factor (either way) are rejected.
    with_scale : bool, default True
        False fits a rigid transform (scale 1).
    refine : bool, default True
        Guided re-matching and reweighted least squares after the robust fit.
    symmetric : bool, optional
        Also estimate fixed → moving and average the two maps (over the moving
        keypoints) when they agree within ``inlier_mm``; the forward estimate otherwise.
        Default (None): when no intensity fit follows (the fit starts from either
        estimate equally well, and the reverse estimate doubles the keypoint time).
    intensity : bool, optional
        A final local intensity fit of the similarity on the two 3-D images
        (:func:`keyfuse.align_refine.refine_intensity`: normalised cross-correlation over
        the fixed foreground, 2× then 1× voxel size), kept only when it raises the
        correlation and moves the foreground by at most 2 × ``inlier_mm``; when the
        fit from the keypoint estimate is refused, fits from the foreground moments
        follow (centroids, scale and principal axes, for any initial rotation:
        :func:`keyfuse.align_refine.global_fit`) and the best correlating one is
        kept. Default
        (None): when both images are known — given as images or paths, or through
        ``moving_image``/``fixed_image``; True requires them; False never.
    moving_image, fixed_image : Image or path, optional
        The images ``moving``/``fixed`` keypoints were extracted from, for the
        intensity fit (not needed when ``moving``/``fixed`` are images themselves).
    seed : int
        Seed of the three-point RANSAC's sampler.
    device : {"auto", "cpu", "cuda"}

    Raises
    ------
    InvalidArgumentError
        With fewer than 3 matches or only degenerate hypotheses.
    """
    from keyfuse import _align

    moving, moving_img = _inputs_with_image(moving, moving_image, device, "moving")
    fixed, fixed_img = _inputs_with_image(fixed, fixed_image, device, "fixed")
    _check_same_dims(moving, fixed)
    have_images = moving_img is not None and fixed_img is not None
    if intensity and not have_images:
        raise InvalidArgumentError(
            "align(intensity=True) needs both 3-D images: pass images (or image paths) as "
            "moving/fixed, or moving_image= and fixed_image="
        )
    if candidates < 1 or not scale_factor >= 1.0 or not max_scale >= 1.0:
        raise InvalidArgumentError("align needs candidates ≥ 1, scale_factor ≥ 1, max_scale ≥ 1")
    if inlier_mm is None:
        vox = max(float(np.max(moving.spacing)), float(np.max(fixed.spacing)), 1.0)
        inlier_mm = max(5.0 * vox, 6.0)
    if not inlier_mm > 0:
        raise InvalidArgumentError(f"inlier_mm must be > 0, got {inlier_mm}")
    opts = (int(candidates), float(scale_factor), float(inlier_mm), int(iterations))
    opts2 = (float(max_scale), bool(with_scale), bool(refine), int(seed))
    fit_intensity = have_images and intensity is not False
    if symmetric is None:
        symmetric = not fit_intensity
    mat, m, xa, xb = _align_one_way(moving, fixed, *opts, *opts2)
    if symmetric:
        try:
            back = _align_one_way(fixed, moving, *opts, *opts2)[0]
        except InvalidArgumentError:
            pass  # the forward estimate stands alone
        else:
            mat = _align.average(
                mat,
                np.asarray(np.linalg.inv(back), np.float64),
                moving.xyz,
                float(inlier_mm),
                bool(with_scale),
            )
    extra: dict[str, Any] = {}
    if fit_intensity:
        from keyfuse.align_refine import global_fit, refine_intensity

        assert moving_img is not None and fixed_img is not None
        trust = 2.0 * float(inlier_mm)
        fit = refine_intensity(moving_img, fixed_img, mat, trust_mm=trust)
        if not fit.accepted:  # a wrong keypoint start (few right matches between subjects)
            alt = global_fit(moving_img, fixed_img, trust)
            if alt.ncc_after > fit.ncc_after:
                fit = alt
        mat, extra["intensity"] = fit.matrix, fit
    res = np.linalg.norm(xa @ mat[:3, :3].T + mat[:3, 3] - xb, axis=1)
    inl = res <= inlier_mm
    rmse = float(np.sqrt(np.mean(res[inl] ** 2))) if inl.any() else float("nan")
    scale = similarity_scale(mat)
    return Alignment(mat, inl, m, rmse, scale, extra)


_KERNELS = ("posterior", "published")

#: Default lower bound of α² (keeps exact duplicates at kernel value 1).
_ALPHA2_FLOOR = 1.0


def _kernel_defaults(
    kernel: str, k: int | None, alpha2_cap_fraction: float | None
) -> tuple[bool, int, float]:
    """(posterior?, K, γ) for a kernel name; None means the kernel's default."""
    if kernel not in _KERNELS:
        raise InvalidArgumentError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    post = kernel == "posterior"
    kk = (10 if post else 30) if k is None else int(k)
    cap = (float("inf") if post else 0.1) if alpha2_cap_fraction is None else alpha2_cap_fraction
    if kk < 1 or not float(cap) > 0:
        raise InvalidArgumentError("k must be ≥ 1 and alpha2_cap_fraction > 0")
    return post, kk, float(cap)


def soft_jaccard(
    a: KeypointSet,
    b: KeypointSet,
    k: int | None = None,
    symmetric: bool = False,
    geometry: bool = False,
    transform: Alignment | npt.ArrayLike | None = None,
    *,
    kernel: str = "posterior",
    exact: bool | None = None,
    checks: int = 128,
    alpha2_floor: float = _ALPHA2_FLOOR,
    alpha2_cap_fraction: float | None = None,
    device: str = "auto",
) -> float:
    """Soft Jaccard similarity J(A, B) ∈ [0, 1] of two keypoint sets.

    ``J = |A∩B| / (|A| + |B| − |A∩B|)`` with a soft intersection built from the kernel
    ``w_ij = exp(−d²(f_i, f_j) / 2α_i²)``, α_i² the squared distance from f_i to its
    nearest neighbour in the collection it is compared against (the published adaptive
    width): ``A∖{f_i} ∪ B`` for two sets alone, every other subject in
    :class:`keyfuse.Index`. J = 1 for identical sets, ≈ 0 for disjoint ones.

    ``kernel="posterior"`` (default): each f_i's kernel values over its K nearest
    neighbours, with the narrower width α_i = half the nearest-neighbour distance, are
    normalised to sum to 1 (a soft assignment of f_i among the candidates), B receives
    the share of its best neighbour, and each keypoint of B keeps only its best share
    from A (so |A∩B| ≤ min(|A|, |B|)). This competition among candidates is what the
    reference matcher's voting gets right; it also scores families better than those
    votes (K = 10 and α = d_nn/2 chosen on two cohorts; figures in docs/decisions.md).
    Two unrelated sets alone keep a small floor (B wins some assignments against A's own
    keypoints); disjoint sets score ≈ 0.

    ``kernel="published"``: ``|A∩B| = Σ_i max_{f_j ∈ NN_K(f_i) ∩ B} w_ij`` (Chauvin et
    al. 2020), with α_i² clamped to ``[alpha2_floor, alpha2_cap_fraction · E]``,
    E = ``2 Σ_d Var_d`` the mean squared distance between two unrelated descriptors of
    the pooled data. The cap (default γ = 0.1 for this kernel) is our addition: distances
    concentrate in 64-d, so without it a keypoint with no true match still scores
    ≈ exp(−½) against its nearest stranger; ``alpha2_cap_fraction=inf`` gives the
    published formula exactly.

    Parameters
    ----------
    a, b : KeypointSet, keypoint file (``.kfk``/``.key``), Image or image path
        Images are extracted first (with ``device``); bare arrays are refused.
    k : int, optional
        Nearest neighbours per keypoint (K); default 10 (posterior) or 30 (published).
    symmetric : bool, default False
        J from the mean of |A∩B| and |B∩A| (then J(A,B) = J(B,A)).
    geometry : bool, default False
        Multiply each kernel value by ``exp(−‖Δx‖²/(σ_a σ_b)²) · exp(−(ln σ_a − ln σ_b)²)``
        (Chauvin et al. 2021), Δx between A's keypoint mapped by ``transform`` and B's,
        σ the scales in mm (A's scaled by the transform's scale).
    transform : Alignment or (4, 4) array, optional
        A → B world transform for the geometry kernel; default ``align(a, b)``.
    kernel : {"posterior", "published"}, default "posterior"
    exact : bool, optional
        Brute-force k-NN (default: exact unless both sets are large).
    checks : int, default 128
        Distance evaluations per keypoint in the approximate search.
    alpha2_floor : float, default 1.0
        Lower bound of α² (keeps exact duplicates at kernel value 1).
    alpha2_cap_fraction : float, optional
        γ of the upper bound γ·E of α²; default ``inf`` (posterior) or 0.1 (published).
    device : {"auto", "cpu", "cuda"}
        The soft Jaccard of two sets runs on the CPU: ``"cuda"`` raises
        :class:`~keyfuse.DeviceUnavailableError` (an :class:`~keyfuse.Index` with
        ``kernel="published"`` searches on the GPU).
    """
    post, k, alpha2_cap_fraction = _kernel_defaults(kernel, k, alpha2_cap_fraction)
    choose_backend(device, "soft_jaccard", no_gpu_path="the two-set soft Jaccard is CPU-only")
    a = _as_keypoints(a, device, "a")
    b = _as_keypoints(b, device, "b")
    _check_same_dims(a, b)
    na, nb = len(a), len(b)
    geo: dict[str, np.ndarray | None] = dict.fromkeys(("xyz_a", "scale_a", "xyz_b", "scale_b"))
    if geometry and na and nb:
        if transform is None:
            transform = align(a, b, device=device)
        mat = np.asarray(transform.matrix if isinstance(transform, Alignment) else transform)
        mat = mat.astype(np.float64)
        if mat.shape != (4, 4):
            raise InvalidArgumentError(f"transform must be 4×4, got {mat.shape}")
        s = similarity_scale(mat)
        geo = {
            "xyz_a": np.ascontiguousarray(a.xyz @ mat[:3, :3].T + mat[:3, 3]),
            "scale_a": np.ascontiguousarray(a.scale, dtype=np.float64) * s,
            "xyz_b": np.ascontiguousarray(b.xyz, dtype=np.float64),
            "scale_b": np.ascontiguousarray(b.scale, dtype=np.float64),
        }
    ab, ba = _core.soft_intersections(
        _desc(a),
        _desc(b),
        k=int(k),
        exact=bool(exact) if exact is not None else False,
        checks=int(checks),
        alpha2_floor=float(alpha2_floor),
        alpha2_cap_fraction=float(alpha2_cap_fraction),
        posterior=post,
        **geo,
    )
    inter = 0.5 * (ab + ba) if symmetric else ab
    union = na + nb - inter
    return float(np.clip(inter / union, 0.0, 1.0)) if union > 0 else 0.0


def reference_votes(
    sets: Sequence[KeypointSet],
    k: int = 5,
    *,
    exact: bool = False,
    checks: int = 64,
) -> npt.NDArray[np.float64]:
    """The reference large-scale matcher's (``featMatchMultiple``) vote matrix, N×N.

    One kd-forest over all sets (8 trees, ``checks`` = 64 as in the reference); every
    keypoint of set a takes its ``k`` nearest neighbours in the other sets and votes at
    most once per other set with ``log2(1 + w_j/Σw)``, ``w_j = exp(−D_j²/D_min²)``; each
    keypoint of set b keeps only its best vote from a, and ``V[a, b]`` is their sum.
    Asymmetric, diagonal 0; unlike the reference, bit-identical on every run. See
    :func:`votes_to_jaccard` to read it as a Jaccard index.
    """
    if len(sets) == 0:
        return np.zeros((0, 0))
    descs = [_desc(_as_keypoints(s, name=f"sets[{i}]")) for i, s in enumerate(sets)]
    return _core.reference_votes(descs, k=int(k), exact=bool(exact), checks=int(checks))


def votes_to_jaccard(votes: npt.ArrayLike, sizes: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Read a vote matrix as a soft intersection: ``J_ij = V_ij / (n_i + n_j − V_ij)``."""
    v = np.asarray(votes, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] != v.shape[1] or n.shape != (v.shape[0],):
        raise InvalidArgumentError("votes must be N×N and sizes of length N")
    union = n[:, None] + n[None, :] - v
    with np.errstate(divide="ignore", invalid="ignore"):
        j = np.where(union > 0, v / union, 0.0)
    np.fill_diagonal(j, 1.0)
    return np.clip(j, 0.0, 1.0)
