"""DICOM reading (issue 10 item 2) on the real files shipped in the pydicom wheel and on a
series written from the real MNI152 volume, checked against SimpleITK (GDCM)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from _dicom_helpers import pydicom_file, small_mni, write_multiframe, write_series

import keyfuse as kf
from keyfuse.errors import CorruptDataError, InvalidArgumentError, MissingDependencyError

pytest.importorskip("pydicom")
sitk = pytest.importorskip("SimpleITK")


def ras_of(img: kf.Image, ijk: np.ndarray) -> np.ndarray:
    return np.c_[ijk, np.ones(len(ijk))] @ img.affine[:3].T


def sitk_ras(s: object, ijk: np.ndarray) -> np.ndarray:
    """World (RAS) positions of voxel indices in a SimpleITK image (LPS)."""
    pts = [
        s.TransformContinuousIndexToPhysicalPoint([float(v) for v in p])  # type: ignore[attr-defined]
        for p in ijk
    ]
    return np.asarray(pts) * np.array([-1.0, -1.0, 1.0])


def corners(shape: tuple[int, ...]) -> np.ndarray:
    return np.array(
        [
            [i, j, k]
            for i in (0, shape[0] - 1)
            for j in (0, shape[1] - 1)
            for k in (0, (shape[2] - 1) if len(shape) > 2 else 0)
        ],
        dtype=float,
    )


def assert_same_anatomy(img: kf.Image, ref: kf.Image, atol: float) -> None:
    """``img`` holds ``ref``'s voxels, possibly stored in another axis order/direction:
    every voxel of ``img`` sits at the world position of the ``ref`` voxel with its value."""
    to_ref = np.linalg.inv(ref.affine) @ img.affine
    perm = np.round(to_ref[:3, :3])
    np.testing.assert_allclose(to_ref[:3, :3], perm, atol=1e-6)
    np.testing.assert_allclose(to_ref[:3, 3], np.round(to_ref[:3, 3]), atol=1e-5)
    idx = np.indices(img.shape).reshape(3, -1).T
    ref_idx = np.round(idx @ perm.T + to_ref[:3, 3]).astype(int)
    np.testing.assert_allclose(img.data.reshape(-1), ref.data[tuple(ref_idx.T)], atol=atol)


def pydicom_dir(sub: str) -> Path:
    return pydicom_file("dicomdirtests") / sub


# -- single files --------------------------------------------------------------------------
def test_ct_slice_rescaled_with_world_geometry_of_simpleitk() -> None:
    path = pydicom_file("CT_small.dcm")
    img = kf.load_image(path)
    ref = sitk.ReadImage(str(path))
    assert img.shape == (128, 128)
    want = sitk.GetArrayFromImage(ref)[0].T  # SimpleITK applies slope/intercept too
    np.testing.assert_allclose(img.data, want)
    assert img.data.min() < -500  # HU: intercept -1024 applied
    ijk = corners(img.shape)[:, :2]
    np.testing.assert_allclose(
        ras_of(img, np.c_[ijk, np.zeros(len(ijk))]),
        sitk_ras(ref, np.c_[ijk, np.zeros(len(ijk))]),
        atol=1e-4,
    )


@pytest.mark.parametrize(
    "variant",
    ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm", "MR_small_padded.dcm"],
)
def test_transfer_syntaxes_decode_to_the_same_pixels(variant: str) -> None:
    ref = kf.load_image(pydicom_file("MR_small.dcm"))
    img = kf.load_image(pydicom_file(variant))
    np.testing.assert_array_equal(img.data, ref.data)
    np.testing.assert_allclose(img.affine, ref.affine)


def test_projection_xray_is_2d_with_its_pixel_size() -> None:
    path = next(pydicom_dir("77654033/CR1").iterdir())
    img = kf.load_image(path)
    assert img.ndim == 2 and img.shape == (16, 16)


def test_non_image_objects_are_refused_by_name() -> None:
    for name in ("rtstruct.dcm", "test-SR.dcm", "rtplan.dcm"):
        path = pydicom_file(name)
        with pytest.raises(CorruptDataError, match="not an image") as info:
            kf.load_image(path)
        assert name in str(info.value)


def test_truncated_file_is_a_keyfuse_error() -> None:
    with pytest.raises(CorruptDataError, match="MR_truncated"):
        kf.load_image(pydicom_file("MR_truncated.dcm"))


def test_compressed_without_decoder_names_the_package() -> None:
    from pydicom.pixels import get_decoder

    path = pydicom_file("MR_small_jpeg_ls_lossless.dcm")
    if get_decoder("1.2.840.10008.1.2.4.80").is_available:
        np.testing.assert_array_equal(
            kf.load_image(path).data, kf.load_image(pydicom_file("MR_small.dcm")).data
        )
        return
    with pytest.raises(MissingDependencyError, match=r"JPEG-LS.*pip install") as info:
        kf.load_image(path)
    assert "MR_small_jpeg_ls_lossless.dcm" in str(info.value)


def test_multiframe_rt_dose_matches_simpleitk() -> None:
    path = pydicom_file("rtdose.dcm")
    img = kf.load_image(path)
    ref = sitk.ReadImage(str(path))
    assert img.shape == tuple(ref.GetSize())
    ijk = corners(img.shape)
    np.testing.assert_allclose(ras_of(img, ijk), sitk_ras(ref, ijk), atol=1e-3)


# -- series --------------------------------------------------------------------------------
def test_real_ct_series_matches_simpleitk(tmp_path: Path) -> None:
    src = pydicom_dir("98892001/CT5N")
    img = kf.load_image(src)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(src)))
    ref = reader.Execute()
    assert img.shape == tuple(ref.GetSize()) == (16, 16, 5)
    np.testing.assert_allclose(img.data, sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    ijk = corners(img.shape)
    np.testing.assert_allclose(ras_of(img, ijk), sitk_ras(ref, ijk), atol=1e-3)


def test_localizer_with_mixed_orientations_is_refused() -> None:
    with pytest.raises(CorruptDataError, match="inconsistent slice orientation"):
        kf.load_image(pydicom_dir("98892003/MR700"))


def test_several_series_listed_and_chosen(tmp_path: Path) -> None:
    shutil.copytree(pydicom_dir("98892001/CT5N"), tmp_path / "a")
    shutil.copytree(pydicom_dir("98892001/CT2N"), tmp_path / "b")
    with pytest.raises(CorruptDataError, match="2 image series") as info:
        kf.load_image(tmp_path)
    msg = str(info.value)
    assert "5 files" in msg and "2 files" in msg and "series=" in msg
    import pydicom

    five = kf.load_image(pydicom_dir("98892001/CT5N"))
    uid = str(pydicom.dcmread(next((tmp_path / "a").iterdir())).SeriesInstanceUID)
    position = next(int(line.split("]")[0].strip(" [")) for line in msg.splitlines() if uid in line)
    for choice in (uid, 5, position):
        np.testing.assert_array_equal(kf.load_image(tmp_path, series=choice).data, five.data)
    # the other series is a two-view localizer: chosen, it is refused for what it is
    with pytest.raises(CorruptDataError, match="inconsistent slice orientation"):
        kf.load_image(tmp_path, series=4)
    with pytest.raises(InvalidArgumentError, match="no series 'nope'"):
        kf.load_image(tmp_path, series="nope")


def test_written_series_reads_back_like_the_volume(tmp_path: Path) -> None:
    """A real volume stored as DICOM (mirrored, oblique-free LPS) reads back in the right
    place; SimpleITK agrees on every voxel and position."""
    mni4 = small_mni()
    write_series(mni4, tmp_path / "series")
    img = kf.load_image(tmp_path / "series")
    assert img.shape == mni4.shape
    slope = float(mni4.data.max() - mni4.data.min()) / 30000.0
    np.testing.assert_allclose(img.data, mni4.data, atol=slope)
    np.testing.assert_allclose(img.affine, mni4.affine, atol=1e-6)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    ref = reader.Execute()
    np.testing.assert_allclose(
        img.data, sitk.GetArrayFromImage(ref).transpose(2, 1, 0), rtol=1e-5, atol=1e-3
    )
    ijk = corners(img.shape)
    np.testing.assert_allclose(ras_of(img, ijk), sitk_ras(ref, ijk), atol=1e-3)
    # and the keypoints of the DICOM are those of the NIfTI, in the same place
    a = kf.extract(img, device="cpu")
    b = kf.extract(mni4, device="cpu")
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a.xyz, b.xyz, atol=0.05)


def test_written_oblique_mirrored_series_agrees_with_simpleitk(tmp_path: Path) -> None:
    mni4 = small_mni()
    from scipy.spatial.transform import Rotation

    affine = mni4.affine.copy()
    affine[:3, :3] = Rotation.from_euler("xyz", [10, -20, 5], degrees=True).as_matrix() @ (
        affine[:3, :3] @ np.diag([-1.0, 1.0, 1.0])
    )
    oblique = kf.Image(mni4.data, affine)
    write_series(oblique, tmp_path / "s")
    img = kf.load_image(tmp_path / "s")
    # DICOM slices are ordered along the slice normal, so k may come back reversed
    slope = float(mni4.data.max() - mni4.data.min()) / 30000.0
    assert_same_anatomy(img, oblique, atol=slope)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    ref = reader.Execute()
    ijk = corners(img.shape)
    np.testing.assert_allclose(ras_of(img, ijk), sitk_ras(ref, ijk), atol=1e-3)


def test_enhanced_multiframe_reads_back_like_the_volume(tmp_path: Path) -> None:
    mni4 = small_mni()
    path = write_multiframe(mni4, tmp_path / "enhanced.dcm")
    img = kf.load_image(path)
    slope = float(mni4.data.max() - mni4.data.min()) / 30000.0
    np.testing.assert_allclose(img.data, mni4.data, atol=slope)
    np.testing.assert_allclose(img.affine, mni4.affine, atol=1e-6)


def test_missing_slice_is_named(tmp_path: Path) -> None:
    mni4 = small_mni()
    small = kf.Image(mni4.data[:, :, 20:30], mni4.affine)
    paths = write_series(small, tmp_path / "s", shuffle_seed=None)
    paths[4].unlink()
    with pytest.raises(
        CorruptDataError, match=r"missing slices: 1 slice between IM0003 and IM0005"
    ):
        kf.load_image(tmp_path / "s")


def test_duplicated_slice_is_named(tmp_path: Path) -> None:
    mni4 = small_mni()
    small = kf.Image(mni4.data[:, :, 20:30], mni4.affine)
    paths = write_series(small, tmp_path / "s", shuffle_seed=None)
    shutil.copy(paths[3], tmp_path / "s" / "copy_of_IM0003")
    with pytest.raises(CorruptDataError, match="duplicated slices"):
        kf.load_image(tmp_path / "s")


def test_garbled_series_uid_is_a_damaged_file(tmp_path: Path) -> None:
    """Three flipped bits (found by tests/io/test_fuzz.py) make a slice's header read
    its SeriesInstanceUID as a run of other elements and lose its Rows: the file used to
    become a one-file "series" without an image and was dropped silently."""
    mni4 = small_mni()
    paths = write_series(kf.Image(mni4.data[:, :, 20:24], mni4.affine), tmp_path / "s")
    raw = bytearray(paths[0].read_bytes())
    for at in (531, 0, 324):
        raw[at] ^= 1
    paths[0].write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match=rf"{paths[0].name} is a damaged DICOM file"):
        kf.load_image(tmp_path / "s")


def test_objects_without_an_image_beside_the_series_are_named(tmp_path: Path) -> None:
    import pydicom

    mni4 = small_mni()
    paths = write_series(kf.Image(mni4.data[:, :, 20:24], mni4.affine), tmp_path / "s")
    ds = pydicom.dcmread(paths[0])
    for key in ("Rows", "Columns", "PixelData"):
        delattr(ds, key)
    ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".9"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: a report
    ds.Modality = "SR"
    ds.save_as(tmp_path / "s" / "note.dcm")
    with pytest.warns(kf.errors.NotDicomWarning, match=r"ignored 1 DICOM object.*note\.dcm"):
        img = kf.load_image(tmp_path / "s")
    assert img.shape[2] == 4


def test_uneven_spacing_is_refused(tmp_path: Path) -> None:
    mni4 = small_mni()
    import pydicom

    small = kf.Image(mni4.data[:, :, 20:30], mni4.affine)
    paths = write_series(small, tmp_path / "s", shuffle_seed=None)
    ds = pydicom.dcmread(paths[9])
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 1.3]
    ds.save_as(paths[9])
    with pytest.raises(CorruptDataError, match="inconsistent slice spacing"):
        kf.load_image(tmp_path / "s")


def test_directory_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CorruptDataError, match="holds no DICOM files"):
        kf.load_image(tmp_path)


def test_dicom_series_feeds_extract(tmp_path: Path) -> None:
    mni4 = small_mni()
    write_series(mni4, tmp_path / "series")
    kps = kf.extract(tmp_path / "series", device="cpu")
    assert len(kps) == len(kf.extract(mni4, device="cpu")) > 0


def test_dicom_directories_are_recognised(tmp_path: Path) -> None:
    mni4 = small_mni()
    from keyfuse.formats.dicom import is_dicom_directory

    write_series(kf.Image(mni4.data[:, :, :3], mni4.affine), tmp_path / "s")
    (tmp_path / "nifti").mkdir()
    mni4.save(tmp_path / "nifti" / "a.nii.gz")
    assert is_dicom_directory(tmp_path / "s")
    assert not is_dicom_directory(tmp_path / "nifti")
    assert not is_dicom_directory(tmp_path / "nifti" / "a.nii.gz")


def test_a_series_directory_is_one_input_of_batch_and_cli(tmp_path: Path) -> None:
    """A cohort folder of DICOM series: each series directory is one scan, named by its
    folder, in the batch functions and in ``keyfuse extract`` alike."""
    from click.testing import CliRunner

    from keyfuse.batch import collect_inputs
    from keyfuse.cli import cli

    series = tmp_path / "cohort" / "sub-07.series"
    write_series(small_mni(), series)
    assert collect_inputs([series]) == [series]
    out = tmp_path / "keys"
    run = CliRunner().invoke(
        cli, ["extract", str(series), "-o", str(out), "-q", "--scheduler", "sync"]
    )
    assert run.exit_code == 0, run.output
    assert [p.name for p in out.glob("*.kfk")] == ["sub-07.series.kfk"]
    assert len(kf.KeypointSet.load(out / "sub-07.series.kfk")) > 0
