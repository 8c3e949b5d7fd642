"""The same anatomy stored another way: an oblique grid (resampled), for tests and
benchmarks of storage-orientation invariance."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError
from keyfuse.image import Image, load_image

__all__ = ["oblique"]


def oblique(
    image: Any,
    rotation: npt.ArrayLike,
    *,
    mirror: bool = False,
    shift: float | npt.ArrayLike = 0.0,
    order: int = 3,
) -> Image:
    """``image`` resampled onto a grid rotated about the volume centre.

    The new grid has the same shape and voxel size; its voxel axes are the old ones
    rotated by ``rotation`` in world space (optionally the first axis reversed, a
    mirrored storage), and it is shifted by ``shift`` voxels along its own axes. Voxels
    outside the old field of view are 0. World coordinates of the anatomy are unchanged,
    so keypoints extracted from both should agree in world space up to resampling.

    Parameters
    ----------
    image : path, Image or array
        A 3D image.
    rotation : (3, 3) array
        A rotation matrix (world frame), e.g. from ``scipy.spatial.transform.Rotation``.
    mirror : bool, default False
        Store the first voxel axis reversed (an affine with the opposite determinant).
    shift : float or 3 floats, default 0.0
        Offset of the new grid, in voxels along its axes.
    order : int, default 3
        Spline order of the resampling (``scipy.ndimage.affine_transform``).

    Returns
    -------
    Image
        float32 voxels on the new grid, with its affine.
    """
    from scipy import ndimage

    img = load_image(image)
    if img.ndim != 3:
        raise InvalidArgumentError(f"oblique needs a 3D image, got shape {img.shape}")
    rot = np.asarray(rotation, dtype=np.float64)
    if rot.shape != (3, 3) or not np.allclose(rot @ rot.T, np.eye(3), atol=1e-6):
        raise InvalidArgumentError("rotation must be a 3×3 rotation matrix")
    centre_vox = (np.asarray(img.shape, dtype=np.float64) - 1) / 2
    centre = img.affine[:3, :3] @ centre_vox + img.affine[:3, 3]
    new = np.eye(4)
    new[:3, :3] = rot @ img.affine[:3, :3]
    if mirror:
        new[:3, 0] *= -1
    new[:3, 3] = centre - new[:3, :3] @ (centre_vox + np.asarray(shift, dtype=np.float64))
    to_old = np.linalg.inv(img.affine) @ new
    data = ndimage.affine_transform(
        np.asarray(img.data, np.float32),
        to_old[:3, :3],
        to_old[:3, 3],
        order=order,
        mode="constant",
        cval=0.0,
    )
    return Image(data.astype(np.float32), new)
