"""The simulated cohort: structure, reproducibility, labels, files (tiny 4 mm cohorts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from keyfuse.datasets import cohort as C
from keyfuse.datasets.cohort import Cohort, simulate_cohort
from keyfuse.errors import InvalidArgumentError, KeyfuseIOError

TINY = dict(n_families=3, family_size=2, n_rescans=1, resolution_mm=4.0, shape=(20, 24, 20))
# no group change and no scanner effects (bias field, contrast, noise)
PLAIN = dict(group_effect=0, bias=0, contrast=0, noise=0)


@pytest.fixture(scope="module")
def tiny() -> Cohort:
    return simulate_cohort(None, seed=3, progress=False, **TINY)  # type: ignore[arg-type]


def test_structure(tiny: Cohort) -> None:
    assert len(tiny) == 7  # 6 individuals + 1 rescan
    rows = tiny.table
    assert [r["relation"] for r in rows if r["family"] == "fam-00"][:2] == ["mz_twin"] * 2
    assert {r["relation"] for r in rows if r["family"] == "fam-01"} == {"dz_twin"}
    rescans = [r for r in rows if r["rescan_of"]]
    assert len(rescans) == 1
    orig = next(r for r in rows if r["subject"] == rescans[0]["rescan_of"])
    assert orig["individual"] == rescans[0]["individual"]
    assert orig["family"] == rescans[0]["family"] and orig["group"] == rescans[0]["group"]
    mz = [r for r in rows if r["relation"] == "mz_twin" and not r["rescan_of"]]
    assert mz[0]["twin_of"] == mz[1]["individual"] and mz[0]["group"] == mz[1]["group"]
    assert len(set(tiny.subjects)) == len(tiny)
    for r in rows:
        assert set(C.COLUMNS) <= set(r)
        assert np.asarray(json.loads(r["transform"])).shape == (16,)  # JSON list of 16 numbers


def test_images_and_labels(tiny: Cohort) -> None:
    for i in range(len(tiny)):
        img, lab = tiny.image(i), tiny.label_map(i)
        assert img.shape == lab.shape == (20, 24, 20)
        assert np.allclose(img.affine, lab.affine)
        assert img.data.dtype == np.float32 and np.isfinite(img.data).all()
        assert lab.data.dtype == np.uint8
        assert set(np.unique(lab.data)) <= {0, 1, 2, 3, 4, 5}
        # tissue labels cover a good part of a field of view centred on the brain
        assert (lab.data > 0).mean() > 0.2
    assert tiny.image(tiny.subjects[2]).shape == (20, 24, 20)
    with pytest.raises(InvalidArgumentError):
        tiny.image(99)
    with pytest.raises(InvalidArgumentError):
        tiny.image("nobody")


def test_template_labels_left_right() -> None:
    tpl = C._template(4.0)
    ijk = np.indices(tpl.labels.shape).reshape(3, -1)
    x = (tpl.affine[:3, :3] @ ijk + tpl.affine[:3, 3:4])[0].reshape(tpl.labels.shape)
    for left, right in ((1, 2), (3, 4)):
        assert (tpl.labels == left).sum() > 100 and (tpl.labels == right).sum() > 100
        assert (x[tpl.labels == left] < 0).all() and (x[tpl.labels == right] >= 0).all()
    assert (tpl.labels == 5).sum() > 0  # ventricles found
    # ventricles are dark in the T1 compared with white matter
    assert tpl.t1[tpl.labels == 5].mean() < 0.6 * tpl.t1[np.isin(tpl.labels, (3, 4))].mean()


def test_reproducible(tiny: Cohort) -> None:
    again = simulate_cohort(None, seed=3, progress=False, **TINY)  # type: ignore[arg-type]
    other = simulate_cohort(None, seed=4, progress=False, **TINY)  # type: ignore[arg-type]
    assert again.table == tiny.table
    assert np.array_equal(again.image(0).data, tiny.image(0).data)
    assert np.array_equal(again.label_map(4).data, tiny.label_map(4).data)
    assert not np.array_equal(other.image(0).data, tiny.image(0).data)


def test_relatives_closer_without_acquisition_effects() -> None:
    # no pose, bias, contrast or noise: what is left is anatomy
    c = simulate_cohort(
        None,
        seed=5,
        progress=False,
        rotation_deg=0,
        scale_range=0,
        translation_mm=0,
        **PLAIN,
        **TINY,  # type: ignore[arg-type]
    )
    rows = c.table
    resc = next(i for i, r in enumerate(rows) if r["rescan_of"])
    orig = next(i for i, r in enumerate(rows) if r["subject"] == rows[resc]["rescan_of"])
    assert np.array_equal(c.image(resc).data, c.image(orig).data)

    def mse(i: int, j: int) -> float:
        return float(np.mean((c.image(i).data - c.image(j).data) ** 2))

    mz = [i for i, r in enumerate(rows) if r["relation"] == "mz_twin" and not r["rescan_of"]]
    unrelated = [
        mse(i, j)
        for i in range(len(rows))
        for j in range(i + 1, len(rows))
        if rows[i]["family"] != rows[j]["family"]
    ]
    assert mse(mz[0], mz[1]) < min(unrelated)


def test_write_and_load(tmp_path: Path) -> None:
    c = simulate_cohort(
        tmp_path / "c",
        seed=1,
        progress=False,
        n_families=1,
        family_size=2,
        n_rescans=1,
        resolution_mm=4.0,
        shape=(16, 16, 16),
    )
    assert (tmp_path / "c" / "cohort.csv").exists()
    loaded = Cohort.load(tmp_path / "c")
    assert loaded.subjects == c.subjects and len(loaded) == 3
    assert loaded.table[0]["family"] == "fam-00"
    assert loaded.image_path(0).exists() and loaded.label_path(0).exists()
    assert np.allclose(loaded.image(1).data, c.image(1).data)
    assert loaded.label_map(0).data.dtype == np.uint8
    with pytest.raises(KeyfuseIOError):
        Cohort.load(tmp_path / "missing")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_families": 0},
        {"n_rescans": 99},
        {"resolution_mm": -1.0},
        {"noise": -0.1},
        {"shape": (2, 2)},
        {"scale_range": 0.9},
    ],
)
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    args = {**TINY, **kwargs}
    with pytest.raises(InvalidArgumentError):
        simulate_cohort(None, progress=False, **args)  # type: ignore[arg-type]


def test_transform_column_is_the_scan_pose() -> None:
    # with anatomy and acquisition effects off, a scan is the template seen through its pose
    from scipy import ndimage as ndi

    c = simulate_cohort(
        None,
        seed=2,
        progress=False,
        family_deformation_mm=0,
        personal_deformation_mm=0,
        family_texture=0,
        personal_texture=0,
        **PLAIN,
        n_families=1,
        family_size=1,
        n_rescans=0,
        resolution_mm=4.0,
        shape=(16, 18, 16),
    )
    tpl = C._template(4.0)
    img = c.image(0)
    pose = np.asarray(json.loads(c.table[0]["transform"])).reshape(4, 4)
    assert c.table[0]["rotation_deg"] > 0
    vox = np.linalg.inv(tpl.affine) @ np.linalg.inv(pose) @ img.affine
    ijk = np.indices(img.shape).reshape(3, -1)
    coords = vox[:3, :3] @ ijk + vox[:3, 3:4]
    expect = ndi.map_coordinates(tpl.t1, coords, order=1, mode="constant").reshape(img.shape)
    assert np.allclose(img.data, expect, atol=1e-2 * float(tpl.t1.max()))
    lab = ndi.map_coordinates(tpl.labels, coords, order=0, mode="constant").reshape(img.shape)
    assert (lab == c.label_map(0).data).mean() > 0.99
