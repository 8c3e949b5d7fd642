"""DICOM reading with pydicom: a directory holding a series, a multi-frame file, or a
single 2D image.

Geometry follows the standard (PS3.3 C.7.6.2): ``ImageOrientationPatient`` gives the
direction of a row (increasing column index) and of a column (increasing row index),
``PixelSpacing`` is (row spacing, column spacing), and ``ImagePositionPatient`` is the
centre of the first transmitted voxel, all in LPS millimetres. keyfuse's array is
``[column, row, slice]`` (x, y, z, as SimpleITK and dcm2niix order them); slices are
sorted by their position along the slice normal, and the third affine column is the step
between consecutive slice positions (so a tilted-gantry CT keeps its true geometry).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keyfuse.errors import (
    CorruptDataError,
    InvalidArgumentError,
    InvalidImageError,
    KeyfuseIOError,
    MissingDependencyError,
    NotDicomWarning,
    warn_caller,
)
from keyfuse.formats import lps_to_ras
from keyfuse.image import Image

# relative tolerances for "the same" orientation and slice step within a series
_ORIENTATION_TOL = 1e-4
_STEP_TOL = 0.01  # 1% of the slice step (and at least 1 µm)


def _pydicom(path: Path) -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise MissingDependencyError(
            f"reading DICOM ({path}) needs pydicom: pip install 'keyfuse[dicom]'"
        ) from exc
    return pydicom


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` starts with a DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_directory(path: Path, probe: int = 16) -> bool:
    """Whether ``path`` is a directory holding DICOM files (so one image, not a folder
    of images): looks at up to ``probe`` files, recursively."""
    if not path.is_dir():
        return False
    seen = 0
    for file in path.rglob("*"):
        if not file.is_file():
            continue
        if file.name.upper() == "DICOMDIR" or is_dicom_file(file):
            return True
        seen += 1
        if seen >= probe:
            break
    return False


@dataclass
class _Header:
    path: Path
    ds: Any

    @property
    def series_uid(self) -> str:
        return str(self.ds.get("SeriesInstanceUID", "(no SeriesInstanceUID)"))


def read_dicom(path: Path, *, series: str | int | None = None) -> Image:
    """Read a DICOM file or a directory holding one series (or the ``series`` chosen).

    Parameters
    ----------
    path:
        A DICOM file (a 2D image or a multi-frame volume) or a directory whose files
        (searched recursively; non-DICOM files and DICOMDIR are skipped) form a series.
    series:
        Which series of a directory that holds several: a SeriesInstanceUID, a
        SeriesNumber, or the position in the listing the error message shows.

    Raises
    ------
    CorruptDataError
        Unreadable files, non-image objects, several series without ``series``, missing
        or duplicated slices, or inconsistent orientation, spacing or size.
    MissingDependencyError
        pydicom is missing, or no installed decoder handles the compression.
    """
    if path.is_dir():
        headers = _scan_directory(path)
        chosen = _choose_series(path, headers, series)
        return _read_series(path, chosen)
    pydicom = _pydicom(path)
    ds = _dcmread(pydicom, path, header_only=False)
    _require_image(ds, path)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return _read_multiframe(ds, path)
    return _read_single(ds, path)


# -- files and series ----------------------------------------------------------------------
def _dcmread(pydicom: Any, path: Path, *, header_only: bool) -> Any:
    try:
        try:
            return pydicom.dcmread(str(path), stop_before_pixels=header_only)
        except pydicom.errors.InvalidDicomError:
            # old files without the Part 10 preamble and meta header: accept them only if
            # they parse into a dataset with the elements every DICOM object carries
            ds = _read_forced(pydicom, path, header_only)
            if ds is None:
                raise
            return ds
    except (pydicom.errors.InvalidDicomError, EOFError) as exc:
        raise CorruptDataError(f"{path} is not a readable DICOM file: {exc}") from exc
    except OSError as exc:
        raise KeyfuseIOError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on damaged headers
        raise CorruptDataError(f"{path} is a damaged DICOM file: {exc}") from exc


def _read_forced(pydicom: Any, path: Path, header_only: bool) -> Any | None:
    """A DICOM file without the Part 10 header, or None if it does not look like one."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), stop_before_pixels=header_only, force=True)
            ok = "SOPClassUID" in ds and ("Modality" in ds or "Rows" in ds)
    except Exception:
        return None
    if not ok:
        return None
    if "TransferSyntaxUID" not in ds.file_meta:
        from pydicom import uid

        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            uid.ImplicitVRLittleEndian
            if implicit
            else uid.ExplicitVRLittleEndian
            if little
            else uid.ExplicitVRBigEndian
        )
    return ds


def _scan_directory(root: Path) -> list[_Header]:
    pydicom = _pydicom(root)
    headers: list[_Header] = []
    skipped: list[Path] = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        if file.name.upper() == "DICOMDIR" or file.name.startswith("."):
            continue
        if not is_dicom_file(file):
            # files without the Part 10 preamble: DICOM only if they parse as one
            ds = _read_forced(pydicom, file, True)
            if ds is None:
                skipped.append(file)
                continue
        else:
            ds = _dcmread(pydicom, file, header_only=True)
        if "SeriesInstanceUID" not in ds or "SOPClassUID" not in ds:
            # every DICOM object names its series and class: a damaged (e.g. cut) file
            raise CorruptDataError(
                f"{file} is a damaged DICOM file (no SeriesInstanceUID or SOPClassUID)"
            )
        for key in ("SeriesInstanceUID", "SOPClassUID"):
            if not _uid_like(ds.get(key)):
                # damaged bytes read as a run of other elements: not a series of its own
                raise CorruptDataError(
                    f"{file} is a damaged DICOM file: its {key} is not a UID "
                    f"({str(ds.get(key))[:40]!r})"
                )
        sop_name = str(getattr(ds.SOPClassUID, "name", ""))
        if "Image Storage" in sop_name and not _header_is_image(ds):
            raise CorruptDataError(
                f"{file} is a damaged DICOM file: a {sop_name} object without Rows/Columns"
            )
        headers.append(_Header(file, ds))
    if not headers:
        raise CorruptDataError(f"{root} holds no DICOM files")
    if skipped:
        _warn_skipped(
            root,
            skipped,
            f"skipped {_count(skipped, 'file')} that "
            f"{'are' if len(skipped) > 1 else 'is'} not DICOM",
        )
    return headers


def _count(items: list[Path], noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) > 1 else ''}"


def _warn_skipped(root: Path, files: list[Path], what: str) -> None:
    """A NotDicomWarning naming (the first five of) the files a directory read passed over."""
    names = ", ".join(str(p.relative_to(root)) for p in files[:5])
    more = f" and {len(files) - 5} more" if len(files) > 5 else ""
    warn_caller(f"{root}: {what}: {names}{more}", NotDicomWarning)


def _uid_like(value: Any) -> bool:
    """One value of digits and dots (real files bend the standard's other UID rules, such
    as leading zeros, so only this much is required)."""
    if not isinstance(value, str):  # absent, or several values
        return False
    return 0 < len(value) <= 64 and all(c.isdigit() or c == "." for c in value)


def _describe(uid: str, files: list[_Header]) -> str:
    ds = files[0].ds
    parts = [
        f"SeriesNumber {ds.get('SeriesNumber', '?')}",
        str(ds.get("Modality", "?")),
        repr(str(ds.get("SeriesDescription", ""))),
        f"{len(files)} file{'s' if len(files) != 1 else ''}",
        f"uid {uid}",
    ]
    return ", ".join(parts)


def _choose_series(root: Path, headers: list[_Header], series: str | int | None) -> list[_Header]:
    groups: dict[str, list[_Header]] = defaultdict(list)
    for h in headers:
        groups[h.series_uid].append(h)

    # image series first, then by SeriesNumber, so the listing's positions are stable
    def order(uid: str) -> tuple[int, float, str]:
        ds = groups[uid][0].ds
        has_pixels = any(_header_is_image(h.ds) for h in groups[uid])
        try:
            number = float(ds.get("SeriesNumber", np.inf))
        except (TypeError, ValueError):
            number = np.inf
        return (0 if has_pixels else 1, number, uid)

    uids = sorted(groups, key=order)
    listing = "\n".join(f"  [{i}] {_describe(uid, groups[uid])}" for i, uid in enumerate(uids))
    if series is None:
        image_uids = [u for u in uids if any(_header_is_image(h.ds) for h in groups[u])]
        if len(image_uids) == 1:
            others = [h.path for u in uids if u != image_uids[0] for h in groups[u]]
            if others:  # reports, presentation states... or a damaged image: never silently
                _warn_skipped(
                    root,
                    others,
                    f"read the one image series; ignored {_count(others, 'DICOM object')} "
                    "without an image",
                )
            return groups[image_uids[0]]
        if not image_uids:
            raise CorruptDataError(f"{root} holds no DICOM images, only:\n{listing}")
        raise CorruptDataError(
            f"{root} holds {len(image_uids)} image series; choose one with series= "
            f"(a SeriesInstanceUID, SeriesNumber or the [position] below), or point to "
            f"a directory holding one series:\n{listing}"
        )
    if isinstance(series, str) and series in groups:
        return groups[series]
    matches = [u for u in uids if str(groups[u][0].ds.get("SeriesNumber", "")) == str(series)]
    if len(matches) == 1:
        return groups[matches[0]]
    if isinstance(series, int) and not isinstance(series, bool) and 0 <= series < len(uids):
        return groups[uids[series]]
    raise InvalidArgumentError(f"no series {series!r} in {root}; it holds:\n{listing}")


def _has_pixels(ds: Any) -> bool:
    return "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds


def _header_is_image(ds: Any) -> bool:
    """Whether a header read without its pixel data describes an image."""
    return _has_pixels(ds) or ("Rows" in ds and "Columns" in ds)


def _require_image(ds: Any, path: Path, *, header: bool = False) -> None:
    if not (_header_is_image(ds) if header else _has_pixels(ds)):
        sop = ds.get("SOPClassUID")
        name = getattr(sop, "name", str(sop)) if sop is not None else "unknown SOP class"
        raise CorruptDataError(
            f"{path} is a DICOM {ds.get('Modality', '')} object without pixel data "
            f"({name}): not an image"
        )


# -- pixels ----------------------------------------------------------------------------------
def _pixels(ds: Any, path: Path) -> np.ndarray:
    """The stored pixel values (frames first for multi-frame), decoded."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    _check_pixel_size(ds, path, bool(ts is not None and getattr(ts, "is_compressed", False)))
    if ts is not None and getattr(ts, "is_compressed", False):
        missing = _missing_decoder(ts)
        if missing:
            raise MissingDependencyError(
                f"{path}: pixel data is compressed as {ts.name} and no installed decoder "
                f"handles it: pip install {missing}"
            )
    try:
        arr = ds.pixel_array
    except MemoryError as exc:
        raise InvalidImageError(f"{path} is too large to decode ({exc})") from exc
    except Exception as exc:  # pydicom: ValueError, AttributeError, RuntimeError, ...
        raise CorruptDataError(f"cannot decode the pixel data of {path}: {exc}") from exc
    arr = np.asarray(arr)
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        # colour (RGB after pydicom's conversion): luminance, ITU-R BT.601
        arr = np.asarray(arr, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return arr


def _check_pixel_size(ds: Any, path: Path, compressed: bool) -> None:
    """Refuse pixel data whose declared size the file cannot hold, before decoding."""
    from keyfuse.formats import check_declared_size

    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CorruptDataError(
            f"{path}: image header incomplete (Rows, Columns, BitsAllocated): {exc}"
        ) from exc
    if min(rows, cols, frames, samples, bits) <= 0:
        raise CorruptDataError(f"{path}: image header declares an empty image")
    declared = rows * cols * frames * samples * ((bits + 7) // 8)
    if bits == 1:
        declared = (rows * cols * frames * samples + 7) // 8
    element = next(
        (k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None
    )
    value = ds[element].value if element else b""
    available = len(value) if isinstance(value, (bytes, bytearray)) else 0
    # compressed streams: a generous bound (JPEG-LS runs compress blank frames far better
    # than deflate's ~1000-fold)
    check_declared_size(path, declared // (4 if compressed else 1), available, compressed)


def _missing_decoder(ts: Any) -> str:
    """pip packages that would decode ``ts`` when none installed can ('' if one can)."""
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom < 3: let pixel_array report
        return ""
    try:
        decoder = get_decoder(ts)
    except (NotImplementedError, ValueError):
        return "python-gdcm"
    if decoder.is_available:
        return ""
    # pydicom names each plugin's missing packages; suggest the one with fewest of them
    options = [deps for deps in decoder.missing_dependencies if deps]
    pkgs = {
        "gdcm": "python-gdcm",
        "pylibjpeg": "pylibjpeg",
        "pyjpegls": "pyjpegls",
        "pillow": "pillow",
        "numpy": "numpy",
    }
    for line in options:
        names = [w.strip(" ,") for w in line.split("requires", 1)[-1].split()]
        wanted = [pkgs.get(n.lower(), n) for n in names if n and n.lower() != "and"]
        if wanted:
            return " ".join(sorted(set(wanted)))
    return "python-gdcm"


def _rescale(arr: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    if slope == 1.0 and intercept == 0.0:
        return arr
    return (arr.astype(np.float64) * slope + intercept).astype(np.float32)


def _float(ds: Any, key: str, default: float) -> float:
    value = ds.get(key, None)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _vector(ds: Any, key: str, n: int, path: Path) -> np.ndarray | None:
    value = ds.get(key, None)
    if value is None:
        return None
    try:
        vec = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CorruptDataError(f"{path}: {key} is not numeric ({value!r})") from exc
    if vec.shape != (n,) or not np.all(np.isfinite(vec)):
        raise CorruptDataError(f"{path}: {key} must hold {n} finite numbers, got {value!r}")
    return vec


def _in_plane(iop: np.ndarray, spacing: np.ndarray, path: Path) -> np.ndarray:
    """The affine's first two columns (LPS): column step along a row, row step down."""
    row, col = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(row @ col) > 1e-3
    ):
        raise CorruptDataError(
            f"{path}: ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors"
        )
    if np.any(spacing <= 0):
        raise CorruptDataError(f"{path}: PixelSpacing must be positive, got {list(spacing)}")
    # PixelSpacing is (between rows, between columns)
    return np.column_stack([row * spacing[1], col * spacing[0]])


def _pixel_spacing(ds: Any, path: Path) -> np.ndarray | None:
    for key in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        sp = _vector(ds, key, 2, path)
        if sp is not None:
            return sp
    return None


# -- one 2D image ----------------------------------------------------------------------------
def _read_single(ds: Any, path: Path) -> Image:
    arr = _pixels(ds, path)
    if arr.ndim != 2:
        raise InvalidImageError(f"{path}: expected a 2D image, got pixel data of shape {arr.shape}")
    data = _rescale(arr, _float(ds, "RescaleSlope", 1.0), _float(ds, "RescaleIntercept", 0.0))
    iop = _vector(ds, "ImageOrientationPatient", 6, path)
    ipp = _vector(ds, "ImagePositionPatient", 3, path)
    spacing = _pixel_spacing(ds, path)
    lps = np.eye(4)
    if spacing is None:
        spacing = np.ones(2)
    if iop is not None:
        lps[:3, :2] = _in_plane(iop, spacing, path)
        normal = np.cross(iop[:3], iop[3:])
        thickness = _float(ds, "SliceThickness", 1.0)
        lps[:3, 2] = normal * (thickness if thickness > 0 else 1.0)
    else:  # projection images (X-ray): pixel sizes only, no patient frame
        lps[:3, :3] = np.diag([spacing[1], spacing[0], 1.0])
    if ipp is not None:
        lps[:3, 3] = ipp
    affine = lps_to_ras(lps) if iop is not None else lps
    return Image(np.ascontiguousarray(data.T), affine)


# -- a series of 2D files --------------------------------------------------------------------
def _read_series(root: Path, files: list[_Header]) -> Image:
    pydicom = _pydicom(root)
    if len(files) == 1:
        ds = _dcmread(pydicom, files[0].path, header_only=False)
        _require_image(ds, files[0].path)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return _read_multiframe(ds, files[0].path)
        return _read_single(ds, files[0].path)
    for h in files:
        _require_image(h.ds, h.path, header=True)
        if int(h.ds.get("NumberOfFrames", 1) or 1) > 1:
            raise CorruptDataError(
                f"{root}: series mixes multi-frame files ({h.path.name}) with others; "
                "read the multi-frame file on its own"
            )
    first = files[0]
    iops, ipps = [], []
    for h in files:
        iop = _vector(h.ds, "ImageOrientationPatient", 6, h.path)
        ipp = _vector(h.ds, "ImagePositionPatient", 3, h.path)
        if iop is None or ipp is None:
            raise CorruptDataError(
                f"{h.path} has no ImageOrientationPatient/ImagePositionPatient, so the "
                f"{len(files)} files of {root} cannot be stacked into a volume; read one "
                "file at a time"
            )
        iops.append(iop)
        ipps.append(ipp)
    iop0 = iops[0]
    for h, iop in zip(files, iops, strict=True):
        if np.max(np.abs(iop - iop0)) > _ORIENTATION_TOL:
            raise CorruptDataError(
                f"{root}: inconsistent slice orientation within the series: {h.path.name} has "
                f"ImageOrientationPatient {np.round(iop, 5).tolist()}, {first.path.name} "
                f"{np.round(iop0, 5).tolist()} (a localizer? choose the files of one stack)"
            )
    shape0 = (first.ds.get("Rows"), first.ds.get("Columns"))
    sp0 = _pixel_spacing(first.ds, first.path)
    for h in files:
        if (h.ds.get("Rows"), h.ds.get("Columns")) != shape0:
            raise CorruptDataError(
                f"{root}: slices differ in size: {h.path.name} is "
                f"{h.ds.get('Rows')}×{h.ds.get('Columns')}, {first.path.name} "
                f"{shape0[0]}×{shape0[1]}"
            )
        sp = _pixel_spacing(h.ds, h.path)
        if (sp is None) != (sp0 is None) or (
            sp is not None and sp0 is not None and np.max(np.abs(sp - sp0)) > 1e-4 * sp0.max()
        ):
            raise CorruptDataError(
                f"{root}: inconsistent PixelSpacing within the series: {h.path.name} has "
                f"{None if sp is None else sp.tolist()}, {first.path.name} "
                f"{None if sp0 is None else sp0.tolist()}"
            )
    spacing = sp0 if sp0 is not None else np.ones(2)
    positions = np.asarray(ipps)
    order, step = _slice_order(root, [h.path for h in files], iop0, positions)
    lps = np.eye(4)
    lps[:3, :2] = _in_plane(iop0, spacing, first.path)
    lps[:3, 2] = step
    lps[:3, 3] = positions[order[0]]
    slices = []
    for idx in order:
        h = files[idx]
        ds = _dcmread(pydicom, h.path, header_only=False)
        _require_image(ds, h.path)
        arr = _pixels(ds, h.path)
        if arr.shape != (int(shape0[0]), int(shape0[1])):
            raise CorruptDataError(
                f"{h.path}: pixel data of shape {arr.shape} does not match its header"
            )
        slices.append(
            _rescale(arr, _float(ds, "RescaleSlope", 1.0), _float(ds, "RescaleIntercept", 0.0))
        )
    dtype = np.result_type(*[s.dtype for s in slices])
    volume = np.stack([s.T.astype(dtype, copy=False) for s in slices], axis=-1)
    return Image(np.ascontiguousarray(volume), lps_to_ras(lps))


def _slice_order(
    where: Path, names: list[Path], iop: np.ndarray, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sort slices along the normal; check for duplicated, missing or uneven slices.

    Returns the order and the LPS step from one slice position to the next.
    """
    normal = np.cross(iop[:3], iop[3:])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    gaps = np.diff(d)
    if len(gaps) == 0:
        return order, normal
    scale = max(float(np.median(np.abs(gaps))), 1e-6)
    dupes = np.flatnonzero(gaps < max(_STEP_TOL * scale, 1e-3))
    if len(dupes):
        a, b = names[order[dupes[0]]].name, names[order[dupes[0] + 1]].name
        n_pos = len(np.unique(np.round(d, 3)))
        hint = (
            f" ({len(d)} files at {n_pos} positions: a 4D/multi-echo series? split it by "
            "AcquisitionNumber/EchoTime or TemporalPositionIdentifier)"
            if n_pos > 1 and len(d) % n_pos == 0 and len(d) // n_pos > 1
            else ""
        )
        raise CorruptDataError(
            f"{where}: duplicated slices: {a} and {b} lie at the same position "
            f"({d[dupes[0]]:.3f} mm along the slice normal){hint}"
        )
    step_len = float(np.median(gaps))
    off = np.abs(gaps - step_len) > max(_STEP_TOL * step_len, 1e-3)
    if np.any(off):
        i = int(np.flatnonzero(off)[0])
        a, b = names[order[i]].name, names[order[i + 1]].name
        ratio = gaps[i] / step_len
        if abs(ratio - round(ratio)) < 0.1 and round(ratio) >= 2:
            missing = round(ratio) - 1
            raise CorruptDataError(
                f"{where}: missing slices: {missing} slice{'s' if missing > 1 else ''} "
                f"between {a} and {b} (a gap of {gaps[i]:.3f} mm where the series steps "
                f"{step_len:.3f} mm)"
            )
        raise CorruptDataError(
            f"{where}: inconsistent slice spacing: {gaps[i]:.3f} mm between {a} and {b}, "
            f"{step_len:.3f} mm elsewhere"
        )
    step = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    # every slice must lie on the line from the first to the last (tilt is fine; a
    # scattered in-plane offset is not)
    expected = positions[order[0]] + np.outer(np.arange(len(order)), step)
    worst = float(np.max(np.linalg.norm(positions[order] - expected, axis=1)))
    if worst > max(_STEP_TOL * step_len, 1e-3) * 10:
        raise CorruptDataError(
            f"{where}: inconsistent slice positions: slices are offset in-plane by up to "
            f"{worst:.3f} mm from a straight stack"
        )
    return order, step


# -- multi-frame files -----------------------------------------------------------------------
def _frame_item(ds: Any, i: int, seq: str) -> Any | None:
    """The functional-group item ``seq`` for frame ``i`` (per-frame, else shared)."""
    for groups_key, index in (
        ("PerFrameFunctionalGroupsSequence", i),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(groups_key)
        if groups is not None and len(groups) > index:
            item = groups[index].get(seq)
            if item is not None and len(item):
                return item[0]
    return None


def _read_multiframe(ds: Any, path: Path) -> Image:
    n = int(ds.NumberOfFrames)
    arr = _pixels(ds, path)
    if arr.ndim != 3 or arr.shape[0] != n:
        raise CorruptDataError(f"{path}: {n} frames declared but pixel data has shape {arr.shape}")
    iops: list[np.ndarray | None] = []
    ipps: list[np.ndarray | None] = []
    slopes, intercepts = [], []
    spacing = _pixel_spacing(ds, path)
    for i in range(n):
        orient = _frame_item(ds, i, "PlaneOrientationSequence")
        pos = _frame_item(ds, i, "PlanePositionSequence")
        meas = _frame_item(ds, i, "PixelMeasuresSequence")
        trans = _frame_item(ds, i, "PixelValueTransformationSequence")
        iops.append(_vector(orient, "ImageOrientationPatient", 6, path) if orient else None)
        ipps.append(_vector(pos, "ImagePositionPatient", 3, path) if pos else None)
        if meas is not None and spacing is None:
            spacing = _pixel_spacing(meas, path)
        src = trans if trans is not None else ds
        slopes.append(_float(src, "RescaleSlope", 1.0))
        intercepts.append(_float(src, "RescaleIntercept", 0.0))
    frames = [_rescale(arr[i], slopes[i], intercepts[i]) for i in range(n)]
    dtype = np.result_type(*[f.dtype for f in frames])
    iop0 = iops[0] if iops[0] is not None else _vector(ds, "ImageOrientationPatient", 6, path)
    if spacing is None:
        spacing = np.ones(2)
    names = [Path(f"{path.name}[frame {i + 1}]") for i in range(n)]
    lps = np.eye(4)
    if all(p is not None for p in ipps) and iop0 is not None:
        for i, iop in enumerate(iops):
            if iop is not None and np.max(np.abs(iop - iop0)) > _ORIENTATION_TOL:
                raise CorruptDataError(
                    f"{path}: inconsistent orientation between frames 1 and {i + 1}"
                )
        positions = np.asarray(ipps)
        order, step = _slice_order(path, names, iop0, positions)
        origin = positions[order[0]]
    else:
        # legacy multi-frame (RT dose, NM): one position, frame offsets along the normal
        ipp = _vector(ds, "ImagePositionPatient", 3, path)
        if iop0 is None or ipp is None:
            raise CorruptDataError(
                f"{path}: a multi-frame image without frame positions "
                "(ImagePositionPatient/ImageOrientationPatient) has no volume geometry"
            )
        normal = np.cross(iop0[:3], iop0[3:])
        offsets = ds.get("GridFrameOffsetVector")
        if offsets is not None and len(offsets) == n:
            off = np.asarray([float(v) for v in offsets])
        else:
            thick = _float(ds, "SpacingBetweenSlices", _float(ds, "SliceThickness", 0.0))
            if thick <= 0:
                raise CorruptDataError(
                    f"{path}: {n} frames but no frame positions, GridFrameOffsetVector or "
                    "slice spacing"
                )
            off = np.arange(n) * thick
        positions = ipp + np.outer(off - off[0], normal)
        order, step = _slice_order(path, names, iop0, positions)
        origin = positions[order[0]]
    lps[:3, :2] = _in_plane(iop0, spacing, path)
    lps[:3, 2] = step
    lps[:3, 3] = origin
    volume = np.stack([frames[i].T.astype(dtype, copy=False) for i in order], axis=-1)
    return Image(np.ascontiguousarray(volume), lps_to_ras(lps))


__all__ = ["NotDicomWarning", "is_dicom_directory", "is_dicom_file", "read_dicom"]
