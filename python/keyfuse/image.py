"""Images: a voxel array with its voxel-to-world (RAS mm) affine, and loading from NIfTI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import CorruptDataError, InvalidImageError, KeyfuseIOError

PathLike = str | os.PathLike[str]


def voxel_sizes(affine: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Voxel sizes in mm along each array axis: the column norms of the affine's 3×3 part."""
    mat = np.asarray(affine, dtype=np.float64)
    return np.sqrt((mat[:3, :3] ** 2).sum(axis=0))


class Image:
    """A 2D or 3D image and its 4×4 voxel-to-world affine (RAS millimetres).

    Parameters
    ----------
    data:
        The voxel array, indexed ``[i, j, k]`` (or ``[i, j]`` for a 2D image). Trailing
        singleton dimensions beyond the third (as in ``(X, Y, Z, 1)``) are dropped; real
        4D data raises :class:`~keyfuse.InvalidImageError`.
    affine:
        4×4 matrix mapping voxel indices to world millimetres. Defaults to the identity
        (1 mm isotropic voxels). For a 2D image the third column still describes the
        slice axis.
    """

    __slots__ = ("affine", "data")

    def __init__(self, data: npt.ArrayLike, affine: npt.ArrayLike | None = None) -> None:
        arr = np.asanyarray(data)
        while arr.ndim > 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3):
            raise InvalidImageError(
                f"expected a 2D or 3D image, got {arr.ndim}D data of shape {arr.shape}"
                + (" (4D series: pass one volume, e.g. data[..., 0])" if arr.ndim == 4 else "")
            )
        if arr.dtype.kind not in "biuf":
            raise InvalidImageError(f"image data must be real numbers, not dtype {arr.dtype}")
        if min(arr.shape) == 0:
            raise InvalidImageError(f"image is empty (shape {arr.shape})")
        mat = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if mat.shape != (4, 4):
            raise InvalidImageError(f"affine must be 4×4, got shape {mat.shape}")
        if not np.all(np.isfinite(mat)) or abs(np.linalg.det(mat[:3, :3])) < 1e-12:
            raise InvalidImageError("affine must be finite and invertible")
        self.data = arr
        self.affine = mat

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def ndim(self) -> int:
        return int(self.data.ndim)

    @property
    def spacing(self) -> npt.NDArray[np.float64]:
        """Voxel sizes in mm along each array axis (length 3, also for 2D images)."""
        return voxel_sizes(self.affine)

    def to_nifti(self) -> Any:
        """This image as a ``nibabel.Nifti1Image``."""
        import nibabel as nib

        return nib.Nifti1Image(np.asarray(self.data), self.affine)

    def save(self, path: PathLike) -> None:
        """Write a NIfTI file (.nii or .nii.gz) atomically."""
        from keyfuse._io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            self.to_nifti().to_filename(str(tmp))

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:g}" for s in self.spacing[: self.ndim])
        return f"Image(shape={self.shape}, spacing=({spacing}) mm, dtype={self.data.dtype})"


def load_image(source: Any, affine: npt.ArrayLike | None = None) -> Image:
    """Load an image from a NIfTI path, a nibabel image, an :class:`Image` or an ndarray.

    Parameters
    ----------
    source:
        ``.nii``/``.nii.gz`` path, nibabel image, :class:`Image`, or array.
    affine:
        Voxel-to-world matrix for an array source (identity when omitted); ignored for
        files and images, which carry their own.

    Raises
    ------
    KeyfuseIOError
        The file does not exist or cannot be read.
    CorruptDataError
        The file exists but is not a readable image.
    InvalidImageError
        The data is not a 2D/3D real-valued image.
    """
    if isinstance(source, Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    if hasattr(source, "dataobj") and hasattr(source, "affine"):  # a nibabel image
        return Image(np.asanyarray(source.dataobj), source.affine)
    if isinstance(source, np.ndarray) or isinstance(source, (list, tuple)):
        return Image(np.asarray(source), affine)
    raise InvalidImageError(
        f"cannot make an image from {type(source).__name__}: pass a path, an Image, "
        "a nibabel image or an ndarray"
    )


def _load_path(path: Path) -> Image:
    import nibabel as nib

    if not path.exists():
        raise KeyfuseIOError(f"image file not found: {path}")
    if path.is_dir():
        raise KeyfuseIOError(f"expected an image file, got a directory: {path}")
    try:
        img: Any = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = img.affine
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CorruptDataError(f"cannot read image {path}: {exc}") from exc
    if affine is None:
        affine = np.eye(4)
    return Image(data, affine)
