"""Keypoint-transfer segmentation (Wachinger et al., IPMI 2015; ALGORITHMS.md §5).

A new image is segmented without registration: its 3D SIFT-Rank keypoints are matched to
the keypoints of annotated training images, each test keypoint gets an organ label by
a vote over its matches, and every match that agrees with the vote transfers the *whole*
organ label map of its training image, shifted by the match's translation. The shifted
maps are summed with weights (vote certainty × match probability × local intensity
likelihood) and each voxel takes the label of highest normalised weight, or background
below 15%. By default an organ is also carried, with a tenth of the weight, by the
keypoints of the organs it touches (the paper's "spleen across"), which keeps small organs
on a limited field of view. Matching, voting and the transfer accumulation run in Rust
(``keyfuse._core``).

Intensities (MRI) are normalised per image before the intensity likelihood is computed
(:func:`normalize_intensity`): each voxel is divided by the mean foreground intensity
within about 20 mm around it and multiplied by 1000, which removes the scanner gain and
most of a smooth bias field, and behaves the same on a cropped field of view. ``nu`` is in
these units; the default 300 was chosen on the simulated cohort (T1 grey and white matter
differ by ~300 there; see docs/decisions.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError as _SkNotFittedError

from keyfuse import _core
from keyfuse.errors import InvalidArgumentError, InvalidImageError
from keyfuse.image import Image, load_image
from keyfuse.segment_files import (
    check_output_path,
    dseg_tsv_path,
    pair_atlas_files,
    write_image,
)
from keyfuse.segment_intensity import normalize_intensity
from keyfuse.segment_timing import Concurrent, StageClock

__all__ = [
    "KeypointTransferSegmenter",
    "NotFittedError",
    "Segmentation",
    "check_output_path",
    "dseg_tsv_path",
    "normalize_intensity",
    "pair_atlas_files",
]

if TYPE_CHECKING:
    from keyfuse.keypoints import KeypointSet

PathLike = str | os.PathLike[str]
DEFAULT_NU = 300.0
# The Hough translation mode per atlas is voted by at most about this many test keypoints
# (every k-th, k = ⌈n / 1000⌉; the re-matching still covers all of them): the unconstrained
# first matching is the costliest step of predict; 1000 instead of 2000 leaves the mean
# Dice unchanged and 500 costs 0.006 on crops (see docs/decisions.md).
HOUGH_QUERIES = 1000
# transfer_from="auto": an organ is also carried by the keypoints of labels that make up at
# least this share of its boundary in the training maps
AUTO_CONTACT_SHARE = 0.05


def _contact_shares(label_maps: Sequence[npt.NDArray[np.int32]]) -> dict[int, dict[int, float]]:
    """For each label, the share of its boundary (face-adjacent voxel pairs with another
    value, summed over the maps) that each other non-background label makes up."""
    pairs: dict[tuple[int, int], int] = {}
    for labels in label_maps:
        base = int(labels.max()) + 1 if labels.size else 1
        for axis in range(labels.ndim):
            a = np.moveaxis(labels, axis, 0)
            x, y = a[:-1].ravel(), a[1:].ravel()
            diff = x != y
            if not diff.any():
                continue
            u, v = x[diff].astype(np.int64), y[diff].astype(np.int64)
            keys, counts = np.unique(
                np.concatenate([u * base + v, v * base + u]), return_counts=True
            )
            for key, c in zip(keys.tolist(), counts.tolist(), strict=True):
                pair = (key // base, key % base)
                pairs[pair] = pairs.get(pair, 0) + c
    totals: dict[int, int] = {}
    for (u, _), c in pairs.items():
        totals[u] = totals.get(u, 0) + c
    out: dict[int, dict[int, float]] = {}
    for (u, v), c in sorted(pairs.items()):
        if u > 0 and v > 0:
            out.setdefault(u, {})[v] = c / totals[u]
    return out


@dataclass(repr=False)
class Segmentation:
    """The result of :meth:`KeypointTransferSegmenter.predict`.

    Attributes
    ----------
    labels : (I, J, K) int32
        Label per voxel on the input image's grid (0 = background).
    probabilities : dict[int, (I, J, K) float32]
        Per voxel, a posterior over the labels: each label's transferred weight q_l
        (its weight at the voxel divided by the total weight transferred for that
        label) divided by max(1, Σ_l q_l), so the labels sum to at most 1 and the rest
        is background. ``labels`` is the arg-max, or background where the best q_l is
        below ``background_fraction``.
    affine : (4, 4) float64
        The input image's voxel-to-world matrix (copied).
    keypoints : KeypointSet
        The test image's keypoints.
    keypoint_labels : (N,) int32
        The label voted for each test keypoint (0 = no reliable match).
    keypoint_certainty : (N,) float32
        The vote certainty p(L̂) of each test keypoint.
    n_matches, n_transfers : int
        Matches over all training images, and agreeing matches that transferred a map.
    timings : dict[str, float]
        Wall seconds spent in extraction, intensity normalisation, matching, voting and
        transfer. The normalisation runs on a worker thread alongside extraction and
        matching, so the stages overlap; ``wait`` is the time predict then waited for it.
    cpu_timings : dict[str, float]
        CPU seconds of the same stages (all threads of the process; the normalisation's
        thread counted in ``normalise`` only).
    """

    labels: npt.NDArray[np.int32]
    probabilities: dict[int, npt.NDArray[np.float32]]
    affine: npt.NDArray[np.float64]
    keypoints: KeypointSet
    keypoint_labels: npt.NDArray[np.int32]
    keypoint_certainty: npt.NDArray[np.float32]
    n_matches: int = 0
    n_transfers: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    label_names: dict[int, str] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        shape = "×".join(map(str, self.labels.shape))
        return (
            f"Segmentation({shape} voxels, labels {sorted(self.probabilities)}, "
            f"{len(self.keypoints)} keypoints, {self.n_transfers} transfers)"
        )

    def to_nifti(self) -> Any:
        """The label map as a ``nibabel.Nifti1Image`` (int16 when the labels fit)."""
        import nibabel as nib

        data = self.labels
        if data.size == 0 or (data.min() >= -32768 and data.max() <= 32767):
            data = data.astype(np.int16)
        return nib.Nifti1Image(data, self.affine)

    def probabilities_nifti(self) -> Any:
        """The per-label probability maps as one 4D ``nibabel.Nifti1Image`` (labels in
        ascending order along the last axis)."""
        import nibabel as nib

        keys = sorted(self.probabilities)
        stack = np.stack([self.probabilities[k] for k in keys], axis=-1)
        img = nib.Nifti1Image(stack.astype(np.float32), self.affine)
        img.header["descrip"] = ("labels " + " ".join(map(str, keys)))[:79].encode()
        return img

    def save(self, path: PathLike, probabilities: PathLike | None = None) -> None:
        """Write the label map (NIfTI, or MGH for ``.mgz``/``.mgh``), its label names as
        a BIDS look-up table beside it (``x.nii.gz`` → ``x.tsv``: ``index``, ``name``;
        names from ``label_names``, else ``label-<value>``), and optionally the
        probability maps (4D). Both paths are checked before anything is written."""
        from keyfuse._io import atomic_path

        target = check_output_path(path, "label map")
        if probabilities is not None:
            check_output_path(probabilities, "probability map")
        write_image(self.to_nifti(), target)
        with atomic_path(dseg_tsv_path(target)) as tmp:
            rows = ["index\tname", "0\tbackground"]
            rows += [
                f"{k}\t{self.label_names.get(k, f'label-{k}')}" for k in sorted(self.probabilities)
            ]
            tmp.write_text("\n".join(rows) + "\n")
        if probabilities is not None:
            write_image(self.probabilities_nifti(), Path(probabilities))


@dataclass
class _Atlas:
    affine: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int32]
    intensity: npt.NDArray[np.float32]
    keypoints: KeypointSet
    keypoint_labels: npt.NDArray[np.int32]


def _linear_key(affine: npt.NDArray[np.float64]) -> bytes:
    return np.round(affine[:3, :3], 6).tobytes()


def _resample_to_linear(
    atlas: _Atlas, linear: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """The atlas on a grid whose voxel axes are ``linear`` (the test image's), covering
    the atlas' whole extent; returns (labels, intensity, origin)."""
    if np.allclose(atlas.affine[:3, :3], linear, rtol=1e-6, atol=1e-6):
        return atlas.labels, atlas.intensity, atlas.affine[:3, 3].copy()
    from scipy import ndimage

    shape = np.array(atlas.labels.shape)
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in shape], indexing="ij")).reshape(3, -1)
    world = atlas.affine[:3, :3] @ corners + atlas.affine[:3, 3:4]
    inv = np.linalg.inv(linear)
    grid = inv @ world
    lo = np.floor(grid.min(axis=1))
    hi = np.ceil(grid.max(axis=1))
    new_shape = tuple(int(v) for v in hi - lo + 1)
    if int(np.prod(new_shape)) > 4 * 10**8:
        raise InvalidArgumentError(
            "training and test voxel sizes differ too much to resample the training maps"
        )
    origin = linear @ lo
    new_affine = np.eye(4)
    new_affine[:3, :3] = linear
    new_affine[:3, 3] = origin
    to_atlas = np.linalg.inv(atlas.affine) @ new_affine
    labels = ndimage.affine_transform(
        atlas.labels, to_atlas[:3, :3], to_atlas[:3, 3], new_shape, order=0, cval=0
    )
    intensity = ndimage.affine_transform(
        atlas.intensity, to_atlas[:3, :3], to_atlas[:3, 3], new_shape, order=1, cval=0.0
    )
    return labels.astype(np.int32), intensity.astype(np.float32), origin


def _as_label_array(source: Any, name: str) -> tuple[npt.NDArray[np.int32], Image]:
    img = load_image(source)
    data = np.asarray(img.data)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
            raise InvalidArgumentError(f"{name} must hold integer labels")
    if data.size and (data.min() < 0 or data.max() > np.iinfo(np.int32).max):
        raise InvalidArgumentError(f"{name} must hold labels in 0..2^31-1 (0 = background)")
    return data.astype(np.int32), img


class NotFittedError(InvalidArgumentError, _SkNotFittedError):
    """An estimator was used before :meth:`fit` (also scikit-learn's ``NotFittedError``)."""


class KeypointTransferSegmenter(BaseEstimator):  # type: ignore[misc]
    """Segment images by transferring whole organ label maps along keypoint matches.

    Parameters
    ----------
    ratio : float, default 0.9
        Lowe's distance-ratio test for the keypoint matches.
    scale_factor : float, default 2.0
        Matched keypoints' scales may differ by at most this factor.
    nu : float or mapping label → float or None, default 300.0
        Standard deviation of the intensity likelihood N(I(x) − I_m(x); ν²), in normalised
        intensity units (local foreground mean = 1000, see :func:`normalize_intensity`); a
        mapping sets it per label (labels it omits use 300). ``None`` or ``inf`` turns the
        intensity term off.
    background_fraction : float, default 0.15
        A voxel is background when its best label's probability is below this.
    background_rule : {"per_label", "max_vote"}, default "per_label"
        The probability compared with ``background_fraction``: ``"per_label"``, the share
        of the label's transferred weight covering the voxel; ``"max_vote"`` (Wachinger et
        al.), the voxel's summed weight over the largest sum anywhere (see
        docs/decisions.md for both on the segmentation benchmark).
    transfer_from : "auto", mapping label → sequence of labels, or None; default "auto"
        Which keypoint labels transfer each organ besides its own keypoints (the paper's
        "spleen across", transferred from liver and lung keypoints too). ``"auto"``: the
        labels that make up at least 5% of the organ's boundary in the training maps
        (face-adjacent voxels, pooled over the atlases); a mapping such as
        ``{5: [3, 4]}`` names them; ``None`` transfers every organ by its own keypoints
        only. Why: a small organ has few keypoints and a limited field of view often
        loses them, while the neighbouring organs' keypoints still carry it along with the
        right shift (see docs/decisions.md).
    across_weight : float, default 0.1
        Factor on the weight of a transfer of an organ by another organ's keypoint. With
        the ``min_weight`` rule these weaker transfers are dropped wherever the organ's
        own keypoints transfer it well, so they only fill in for missing own evidence
        (see docs/decisions.md).
    min_weight : float, default 0.2
        Transfers whose weight p(L̂)·p(m) is below this fraction of the largest weight
        transferred for the same label are skipped (0 keeps all). The weights are very
        skewed (p(m) is a density over translations), so few transfers carry most of the
        weight (see docs/decisions.md).
    hough : bool, default True
        Hough translation mode per training image and spatially constrained re-matching
        (keeps the 10% closest) before p(m) is estimated.
    normalize : bool, default True
        Normalise intensities with :func:`normalize_intensity` (turn off when images are
        already on a common scale, e.g. CT in HU, and give ``nu`` in those units).
    device : str, default "auto"
        Backend for extraction and matching (``"auto" | "cpu" | "cuda"``).
    extract_params : mapping, optional
        Extra keyword arguments for :func:`keyfuse.extract`. Unless given here, on scans
        coarser than 1 mm ``sigma0`` and ``initial_blur`` are scaled by 1 mm / voxel size
        (the scales of a 1 mm scan; the extractor's defaults find few keypoints at 2 mm).
    progress : bool, default True
        Show tqdm progress bars.

    Examples
    --------
    >>> seg = kf.KeypointTransferSegmenter().fit(images, label_maps)  # doctest: +SKIP
    >>> out = seg.predict(new_image)  # doctest: +SKIP
    >>> out.to_nifti().to_filename("labels.nii.gz")  # doctest: +SKIP
    """

    def __init__(
        self,
        ratio: float = 0.9,
        scale_factor: float = 2.0,
        nu: float | Mapping[int, float] | None = DEFAULT_NU,
        background_fraction: float = 0.15,
        background_rule: Literal["per_label", "max_vote"] = "per_label",
        transfer_from: Mapping[int, Sequence[int]] | str | None = "auto",
        across_weight: float = 0.1,
        min_weight: float = 0.2,
        hough: bool = True,
        normalize: bool = True,
        device: str = "auto",
        extract_params: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise InvalidArgumentError(f"ratio must be in (0, 1], got {ratio}")
        if not scale_factor >= 1.0:
            raise InvalidArgumentError(f"scale_factor must be ≥ 1, got {scale_factor}")
        if not 0.0 <= background_fraction <= 1.0:
            raise InvalidArgumentError(
                f"background_fraction must be in [0, 1], got {background_fraction}"
            )
        if not 0.0 <= min_weight <= 1.0:
            raise InvalidArgumentError(f"min_weight must be in [0, 1], got {min_weight}")
        nus = nu.values() if isinstance(nu, Mapping) else [nu]
        for v in nus:
            if v is not None and not (float(v) > 0.0):
                raise InvalidArgumentError(f"nu must be positive (or None), got {v}")
        self.ratio = ratio
        self.scale_factor = scale_factor
        self.nu = nu
        if background_rule not in ("per_label", "max_vote"):
            raise InvalidArgumentError(
                f"background_rule must be 'per_label' or 'max_vote', not {background_rule!r}"
            )
        self.background_fraction = background_fraction
        self.background_rule = background_rule
        if isinstance(transfer_from, str) and transfer_from != "auto":
            raise InvalidArgumentError(
                f"transfer_from must be 'auto', None or a mapping, got {transfer_from!r}"
            )
        if not 0.0 <= across_weight <= 1.0:
            raise InvalidArgumentError(f"across_weight must be in [0, 1], got {across_weight}")
        self.transfer_from = transfer_from
        self.across_weight = across_weight
        self.min_weight = min_weight
        self.hough = hough
        self.normalize = normalize
        self.device = device
        self.extract_params = extract_params  # as given: sklearn's clone() checks identity
        self.progress = progress
        self._atlases: list[_Atlas] = []
        self._labels: list[int] = []
        self._cache: dict[bytes, tuple[_core.TransferAtlases, list[npt.NDArray[np.float64]]]] = {}
        self._kp_atlases: _core.AtlasKeypoints | None = None
        self._contact: dict[int, dict[int, float]] = {}
        self._label_names: dict[int, str] = {}

    # ------------------------------------------------------------------ fitting
    @property
    def labels_(self) -> list[int]:
        """The non-background labels seen in the training label maps, ascending."""
        self._check_fitted()
        return list(self._labels)

    @property
    def n_atlases_(self) -> int:
        return len(self._atlases)

    def _check_fitted(self) -> None:
        if not self._atlases:
            raise NotFittedError(
                "this KeypointTransferSegmenter is not fitted yet: call fit(images, "
                "label_maps) first"
            )

    def __sklearn_is_fitted__(self) -> bool:
        return bool(self._atlases)

    def extract_keypoints(self, image: Any) -> KeypointSet:
        """The keypoints this segmenter uses for ``image`` (what :meth:`fit` and
        :meth:`predict` extract when not given keypoints)."""
        import keyfuse as kf

        img = load_image(image)

        params = dict(self.extract_params or {})
        # Keypoint transfer needs many keypoints: on coarse scans extract at the physical
        # scales of a 1 mm scan (the extractor's σ0 and pre-blur are in voxels), which
        # gives thousands of rows on a 2 mm brain instead of a few dozen.
        finest = float(np.min(img.spacing))
        if finest > 1.0:
            from keyfuse.extraction import default_params

            defaults = default_params()
            for name in ("sigma0", "initial_blur"):
                if name in defaults:
                    params.setdefault(name, float(defaults[name]) / finest)
        return kf.extract(img, device=self.device, **params)

    def fit(
        self,
        images: Sequence[Any],
        label_maps: Sequence[Any],
        keypoints: Sequence[KeypointSet] | None = None,
        label_names: Mapping[int, str] | None = None,
    ) -> KeypointTransferSegmenter:
        """Store the training images' keypoints (with the label at each location;
        background keypoints dropped), label maps and normalised intensities.

        Parameters
        ----------
        images, label_maps : sequences of paths, :class:`Image` or arrays
            One label map (integers, 0 = background) per image, on the image's grid.
        keypoints : sequence of KeypointSet, optional
            Precomputed keypoints of the images (extracted when omitted).
        label_names : mapping label → name, optional
            Names written to the BIDS look-up table beside a saved label map.
        """
        from tqdm.auto import tqdm

        if len(images) != len(label_maps):
            raise InvalidArgumentError(f"{len(images)} images but {len(label_maps)} label maps")
        if not images:
            raise InvalidArgumentError("fit() needs at least one training image")
        if keypoints is not None and len(keypoints) != len(images):
            raise InvalidArgumentError(f"{len(keypoints)} keypoint sets for {len(images)} images")
        atlases: list[_Atlas] = []
        bar = tqdm(
            range(len(images)), desc="training keypoints", unit="image", disable=not self.progress
        )
        for n in bar:
            img = load_image(images[n])
            if img.ndim != 3:
                raise InvalidImageError(f"training image {n} is not 3D (shape {img.shape})")
            labels, label_img = _as_label_array(label_maps[n], f"label map {n}")
            if labels.shape != img.shape:
                raise InvalidArgumentError(
                    f"label map {n} has shape {labels.shape}, its image {img.shape}"
                )
            if not np.allclose(label_img.affine, img.affine, atol=1e-3) and not np.allclose(
                label_img.affine, np.eye(4)
            ):
                raise InvalidArgumentError(f"label map {n} has a different affine than its image")
            intensity = (
                normalize_intensity(img.data, img.spacing)
                if self.normalize
                else np.asarray(img.data, dtype=np.float32)
            )
            kps = keypoints[n] if keypoints is not None else self.extract_keypoints(img)
            idx = np.rint(kps.ijk).astype(np.int64)
            idx = np.clip(idx, 0, np.array(labels.shape) - 1)
            kp_labels = labels[idx[:, 0], idx[:, 1], idx[:, 2]] if len(kps) else np.zeros(0)
            keep = kp_labels > 0
            atlases.append(
                _Atlas(
                    affine=img.affine.copy(),
                    labels=labels,
                    intensity=intensity,
                    keypoints=kps[np.flatnonzero(keep)],
                    keypoint_labels=kp_labels[keep].astype(np.int32),
                )
            )
        present = sorted({int(v) for a in atlases for v in np.unique(a.labels) if v > 0})
        if not present:
            raise InvalidArgumentError("the label maps contain no labels (all background)")
        self._atlases = atlases
        self._labels = present
        self._label_names = {int(k): str(v) for k, v in (label_names or {}).items()}
        self._cache = {}
        self._contact = _contact_shares([a.labels for a in atlases])
        # the training keypoints in the matcher's form, built once
        self._kp_atlases = _core.AtlasKeypoints(
            [np.ascontiguousarray(a.keypoints.descriptors, dtype=np.uint8) for a in atlases],
            [np.ascontiguousarray(a.keypoints.xyz, dtype=np.float64) for a in atlases],
            [np.ascontiguousarray(a.keypoints.scale, dtype=np.float64) for a in atlases],
            [np.ascontiguousarray(a.keypoint_labels, dtype=np.int32) for a in atlases],
        )
        # build the run-form atlases now for the training grid (the usual test grid)
        self._transfer_atlases(atlases[0].affine[:3, :3])
        return self

    def _transfer_atlases(
        self, linear: npt.NDArray[np.float64]
    ) -> tuple[_core.TransferAtlases, list[npt.NDArray[np.float64]]]:
        key = _linear_key(linear)
        if key not in self._cache:
            resampled = [_resample_to_linear(a, linear) for a in self._atlases]
            built = _core.TransferAtlases(
                [np.ascontiguousarray(r[0]) for r in resampled],
                [np.ascontiguousarray(r[1]) for r in resampled],
            )
            self._cache = {key: (built, [r[2] for r in resampled])}  # keep the latest grid
        return self._cache[key]

    def _nu_array(self, labels: Sequence[int]) -> npt.NDArray[np.float32]:
        def one(v: float | None) -> float:
            return float("inf") if v is None else float(v)

        if isinstance(self.nu, Mapping):
            return np.array([one(self.nu.get(lab, DEFAULT_NU)) for lab in labels], dtype=np.float32)
        return np.full(len(labels), one(self.nu), dtype=np.float32)

    def _organs_for(self) -> dict[int, list[int]]:
        """keypoint label → organs it transfers (its own first)."""
        organs: dict[int, list[int]] = {lab: [lab] for lab in self._labels}
        if self.across_weight <= 0.0:
            across = {}
        elif self.transfer_from == "auto":
            across = {
                organ: [src for src, share in shares.items() if share >= AUTO_CONTACT_SHARE]
                for organ, shares in self._contact.items()
            }
        elif isinstance(self.transfer_from, Mapping):
            across = {int(k): [int(v) for v in vs] for k, vs in self.transfer_from.items()}
        else:
            across = {}
        for organ, sources in across.items():
            if organ not in organs:
                raise InvalidArgumentError(f"transfer_from names label {organ} not in the maps")
            for src in sources:
                if src in organs and organ not in organs[src]:
                    organs[src].append(organ)
        return organs

    # --------------------------------------------------------------- prediction
    def predict(self, image: Any, keypoints: KeypointSet | None = None) -> Segmentation:
        """Segment ``image`` (path, :class:`Image` or array; any field of view).

        Parameters
        ----------
        image : path, Image or ndarray
            The 3D image to segment.
        keypoints : KeypointSet, optional
            Its precomputed keypoints (extracted when omitted).

        Returns
        -------
        Segmentation
            Labels and per-label probabilities on the input's grid, with its affine.
        """
        self._check_fitted()
        img = load_image(image)
        if img.ndim != 3:
            raise InvalidImageError(f"expected a 3D image, got shape {img.shape}")
        # the intensities are normalised on a worker thread while extraction and matching
        # run (both release the GIL); the transfer waits for them
        norm: Concurrent[npt.NDArray[np.float32]] | None = None
        if self.normalize:
            norm = Concurrent(lambda: normalize_intensity(img.data, img.spacing))
        clock = StageClock(norm)
        clock.start()
        kps = keypoints if keypoints is not None else self.extract_keypoints(img)
        clock.stop("extract")

        # 1. matches to every training image (Rust, atlases in parallel): ratio test, Hough
        # mode, spatially constrained re-matching, p(m) by KDE over translations
        clock.start()
        assert self._kp_atlases is not None
        n = len(kps)
        if n:
            q, atlas_idx, _, lab, d2, pm, translation = self._kp_atlases.match_all(
                np.ascontiguousarray(kps.descriptors, dtype=np.uint8),
                np.ascontiguousarray(kps.xyz, dtype=np.float64),
                np.ascontiguousarray(kps.scale, dtype=np.float64),
                ratio=float(self.ratio),
                scale_factor=float(self.scale_factor),
                hough=bool(self.hough),
                hough_queries=HOUGH_QUERIES,
            )
        else:
            q = np.zeros(0, np.uint32)
        clock.stop("match")
        # the worker's own seconds (it ran alongside extraction and matching)
        clock.start()
        intensity = norm.result() if norm is not None else np.asarray(img.data, dtype=np.float32)
        clock.stop("wait")
        if norm is not None:
            clock.wall["normalise"], clock.cpu["normalise"] = norm.wall, norm.cpu
        else:
            clock.wall["normalise"] = clock.cpu["normalise"] = 0.0

        labels_out = np.zeros(img.shape, dtype=np.int32)
        if q.size == 0:
            return Segmentation(
                labels=labels_out,
                probabilities={lab: np.zeros(img.shape, np.float32) for lab in self._labels},
                affine=img.affine.copy(),
                keypoints=kps,
                keypoint_labels=np.zeros(n, np.int32),
                keypoint_certainty=np.zeros(n, np.float32),
                timings=clock.wall,
                cpu_timings=clock.cpu,
                label_names=dict(self._label_names),
            )
        pm32 = np.where(np.isfinite(pm) & (pm > 0), pm, 0.0).astype(np.float32)

        # 2. keypoint label voting (Rust)
        clock.start()
        kp_labels, certainty = _core.vote_labels(n_query=n, query=q, label=lab, dist2=d2, pm=pm32)
        clock.stop("vote")

        # 3. transfer of whole organ maps along the agreeing matches (Rust)
        clock.start()
        voted = kp_labels[q]
        agree = (voted > 0) & (lab == voted)
        linear = img.affine[:3, :3]
        built, origins = self._transfer_atlases(linear)
        inv = np.linalg.inv(linear)
        origin_arr = np.stack(origins)
        # atlas voxel v lands on test voxel v + L⁻¹(o_atlas + t − o_test)
        shift_f = (origin_arr[atlas_idx[agree]] + translation[agree] - img.affine[:3, 3]) @ inv.T
        shift = np.rint(shift_f).astype(np.int64)
        if shift.size and np.abs(shift).max() > 2**30:
            raise InvalidArgumentError("match translations are out of range")
        weight = certainty[q[agree]].astype(np.float64) * pm32[agree]
        organs_for = self._organs_for()
        t_atlas, t_label, t_shift, t_weight = [], [], [], []
        voted_agree = voted[agree]
        for src in np.unique(voted_agree):
            sel = voted_agree == src
            for organ in organs_for.get(int(src), [int(src)]):
                t_atlas.append(atlas_idx[agree][sel])
                t_label.append(np.full(int(sel.sum()), organ, dtype=np.int32))
                t_shift.append(shift[sel])
                # an organ carried by another organ's keypoint: weaker evidence
                t_weight.append(weight[sel] * (1.0 if organ == src else self.across_weight))
        if t_atlas:
            ta = np.concatenate(t_atlas).astype(np.uint32)
            tl = np.concatenate(t_label)
            ts = np.concatenate(t_shift).astype(np.int32)
            tw = np.concatenate(t_weight)
            if self.min_weight > 0.0:
                # skip transfers far weaker than the label's strongest one
                values, inverse = np.unique(tl, return_inverse=True)
                top = np.zeros(len(values))
                np.maximum.at(top, inverse, tw)
                keep = tw >= self.min_weight * top[inverse]
                ta, tl, ts, tw = ta[keep], tl[keep], ts[keep], tw[keep]
        else:
            ta = np.zeros(0, np.uint32)
            tl = np.zeros(0, np.int32)
            ts = np.zeros((0, 3), np.int32)
            tw = np.zeros(0, np.float64)
        label_values = list(built.labels)
        seg_labels, probs, _, _ = built.transfer(
            np.ascontiguousarray(intensity, dtype=np.float32),
            ta,
            tl,
            np.ascontiguousarray(ts),
            tw,
            self._nu_array(label_values),
            float(self.background_fraction),
            max_vote=self.background_rule == "max_vote",
            # a posterior per voxel: the labels' shares divided by max(1, their sum), so
            # they sum to at most 1 (background the rest)
            posterior=True,
        )
        clock.stop("transfer")
        stack = np.asarray(probs, dtype=np.float32)
        return Segmentation(
            labels=seg_labels,
            probabilities={int(v): stack[k] for k, v in enumerate(label_values)},
            affine=img.affine.copy(),
            keypoints=kps,
            keypoint_labels=kp_labels,
            keypoint_certainty=certainty,
            n_matches=int(q.size),
            n_transfers=int(ta.size),
            timings=clock.wall,
            cpu_timings=clock.cpu,
            label_names=dict(self._label_names),
        )
