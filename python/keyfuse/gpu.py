"""Stages of the pipeline that run on the GPU on their own, for diagnostics and benchmarks.

:func:`keyfuse.extract` runs the whole extractor; :func:`scale_space` runs only its first
stage, the DoG scale space and its extrema, on the CUDA backend (``rust/keyfuse-cuda``).
Every function here needs a usable GPU (see :func:`keyfuse.device.cuda_info`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from keyfuse import _core
from keyfuse.errors import InvalidImageError
from keyfuse.image import load_image

__all__ = ["Octave", "scale_space"]


class Octave(NamedTuple):
    """One octave of the DoG scale space."""

    #: Shape of the octave's grid (the image's, halved once per octave).
    shape: tuple[int, int, int]
    #: (n, 5) int64 rows ``(DoG level, i, j, k, polarity)``: the strict extrema over their
    #: 80 neighbours in scale and space, in the octave's voxel grid; polarity +1 for a
    #: maximum, -1 for a minimum.
    extrema: npt.NDArray[np.int64]


def scale_space(image: Any, **params: Any) -> list[Octave]:
    """The extractor's DoG scale space and its extrema, computed on the GPU.

    Intensities are normalised as the CPU extractor does (99.5th percentile of |value|
    to 1), with the same blur, octave schedule and margins; the volume is used in its own
    voxel grid (no resampling of anisotropic voxels).

    Parameters
    ----------
    image : Image, path, nibabel image or 3D array
        The volume (see :func:`keyfuse.load_image`).
    **params
        Extraction parameters, as for :func:`keyfuse.extract` (the detection ones are
        used; see :func:`keyfuse.extraction.default_params`).

    Returns
    -------
    list of Octave
        One per octave, finest first; empty for a constant volume.

    Raises
    ------
    DeviceUnavailableError
        No usable GPU.
    InvalidImageError
        The image is not 3D.
    InvalidArgumentError
        An unknown parameter name or an out-of-range value.
    """
    img = load_image(image)
    if img.ndim != 3:
        raise InvalidImageError(f"scale_space needs a 3D image, got {img.ndim}D")
    volume = np.ascontiguousarray(img.data, dtype=np.float32)
    octaves = _core.gpu_scale_space(volume, keep_images=False, **params)
    return [
        Octave(
            tuple(int(n) for n in o["shape"]),  # type: ignore[arg-type, attr-defined]
            np.asarray(o["extrema"], dtype=np.int64),
        )
        for o in octaves
    ]
