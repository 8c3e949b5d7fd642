"""Issue 15, the estimators: scikit-learn habits (get_params, clone, short reprs,
NotFittedError), per-voxel posteriors, calibrated fusion probabilities, and the BIDS
look-up table written beside a label map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from test_segment import AFFINE, shifted_case

import keyfuse as kf
from keyfuse.segment import KeypointTransferSegmenter


@pytest.fixture(scope="module")
def fitted() -> tuple[KeypointTransferSegmenter, kf.Segmentation]:
    labels, image, kps, test_img, test_kps, _ = shifted_case()
    # two atlases shifted against each other: their organ maps overlap in the test grid
    labels2, image2, kps2, *_ = shifted_case(shift=(1, 1, 0))
    seg = KeypointTransferSegmenter(progress=False, extract_params={"sigma0": 1.2})
    seg.fit(
        [kf.Image(image, AFFINE), kf.Image(image2, AFFINE)],
        [labels, labels2],
        keypoints=[kps, kps2],
        label_names={1: "liver", 2: "spleen", 3: "kidney"},
    )
    return seg, seg.predict(test_img, keypoints=test_kps)


def test_segmenter_follows_sklearn() -> None:
    seg = KeypointTransferSegmenter(ratio=0.8, extract_params={"sigma0": 1.2}, progress=False)
    params = seg.get_params()
    assert params["ratio"] == 0.8 and params["extract_params"] == {"sigma0": 1.2}
    twin = clone(seg)
    assert twin.get_params() == params and twin is not seg
    # scikit-learn's repr: only the parameters changed from their defaults
    assert repr(KeypointTransferSegmenter()) == "KeypointTransferSegmenter()"
    assert "ratio=0.8" in repr(seg) and "nu=" not in repr(seg)
    with pytest.raises(NotFittedError, match="not fitted"):
        seg.predict(kf.Image(np.zeros((8, 8, 8), np.float32)))
    with pytest.raises(kf.KeyfuseError):  # also a keyfuse error
        seg.labels_  # noqa: B018


def test_segmentation_repr_and_posteriors(fitted) -> None:
    _, out = fitted
    text = repr(out)
    assert "\n" not in text and len(text) < 200 and text.startswith("Segmentation(")
    total = sum(out.probabilities.values())
    assert float(total.max()) <= 1.0 + 1e-6  # a posterior: at most 1 per voxel
    assert float(total.max()) > 0.5
    best = np.argmax(np.stack([out.probabilities[k] for k in (1, 2, 3)]), axis=0) + 1
    inside = out.labels > 0
    assert np.array_equal(best[inside], out.labels[inside])


def test_save_writes_bids_lookup_table_and_checks_the_name(fitted, tmp_path: Path) -> None:
    _, out = fitted
    out.save(tmp_path / "sub-01_dseg.nii.gz")
    tsv = (tmp_path / "sub-01_dseg.tsv").read_text().splitlines()
    assert tsv == ["index\tname", "0\tbackground", "1\tliver", "2\tspleen", "3\tkidney"]
    for bad in ("out_noext", "x.img"):
        with pytest.raises(kf.InvalidArgumentError, match=r"\.nii\.gz"):
            out.save(tmp_path / bad)
        assert not (tmp_path / bad).exists()
    # FreeSurfer's format, which the image reader reads, is written too
    out.save(tmp_path / "aseg.mgz", tmp_path / "probs.mgz")
    back = kf.load_image(tmp_path / "aseg.mgz")
    assert np.array_equal(back.data, out.labels) and np.allclose(back.affine, out.affine)
    import nibabel as nib

    probs = np.asarray(nib.load(tmp_path / "probs.mgz").dataobj)
    assert probs.shape == (*out.labels.shape, 3)
    assert np.allclose(probs[..., 1], out.probabilities[2])
    assert (tmp_path / "aseg.tsv").exists()
    with pytest.raises(kf.KeyfuseIOError, match="directory"):
        out.save(tmp_path, None)


def test_fusion_probabilities_can_be_calibrated() -> None:
    from sklearn.calibration import CalibratedClassifierCV

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (2, 16))
    X = np.concatenate([c + 0.4 * rng.normal(0, 1, (30, 16)) for c in centres])
    y = np.repeat([0, 1], 30)
    raw = kf.FusionClassifier(alpha=0.0).fit(X, y)
    assert (raw.predict(X) == y).mean() == 1.0
    cal = CalibratedClassifierCV(kf.FusionClassifier(alpha=0.0), cv=3).fit(X, y)
    p = cal.predict_proba(X)
    assert np.allclose(p.sum(axis=1), 1.0)
    # calibrated: confident where the classes are separated
    assert p[np.arange(len(y)), y].mean() > raw.predict_proba(X)[np.arange(len(y)), y].mean()
    assert "calibrated" in (kf.FusionClassifier.predict_proba.__doc__ or "")
