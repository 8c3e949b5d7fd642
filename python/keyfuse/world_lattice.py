"""The world lattice: where keyfuse samples a 3D scan before it detects keypoints.

A DoG detector finds extrema among voxel samples, so which keypoints it keeps depends
on where the samples fall, not only on the anatomy: on MNI152 at 2 mm, a half-voxel
shift of the grid or an oblique re-storage keeps only 50-80% of the keypoints (see
docs/decisions.md). To make keypoints a property of the anatomy rather than of the
grid, keyfuse samples on one lattice fixed in world space: axis-aligned (RAS), voxel
centres at whole multiples of the scan's smallest voxel size ``h`` in world mm. An
oblique grid is resliced onto it first with cubic B-spline interpolation (Rust,
``keyfuse._core.reslice_volume``) and keypoints are mapped back to the stored grid.
An axis-aligned grid is extracted exactly as stored (no interpolation, no cost); with
``extract(..., reslice="lattice")`` one whose centres are off the lattice is resliced
too, so that the placement of the field of view does not change the keypoints either.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keyfuse import _core
from keyfuse.image import Image

#: Largest deviation (voxels) of the origin from the lattice, and of a direction
#: cosine from a signed permutation, still treated as on the lattice.
ON_LATTICE_TOL = 1e-3


def lattice_for(
    img: Image, off_lattice: bool = False
) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """The world-lattice grid covering ``img`` (its 4×4 affine and shape), or ``None``
    when ``img`` (3D) needs no reslicing: its grid is axis-aligned and, with
    ``off_lattice``, also has its voxel centres on the lattice."""
    affine = np.asarray(img.affine, dtype=np.float64)
    lin = affine[:3, :3]
    spacing = img.spacing
    h = float(spacing.min())
    shape = np.asarray(img.shape, dtype=np.float64)
    directions = lin / spacing
    axis_aligned = np.all(
        np.isclose(np.abs(directions), np.round(np.abs(directions)), atol=ON_LATTICE_TOL)
    )
    corners = np.array(
        [[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    world = corners @ lin.T + affine[:3, 3]
    low = world.min(axis=0)
    on_lattice = np.allclose(low / h, np.round(low / h), atol=ON_LATTICE_TOL)
    if axis_aligned and (on_lattice or not off_lattice):
        return None
    start = np.floor(low / h + ON_LATTICE_TOL) * h
    stop = np.ceil(world.max(axis=0) / h - ON_LATTICE_TOL) * h
    size = np.round((stop - start) / h).astype(int) + 1
    lattice = np.eye(4)
    lattice[:3, :3] *= h
    lattice[:3, 3] = start
    return lattice, (int(size[0]), int(size[1]), int(size[2]))


def resample_onto(
    data: np.ndarray,
    img: Image,
    lattice: np.ndarray,
    shape: tuple[int, int, int],
    max_voxels: float,
) -> np.ndarray:
    """``data`` (``img``'s voxels, float32) sampled on the lattice grid (cubic B-spline;
    0 outside ``img``'s field of view). A lattice grid over ``max_voxels`` voxels (the
    extraction parameter) raises ``InvalidImageError`` before anything is allocated."""
    to_stored = np.linalg.inv(np.asarray(img.affine, dtype=np.float64)) @ lattice
    return _core.reslice_volume(
        volume=np.ascontiguousarray(data, dtype=np.float32),
        matrix=to_stored[:3, :].tolist(),
        shape=shape,
        max_voxels=max_voxels,
    )


def fields_to_stored(
    fields: dict[str, Any], img: Image, lattice: np.ndarray, settings: dict[str, Any]
) -> dict[str, Any]:
    """Extractor output on the lattice, re-expressed on ``img``'s stored grid.

    Positions map through the two affines; a frame's axes (rows, world directions on the
    lattice) become directions along the stored axes. Keypoints whose descriptor support
    reaches past the stored field of view are dropped, as the extractor drops them at the
    faces of a grid it samples directly (descriptor radius × σ plus the border margin;
    ``settings`` holds every extraction parameter, defaults included).
    """
    affine = np.asarray(img.affine, dtype=np.float64)
    to_stored = np.linalg.inv(affine) @ lattice
    out = dict(fields)
    ijk = np.asarray(fields["ijk"], dtype=np.float64) @ to_stored[:3, :3].T + to_stored[:3, 3]
    spacing = img.spacing
    rotation = (affine[:3, :3] / spacing).astype(np.float32)
    orientation = np.asarray(fields["orientation"], dtype=np.float32) @ rotation
    radius = float(settings["descriptor_radius"])
    border = float(settings["border"])
    h = float(lattice[0, 0])
    reach = radius * np.asarray(fields["scale"], dtype=np.float64) + border * h  # mm
    last = np.asarray(img.shape, dtype=np.float64) - 1
    to_face = np.minimum(ijk, last - ijk) * spacing  # mm to the nearest face, per axis
    keep = np.all(to_face >= reach[:, None], axis=1)
    out["ijk"] = ijk
    out["orientation"] = np.ascontiguousarray(orientation)
    return {name: np.ascontiguousarray(np.asarray(value)[keep]) for name, value in out.items()}
