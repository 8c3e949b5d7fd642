"""Keypoint extraction: ``kf.extract`` over the Rust 3D SIFT-Rank extractor."""

from __future__ import annotations

from typing import Any

import numpy as np

from keyfuse import _core
from keyfuse.device import choose_backend
from keyfuse.errors import InvalidArgumentError, InvalidImageError
from keyfuse.image import Image, load_image
from keyfuse.keypoints import KeypointSet
from keyfuse.world_lattice import fields_to_stored, lattice_for, resample_onto

#: Why extraction has no GPU path (reported by ``device="cuda"``).
NO_GPU_EXTRACT = (
    "the descriptor stage is CPU-only; keyfuse.gpu.scale_space runs the scale space alone"
)


def check_extract_device(device: str) -> None:
    """Resolve ``device`` for an extraction (``"cuda"`` raises: no GPU path) and record
    the backend for :func:`keyfuse.device.last_backends`."""
    choose_backend(device, "extract", no_gpu_path=NO_GPU_EXTRACT)


def default_params() -> dict[str, Any]:
    """Every extraction parameter with its default value (see :func:`extract`)."""
    return dict(_core.default_extract_params())


def extract(
    image: Any, device: str = "auto", *, reslice: str = "oblique", **params: Any
) -> KeypointSet:
    """Extract 3D SIFT-Rank keypoints (or 2D SIFT-Rank for a 2D image).

    Parameters
    ----------
    image:
        A path (any format :func:`~keyfuse.load_image` reads: NIfTI, MGH, a DICOM series
        directory, NRRD, ...), an :class:`~keyfuse.Image`, a nibabel or SimpleITK image
        or an ndarray (1 mm voxels, with a warning). 3D images give 3D keypoints; 2D
        images give 2D SIFT-Rank keypoints (k = 0). Anisotropic voxels are handled (the
        extractor works on an isotropic grid); coordinates come back in the original
        voxel grid and in mm.

        Results do not depend on how the image is stored: a 3D image is re-stored in the
        axis order and directions closest to RAS (flips and permutations only, exact)
        before extraction, so descriptors live in that nearest-RAS frame and the 48 axis
        orientations of one scan give bit-identical descriptors. ``ijk`` and the rows of
        ``orientation`` are then expressed in the grid as stored (for a mirrored storage
        the frames are reflections); ``xyz`` is world RAS mm.

        An oblique 3D grid is resliced (cubic B-spline) onto the world lattice
        (axis-aligned, centres at whole multiples of its smallest voxel size in world
        mm) before extraction, so an oblique storage gives the keypoints of the
        axis-aligned one; see :mod:`keyfuse.world_lattice`.
    device:
        ``"auto"`` or ``"cpu"``: extraction runs on the CPU (its descriptor stage has no
        GPU version); ``"cuda"`` raises :class:`~keyfuse.DeviceUnavailableError`.
    reslice:
        ``"oblique"`` (default) reslices oblique grids onto the world lattice;
        ``"lattice"`` also axis-aligned grids whose voxel centres are off it (the field
        of view's placement then does not change the keypoints; costs an
        interpolation); ``"never"`` extracts on the grid as stored.
    **params:
        Extraction parameters; :func:`default_params` lists them with their defaults
        (e.g. ``sigma0=1.6``, ``scales_per_octave=4``, ``initial_blur=0``).

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
    DeviceUnavailableError
        ``device="cuda"``: extraction has no GPU path.
    """
    img = load_image(image)
    check_extract_device(device)
    if reslice not in ("oblique", "lattice", "never"):
        raise InvalidArgumentError(
            f"reslice must be 'oblique', 'lattice' or 'never', not {reslice!r}"
        )
    lattice = (
        lattice_for(img, off_lattice=reslice == "lattice")
        if reslice != "never" and img.ndim == 3
        else None
    )
    if lattice is not None:
        grid, shape = lattice
        h = float(grid[0, 0])
        settings = {**default_params(), **params}
        data = resample_onto(_as_float32(img), img, grid, shape, float(settings["max_voxels"]))
        fields = _core.extract3d(data, (h, h, h), **params)
        fields = fields_to_stored(fields, img, grid, settings)
        return KeypointSet._from_core(fields, img.affine, img.shape)
    canon, to_storage = canonical_storage(img)
    # the extractor refuses non-finite voxels in its first pass over the data; the count
    # for the message is taken only then (a separate scan here cost ~4 ms on 1 mm MNI)
    data = _as_float32(canon, check=False)
    spacing = canon.spacing
    try:
        if img.ndim == 3:
            sp3 = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
            fields = _core.extract3d(data, sp3, **params)
        else:
            fields = _core.extract2d(data, (float(spacing[0]), float(spacing[1])), **params)
    except InvalidImageError:
        _check_finite(data)
        raise
    if to_storage is not None:
        fields = _fields_to_storage(fields, to_storage)
    return KeypointSet._from_core(fields, img.affine, img.shape)


_IDENTITY_ORNT = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def canonical_storage(img: Image) -> tuple[Image, np.ndarray | None]:
    """``img`` re-stored in the axis order and directions closest to RAS, exactly.

    Only flips and permutations of the voxel array (``nibabel.orientations``): no
    resampling, so the voxel values are untouched. The returned 4×4 matrix maps the
    canonical image's voxel indices (``[u, v, 0]`` for a 2D image) to ``img``'s (``None``
    when ``img`` is already stored closest to RAS, e.g. the MNI152 template or a 2D image
    with an identity affine).

    The extractor computes descriptors and orientation frames in the canonical grid, so
    the same anatomy stored in any of the 48 axis orientations (mirrored or not) gives
    identical descriptors; an oblique affine leaves a residual rotation below 45° about
    the canonical axes, which the descriptors' own orientation normalisation absorbs. A
    2D image is treated as a one-voxel-thick volume (its affine's third column is the
    slice normal): its in-plane axes are ordered and flipped the same way.
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    ornt = io_orientation(img.affine)
    if np.array_equal(ornt, _IDENTITY_ORNT):
        return img, None
    shape3 = img.shape if img.ndim == 3 else (*img.shape, 1)
    to_storage = inv_ornt_aff(ornt, shape3)
    data = apply_orientation(np.asarray(img.data).reshape(shape3), ornt)
    affine = img.affine @ to_storage
    if img.ndim == 2:
        # the single slice lands on canonical axis s; the plane is the other two, in order
        s = int(ornt[2, 0])
        axes = [a for a in range(3) if a != s] + [s]
        in_plane = np.zeros((4, 4))
        in_plane[axes, [0, 1, 2]] = 1.0
        in_plane[3, 3] = 1.0
        if np.array_equal(axes, [0, 1, 2]) and np.array_equal(to_storage, np.eye(4)):
            return img, None
        data = np.squeeze(data, axis=s)
        affine = affine @ in_plane
        to_storage = to_storage @ in_plane
    return Image(np.ascontiguousarray(data), affine), to_storage


def _fields_to_storage(fields: dict[str, Any], to_storage: np.ndarray) -> dict[str, Any]:
    """Extractor output on the canonical grid, re-expressed on the stored grid.

    ``to_storage`` is a signed permutation plus a whole-voxel shift, so coordinates map
    exactly (up to the last bit of ``n - 1 - x``) and a frame's axes (the rows of each
    orientation matrix, voxel vectors) map by the signed permutation alone.
    """
    out = dict(fields)
    perm = to_storage[:3, :3]
    ijk = np.asarray(fields["ijk"], dtype=np.float64)
    out["ijk"] = ijk @ perm.T + to_storage[:3, 3]
    orientation = np.asarray(fields["orientation"], dtype=np.float32)
    out["orientation"] = np.ascontiguousarray(orientation @ perm.T.astype(np.float32))
    return out


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
    # the plane's axes (0, 1, 2) are the volume's (in_plane[0], in_plane[1], axis): a
    # frame's rows are voxel vectors, so their components move the same way as ijk's
    to_volume = np.zeros((3, 3), dtype=np.float32)
    to_volume[in_plane[0], 0] = to_volume[in_plane[1], 1] = to_volume[axis, 2] = 1.0
    orientation = np.ascontiguousarray(flat.orientation @ to_volume.T)
    return KeypointSet(
        ijk,
        flat.scale,
        orientation,
        flat.descriptors,
        flat.polarity,
        flat.response,
        flat.eigenvalues,
        flat.flags,
        affine=img.affine,
        shape=img.shape,
    )


def _as_float32(img: Image, check: bool = True) -> np.ndarray:
    """The voxel array as float32 in its own memory order, refusing non-finite voxels
    (unless ``check`` is false: the caller passes it to the extractor, which refuses
    them itself).

    (``Image`` has already refused non-real dtypes, and every integer dtype fits float32's
    range, so only floats can hold NaN/Inf.) A float32 array is passed as it is: the
    extractor copies it into its own C-ordered buffer (Fortran order included), so a
    second, C-ordered copy would only add the volume's size to the peak memory.
    """
    out = np.asarray(img.data, dtype=np.float32)
    if check and img.data.dtype.kind == "f":
        _check_finite(out)
    return out


def _check_finite(data: np.ndarray) -> None:
    """Raise :class:`InvalidImageError` with the count where ``data`` holds NaN/Inf."""
    if not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InvalidImageError(
            f"image contains {bad} non-finite (NaN/Inf) voxels; "
            "replace them first, e.g. np.nan_to_num(data)"
        )
