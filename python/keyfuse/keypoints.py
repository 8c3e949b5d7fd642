"""Keypoint sets: the geometry and SIFT-Rank descriptors of one image's keypoints, their
compact binary file (``.kfk``) and the reference ``featExtract`` ``.key`` text format."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse._io import atomic_path
from keyfuse.errors import CorruptDataError, InvalidArgumentError, KeyfuseIOError
from keyfuse.image import voxel_sizes

PathLike = str | os.PathLike[str]

DESC_LEN = 64
FLAG_MAXIMUM = 0x10  # featExtract: DoG maximum (clear = minimum)
FLAG_REORIENTED = 0x20  # featExtract: the row carries a dominant orientation
_KFK_MAGIC = b"KFKP"
_KFK_VERSION = 1
# (field, dtype, per-row shape) in the order they are stored in a .kfk file
_FIELDS: tuple[tuple[str, type, tuple[int, ...]], ...] = (
    ("ijk", np.float64, (3,)),
    ("scale", np.float32, ()),
    ("orientation", np.float32, (3, 3)),
    ("descriptors", np.uint8, (DESC_LEN,)),
    ("polarity", np.int8, ()),
    ("response", np.float32, ()),
    ("eigenvalues", np.float32, (3,)),
    ("flags", np.uint8, ()),
)


class KeypointSet:
    """The keypoints of one image, one row per oriented feature.

    Attributes
    ----------
    ijk : (N, 3) float64
        Voxel coordinates in array-index order; the centre of voxel ``[i, j, k]`` is at
        ``(i, j, k)``.
    xyz : (N, 3) float64
        World coordinates in mm (RAS): ``affine @ [i, j, k, 1]``.
    scale : (N,) float32
        Gaussian scale σ of the detection, in mm.
    orientation : (N, 3, 3) float32
        The keypoint's axes as rows, vectors of the stored grid's voxel axes. For a
        mirrored storage (affine with negative determinant) they form a reflection: the
        descriptor was computed in the right-handed nearest-RAS frame (see the README's
        "Storage orientation").
    descriptors : (N, 64) uint8
        SIFT-Rank descriptors: each row is a permutation of 0..63.
    polarity : (N,) int8
        +1 for a DoG maximum, −1 for a minimum (DoG = f(κσ) − f(σ), so a bright blob
        is a minimum, as in featExtract).
    response : (N,) float32
        DoG value at the refined extremum.
    eigenvalues : (N, 3) float32
        Structure-tensor eigenvalues of the patch, descending.
    flags : (N,) uint8
        featExtract's info flag bits: 0x10 DoG maximum, 0x20 a row carrying a dominant
        orientation (clear on the one unrotated row per detection).
    affine : (4, 4) float64
        Voxel-to-world matrix of the image the keypoints came from.
    shape : tuple of int
        Shape of that image.
    """

    __slots__ = (
        "affine",
        "descriptors",
        "eigenvalues",
        "flags",
        "ijk",
        "orientation",
        "polarity",
        "response",
        "scale",
        "shape",
        "xyz",
    )

    def __init__(
        self,
        ijk: npt.ArrayLike,
        scale: npt.ArrayLike,
        orientation: npt.ArrayLike | None = None,
        descriptors: npt.ArrayLike | None = None,
        polarity: npt.ArrayLike | None = None,
        response: npt.ArrayLike | None = None,
        eigenvalues: npt.ArrayLike | None = None,
        flags: npt.ArrayLike | None = None,
        affine: npt.ArrayLike | None = None,
        shape: Sequence[int] | None = None,
    ) -> None:
        ijk_arr = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        n = len(ijk_arr)

        def column(value: Any, dtype: type, tail: tuple[int, ...], default: Any) -> np.ndarray:
            if value is None:
                return np.broadcast_to(np.asarray(default, dtype=dtype), (n, *tail)).copy()
            arr = np.asarray(value)
            if dtype is np.uint8 and arr.dtype != np.uint8:
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise InvalidArgumentError("descriptors must be in 0..255 (uint8)")
            arr = arr.astype(dtype, copy=False)
            if arr.shape != (n, *tail):
                raise InvalidArgumentError(
                    f"expected an array of shape {(n, *tail)} to go with {n} keypoints, "
                    f"got {arr.shape}"
                )
            return np.ascontiguousarray(arr)

        self.ijk = np.ascontiguousarray(ijk_arr)
        self.scale = column(scale, np.float32, (), 1.0)
        self.orientation = column(orientation, np.float32, (3, 3), np.eye(3))
        self.descriptors = column(descriptors, np.uint8, (DESC_LEN,), 0)
        self.polarity = column(polarity, np.int8, (), 1)
        self.response = column(response, np.float32, (), 0.0)
        self.eigenvalues = column(eigenvalues, np.float32, (3,), 0.0)
        if flags is None:  # derive: polarity, and whether the row has a non-trivial frame
            identity = np.all(
                np.abs(self.orientation - np.eye(3, dtype=np.float32)) < 1e-6, axis=(1, 2)
            )
            flags = np.where(self.polarity > 0, FLAG_MAXIMUM, 0) | np.where(
                identity, 0, FLAG_REORIENTED
            )
        self.flags = column(flags, np.uint8, (), 0)
        self.affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise InvalidArgumentError(f"affine must be 4×4, got {self.affine.shape}")
        self.shape = tuple(int(s) for s in shape) if shape is not None else ()
        self.xyz = self.ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    # -- construction -------------------------------------------------------------------
    @classmethod
    def empty(
        cls, affine: npt.ArrayLike | None = None, shape: Sequence[int] | None = None
    ) -> KeypointSet:
        """A set with no keypoints (what a featureless image gives)."""
        return cls(np.zeros((0, 3)), np.zeros(0), affine=affine, shape=shape)

    @classmethod
    def _from_columns(
        cls, columns: Sequence[np.ndarray], affine: Any, shape: Sequence[int] | None
    ) -> KeypointSet:
        """Build from arrays given in ``_FIELDS`` order."""
        named: dict[str, Any] = {
            name: col for (name, _, _), col in zip(_FIELDS, columns, strict=True)
        }
        return cls(**named, affine=affine, shape=shape)

    @classmethod
    def _from_core(
        cls, fields: dict[str, np.ndarray], affine: np.ndarray, shape: Sequence[int]
    ) -> KeypointSet:
        return cls(
            fields["ijk"],
            fields["scale"],
            fields["orientation"],
            fields["descriptors"],
            fields["polarity"],
            fields["response"],
            fields["eigenvalues"],
            fields.get("flags"),
            affine=affine,
            shape=shape,
        )

    @classmethod
    def concatenate(cls, sets: Sequence[KeypointSet]) -> KeypointSet:
        """Join sets that share one image space (the first set's affine and shape)."""
        if not sets:
            raise InvalidArgumentError("concatenate needs at least one KeypointSet")
        first = sets[0]
        return cls._from_columns(
            [np.concatenate([getattr(s, name) for s in sets]) for name, _, _ in _FIELDS],
            first.affine,
            first.shape,
        )

    # -- container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ijk)

    def __getitem__(self, index: Any) -> KeypointSet:
        """A subset: boolean mask, integer indices or a slice."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return KeypointSet._from_columns(
            [getattr(self, name)[index] for name, _, _ in _FIELDS], self.affine, self.shape
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeypointSet):
            return NotImplemented
        return (
            self.shape == other.shape
            and np.array_equal(self.affine, other.affine)
            and all(
                np.array_equal(getattr(self, name), getattr(other, name)) for name, _, _ in _FIELDS
            )
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shape = "×".join(map(str, self.shape)) or "?"
        return f"KeypointSet({len(self)} keypoints, image {shape})"

    @property
    def spacing(self) -> npt.NDArray[np.float64]:
        """Voxel sizes (mm) of the source image."""
        return voxel_sizes(self.affine)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored fields (the on-disk size of a .kfk file, less its header)."""
        return sum(getattr(self, name).nbytes for name, _, _ in _FIELDS)

    def transformed(self, matrix: npt.ArrayLike) -> KeypointSet:
        """The same keypoints with world coordinates mapped by a 4×4 world transform.

        Voxel coordinates are unchanged; the affine becomes ``matrix @ affine``.
        """
        mat = np.asarray(matrix, dtype=np.float64)
        if mat.shape != (4, 4):
            raise InvalidArgumentError(f"transform must be 4×4, got {mat.shape}")
        return KeypointSet._from_columns(
            [getattr(self, name) for name, _, _ in _FIELDS], mat @ self.affine, self.shape
        )

    # -- compact binary file --------------------------------------------------------------
    def save(self, path: PathLike) -> None:
        """Write a compact binary ``.kfk`` file (about 100 bytes per keypoint), atomically.

        Layout: magic ``KFKP``, uint32 header length, JSON header (version, count, shape,
        affine), the columns as little-endian arrays, then a CRC-32 of everything before.
        """
        header = json.dumps(
            {
                "version": _KFK_VERSION,
                "count": len(self),
                "shape": list(self.shape),
                "affine": self.affine.tolist(),
            }
        ).encode()
        buf = io.BytesIO()
        buf.write(_KFK_MAGIC)
        buf.write(struct.pack("<I", len(header)))
        buf.write(header)
        for name, dtype, _ in _FIELDS:
            buf.write(
                np.ascontiguousarray(
                    getattr(self, name), dtype=np.dtype(dtype).newbyteorder("<")
                ).tobytes()
            )
        payload = buf.getvalue()
        with atomic_path(path) as tmp:
            tmp.write_bytes(payload + struct.pack("<I", zlib.crc32(payload)))

    @classmethod
    def load(cls, path: PathLike) -> KeypointSet:
        """Read a ``.kfk`` file written by :meth:`save`; damage raises CorruptDataError."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError as exc:
            raise KeyfuseIOError(f"keypoint file not found: {path}") from exc
        except OSError as exc:
            raise KeyfuseIOError(f"cannot read {path}: {exc}") from exc
        if len(raw) < 12 or raw[:4] != _KFK_MAGIC:
            raise CorruptDataError(f"{path} is not a keyfuse keypoint file (.kfk)")
        payload, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
        if zlib.crc32(payload) != crc:
            raise CorruptDataError(f"{path} is damaged (checksum mismatch)")
        (hlen,) = struct.unpack("<I", payload[4:8])
        try:
            header = json.loads(payload[8 : 8 + hlen])
            n = int(header["count"])
            version = int(header["version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptDataError(f"{path} has a damaged header") from exc
        if version > _KFK_VERSION:
            raise CorruptDataError(f"{path} was written by a newer keyfuse (format {version})")
        offset = 8 + hlen
        columns = []
        for _, dtype, tail in _FIELDS:
            dt = np.dtype(dtype).newbyteorder("<")
            count = n * int(np.prod(tail, dtype=np.int64))
            size = count * dt.itemsize
            if offset + size > len(payload):
                raise CorruptDataError(f"{path} is truncated")
            columns.append(np.frombuffer(payload, dt, count, offset).reshape(n, *tail))
            offset += size
        if offset != len(payload):
            raise CorruptDataError(f"{path} has {len(payload) - offset} unexpected trailing bytes")
        return cls._from_columns(columns, header["affine"], header["shape"])


# -- featExtract .key text format ---------------------------------------------------------
_COLUMN_LINE = (
    "Scale-space location[x y z scale] orientation[o11 o12 o13 o21 o22 o23 o31 o32 o32] "
    "2nd moment eigenvalues[e1 e2 e3] info flag[i1] descriptor[d1 .. d64]"
)
_ROW_FIELDS = 4 + 9 + 3 + 1 + DESC_LEN
# featExtract's scale column over keyfuse's σ (the σ of the blob a keypoint responds to):
# the median ratio over the 1,847 reference rows of the MNI152 template that lie within one
# voxel of a keyfuse keypoint (interquartile range 1.45–1.51).
KEY_SCALE_PER_SIGMA = 1.48


def write_key(kps: KeypointSet, path: PathLike, *, world: bool = False) -> None:
    """Write ``kps`` in the reference ``featExtract`` ``.key`` text format, atomically.

    Coordinates are written in voxels with centres at ``i + 0.5`` (featExtract's
    convention) and the scale column in featExtract's units (``KEY_SCALE_PER_SIGMA`` × σ,
    in voxels); with ``world=True`` coordinates and scale are in mm and the header carries
    the affine (featExtract's ``-w`` output).
    """
    spacing = float(np.mean(kps.spacing))
    if world:
        coords = kps.xyz
        scale = KEY_SCALE_PER_SIGMA * kps.scale.astype(np.float64)
        space = "millimeters (qto_xyz) : " + " ".join(f"{v:f}" for v in kps.affine.ravel())
    else:
        coords = kps.ijk + 0.5
        scale = KEY_SCALE_PER_SIGMA * kps.scale.astype(np.float64) / spacing
        space = "voxels: " + " ".join(f"{v:.1f}" for v in np.eye(4).ravel())
    shape = list(kps.shape) + [1] * (3 - len(kps.shape))
    flags = kps.flags
    out = io.StringIO()
    out.write("# featExtract 1.1\n")
    out.write("# Extraction Voxel Resolution (ijk) : {} {} {}\n".format(*shape[:3]))
    out.write("# Extraction Voxel Size (mm)  (ijk) : {:f} {:f} {:f}\n".format(*kps.spacing[:3]))
    out.write(f"# Feature Coordinate Space: {space}\n")
    out.write(f"Features: {len(kps)}\n{_COLUMN_LINE}\n")
    floats = np.column_stack(
        [coords, scale, kps.orientation.reshape(-1, 9), kps.eigenvalues]
    ).astype(np.float64)
    for row_floats, flag, desc in zip(floats, flags, kps.descriptors, strict=True):
        out.write("".join(f"{v:f}\t" for v in row_floats))
        out.write(f"{int(flag)}\t")
        out.write("".join(f"{int(d)}\t" for d in desc))
        out.write("\n")
    with atomic_path(path) as tmp:
        tmp.write_text(out.getvalue())


def read_key(path: PathLike, affine: npt.ArrayLike | None = None) -> KeypointSet:
    """Read a ``featExtract`` ``.key`` file (current format or the older 1.1 header).

    Voxel-space files give voxel coordinates (the file's ``i + 0.5`` centres shifted back)
    and, when ``affine`` is given, world coordinates through it; otherwise the affine is a
    diagonal from the header's voxel size. World-space (``-w``) files carry their affine.
    Rows whose descriptor is not in 0..255 or whose field count is wrong raise
    :class:`CorruptDataError`.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise KeyfuseIOError(f"key file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptDataError(f"cannot read key file {path}: {exc}") from exc

    lines = text.splitlines()
    declared: int | None = None
    voxel_size = np.ones(3)
    shape: list[int] = []
    world_affine: np.ndarray | None = None
    body_start: int | None = None
    for lineno, line in enumerate(lines):
        if line.startswith("#"):
            if "Extraction Voxel Size" in line:
                voxel_size = _numbers_after_colon(line, 3, path)
            elif "Extraction Voxel Resolution" in line:
                shape = [int(v) for v in _numbers_after_colon(line, 3, path)]
            elif "Feature Coordinate Space" in line and "millimeters" in line:
                world_affine = _numbers_after_colon(line, 16, path).reshape(4, 4)
            continue
        if line.startswith("Features:"):
            try:
                declared = int(line.split(":", 1)[1])
            except ValueError as exc:
                raise CorruptDataError(f"{path}:{lineno + 1}: bad 'Features:' line") from exc
            continue
        if "Scale-space location[x y z scale]" in line:
            body_start = lineno + 1
            break
        if line.strip():
            raise CorruptDataError(f"{path}:{lineno + 1}: unexpected header line {line[:60]!r}")
    if body_start is None:
        raise CorruptDataError(f"{path} is not a featExtract .key file (no column line)")

    rows = [line for line in lines[body_start:] if line.strip()]
    try:
        table = np.array([[float(v) for v in row.split()] for row in rows], dtype=np.float64)
    except ValueError as exc:
        raise CorruptDataError(f"{path}: non-numeric value in a feature row") from exc
    table = table.reshape(len(rows), -1) if rows else np.zeros((0, _ROW_FIELDS))
    if table.shape[1] != _ROW_FIELDS:
        raise CorruptDataError(
            f"{path}: feature rows have {table.shape[1]} fields, expected {_ROW_FIELDS}"
        )
    if declared is not None and declared != len(table):
        raise CorruptDataError(f"{path} declares {declared} features but holds {len(table)}")
    desc = table[:, 17:]
    if desc.size and (desc.min() < 0 or desc.max() > 255 or np.any(desc != np.round(desc))):
        raise CorruptDataError(f"{path}: descriptor values must be integers in 0..255")
    flags = table[:, 16].astype(np.int64)
    if world_affine is not None:
        mm_affine = world_affine
        ijk = (table[:, :3] - mm_affine[:3, 3]) @ np.linalg.inv(mm_affine[:3, :3]).T
        sigma_mm = table[:, 3] / KEY_SCALE_PER_SIGMA
    else:
        mm_affine = (
            np.asarray(affine, dtype=np.float64)
            if affine is not None
            else np.diag([*voxel_size, 1.0])
        )
        ijk = table[:, :3] - 0.5
        voxel_mm = float(np.mean(voxel_sizes(mm_affine)))
        sigma_mm = table[:, 3] / KEY_SCALE_PER_SIGMA * voxel_mm
    return KeypointSet(
        ijk,
        sigma_mm,
        table[:, 4:13].reshape(-1, 3, 3),
        desc.astype(np.uint8),
        np.where(flags & FLAG_MAXIMUM, 1, -1),
        None,
        table[:, 13:16],
        flags,
        affine=mm_affine,
        shape=shape or None,
    )


def _numbers_after_colon(line: str, count: int, path: Path) -> np.ndarray:
    tail = line.rsplit(":", 1)[1].split()
    try:
        values = np.array([float(v) for v in tail[:count]])
    except ValueError as exc:
        raise CorruptDataError(f"{path}: bad header line {line[:60]!r}") from exc
    if len(values) != count:
        raise CorruptDataError(f"{path}: header line {line[:60]!r} needs {count} numbers")
    return values
