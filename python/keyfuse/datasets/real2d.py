"""A small real multi-class set of 2-D images, assembled from files shipped in wheels.

* **MNI152 brain MR slices** (nilearn's template, :func:`keyfuse.datasets.mni152`):
  ``per_view`` axial, coronal and sagittal slices each, evenly spaced over the central
  60 % of the head along the axis they cut (classes ``"mr_axial"``, ``"mr_coronal"``,
  ``"mr_sagittal"``).
* **pydicom's test images** (``pydicom/data/test_files``), read with
  :func:`keyfuse.load_image` (colour → luminance): CT (``"ct"``: ``CT_small.dcm``,
  ``693_J2KI.dcm``, ``J2K_pixelrep_mismatch.dcm`` — a head) and ultrasound (``"us"``:
  ``examples_rgb_color.dcm``, ``examples_palette.dcm``, ``ExplVR_BigEnd.dcm``,
  ``examples_jpeg2k.dcm``). A file this pydicom cannot decode (e.g. JPEG 2000 without
  a decoder) is left out, so the counts depend on the installed packages: read them
  from the returned labels.

>>> images, labels = kf.datasets.images2d()
>>> collections.Counter(labels)
Counter({'mr_axial': 8, 'mr_coronal': 8, 'mr_sagittal': 8, 'us': 4, 'ct': 3})
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np

from keyfuse.errors import InvalidArgumentError, KeyfuseError, MissingDependencyError
from keyfuse.image import Image, load_image

__all__ = ["DICOM_FILES", "images2d", "pydicom_test_file"]

#: class → pydicom test files of that class
DICOM_FILES: dict[str, tuple[str, ...]] = {
    "ct": ("CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"),
    "us": (
        "examples_rgb_color.dcm",
        "examples_palette.dcm",
        "ExplVR_BigEnd.dcm",
        "examples_jpeg2k.dcm",
    ),
}
VIEWS = ("sagittal", "coronal", "axial")  # the MNI152 voxel axes 0, 1, 2 (RAS)


def pydicom_test_file(name: str) -> Path:
    """Path of a file shipped in the pydicom wheel (``pydicom/data/test_files``).

    Parameters
    ----------
    name : str
        File name, e.g. ``"CT_small.dcm"``.
    """
    spec = importlib.util.find_spec("pydicom")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("pydicom's test images need pydicom: pip install pydicom")
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "test_files" / name
        if path.is_file():
            return path
    raise MissingDependencyError(f"this pydicom wheel does not ship {name}")


def _mni_slices(per_view: int, resolution_mm: float) -> tuple[list[Image], list[str]]:
    from keyfuse.datasets.mni import mni152

    vol = mni152(resolution_mm=resolution_mm)
    data = np.asarray(vol.data)
    images: list[Image] = []
    labels: list[str] = []
    for axis, view in enumerate(VIEWS):
        # the head's extent along this axis (voxels brighter than 10 % of the maximum)
        other = tuple(a for a in range(3) if a != axis)
        inside = np.flatnonzero(data.max(axis=other) > 0.1 * data.max())
        lo, hi = inside[0], inside[-1]
        span = hi - lo
        positions = np.linspace(lo + 0.2 * span, hi - 0.2 * span, per_view)
        for p in np.round(positions).astype(int):
            plane = np.ascontiguousarray(np.take(data, int(p), axis=axis), dtype=np.float32)
            spacing = [float(vol.spacing[a]) for a in other]
            images.append(Image(plane, np.diag([*spacing, 1.0, 1.0])))
            labels.append(f"mr_{view}")
    return images, labels


def images2d(
    per_view: int = 8, *, resolution_mm: float = 2.0, dicom: bool = True
) -> tuple[list[Image], list[str]]:
    """The 2-D images and their class labels (see the module docstring).

    Parameters
    ----------
    per_view : int, default=8
        MNI152 slices per view (axial, coronal, sagittal).
    resolution_mm : float, default=2.0
        Resolution of the MNI152 template the slices are cut from.
    dicom : bool, default=True
        Include pydicom's CT and ultrasound images (needs pydicom).

    Returns
    -------
    (list of Image, list of str)
        The images (2-D float32) and one class label each, MNI slices first.
    """
    if per_view < 1:
        raise InvalidArgumentError(f"per_view must be ≥ 1, got {per_view}")
    images, labels = _mni_slices(int(per_view), resolution_mm)
    if dicom:
        for cls, names in DICOM_FILES.items():
            for name in names:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        img = load_image(pydicom_test_file(name))
                except (KeyfuseError, RuntimeError):  # no decoder for this transfer syntax
                    continue
                if img.ndim == 2:
                    images.append(img)
                    labels.append(cls)
    return images, labels
