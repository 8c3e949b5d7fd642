"""Images: a voxel array with its voxel-to-world (RAS mm) affine; loading and saving
every format :mod:`keyfuse.formats` knows (NIfTI, MGH/MGZ, DICOM, NRRD, MetaImage, PNG/
JPEG/TIFF)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import (
    InvalidArgumentError,
    InvalidImageError,
    VoxelSizeWarning,
    warn_caller,
)

PathLike = str | os.PathLike[str]


def voxel_sizes(affine: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Voxel sizes in mm along each array axis: the column norms of the affine's 3×3 part."""
    mat = np.asarray(affine, dtype=np.float64)
    return np.sqrt((mat[:3, :3] ** 2).sum(axis=0))


def _warn_no_voxel_size(shape: tuple[int, ...]) -> None:
    """Warn that an array got 1 mm voxels, pointing at the caller outside keyfuse."""
    warn_caller(
        f"image array of shape {shape} has no affine or voxel size: assuming 1 mm voxels; "
        "pass kf.Image(array, spacing=(...)) or an affine (or load the file with "
        "kf.load_image)",
        VoxelSizeWarning,
    )


def _is_nibabel_image(obj: Any) -> bool:
    return hasattr(obj, "dataobj") and hasattr(obj, "affine")


def _is_simpleitk_image(obj: Any) -> bool:
    return type(obj).__module__.startswith("SimpleITK") and hasattr(obj, "GetDirection")


class Image:
    """A 2D or 3D image and its 4×4 voxel-to-world affine (RAS millimetres).

    Parameters
    ----------
    data:
        The voxel array, indexed ``[i, j, k]`` (or ``[i, j]`` for a 2D image), or an image
        of another library: a nibabel image (its array and affine) or a SimpleITK image
        (its array transposed from SimpleITK's ``(z, y, x)`` to ``(x, y, z)`` and its
        LPS geometry turned into a RAS affine). Trailing singleton dimensions beyond the
        third (as in ``(X, Y, Z, 1)``) are dropped; real 4D data raises
        :class:`~keyfuse.InvalidImageError`.
    affine:
        4×4 matrix mapping voxel indices to world (RAS) millimetres. For a 2D image the
        third column still describes the slice axis. Not allowed together with
        ``spacing``, nor for nibabel/SimpleITK images, which carry their own.
    spacing:
        Voxel sizes in mm along the array's axes, for an array without an affine (a
        diagonal affine). With neither ``affine`` nor ``spacing`` an array gets 1 mm
        voxels and a :class:`VoxelSizeWarning`, since distances, scales and matching
        tolerances all depend on it.

    Notes
    -----
    An array taken from ``SimpleITK.GetArrayFromImage`` is in ``(z, y, x)`` order: pass
    the SimpleITK image itself (or ``arr.transpose(2, 1, 0)`` with an affine).
    """

    __slots__ = ("affine", "data")
    data: np.ndarray
    affine: npt.NDArray[np.float64]

    def __init__(
        self,
        data: Any,
        affine: npt.ArrayLike | None = None,
        *,
        spacing: npt.ArrayLike | None = None,
    ) -> None:
        if affine is not None and spacing is not None:
            raise InvalidArgumentError("give either affine or spacing, not both")
        if isinstance(data, Image):
            if affine is not None or spacing is not None:
                raise InvalidArgumentError("an Image carries its own affine")
            data, affine = data.data, data.affine
        elif _is_nibabel_image(data) or _is_simpleitk_image(data):
            if affine is not None or spacing is not None:
                raise InvalidArgumentError(
                    f"a {type(data).__name__} carries its own geometry: "
                    "do not pass affine or spacing"
                )
            from keyfuse.formats import from_nibabel, from_simpleitk

            conv = from_nibabel if _is_nibabel_image(data) else from_simpleitk
            data, affine = conv(data)
        elif affine is None:
            arr0 = np.asanyarray(data)
            if spacing is None:
                if arr0.ndim in (2, 3):
                    _warn_no_voxel_size(arr0.shape)
            else:
                sp = np.asarray(spacing, dtype=np.float64).ravel()
                nd = max(arr0.ndim, 2)
                if len(sp) not in (min(nd, 3), 3) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
                    raise InvalidArgumentError(
                        f"spacing must be {min(nd, 3)} positive voxel sizes in mm, got {spacing!r}"
                    )
                affine = np.diag([*sp, *([1.0] * (3 - len(sp))), 1.0])
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
        """This image as a ``nibabel.Nifti1Image`` (qform and sform set, units mm)."""
        from keyfuse.formats import to_nifti

        return to_nifti(self)

    def to_simpleitk(self) -> Any:
        """This image as a ``SimpleITK.Image`` (LPS geometry; needs SimpleITK)."""
        from keyfuse.formats import to_simpleitk

        return to_simpleitk(self)

    def save(self, path: PathLike) -> None:
        """Write the image atomically, in the format its suffix names.

        ``.nii``/``.nii.gz`` (NIfTI-1, qform and sform codes 1 and units mm), ``.mgz``/
        ``.mgh`` (FreeSurfer), ``.nrrd``, ``.mha``/``.mhd`` (MetaImage; NRRD and
        MetaImage need SimpleITK) and, for 2D images, ``.png``/``.tif``/``.tiff``.
        The path is checked before anything is written; a failed write leaves no file.

        Raises
        ------
        InvalidArgumentError
            An unknown or unsupported suffix (the message lists the supported ones).
        KeyfuseIOError
            The file cannot be written.
        """
        from keyfuse.formats import write_image

        write_image(self, Path(path))

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:g}" for s in self.spacing[: self.ndim])
        return f"Image(shape={self.shape}, spacing=({spacing}) mm, dtype={self.data.dtype})"


def load_image(
    source: Any,
    affine: npt.ArrayLike | None = None,
    *,
    spacing: npt.ArrayLike | None = None,
    series: str | int | None = None,
) -> Image:
    """Load an image from a file or directory, another library's image, or an array.

    Parameters
    ----------
    source:
        A path: NIfTI-1/2 (``.nii``, ``.nii.gz``), MGH/MGZ, a DICOM file or a directory
        holding a DICOM series, NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
        ``.mhd``; NRRD and MetaImage need SimpleITK, ``pip install 'keyfuse[itk]'``), or
        PNG/JPEG/TIFF (2D; colour is converted to luminance). Or an :class:`Image`, a
        nibabel image, a SimpleITK image, or an ndarray.
    affine, spacing:
        Voxel-to-world matrix or voxel sizes for an array source (see :class:`Image`);
        ignored for files and images, which carry their own.
    series:
        For a DICOM directory holding several series: which one, by
        SeriesInstanceUID, SeriesNumber or position in the listed order.

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
        from keyfuse.formats import read_image

        return read_image(Path(source), series=series)
    if _is_nibabel_image(source) or _is_simpleitk_image(source):
        return Image(source)
    if isinstance(source, np.ndarray) or isinstance(source, (list, tuple)):
        if affine is None and spacing is None:
            arr = np.asarray(source)
            if arr.ndim in (2, 3):
                _warn_no_voxel_size(arr.shape)
            return Image(arr, np.eye(4))
        return Image(np.asarray(source), affine, spacing=spacing)
    raise InvalidImageError(
        f"cannot make an image from {type(source).__name__}: pass a path, an Image, "
        "a nibabel or SimpleITK image, or an ndarray"
    )
