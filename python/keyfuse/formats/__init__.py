"""Image file formats: one place that reads and writes every format keyfuse supports.

Reading (:func:`read_image`, behind :func:`keyfuse.load_image`):

=====================================  ==========================  ===================
format                                 suffixes                    reader
=====================================  ==========================  ===================
NIfTI-1 / NIfTI-2                      ``.nii``, ``.nii.gz``       nibabel
MGH / MGZ (FreeSurfer)                 ``.mgh``, ``.mgz``          nibabel
DICOM: a directory holding a series,   any (``.dcm``, none, ...)   pydicom
a multi-frame file, a single image                                 (``keyfuse[dicom]``)
NRRD, MetaImage                        ``.nrrd``, ``.nhdr``,       SimpleITK
                                       ``.mha``, ``.mhd``          (``keyfuse[itk]``)
PNG, JPEG, TIFF, BMP (2D)              ``.png``, ``.jpg``, ...     Pillow
=====================================  ==========================  ===================

Every reader returns a :class:`~keyfuse.Image` whose affine maps ``[i, j, k]`` voxel
indices to RAS millimetres. DICOM, NRRD and MetaImage store LPS geometry; it is turned
into RAS in exactly one place, :func:`lps_to_ras`. Every failure is a
:class:`~keyfuse.KeyfuseError` naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from keyfuse.errors import (
    CorruptDataError,
    InvalidArgumentError,
    InvalidImageError,
    KeyfuseError,
    KeyfuseIOError,
    MissingDependencyError,
)
from keyfuse.image import Image

NIBABEL_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
WRITABLE_SUFFIXES = (
    ".nii.gz",
    ".nii",
    ".mgz",
    ".mgh",
    ".nrrd",
    ".mha",
    ".mhd",
    ".png",
    ".tif",
    ".tiff",
)

# DICOM, NRRD and MetaImage (ITK) describe space as LPS; keyfuse's affines are RAS.
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """An LPS voxel-to-world affine as RAS (the same matrix maps RAS back to LPS)."""
    return _LPS_RAS @ np.asarray(affine, dtype=np.float64)


def suffix_of(path: Path) -> str:
    """The format suffix of ``path``, lower case (``.nii.gz`` counts as one)."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


# -- reading ---------------------------------------------------------------------------------
def read_image(path: Path, *, series: str | int | None = None) -> Image:
    """Read the image at ``path`` (a file, or a directory holding a DICOM series).

    Every failure is a :class:`~keyfuse.KeyfuseError` naming the file: a reader's own
    exception (a damaged file can raise almost anything inside nibabel, pydicom, ITK or
    Pillow) becomes a :class:`~keyfuse.CorruptDataError`.
    """
    try:
        return _read_image(path, series=series)
    except KeyfuseError:
        raise
    except MemoryError as exc:
        raise InvalidImageError(f"{path} is too large to load into memory") from exc
    except RecursionError as exc:
        raise CorruptDataError(f"cannot read image {path}: nesting too deep") from exc
    except Exception as exc:
        raise CorruptDataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _read_image(path: Path, *, series: str | int | None = None) -> Image:
    if not path.exists():
        raise KeyfuseIOError(f"image file not found: {path}")
    if path.is_dir():
        from keyfuse.formats.dicom import read_dicom

        return read_dicom(path, series=series)
    if not os.access(path, os.R_OK):
        raise KeyfuseIOError(f"image file is not readable (permissions): {path}")
    suffix = suffix_of(path)
    if suffix in NIBABEL_SUFFIXES:
        return _read_nibabel(path)
    if suffix in ITK_SUFFIXES:
        return _read_itk(path)
    if suffix in RASTER_SUFFIXES:
        return _read_raster(path)
    from keyfuse.formats.dicom import is_dicom_file, read_dicom

    if suffix in DICOM_SUFFIXES or is_dicom_file(path):
        return read_dicom(path, series=series)
    raise CorruptDataError(
        f"cannot read {path}: unknown image format {suffix or '(no suffix)'!r}; keyfuse reads "
        "NIfTI (.nii, .nii.gz), MGH (.mgh, .mgz), DICOM (a file or a series directory), "
        "NRRD (.nrrd), MetaImage (.mha, .mhd) and PNG/JPEG/TIFF"
    )


# A deflate stream expands at most ~1032-fold; a file whose header claims more voxel bytes
# than that (or, uncompressed, more than it holds) is refused before any allocation.
MAX_EXPANSION = 1100


def check_declared_size(path: Path, declared: int, available: int, compressed: bool) -> None:
    """Refuse a file whose header declares more voxel data than it can hold.

    ``declared`` is the voxel data size the header claims, ``available`` the bytes the file
    holds for it (compressed or not).
    """
    limit = available * MAX_EXPANSION if compressed else available
    if declared > limit:
        raise CorruptDataError(
            f"{path} declares {declared:,} bytes of voxel data but holds "
            f"{available:,}{' compressed' if compressed else ''}: truncated or damaged header"
        )


def _check_stream(path: Path, limit: int, offset: int = 0, wbits: int = 31) -> int:
    """Decompress a gzip file (or the zlib/gzip stream from ``offset``; ``wbits`` as for
    zlib: 31 gzip, 15 zlib) to its end, discarding the output, and return its size;
    refuse a truncated or damaged stream (end marker, checksum) or one that grows past
    ``limit`` bytes. Memory stays at one chunk."""
    import zlib

    total = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        d = zlib.decompressobj(wbits)
        while True:
            chunk = d.unused_data or fh.read(1 << 20)
            if d.eof:
                if not chunk.strip(b"\0"):  # the end, or zero padding after it
                    if not chunk or not fh.read(1 << 20).strip(b"\0"):
                        break
                if wbits != 31:
                    raise CorruptDataError(f"{path} has unexpected bytes after its data")
                d = zlib.decompressobj(wbits)  # a further gzip member
            elif not chunk:
                raise CorruptDataError(f"{path} is truncated (the gzip stream ends early)")
            try:
                piece = d.decompress(chunk, max(1, limit - total + 1))
            except zlib.error as exc:
                raise CorruptDataError(f"{path} is damaged (gzip: {exc})") from exc
            total += len(piece)
            if total > limit:
                raise CorruptDataError(f"{path} decompresses to more than its header declares")
            if d.unconsumed_tail:
                raise CorruptDataError(f"{path} decompresses to more than its header declares")
    return total


def _read_nibabel(path: Path) -> Image:
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))
        shape = img.header.get_data_shape()
        if any(int(n) < 0 for n in shape):
            raise CorruptDataError(f"{path} declares a negative dimension {shape}")
        declared = int(np.prod([int(n) for n in shape], dtype=object)) * int(
            img.header.get_data_dtype().itemsize
        )
        offset = int(getattr(img.dataobj, "offset", 0) or 0)
        size = path.stat().st_size
        compressed = path.name.lower().endswith((".gz", ".mgz"))
        check_declared_size(path, declared, size if compressed else size - offset, compressed)
        if compressed:
            # check the whole gzip stream, its end and CRC: nibabel stops after the voxels,
            # so a file cut after them would otherwise load without a word
            _check_stream(path, limit=offset + declared + (1 << 20) + 64 * size)
        data = np.asanyarray(img.dataobj)
        affine = img.affine
    except CorruptDataError:
        raise
    except MemoryError as exc:
        raise InvalidImageError(f"{path} is too large to load into memory") from exc
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CorruptDataError(f"cannot read image {path}: {exc}") from exc
    if affine is None:
        affine = np.eye(4)
    try:
        return Image(data, affine)
    except InvalidImageError as exc:
        raise InvalidImageError(f"{path}: {exc}") from exc


def _import_sitk(path: Path, what: str) -> Any:
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise MissingDependencyError(
            f"reading or writing {what} ({path.name}) needs SimpleITK: pip install 'keyfuse[itk]'"
        ) from exc
    return sitk


_MET_TYPES = {
    "MET_CHAR",
    "MET_UCHAR",
    "MET_SHORT",
    "MET_USHORT",
    "MET_INT",
    "MET_UINT",
    "MET_LONG",
    "MET_ULONG",
    "MET_LONG_LONG",
    "MET_ULONG_LONG",
    "MET_FLOAT",
    "MET_DOUBLE",
}
_NRRD_TYPES = {
    "signed char",
    "int8",
    "int8_t",
    "uchar",
    "unsigned char",
    "uint8",
    "uint8_t",
    "short",
    "short int",
    "signed short",
    "signed short int",
    "int16",
    "int16_t",
    "ushort",
    "unsigned short",
    "unsigned short int",
    "uint16",
    "uint16_t",
    "int",
    "signed int",
    "int32",
    "int32_t",
    "uint",
    "unsigned int",
    "uint32",
    "uint32_t",
    "longlong",
    "long long",
    "long long int",
    "signed long long",
    "signed long long int",
    "int64",
    "int64_t",
    "ulonglong",
    "unsigned long long",
    "unsigned long long int",
    "uint64",
    "uint64_t",
    "float",
    "double",
}
_NRRD_ENCODINGS = {"raw", "gzip", "gz", "bzip2", "bz2", "ascii", "text", "txt", "hex"}


def _validate_itk_header(path: Path) -> None:
    """Check a NRRD/MetaImage header strictly before ITK parses it.

    ITK's readers can abort the whole process (heap corruption) on some damaged headers,
    so keyfuse refuses anything that is not a well-formed header first: printable ASCII
    lines, the fields a reader needs, numbers where numbers belong, consistent counts.
    """
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    suffix = suffix_of(path)
    lines: list[str] = []
    for raw in head.split(b"\n"):
        text = raw.rstrip(b"\r")
        if suffix in (".nrrd", ".nhdr") and not text and lines:
            break  # end of the NRRD header
        if any(c < 32 and c != 9 for c in text) or any(c > 126 for c in text):
            raise CorruptDataError(f"{path} has a damaged header (non-text bytes)")
        lines.append(text.decode("ascii"))
        if suffix in (".mha", ".mhd") and text.split(b"=", 1)[0].strip() == b"ElementDataFile":
            break
    else:
        if len(head) == 1 << 16:
            raise CorruptDataError(f"{path} has a header longer than 64 KiB")

    def bad(what: str) -> CorruptDataError:
        return CorruptDataError(f"{path} has a damaged header: {what}")

    def numbers(value: str, count: int, kind: type, what: str) -> list[Any]:
        parts = value.replace("(", " ").replace(")", " ").replace(",", " ").split()
        try:
            vals = [kind(v) for v in parts]
        except ValueError:
            raise bad(f"{what} {value!r} is not {count} numbers") from None
        if len(vals) != count or not all(np.isfinite(float(v)) for v in vals):
            raise bad(f"{what} {value!r} is not {count} finite numbers")
        return vals

    if suffix in (".mha", ".mhd"):
        fields: dict[str, str] = {}
        for line in lines:
            if not line.strip():
                continue
            key, eq, value = line.partition("=")
            if not eq or not key.strip().isidentifier():
                raise bad(f"line {line[:40]!r}")
            fields[key.strip()] = value.strip()
        try:
            ndims = int(fields.get("NDims", ""))
        except ValueError:
            raise bad("NDims missing or not a number") from None
        if not 1 <= ndims <= 4:
            raise bad(f"NDims = {ndims}")
        sizes = numbers(fields.get("DimSize", ""), ndims, int, "DimSize")
        if min(sizes) < 1:
            raise bad(f"DimSize {sizes}")
        for key, count in (
            ("ElementSpacing", ndims),
            ("ElementSize", ndims),
            ("Offset", ndims),
            ("Position", ndims),
            ("Origin", ndims),
            ("CenterOfRotation", ndims),
            ("TransformMatrix", ndims * ndims),
            ("Rotation", ndims * ndims),
            ("Orientation", ndims * ndims),
        ):
            if key in fields:
                numbers(fields[key], count, float, key)
        if fields.get("ElementType") not in _MET_TYPES:
            raise bad(f"ElementType {fields.get('ElementType')!r}")
        for key in (
            "CompressedData",
            "BinaryData",
            "BinaryDataByteOrderMSB",
            "ElementByteOrderMSB",
        ):
            if key in fields and fields[key] not in ("True", "False"):
                raise bad(f"{key} = {fields[key]!r}")
        for key in ("CompressedDataSize", "HeaderSize", "ElementNumberOfChannels"):
            if key in fields:
                numbers(fields[key], 1, int, key)
        if "ElementDataFile" not in fields or not fields["ElementDataFile"]:
            raise bad("no ElementDataFile")
        return
    # NRRD
    if not lines or not (lines[0].startswith("NRRD000") and lines[0][7:].isdigit()):
        raise bad("no NRRD magic line")
    nfields: dict[str, str] = {}
    for line in lines[1:]:
        if not line or line.startswith("#"):
            continue
        if ":=" in line:
            continue  # key/value pairs: free text
        key, colon, value = line.partition(": ")
        if not colon:
            raise bad(f"line {line[:40]!r}")
        nfields[key.strip().lower()] = value.strip()
    try:
        dim = int(nfields.get("dimension", ""))
    except ValueError:
        raise bad("dimension missing or not a number") from None
    if not 1 <= dim <= 4:
        raise bad(f"dimension {dim}")
    sizes = numbers(nfields.get("sizes", ""), dim, int, "sizes")
    if min(sizes) < 1:
        raise bad(f"sizes {sizes}")
    if nfields.get("type", "").lower() not in _NRRD_TYPES:
        raise bad(f"type {nfields.get('type')!r}")
    if nfields.get("encoding", "").lower() not in _NRRD_ENCODINGS:
        raise bad(f"encoding {nfields.get('encoding')!r}")
    if "endian" in nfields and nfields["endian"] not in ("little", "big"):
        raise bad(f"endian {nfields['endian']!r}")
    for key in ("spacings", "thicknesses"):
        if key in nfields:
            numbers(nfields[key].replace("nan", "0").replace("NaN", "0"), dim, float, key)
    if "space origin" in nfields:
        origin = nfields["space origin"]
        numbers(
            origin,
            len(origin.replace("(", " ").replace(")", " ").replace(",", " ").split()),
            float,
            "space origin",
        )
    if "space directions" in nfields:
        for part in nfields["space directions"].split():
            if part != "none":
                inner = part.strip("()").split(",")
                numbers(" ".join(inner), len(inner), float, "space directions")


def _read_itk(path: Path) -> Image:
    sitk = _import_sitk(path, "NRRD and MetaImage files")
    _validate_itk_header(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        sizes = [int(n) for n in reader.GetSize()]
        declared = int(np.prod(sizes, dtype=object)) * int(reader.GetNumberOfComponents())
        declared *= _itk_bytes().get(int(reader.GetPixelID()), 8)
        data_file, offset, compressed = _itk_data_file(path)
        check_declared_size(path, declared, data_file.stat().st_size - offset, compressed)
        if compressed:
            # ITK ignores a stream's missing end (and checksum): check it whole first
            head = data_file.read_bytes()[offset : offset + 2]
            wbits = 31 if head == b"\x1f\x8b" else 15 if head[:1] == b"\x78" else 0
            if wbits:
                _check_stream(data_file, limit=declared + 64, offset=offset, wbits=wbits)
        img = reader.Execute()
    except (CorruptDataError, KeyfuseIOError):
        raise
    except OSError as exc:
        raise KeyfuseIOError(f"cannot read image {path}: {exc}") from exc
    except MemoryError as exc:
        raise InvalidImageError(f"{path} is too large to load into memory") from exc
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next(
            (ln for ln in first if "ERROR" in ln or "rror" in ln), first[-1] if first else ""
        )
        raise CorruptDataError(f"cannot read image {path}: {detail.strip()}") from exc
    try:
        return Image(*from_simpleitk(img))
    except InvalidImageError as exc:
        raise InvalidImageError(f"{path}: {exc}") from exc


@functools.cache
def _itk_bytes() -> dict[int, int]:
    """Bytes per voxel of each SimpleITK pixel id; looked up on first use, since importing
    SimpleITK costs ~90 MB of memory that reading other formats must not pay."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return {}
    sizes = {
        "Int8": 1,
        "UInt8": 1,
        "Int16": 2,
        "UInt16": 2,
        "Int32": 4,
        "UInt32": 4,
        "Float32": 4,
        "Int64": 8,
        "UInt64": 8,
        "Float64": 8,
    }
    out = {}
    for name, nbytes in sizes.items():
        for prefix in ("sitk", "sitkVector"):
            value = getattr(sitk, prefix + name, None)
            if value is not None:
                out[int(value)] = nbytes
    return out


def _itk_data_file(path: Path) -> tuple[Path, int, bool]:
    """Where a NRRD/MetaImage's voxels are: the file, the offset of the data in it (after
    an attached header) and whether they may be compressed."""
    suffix = suffix_of(path)
    key = "elementdatafile" if suffix in (".mha", ".mhd") else "data file"
    compressed = False
    target, offset = path, 0
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    pos = 0
    for raw in head.split(b"\n"):
        pos += len(raw) + 1
        line = raw.decode("latin-1").strip()
        low = line.lower()
        if low.startswith(("compresseddata", "encoding")) and any(
            w in low for w in ("true", "gz", "gzip", "bz2", "bzip2")
        ):
            compressed = True
        if low.startswith(key) and ("=" in line or ":" in line):
            value = line.split("=" if key == "elementdatafile" else ":", 1)[1].strip()
            if value.upper() == "LOCAL":
                offset = pos  # MetaImage: the data follow this line
                break
            if value and value.upper() != "LIST" and "%" not in value:
                target = path.parent / value
        if not line and suffix == ".nrrd":
            offset = pos  # end of an attached NRRD header
            break
    if not target.exists():
        raise KeyfuseIOError(f"the voxel data file of {path} is missing: {target}")
    if target != path:
        offset = 0
    return target, offset, compressed


def _read_raster(path: Path) -> Image:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        if suffix_of(path) == ".png":
            with PILImage.open(path) as check:
                check.verify()  # every chunk's CRC, up to IEND: no silently cut file
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - 1024))
                if b"IEND\xaeB`\x82" not in fh.read():
                    raise CorruptDataError(f"{path} is truncated (no PNG end chunk)")
        with PILImage.open(path) as pil:
            frames = []
            for frame in range(getattr(pil, "n_frames", 1)):
                pil.seek(frame)
                frames.append(_pil_to_gray(pil))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptDataError(f"cannot read image {path}: {exc}") from exc
    except PILImage.DecompressionBombError as exc:
        raise InvalidImageError(f"{path} is too large: {exc}") from exc
    if len({f.shape for f in frames}) != 1:
        raise InvalidImageError(f"{path}: the pages of this TIFF differ in size")
    # PIL arrays are [row, column]; keyfuse's first axis is the column (x), as for DICOM
    data = frames[0].T if len(frames) == 1 else np.stack([f.T for f in frames], axis=-1)
    return Image(np.ascontiguousarray(data), np.eye(4))


def _pil_to_gray(pil: Any) -> np.ndarray:
    mode = pil.mode
    if mode in ("1", "L", "P", "LA", "PA"):
        if mode.startswith("P"):
            pil = pil.convert("L")
        return np.asarray(pil.convert("L") if mode in ("1", "LA", "PA") else pil)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return np.asarray(pil)
    # colour: luminance (ITU-R BT.601, as Pillow's "L" conversion) kept in float
    rgb = np.asarray(pil.convert("RGB"), dtype=np.float32)
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


# -- other libraries' images -----------------------------------------------------------------
def from_nibabel(img: Any) -> tuple[np.ndarray, np.ndarray]:
    """A nibabel image's voxel array (scaled) and affine."""
    data = np.asanyarray(img.dataobj)
    affine = img.affine if img.affine is not None else np.eye(4)
    return data, np.asarray(affine, dtype=np.float64)


def from_simpleitk(img: Any) -> tuple[np.ndarray, np.ndarray]:
    """A SimpleITK image's array in ``(x, y, z)`` order and its geometry as a RAS affine."""
    import SimpleITK as sitk

    dim = int(img.GetDimension())
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidImageError(
            f"SimpleITK image has {img.GetNumberOfComponentsPerPixel()} components per "
            "pixel: pass one channel (e.g. SimpleITK.VectorIndexSelectionCast)"
        )
    if dim not in (2, 3):
        raise InvalidImageError(f"expected a 2D or 3D SimpleITK image, got {dim}D")
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) order
    data = np.ascontiguousarray(arr.transpose(tuple(range(arr.ndim))[::-1]))
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:dim, :dim] = direction * spacing
    lps[:dim, 3] = img.GetOrigin()
    return data, lps_to_ras(lps)


def to_simpleitk(image: Image) -> Any:
    """``image`` as a ``SimpleITK.Image`` with LPS origin, spacing and direction."""
    sitk = _import_sitk(Path("image"), "SimpleITK images")
    data = np.asarray(image.data)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    dim = image.ndim
    lps = lps_to_ras(image.affine)
    mat = lps[:dim, :dim]
    spacing = np.sqrt((mat**2).sum(axis=0))
    direction = mat / spacing
    if dim == 2 and not np.allclose(lps[2, :2], 0):
        raise InvalidArgumentError(
            "this 2D image lies in an oblique plane that a 2D SimpleITK image cannot describe"
        )
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(tuple(range(dim))[::-1])))
    out.SetSpacing([float(s) for s in spacing])
    out.SetOrigin([float(v) for v in lps[:dim, 3]])
    out.SetDirection([float(v) for v in direction.ravel()])
    return out


def to_nifti(image: Image) -> Any:
    """``image`` as a ``nibabel.Nifti1Image``: sform and qform set (code 1, scanner
    anatomical) from the affine, spatial units millimetres."""
    import nibabel as nib

    data = _nifti_safe(np.asarray(image.data))
    img = nib.Nifti1Image(data, image.affine)
    img.set_sform(image.affine, code=1)
    img.set_qform(image.affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    return img


def _nifti_safe(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if data.dtype == np.float16:
        return data.astype(np.float32)
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        # nibabel refuses 64-bit integers without an explicit dtype: keep them exact if
        # they fit 32 bits
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
            return data.astype(np.int32)
        return data.astype(np.float64)
    return data


# -- writing ---------------------------------------------------------------------------------
def check_writable(path: Path, ndim: int = 3) -> str:
    """Check, before any work, that an image of ``ndim`` dimensions can be written to
    ``path``; returns the format suffix.

    Raises
    ------
    InvalidArgumentError
        The suffix is missing, unknown, or cannot hold such an image.
    KeyfuseIOError
        ``path`` is a directory or its folder cannot be created or written.
    """
    suffix = suffix_of(path)
    if suffix not in WRITABLE_SUFFIXES:
        shown = suffix or "no suffix"
        raise InvalidArgumentError(
            f"cannot write an image to {path} ({shown}): use one of " + ", ".join(WRITABLE_SUFFIXES)
        )
    if suffix in (".png", ".tif", ".tiff") and ndim != 2:
        raise InvalidArgumentError(
            f"cannot write a {ndim}D image to {path}: {suffix} holds 2D images; "
            "use .nii.gz, .mgz, .nrrd or .mha"
        )
    if path.is_dir():
        raise KeyfuseIOError(f"cannot write an image to {path}: it is a directory")
    parent = path.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise KeyfuseIOError(f"cannot write an image to {path}: {existing} is not writable")
    return suffix


def write_image(image: Image, path: Path) -> None:
    """Write ``image`` to ``path`` atomically in the format its suffix names."""
    from keyfuse._io import atomic_path

    suffix = check_writable(path, image.ndim)
    try:
        if suffix == ".mhd":  # header + separate .raw: both appear, or neither
            _write_mhd(image, path)
            return
        with atomic_path(path) as tmp:
            if suffix in (".nii", ".nii.gz"):
                to_nifti(image).to_filename(str(tmp))
            elif suffix in (".mgz", ".mgh"):
                _to_mgh(image).to_filename(str(tmp))
            elif suffix in (".nrrd", ".mha"):
                sitk = _import_sitk(path, "NRRD and MetaImage files")
                sitk.WriteImage(to_simpleitk(image), str(tmp), useCompression=True)
            else:
                _write_raster(image, tmp, suffix)
    except KeyfuseError:
        raise
    except OSError as exc:
        raise KeyfuseIOError(f"cannot write image {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # a writer's own error types (nibabel, SimpleITK, Pillow)
        raise KeyfuseIOError(f"cannot write image {path}: {exc}") from exc


def _to_mgh(image: Image) -> Any:
    import nibabel as nib

    data = np.asarray(image.data)
    if image.ndim == 2:
        data = data[:, :, None]
    # MGH holds uint8, int16, int32 and float32 voxels
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    elif data.dtype not in (np.uint8, np.int16, np.int32, np.float32):
        if data.dtype.kind in "iu" and data.size:
            lo, hi = int(data.min()), int(data.max())
            if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
                data = data.astype(np.int32)
            else:
                data = data.astype(np.float32)
        else:
            data = data.astype(np.float32)
    mat = image.affine[:3, :3]
    cols = mat / np.sqrt((mat**2).sum(axis=0))
    if not np.allclose(cols.T @ cols, np.eye(3), atol=1e-4):
        raise InvalidArgumentError(
            "MGH/MGZ cannot store a sheared affine (e.g. a tilted-gantry CT): use .nii.gz"
        )
    return nib.MGHImage(np.ascontiguousarray(data), image.affine)


def _write_raster(image: Image, tmp: Path, suffix: str) -> None:
    from PIL import Image as PILImage

    data = np.asarray(image.data).T  # [column, row] → PIL's [row, column]
    if data.dtype == np.bool_:
        data = data.astype(np.uint8) * 255
    if suffix == ".png":
        if data.dtype not in (np.uint8, np.uint16):
            raise InvalidArgumentError(
                f"PNG holds 8- or 16-bit unsigned integers, not {data.dtype}: convert the "
                "data (e.g. np.clip(x, 0, 255).astype(np.uint8)) or write .tif"
            )
    elif data.dtype not in (np.uint8, np.uint16, np.int32, np.float32):
        data = data.astype(np.float32)
    PILImage.fromarray(np.ascontiguousarray(data)).save(
        tmp, format="PNG" if suffix == ".png" else "TIFF"
    )


def _write_mhd(image: Image, path: Path) -> None:
    sitk = _import_sitk(path, "MetaImage files")
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        sitk.WriteImage(to_simpleitk(image), str(stage / path.name), useCompression=True)
        header = stage / path.name
        data_files = [p for p in stage.iterdir() if p != header]
        for p in data_files:  # the data first, so a visible header always has its data
            os.replace(p, path.parent / p.name)
        os.replace(header, path)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(stage)


__all__ = [
    "check_writable",
    "from_nibabel",
    "from_simpleitk",
    "lps_to_ras",
    "read_image",
    "suffix_of",
    "to_nifti",
    "to_simpleitk",
    "write_image",
]
