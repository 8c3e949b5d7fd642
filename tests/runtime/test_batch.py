"""Batch processing: one output per input, resume, failure list, Dask and thread pools."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from keyfuse import _core, batch
from keyfuse.errors import InvalidArgumentError


def _copy_upper(inp: str, out: str) -> None:
    """A toy task: fails on inputs whose text says so, else writes the text upper-cased."""
    text = Path(inp).read_text()
    if "bad" in text:
        raise ValueError(f"cannot process {Path(inp).name}")
    Path(out).write_text(text.upper())


def _inputs(tmp_path: Path, texts: list[str]) -> list[Path]:
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    paths = []
    for n, t in enumerate(texts):
        p = d / f"f{n}.txt"
        p.write_text(t)
        paths.append(p)
    return paths


@pytest.mark.parametrize("scheduler", ["sync", "threads", "local"])
def test_failures_never_abort_and_resume(tmp_path: Path, scheduler: str) -> None:
    ins = _inputs(tmp_path, ["a", "bad", "c", "d"])
    outs = [tmp_path / "out" / f"{p.stem}.up" for p in ins]
    fail = tmp_path / "out" / "failures.csv"
    res = batch.run_batch(
        _copy_upper, ins, outs, scheduler=scheduler, n_workers=2, progress=False, failures_path=fail
    )
    assert res.written == [outs[0], outs[2], outs[3]]
    assert [f.input for f in res.failures] == [str(ins[1])]
    assert res.failures[0].error == "ValueError" and "f1.txt" in res.failures[0].message
    assert outs[0].read_text() == "A" and not outs[1].exists()
    rows = list(csv.DictReader(fail.open()))
    assert rows == [
        {"input": str(ins[1]), "error": "ValueError", "message": "cannot process f1.txt"}
    ]

    # resume: existing outputs are skipped, the failed input is retried
    ins[1].write_text("b")
    again = batch.run_batch(
        _copy_upper, ins, outs, scheduler="sync", progress=False, failures_path=fail
    )
    assert again.skipped == [outs[0], outs[2], outs[3]]
    assert again.written == [outs[1]] and again.ok
    assert not fail.exists()  # no stale failure list
    outs[0].write_text("stale")
    batch.run_batch(_copy_upper, ins, outs, scheduler="sync", progress=False, overwrite=True)
    assert outs[0].read_text() == "A"


def test_bad_batch_arguments(tmp_path: Path) -> None:
    ins = _inputs(tmp_path, ["a", "b"])
    with pytest.raises(InvalidArgumentError):
        batch.run_batch(_copy_upper, ins, [tmp_path / "o"], progress=False)
    with pytest.raises(InvalidArgumentError):  # two inputs, one output file
        batch.run_batch(_copy_upper, ins, [tmp_path / "o", tmp_path / "o"], progress=False)
    with pytest.raises(InvalidArgumentError):
        batch.extract_batch([], tmp_path / "keys", progress=False)
    with pytest.raises(InvalidArgumentError):
        batch.extract_batch(ins, tmp_path / "keys", device="tpu", progress=False)
    with pytest.raises(InvalidArgumentError):
        batch.extract_batch(ins, tmp_path / "keys", fmt="csv", progress=False)


def test_paths(tmp_path: Path) -> None:
    assert batch.output_path("/x/sub-01.nii.gz", "/k") == Path("/k/sub-01.kfk")
    assert batch.output_path("sub-01.nii", "/k", ".key") == Path("/k/sub-01.key")
    assert batch.output_path("x/scan.v2.mgz", "/k") == Path("/k/scan.v2.kfk")
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("b.nii.gz", "a.nii", "notes.txt"):
        (d / name).write_bytes(b"")
    got = batch.collect_inputs([d, tmp_path / "x.nii.gz"])
    assert [p.name for p in got] == ["a.nii", "b.nii.gz", "x.nii.gz"]


def test_subject_id_from_path() -> None:
    from keyfuse._io import subject_id_from_path

    assert subject_id_from_path("/d/sub-01.nii.gz") == "sub-01"
    assert subject_id_from_path("sub-01.nii") == "sub-01"
    assert subject_id_from_path(Path("k/sub-01.kfk")) == "sub-01"
    assert subject_id_from_path("sub.01.key") == "sub.01"
    assert subject_id_from_path("scan.mgz") == "scan"  # any other suffix: the last one


@pytest.mark.skipif(not hasattr(_core, "extract3d"), reason="extension built without extract3d")
def test_extract_batch_real(tmp_path: Path) -> None:
    import keyfuse as kf

    rng = np.random.default_rng(0)
    data = np.zeros((24, 24, 24), np.float32)
    zz, yy, xx = np.indices(data.shape)
    for c in rng.uniform(6, 18, size=(6, 3)):
        data += 100 * np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / 6.0)
    good = tmp_path / "good.nii.gz"
    kf.Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).save(good)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    res = batch.extract_batch(
        [good, broken, tmp_path / "missing.nii.gz"],
        tmp_path / "keys",
        scheduler="threads",
        progress=False,
        device="cpu",
    )
    assert res.written == [tmp_path / "keys" / "good.kfk"]
    assert [Path(f.input).name for f in res.failures] == ["broken.nii.gz", "missing.nii.gz"]
    kps = kf.KeypointSet.load(res.written[0])
    assert kps == kf.extract(good, device="cpu")
    assert (tmp_path / "keys" / "failures.csv").exists()


def test_dask_scheduler_address(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    ins = _inputs(tmp_path, ["x", "bad", "z"])
    outs = [tmp_path / "out" / f"{p.stem}.up" for p in ins]
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        res = batch.run_batch(
            _copy_upper, ins, outs, scheduler=cluster.scheduler_address, progress=False
        )
    assert res.written == [outs[0], outs[2]] and outs[2].read_text() == "Z"
    assert [f.error for f in res.failures] == ["ValueError"]
