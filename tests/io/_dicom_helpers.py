"""Helpers for the image-format tests: pydicom's shipped files and a DICOM writer
that stores a real volume as a series or as one enhanced multi-frame file."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest

import keyfuse as kf

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def pydicom_file(name: str) -> Path:
    """A file shipped in the pydicom wheel (``pydicom/data/test_files``)."""
    pydicom = pytest.importorskip("pydicom")
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.exists():
        pytest.skip(f"this pydicom wheel does not ship {name}")
    return path


@cache
def small_mni() -> kf.Image:
    """The real MNI152 template at 4 mm (50×59×48): small and fast. (Not a fixture in a
    conftest.py: a second conftest module would shadow tests/conftest.py for the tests
    that import helpers from it.)"""
    return kf.datasets.mni152(resolution_mm=4.0)


def _geometry(img: kf.Image) -> tuple[np.ndarray, list[float], list[float]]:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    sx, sy = (float(np.linalg.norm(lps[:3, c])) for c in (0, 1))
    iop = [*(lps[:3, 0] / sx), *(lps[:3, 1] / sy)]
    return lps, iop, [sy, sx]


def _base(uid: str, sop_class: str, number: int = 1) -> object:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    # deterministic instance UIDs: the same bytes every run (hypothesis replays cases)
    meta.MediaStorageSOPInstanceUID = f"{uid}.{number}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = "MR"
    ds.PatientName = "MNI152^Template"
    ds.PatientID = "mni152"
    ds.SeriesNumber = 7
    ds.SeriesDescription = "MNI152 written by keyfuse tests"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def quantise(img: kf.Image) -> tuple[np.ndarray, float, float]:
    """int16 stored values and the rescale that maps them back (like a scanner's)."""
    data = np.asarray(img.data, np.float64)
    slope = float(data.max() - data.min()) / 30000.0
    intercept = float(data.min()) - 1000.0 * slope
    stored = np.round((data - intercept) / slope).astype(np.int16)
    return stored, slope, intercept


def write_series(
    img: kf.Image,
    folder: Path,
    *,
    uid: str = "1.2.826.0.1.3680043.8.498.10",
    shuffle_seed: int | None = 0,
) -> list[Path]:
    """Store a 3D ``img`` as a DICOM series, one file per k-slice (names shuffled)."""
    folder.mkdir(parents=True, exist_ok=True)
    lps, iop, spacing = _geometry(img)
    stored, slope, intercept = quantise(img)
    n = img.shape[2]
    names = (
        np.arange(n) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(n)
    )
    paths = []
    for k in range(n):
        ds = _base(uid, MR_IMAGE_STORAGE, k + 1)
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = img.shape[1], img.shape[0]
        ds.PixelSpacing = spacing
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.ImageOrientationPatient = [round(v, 10) for v in iop]
        ds.ImagePositionPatient = [round(v, 10) for v in (lps[:3, 3] + k * lps[:3, 2])]
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = f"{intercept:.10g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / f"IM{names[k]:04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe(img: kf.Image, path: Path) -> Path:
    """Store a 3D ``img`` as one enhanced MR multi-frame file (per-frame positions,
    shared orientation and pixel measures, frames in reverse order)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lps, iop, spacing = _geometry(img)
    stored, slope, intercept = quantise(img)
    n = img.shape[2]
    order = np.arange(n)[::-1]
    ds = _base("1.2.826.0.1.3680043.8.498.11", ENHANCED_MR_STORAGE)
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = img.shape[1], img.shape[0]
    shared = Dataset()
    orient, meas, trans = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [round(v, 10) for v in iop]
    meas.PixelSpacing = spacing
    meas.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
    trans.RescaleSlope = f"{slope:.10g}"
    trans.RescaleIntercept = f"{intercept:.10g}"
    trans.RescaleType = "US"
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([meas])
    shared.PixelValueTransformationSequence = Sequence([trans])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [round(v, 10) for v in (lps[:3, 3] + k * lps[:3, 2])]
        item.PlanePositionSequence = Sequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(np.stack([stored[:, :, k].T for k in order])).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
