"""Images in atlas space: resampling through an image → atlas similarity transform, and
the check that such a transform is plausible.

The CNN features (:mod:`keyfuse.cnn`) read slices of the image resampled onto the atlas
grid (T∘I in the fusion paper, Fig. 1); the fusion experiment and the reports use the
same resampling and check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse._align import similarity_scale
from keyfuse.errors import InvalidArgumentError, InvalidImageError
from keyfuse.image import Image, load_image

__all__ = [
    "atlas_ncc",
    "axial_axis",
    "check_alignment",
    "resample_planes",
    "resample_to_atlas",
]


def _as_matrix(transform: Any) -> npt.NDArray[np.float64]:
    mat = getattr(transform, "matrix", transform)
    arr = np.asarray(mat, dtype=np.float64)
    if arr.shape != (4, 4) or not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(
            f"transform must be a finite 4×4 matrix (or have .matrix), got shape {arr.shape}"
        )
    if abs(np.linalg.det(arr[:3, :3])) < 1e-12:
        raise InvalidArgumentError("transform is singular")
    return arr


def resample_to_atlas(image: Any, transform: Any, atlas: Image, *, order: int = 1) -> Image:
    """T∘I on the atlas grid: the image resampled where the atlas voxels are.

    Parameters
    ----------
    image:
        A 3-D image (path, :class:`~keyfuse.Image`, ...).
    transform:
        4×4 matrix (or an object with ``.matrix``, e.g. ``kf.align(image_kps,
        atlas_kps)``) mapping the image's world mm onto the atlas's world mm.
    atlas:
        The reference grid (shape and affine), e.g. ``kf.datasets.mni152()``.
    order:
        Spline order of the interpolation (default 1, trilinear).
    """
    from scipy import ndimage

    img = load_image(image)
    if img.ndim != 3 or atlas.ndim != 3:
        raise InvalidImageError("resampling to an atlas needs a 3-D image and a 3-D atlas")
    t = _as_matrix(transform)
    # atlas voxel -> atlas world -> image world (T⁻¹) -> image voxel
    m = np.linalg.inv(img.affine) @ np.linalg.inv(t) @ atlas.affine
    data = np.asarray(img.data, dtype=np.float32)
    out = ndimage.affine_transform(
        data, m[:3, :3], offset=m[:3, 3], output_shape=atlas.shape, order=order, cval=0.0
    )
    return Image(out, atlas.affine)


def resample_planes(
    image: Any,
    transform: Any,
    atlas: Image,
    axis: int,
    indices: Sequence[int],
    *,
    order: int = 1,
) -> list[npt.NDArray[np.float32]]:
    """Planes ``indices`` across ``axis`` of :func:`resample_to_atlas`'s result, computed
    directly (same values, without resampling the whole volume).

    Parameters
    ----------
    image, transform, atlas, order:
        As in :func:`resample_to_atlas`.
    axis:
        The atlas voxel axis the planes cut across (0, 1 or 2).
    indices:
        Plane indices along ``axis`` on the atlas grid.
    """
    from scipy import ndimage

    img = load_image(image)
    if img.ndim != 3 or atlas.ndim != 3:
        raise InvalidImageError("resampling to an atlas needs a 3-D image and a 3-D atlas")
    if axis not in (0, 1, 2):
        raise InvalidArgumentError(f"axis must be 0, 1 or 2, got {axis}")
    m = np.linalg.inv(img.affine) @ np.linalg.inv(_as_matrix(transform)) @ atlas.affine
    keep = [a for a in range(3) if a != axis]
    shape2 = (atlas.shape[keep[0]], atlas.shape[keep[1]])
    uu, vv = np.meshgrid(np.arange(shape2[0]), np.arange(shape2[1]), indexing="ij")
    data = np.asarray(img.data, dtype=np.float32)
    out = []
    for idx in indices:
        if not 0 <= int(idx) < atlas.shape[axis]:
            raise InvalidArgumentError(f"plane {idx} outside 0..{atlas.shape[axis] - 1}")
        vox = np.zeros((3, uu.size))
        vox[keep[0]] = uu.ravel()
        vox[keep[1]] = vv.ravel()
        vox[axis] = int(idx)
        coords = m[:3, :3] @ vox + m[:3, 3:4]
        plane = ndimage.map_coordinates(data, coords, order=order, cval=0.0)
        out.append(plane.reshape(shape2).astype(np.float32))
    return out


def axial_axis(affine: npt.NDArray[np.float64]) -> int:
    """The voxel axis closest to world z (superior): axial slices are across it.

    Parameters
    ----------
    affine : (4, 4) array
        Voxel-to-world (RAS+, mm) transform.

    Returns
    -------
    int
        0, 1 or 2.
    """
    cols = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return int(np.argmax(np.abs(cols[2])))


def atlas_ncc(image: Any, transform: Any, atlas: Image) -> float:
    """Normalised correlation between the atlas and the image resampled through
    ``transform`` on the atlas's three central orthogonal planes."""
    a_parts, b_parts = [], []
    for axis in range(3):
        mid = (atlas.shape[axis] - 1) // 2
        (plane,) = resample_planes(image, transform, atlas, axis, [mid])
        a_parts.append(np.take(np.asarray(atlas.data, np.float64), mid, axis=axis).ravel())
        b_parts.append(plane.astype(np.float64).ravel())
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def check_alignment(image: Any, transform: Any, atlas: Image) -> str | None:
    """Why an image → atlas similarity looks wrong, or None when it passes: its scale
    must lie in [0.75, 1.33], and the image resampled through it must correlate with
    the atlas (three central planes) at least as well (within 0.01) as the image left
    where it is."""
    mat = _as_matrix(transform)
    scale = similarity_scale(mat)
    if not 0.75 <= scale <= 1.33:
        return f"scale {scale:.2f} outside [0.75, 1.33]"
    after, before = atlas_ncc(image, mat, atlas), atlas_ncc(image, np.eye(4), atlas)
    if not after >= before - 0.01:  # a scan already in place may tie
        return f"correlation with the atlas {after:.3f} after alignment, {before:.3f} before"
    return None
