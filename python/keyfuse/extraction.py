"""Keypoint extraction: ``kf.extract`` over the Rust 3D SIFT-Rank extractor."""

from __future__ import annotations

from typing import Any

import numpy as np

from keyfuse import _core
from keyfuse.device import resolve_device
from keyfuse.errors import InvalidArgumentError, InvalidImageError
from keyfuse.image import Image, load_image
from keyfuse.keypoints import KeypointSet


def default_params() -> dict[str, Any]:
    """Every extraction parameter with its default value (see :func:`extract`)."""
    return dict(_core.default_extract_params())


def extract(image: Any, device: str = "auto", **params: Any) -> KeypointSet:
    """Extract 3D SIFT-Rank keypoints (or 2D SIFT-Rank for a 2D image).

    Parameters
    ----------
    image:
        A path to a NIfTI file, an :class:`~keyfuse.Image`, a nibabel image or an ndarray
        (identity affine). 3D images give 3D keypoints; 2D images give 2D SIFT-Rank
        keypoints (k = 0). Anisotropic voxels are handled (the extractor works on an
        isotropic grid); coordinates come back in the original voxel grid and in mm.
    device:
        ``"auto"`` (GPU when one is usable, else CPU), ``"cpu"`` or ``"cuda"``.
    **params:
        Extraction parameters; :func:`default_params` lists them with their defaults
        (e.g. ``sigma0=1.6``, ``scales_per_octave=3``, ``initial_blur=0.5``).

    Returns
    -------
    KeypointSet
        One row per oriented feature; empty for a featureless (e.g. constant) image.

    Raises
    ------
    InvalidImageError
        4D/1D data, non-real dtypes, NaN/Inf voxels, or an image too large to process.
    InvalidArgumentError
        An unknown parameter name or an out-of-range value.
    """
    img = load_image(image)
    data = _as_float32(img)
    resolve_device(device)  # checked; extraction runs on the CPU
    spacing = img.spacing
    if img.ndim == 3:
        sp3 = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        fields = _core.extract3d(data, sp3, **params)
    else:
        fields = _core.extract2d(data, (float(spacing[0]), float(spacing[1])), **params)
    return KeypointSet._from_core(fields, img.affine, img.shape)


def extract_slice(
    image: Any, axis: int = 2, index: int | None = None, device: str = "auto", **params: Any
) -> KeypointSet:
    """2D SIFT-Rank keypoints of one slice of a 3D image, in the volume's frame.

    ``index`` defaults to the middle slice (the fusion paper's mid-axial slice for
    ``axis=2``). The returned ``ijk``/``xyz`` are 3D coordinates in the volume.
    """
    img = load_image(image)
    if img.ndim != 3:
        raise InvalidImageError(f"extract_slice needs a 3D image, got {img.ndim}D")
    if axis not in (0, 1, 2):
        raise InvalidArgumentError(f"axis must be 0, 1 or 2, not {axis}")
    n = img.shape[axis]
    index = n // 2 if index is None else int(index)
    if not 0 <= index < n:
        raise InvalidArgumentError(f"slice index {index} outside 0..{n - 1}")
    in_plane = [a for a in range(3) if a != axis]
    # the slice's own 2D grid: the volume's columns for the in-plane axes, then the slice axis
    plane_affine = np.eye(4)
    plane_affine[:3, 0] = img.affine[:3, in_plane[0]]
    plane_affine[:3, 1] = img.affine[:3, in_plane[1]]
    plane_affine[:3, 2] = img.affine[:3, axis]
    plane_affine[:3, 3] = img.affine[:3, 3] + index * img.affine[:3, axis]
    plane = Image(np.take(img.data, index, axis=axis), plane_affine)
    flat = extract(plane, device=device, **params)
    ijk = np.zeros_like(flat.ijk)
    ijk[:, in_plane[0]] = flat.ijk[:, 0]
    ijk[:, in_plane[1]] = flat.ijk[:, 1]
    ijk[:, axis] = index
    return KeypointSet(
        ijk,
        flat.scale,
        flat.orientation,
        flat.descriptors,
        flat.polarity,
        flat.response,
        flat.eigenvalues,
        affine=img.affine,
        shape=img.shape,
    )


def _as_float32(img: Image) -> np.ndarray:
    """The voxel array as C-contiguous float32, refusing non-finite voxels.

    (``Image`` has already refused non-real dtypes, and every integer dtype fits float32's
    range, so only floats can hold NaN/Inf.)
    """
    out = np.ascontiguousarray(img.data, dtype=np.float32)
    if img.data.dtype.kind == "f" and not np.isfinite(out).all():
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise InvalidImageError(
            f"image contains {bad} non-finite (NaN/Inf) voxels; "
            "replace them first, e.g. np.nan_to_num(data)"
        )
    return out
