"""The MNI152 2009a symmetric template (T1 and GM/WM tissue maps) from the nilearn
wheel, read with nibabel without importing nilearn itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np

from keyfuse.errors import InvalidArgumentError, MissingDependencyError
from keyfuse.image import Image, load_image

Map = Literal["t1", "gm", "wm"]
_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def mni152_path(kind: Map = "t1") -> Path:
    """Path of the template file inside the installed nilearn wheel.

    Found through the package's install location (``importlib.util.find_spec``), so
    nilearn's modules are never imported.
    """
    if kind not in ("t1", "gm", "wm"):
        raise InvalidArgumentError(f"kind must be 't1', 'gm' or 'wm', not {kind!r}")
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the MNI152 template ships inside the nilearn wheel: pip install 'keyfuse[data]'"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "data" / _FILE.format(kind)
        if path.exists():
            return path
    raise MissingDependencyError(f"nilearn is installed but has no {_FILE.format(kind)}")


def mni152(kind: Map = "t1", resolution_mm: float = 1.0) -> Image:
    """The MNI152 2009a template (197×233×189 at 1 mm) as a float32 :class:`Image`.

    Parameters
    ----------
    kind:
        ``"t1"`` (intensities 0..255), ``"gm"`` or ``"wm"`` (tissue probability 0..1).
    resolution_mm:
        Voxel size; values above 1 resample the template (trilinear, with the
        anti-aliasing blur appropriate for the factor) onto a coarser grid covering the
        same field of view.
    """
    img = load_image(mni152_path(kind))
    data = np.asarray(img.data, dtype=np.float32)
    if kind != "t1":
        data = data / np.float32(255.0 if data.max() > 1.5 else 1.0)
    if resolution_mm <= 0 or not np.isfinite(resolution_mm):
        raise InvalidArgumentError(f"resolution_mm must be positive, not {resolution_mm}")
    if resolution_mm == 1.0:
        return Image(data, img.affine)
    return _resample(Image(data, img.affine), float(resolution_mm))


def _resample(img: Image, resolution_mm: float) -> Image:
    from scipy import ndimage

    factor = resolution_mm / float(np.mean(img.spacing))
    data = np.asarray(img.data, dtype=np.float32)
    if factor > 1:
        data = ndimage.gaussian_filter(data, sigma=0.5 * np.sqrt(factor**2 - 1))
    shape = tuple(max(1, int(np.floor((s - 1) / factor)) + 1) for s in data.shape)
    grid = np.meshgrid(*[np.arange(s) * factor for s in shape], indexing="ij")
    out = ndimage.map_coordinates(data, grid, order=1, mode="nearest").astype(np.float32)
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] * factor
    return Image(out, affine)
