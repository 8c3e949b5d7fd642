"""The experiments' own helpers (their full runs are the benches' --quick mode)."""

from __future__ import annotations

import numpy as np

import keyfuse as kf
from keyfuse.experiments import cohort, segmentation


def test_crop_keeps_world_positions() -> None:
    img = kf.Image(np.arange(1000.0).reshape(10, 10, 10), np.diag([2.0, 2.0, 2.0, 1.0]))
    box = segmentation.crop_box(img.shape)
    out = segmentation.crop_image(img, box)
    lo = np.array([s.start for s in box], dtype=np.float64)
    np.testing.assert_array_equal(out.data, img.data[box])
    np.testing.assert_allclose(out.affine[:3, 3], img.affine[:3, :3] @ lo + img.affine[:3, 3])


def test_label_dice_scores_the_labels_of_the_truth() -> None:
    truth = np.zeros((4, 4, 4), np.int32)
    truth[:2] = 1
    truth[2:, :2] = 5
    pred = truth.copy()
    pred[3] = 0  # half of label 5 missed
    scores = segmentation.label_dice(pred, truth)
    assert set(scores) == {1, 5}
    assert scores[1] == 1.0 and scores[5] == 2 * 4 / (8 + 4)


def test_segmentation_table_and_cohort_report() -> None:
    rows = [{1: 0.8, 5: 0.5}, {1: 0.6, 5: 0.7}]
    table = segmentation.report({"full": {"m": (rows, [1.0, 3.0], [2.0, 2.0])}, "crop": {}})
    line = next(ln for ln in table.splitlines() if ln.startswith("m "))
    assert "0.700±0.100" in line and "0.600±0.100" in line and "2.00" in line
    assert "cropped" not in table
    rep = {k: 0.5 for _, k in cohort.REPORT_ROWS}
    better = {k: 0.9 for _, k in cohort.REPORT_ROWS}
    reports = {
        "soft Jaccard exact": better,
        "ref. votes as J exact": rep,
        "soft Jaccard forest": rep,
        "ref. votes as J forest": better,
    }
    text = cohort.report(
        {
            "reports": reports,
            "times": dict.fromkeys(reports, 0.1),
            "soft_jaccard_repeatable": True,
            "votes_repeatable": True,
        }
    )
    assert (
        "exact k-NN for both): soft Jaccard beats the reference voting on family_auc and map"
        in text
    )
    assert "forest k-NN for both): soft Jaccard beats the reference voting on NEITHER" in text
