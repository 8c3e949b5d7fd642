"""Image formats other than DICOM (issue 10 item 2, issue 15 items 6 and 11): reading
and writing NIfTI-1/2, MGH/MGZ, NRRD, MetaImage and PNG/JPEG/TIFF; nibabel and SimpleITK
images; geometry checked against nibabel and SimpleITK on the same files."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _dicom_helpers import small_mni

import keyfuse as kf
from keyfuse.errors import (
    CorruptDataError,
    InvalidArgumentError,
    InvalidImageError,
    KeyfuseError,
    KeyfuseIOError,
)
from keyfuse.image import VoxelSizeWarning

sitk = pytest.importorskip("SimpleITK")


def oblique_mirrored(img: kf.Image) -> kf.Image:
    """``img``'s voxels under an oblique, left-handed affine (as scanners write)."""
    from scipy.spatial.transform import Rotation

    affine = img.affine.copy()
    affine[:3, :3] = Rotation.from_euler("xyz", [7, -12, 20], degrees=True).as_matrix() @ (
        affine[:3, :3] @ np.diag([-1.0, 1.0, 1.0])
    )
    return kf.Image(img.data, affine)


def sitk_ras(s: object, ijk: np.ndarray) -> np.ndarray:
    pts = [
        s.TransformContinuousIndexToPhysicalPoint([float(v) for v in p])  # type: ignore[attr-defined]
        for p in ijk
    ]
    return np.asarray(pts) * np.array([-1.0, -1.0, 1.0])


def some_voxels(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.c_[[rng.integers(0, s, 20) for s in shape]].T.astype(float)


# -- 3D formats round trip, and agree with nibabel/SimpleITK ---------------------------------
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mgz", ".mgh", ".nrrd", ".mha", ".mhd"])
def test_save_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    mni4 = small_mni()
    img = oblique_mirrored(mni4)
    path = tmp_path / f"scan{suffix}"
    img.save(path)
    back = kf.load_image(path)
    np.testing.assert_array_equal(back.data, img.data)
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    ijk = some_voxels(img.shape)
    world = np.c_[ijk, np.ones(len(ijk))] @ back.affine[:3].T
    if suffix in (".nii", ".nii.gz", ".mgz", ".mgh"):
        ref = nib.load(str(path))
        np.testing.assert_allclose(world, nib.affines.apply_affine(ref.affine, ijk), atol=1e-3)
    else:
        np.testing.assert_allclose(world, sitk_ras(sitk.ReadImage(str(path)), ijk), atol=1e-3)
        if suffix == ".mhd":  # its data file sits beside it, under its final name
            assert (tmp_path / "scan.zraw").exists() or (tmp_path / "scan.raw").exists()


def test_nifti2_is_read(tmp_path: Path) -> None:
    mni4 = small_mni()
    path = tmp_path / "n2.nii.gz"
    nib.save(nib.Nifti2Image(mni4.data, mni4.affine), str(path))
    back = kf.load_image(path)
    np.testing.assert_array_equal(back.data, mni4.data)
    np.testing.assert_allclose(back.affine, mni4.affine)


def test_saved_nifti_carries_codes_and_units(tmp_path: Path) -> None:
    mni4 = small_mni()
    mni4.save(tmp_path / "x.nii.gz")
    hdr = nib.load(str(tmp_path / "x.nii.gz")).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    assert hdr.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(hdr.get_qform(), mni4.affine, atol=1e-5)


def test_extract_is_the_same_from_every_format(tmp_path: Path) -> None:
    mni4 = small_mni()
    ref = kf.extract(mni4, device="cpu")
    for suffix in (".mgz", ".nrrd", ".mha"):
        mni4.save(tmp_path / f"m{suffix}")
        kps = kf.extract(tmp_path / f"m{suffix}", device="cpu")
        np.testing.assert_array_equal(kps.descriptors, ref.descriptors)
        np.testing.assert_allclose(kps.xyz, ref.xyz, atol=1e-4)


# -- other libraries' images ----------------------------------------------------------------
def test_image_from_nibabel_image() -> None:
    mni4 = small_mni()
    nimg = nib.Nifti1Image(mni4.data, mni4.affine)
    img = kf.Image(nimg)
    np.testing.assert_array_equal(img.data, mni4.data)
    np.testing.assert_array_equal(img.affine, mni4.affine)
    with pytest.raises(InvalidArgumentError, match="carries its own"):
        kf.Image(nimg, np.eye(4))


def test_image_from_simpleitk_image_handles_zyx(tmp_path: Path) -> None:
    mni4 = small_mni()
    img = oblique_mirrored(mni4)
    img.save(tmp_path / "x.nrrd")
    simg = sitk.ReadImage(str(tmp_path / "x.nrrd"))
    assert sitk.GetArrayFromImage(simg).shape == img.shape[::-1]  # SimpleITK's (z, y, x)
    got = kf.Image(simg)
    assert got.shape == img.shape
    np.testing.assert_array_equal(got.data, img.data)
    ijk = some_voxels(img.shape)
    np.testing.assert_allclose(
        np.c_[ijk, np.ones(len(ijk))] @ got.affine[:3].T, sitk_ras(simg, ijk), atol=1e-4
    )
    # and back: SimpleITK sees the same geometry
    round_trip = img.to_simpleitk()
    np.testing.assert_allclose(sitk_ras(round_trip, ijk), sitk_ras(simg, ijk), atol=1e-4)
    kps = kf.extract(simg, device="cpu")
    assert len(kps) == len(kf.extract(img, device="cpu"))


def test_simpleitk_2d_image() -> None:
    simg = sitk.GetImageFromArray(np.arange(30, dtype=np.float32).reshape(5, 6))
    simg.SetSpacing((0.5, 2.0))
    img = kf.Image(simg)
    assert img.shape == (6, 5)
    np.testing.assert_allclose(img.spacing[:2], [0.5, 2.0])


# -- arrays without geometry ----------------------------------------------------------------
def test_array_without_affine_warns_and_spacing_is_used() -> None:
    arr = np.zeros((8, 9, 10), np.float32)
    with pytest.warns(VoxelSizeWarning, match="assuming 1 mm"):
        kf.Image(arr)
    with pytest.warns(VoxelSizeWarning):
        kf.load_image(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = kf.Image(arr, spacing=(0.5, 0.5, 2.0))
        kf.Image(arr, np.eye(4))
    np.testing.assert_allclose(img.spacing, [0.5, 0.5, 2.0])
    with pytest.raises(InvalidArgumentError, match="spacing"):
        kf.Image(arr, spacing=(1.0, -1.0, 1.0))
    with pytest.raises(InvalidArgumentError, match="not both"):
        kf.Image(arr, np.eye(4), spacing=(1, 1, 1))


# -- 2D raster formats ----------------------------------------------------------------------
def test_png_tiff_round_trip_and_jpeg_colour(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    rng = np.random.default_rng(1)
    img = kf.Image(rng.integers(0, 255, (40, 30)).astype(np.uint8), np.eye(4))
    for suffix in (".png", ".tif"):
        img.save(tmp_path / f"x{suffix}")
        np.testing.assert_array_equal(kf.load_image(tmp_path / f"x{suffix}").data, img.data)
    f = kf.Image(rng.random((40, 30)).astype(np.float32), np.eye(4))
    f.save(tmp_path / "f.tiff")
    np.testing.assert_array_equal(kf.load_image(tmp_path / "f.tiff").data, f.data)
    rgb = rng.integers(0, 255, (30, 40, 3)).astype(np.uint8)  # PIL: rows × columns
    PILImage.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    got = kf.load_image(tmp_path / "c.jpg")
    assert got.shape == (40, 30) and got.ndim == 2


# -- errors: keyfuse's, naming the file, before any work ------------------------------------
def test_save_refuses_bad_paths_before_writing(tmp_path: Path) -> None:
    mni4 = small_mni()
    with pytest.raises(InvalidArgumentError, match=r"out_noext.*\.nii\.gz"):
        mni4.save(tmp_path / "out_noext")
    with pytest.raises(InvalidArgumentError, match="holds 2D images"):
        mni4.save(tmp_path / "x.png")
    (tmp_path / "adir.nii.gz").mkdir()
    with pytest.raises(KeyfuseIOError, match="directory"):
        mni4.save(tmp_path / "adir.nii.gz")
    float2d = kf.Image(np.zeros((4, 4), np.float32), np.eye(4))
    with pytest.raises(InvalidArgumentError, match="PNG holds"):
        float2d.save(tmp_path / "f.png")
    sheared = mni4.affine.copy()
    sheared[0, 1] = 1.5
    with pytest.raises(InvalidArgumentError, match="sheared"):
        kf.Image(mni4.data, sheared).save(tmp_path / "s.mgz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.nii.gz"]
    # nested folders are created
    mni4.save(tmp_path / "a" / "b" / "x.mgz")
    assert (tmp_path / "a" / "b" / "x.mgz").exists()


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    mni4 = small_mni()
    with pytest.raises(KeyfuseIOError, match="not found"):
        kf.load_image(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.xyz").write_text("hello")
    with pytest.raises(CorruptDataError, match=r"notes\.xyz.*unknown image format"):
        kf.load_image(tmp_path / "notes.xyz")
    for suffix in (".nii.gz", ".mgz", ".nrrd", ".mha", ".png"):
        path = tmp_path / f"t{suffix}"
        if suffix == ".png":
            kf.Image(np.zeros((8, 8), np.uint8), np.eye(4)).save(path)
        else:
            mni4.save(path)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 3])
        with pytest.raises(KeyfuseError, match=f"t{suffix.replace('.', '[.]')}"):
            kf.load_image(path)


def test_4d_file_is_refused_with_the_file_name(tmp_path: Path) -> None:
    nib.save(
        nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)),
        str(tmp_path / "bold.nii.gz"),
    )
    with pytest.raises(InvalidImageError, match=r"bold\.nii\.gz.*4D"):
        kf.load_image(tmp_path / "bold.nii.gz")
