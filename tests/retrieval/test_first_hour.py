"""Issue 15, the Python API side: a new user's mistakes give errors or warnings with
counts, never an empty or wrong answer (index open vs create, restrict, kinds of input,
cohort order), and results convert to pandas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import keyfuse as kf
from keyfuse.index import EmptyKeypointsWarning, EmptyRestrictionWarning


def _set(rng: np.random.Generator, proto: np.ndarray, shape: tuple[int, ...]) -> kf.KeypointSet:
    n = len(proto)
    desc = np.argsort(np.argsort(proto + 4.0 * rng.standard_normal(proto.shape), axis=1), axis=1)
    return kf.KeypointSet(
        rng.uniform(0, 40, (n, 3)),
        rng.uniform(1.5, 4, n),
        descriptors=desc.astype(np.uint8),
        shape=shape,
    )


@pytest.fixture(scope="module")
def family_sets() -> list[tuple[str, kf.KeypointSet, dict[str, str]]]:
    """Three families of three noisy copies of a prototype (3D), labelled."""
    rng = np.random.default_rng(1)
    out = []
    for f in range(3):
        proto = rng.random((150, 64)) * 64
        for m in range(3):
            labels = {"family": f"F{f}", "group": "A" if f else "B"}
            out.append((f"sub-{f}{m}", _set(rng, proto, (40, 40, 40)), labels))
    return out


# ------------------------------------------------------------------ item 4: index opening


def test_opening_a_mistyped_index_raises(family_sets, tmp_path: Path) -> None:
    ix = kf.Index.create(tmp_path / "cohort.kfi")
    for sid, kps, labels in family_sets:
        ix.add(sid, kps, **labels)
    with pytest.raises(kf.KeyfuseIOError, match=r"cohrt\.kfi is not a keyfuse index.*create"):
        kf.Index(tmp_path / "cohrt.kfi")
    assert not (tmp_path / "cohrt.kfi").exists()  # nothing was created
    with pytest.raises(kf.KeyfuseIOError):
        kf.Index(tmp_path / "cohrt.kfi", mode="r+")
    # open (read-only by default) finds the subjects; adding needs mode="r+"
    back = kf.Index(tmp_path / "cohort.kfi")
    assert back.subjects == ix.subjects
    assert back.search(family_sets[0][1], k=1)[0].subject_id == family_sets[0][0]
    with pytest.raises(kf.InvalidArgumentError, match="read-only"):
        back.add("new", family_sets[0][1])
    kf.Index(tmp_path / "cohort.kfi", mode="r+").add("new", family_sets[0][1])
    assert len(kf.Index(tmp_path / "cohort.kfi")) == len(family_sets) + 1
    # create refuses an existing index; "w" replaces it; "a" opens or creates
    with pytest.raises(kf.KeyfuseIOError, match="already exists"):
        kf.Index.create(tmp_path / "cohort.kfi")
    assert len(kf.Index(tmp_path / "cohort.kfi", mode="a")) == len(family_sets) + 1
    assert len(kf.Index(tmp_path / "cohort.kfi", mode="w")) == 0
    assert len(kf.Index(tmp_path / "cohort.kfi")) == 0
    assert len(kf.Index(tmp_path / "other.kfi", mode="a")) == 0
    with pytest.raises(kf.InvalidArgumentError, match="mode"):
        kf.Index(tmp_path / "cohort.kfi", mode="rw")


def test_manifest_records_version_parameters_and_seed(family_sets, tmp_path: Path) -> None:
    ix = kf.Index.create(tmp_path / "ix", k=7, checks=32)
    ix.add(*family_sets[0][:2])
    prov = json.loads((tmp_path / "ix" / "manifest.json").read_text())["provenance"]
    assert prov["keyfuse_version"] == kf.__version__
    assert prov["params"]["k"] == 7 and prov["params"]["checks"] == 32
    assert prov["params"]["kernel"] == "posterior" and prov["seed"] == 0


def test_remove_subjects(family_sets, tmp_path: Path) -> None:
    ix = kf.Index.create(tmp_path / "ix")
    ix.add_many([(s, k, None, lab) for s, k, lab in family_sets])
    before = ix.search(family_sets[0][1], k=None)
    ix.remove(["sub-11", "sub-22"])
    assert "sub-11" not in ix and len(ix) == len(family_sets) - 2
    back = kf.Index(tmp_path / "ix")
    assert back.subjects == ix.subjects
    got, want = back.keypoints("sub-00"), family_sets[0][1]  # compact geometry
    assert np.array_equal(got.descriptors, want.descriptors)
    assert np.abs(got.ijk - want.ijk).max() < 1e-2
    after = back.search(family_sets[0][1], k=1)
    assert after[0] == before[0]
    with pytest.raises(kf.InvalidArgumentError, match="not in the index"):
        ix.remove("sub-99")
    mem = kf.Index()
    mem.add_many([(s, k, None, lab) for s, k, lab in family_sets])
    mem.remove("sub-00")
    assert mem.subjects == [s for s, _, _ in family_sets[1:]]
    assert mem.search(family_sets[1][1], k=1)[0].subject_id == "sub-01"


# ------------------------------------------------------------- item 4: restrict mistakes


def test_restrict_on_a_missing_label_raises_and_no_match_warns(family_sets) -> None:
    ix = kf.Index()
    for sid, kps, labels in family_sets:
        ix.add(sid, kps, **labels)
    q = family_sets[0][1]
    with pytest.raises(kf.InvalidArgumentError, match=r"\['sex'\].*family, group|family"):
        ix.search(q, restrict={"sex": "F"})
    with pytest.warns(EmptyRestrictionWarning, match=r"none of the 9.*A \(6\), B \(3\)") as rec:
        hits = ix.search(q, restrict={"group": "C"})
    assert len(hits) == 0 and len(rec) == 1  # one warning, pointing at the caller
    assert rec[0].filename == __file__
    assert len(ix.search(q, k=None, restrict={"group": "A"})) == 6


# --------------------------------------------------------------- item 5: kinds of input


def test_wrong_kinds_of_input_are_refused(family_sets, tmp_path: Path) -> None:
    a = family_sets[0][1]
    with pytest.raises(kf.InvalidArgumentError, match="descriptors"):
        kf.soft_jaccard(a, a.descriptors)
    with pytest.raises(kf.InvalidArgumentError, match=r"kf\.Image"):
        kf.soft_jaccard(a, np.zeros((8, 8, 8), np.float32))
    # a keypoint file path works, as the docstring says
    a.save(tmp_path / "sub-001.kfk")
    kf.write_key(a, tmp_path / "sub-001.key")
    assert kf.soft_jaccard(a, str(tmp_path / "sub-001.kfk")) == pytest.approx(1.0)
    assert kf.soft_jaccard(a, tmp_path / "sub-001.key") == pytest.approx(1.0, abs=1e-6)


def test_2d_query_against_a_3d_index_is_refused(family_sets) -> None:
    ix = kf.Index()
    for sid, kps, labels in family_sets:
        ix.add(sid, kps, **labels)
    rng = np.random.default_rng(5)
    flat = _set(rng, rng.random((50, 64)) * 64, (40, 40))
    with pytest.raises(kf.InvalidArgumentError, match=r"2D image.*3D"):
        ix.search(flat)
    with pytest.raises(kf.InvalidArgumentError, match=r"2D image.*3D"):
        ix.add("slice", flat)
    with pytest.raises(kf.InvalidArgumentError, match="not comparable"):
        kf.soft_jaccard(flat, family_sets[0][1])


def test_real_2d_extraction_against_3d_index(family_sets) -> None:
    """The user's command: keypoints of a real 2D image queried against a 3D index."""
    from conftest import textured_volume

    img2d = kf.Image(textured_volume((64, 64, 1))[..., 0])
    kps2d = kf.extract(img2d)
    assert len(kps2d.shape) == 2
    ix = kf.Index()
    ix.add(*family_sets[0][:2])
    with pytest.raises(kf.InvalidArgumentError, match="2D"):
        ix.search(kps2d)


def test_zero_keypoints_warn(family_sets) -> None:
    ix = kf.Index()
    with pytest.warns(EmptyKeypointsWarning, match="1 of 1 subjects added have no keypoints"):
        ix.add("blank", kf.KeypointSet.empty(shape=(40, 40, 40)))
    ix.add(*family_sets[0][:2])
    with pytest.warns(EmptyKeypointsWarning, match="query has no keypoints"):
        ix.search(kf.KeypointSet.empty(shape=(40, 40, 40)))


# ------------------------------------------------------- item 2: the cohort's order by id


def test_family_report_matches_by_subject_id(family_sets) -> None:
    import pandas as pd

    table = [
        {"subject": sid, "family": lab["family"], "individual": sid} for sid, _, lab in family_sets
    ]
    ordered = kf.Index()
    for sid, kps, lab in family_sets:
        ordered.add(sid, kps, **lab)
    shuffled = kf.Index()  # built in another order: families interleaved
    for i in (0, 3, 6, 1, 4, 7, 2, 5, 8):
        sid, kps, lab = family_sets[i]
        shuffled.add(sid, kps, **lab)
    want = kf.evaluate.family_report(table, ordered.pairwise())
    assert want["family_auc"] > 0.9
    for scores in (shuffled, shuffled.pairwise(as_frame=True)):
        got = kf.evaluate.family_report(table, scores)
        assert got["family_auc"] == pytest.approx(want["family_auc"])
        assert got["map"] == pytest.approx(want["map"])
    # a plain matrix in another order is what the user got before: a wrong answer
    wrong = kf.evaluate.family_report(table, shuffled.pairwise())
    assert wrong["family_auc"] < want["family_auc"] - 0.3
    frame = shuffled.pairwise(as_frame=True)
    assert isinstance(frame, pd.DataFrame) and list(frame.index) == shuffled.subjects
    with pytest.raises(kf.InvalidArgumentError, match="not among"):
        kf.evaluate.family_report(table, frame.drop(index="sub-00"))


# ------------------------------------------------------------------ item 13: pandas


def test_search_result_to_frame(family_sets) -> None:
    ix = kf.Index()
    for sid, kps, labels in family_sets:
        ix.add(sid, kps, **labels)
    hits = ix.search(family_sets[0][0], k=3)
    df = hits.to_frame()
    assert df.index.name == "subject_id" and list(df.index) == hits.ids
    assert list(df["rank"]) == [1, 2, 3] and np.allclose(df["score"], hits.scores)
    assert df.loc[hits.ids[0], "family"] == "F0"
    assert "SearchResult" in repr(hits)


def test_version_and_python_m() -> None:
    import subprocess
    import sys

    assert kf.__version__ and kf.__version__[0].isdigit()
    out = subprocess.run(
        [sys.executable, "-m", "keyfuse", "--version"], capture_output=True, text=True, check=True
    )
    assert kf.__version__ in out.stdout


def test_cuda_that_cannot_be_honoured_says_so(family_sets, monkeypatch) -> None:
    """``device="cuda"`` on the posterior kernel (no GPU version) raises, naming the
    kernel, instead of searching on the CPU (the check comes before the GPU probe, so it
    is the same on every machine); ``"auto"`` runs on the CPU silently and says so in
    keyfuse.device.last_backends."""
    from keyfuse.device import last_backends

    monkeypatch.delenv("KEYFUSE_DEVICE", raising=False)
    ix = kf.Index()
    for sid, kps, labels in family_sets:
        ix.add(sid, kps, **labels)
    with pytest.raises(kf.DeviceUnavailableError, match=r"index.search.*posterior"):
        ix.search(family_sets[0][1], device="cuda")
    with pytest.raises(kf.DeviceUnavailableError, match=r"index.pairwise.*posterior"):
        ix.pairwise(device="cuda")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ix.search(family_sets[0][1], device="auto")  # auto chooses silently, by design
    assert last_backends()["index.search"] == "cpu"
