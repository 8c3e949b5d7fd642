"""Batch processing: one output per input, resume, failure list, Dask and thread pools."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from keyfuse import _core, batch
from keyfuse.errors import InvalidArgumentError, KeyfuseIOError


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
    (tmp_path / "x.nii.gz").write_bytes(b"")
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
    # no named input exists: refused before any work (one missing among others is a
    # failure of the batch, see test_batch_faults.py)
    with pytest.raises(KeyfuseIOError, match=r"missing\.nii\.gz"):
        batch.extract_batch([tmp_path / "missing.nii.gz"], tmp_path / "keys")
    assert not (tmp_path / "keys").exists()
    res = batch.extract_batch(
        [good, broken],
        tmp_path / "keys",
        scheduler="threads",
        progress=False,
        device="cpu",
    )
    assert res.written == [tmp_path / "keys" / "good.kfk"]
    assert [Path(f.input).name for f in res.failures] == ["broken.nii.gz"]
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


def test_inputs_as_a_string_glob_or_tree(tmp_path: Path) -> None:
    """``extract_batch("cohort/images", "keys/")`` as in the README: a string is one path
    (never iterated character by character); globs and BIDS trees work too."""
    tree = tmp_path / "bids"
    for sub in ("sub-01", "sub-02"):
        (tree / sub / "anat").mkdir(parents=True)
        (tree / sub / "anat" / f"{sub}_T1w.nii.gz").write_bytes(b"")
        (tree / sub / "anat" / f"{sub}_T2w.nii.gz").write_bytes(b"")
    (tree / "sub-01" / "anat" / "notes.txt").write_text("x")
    names = lambda ps: [p.name for p in ps]  # noqa: E731
    assert names(batch.collect_inputs(str(tree))) == [
        "sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz", "sub-02_T1w.nii.gz", "sub-02_T2w.nii.gz",
    ]  # fmt: skip
    assert names(batch.collect_inputs(tree, pattern="*_T1w.nii.gz")) == [
        "sub-01_T1w.nii.gz", "sub-02_T1w.nii.gz",
    ]  # fmt: skip
    assert names(batch.collect_inputs(str(tree / "*" / "anat" / "*_T2w.nii.gz"))) == [
        "sub-01_T2w.nii.gz", "sub-02_T2w.nii.gz",
    ]  # fmt: skip
    assert names(batch.collect_inputs(tree, recursive=False)) == []
    single = tree / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    assert batch.collect_inputs(str(single)) == [single]
    with pytest.raises(KeyfuseIOError, match="no files match"):
        batch.collect_inputs(str(tree / "*.mgz"))
    with pytest.raises(KeyfuseIOError, match="no such file"):
        batch.collect_inputs(str(tmp_path / "cohrt"))


@pytest.mark.skipif(not hasattr(_core, "extract3d"), reason="extension built without extract3d")
def test_extract_batch_takes_a_directory_string(tmp_path: Path) -> None:
    import keyfuse as kf

    images = tmp_path / "cohort" / "images"
    rng = np.random.default_rng(1)
    for name in ("o1", "o2"):
        data = rng.random((20, 20, 20)).astype(np.float32)
        kf.Image(data, np.diag([2.0, 2.0, 2.0, 1.0])).save(images / f"{name}.nii.gz")
    res = batch.extract_batch(str(images), str(tmp_path / "keys"), progress=False, device="cpu")
    assert [p.name for p in res.outputs] == ["o1.kfk", "o2.kfk"] and res.ok


_SLOW_BATCH = """
import signal, sys, time
from pathlib import Path
from keyfuse import batch

# as in a terminal: a runner that starts the suite in the background (nohup, some CI)
# passes SIGINT on ignored, and Python then never raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)

def slow(inp, out):
    time.sleep(0.4)
    Path(out).write_text("done")

d = Path(sys.argv[1])
ins = [d / f"in{i:02d}" for i in range(24)]
for p in ins:
    p.write_text("x")
outs = [d / "out" / f"{p.name}.txt" for p in ins]
try:
    res = batch.run_batch(slow, ins, outs, scheduler=sys.argv[2], n_workers=2, progress=False)
except batch.BatchInterrupted as stop:
    print("interrupted", len(stop.result.written), flush=True)
    sys.exit(130)
print("done", len(res.written), len(res.skipped), flush=True)
"""


@pytest.mark.parametrize("scheduler", ["threads", "local"])
def test_ctrl_c_cancels_queued_work_and_keeps_finished(tmp_path: Path, scheduler: str) -> None:
    import signal
    import subprocess
    import sys
    import time

    if scheduler == "local":
        pytest.importorskip("distributed")
    script = tmp_path / "slow_batch.py"
    script.write_text(_SLOW_BATCH)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), scheduler],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (out.exists() and any(out.glob("*.txt"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    stdout, stderr = proc.communicate(timeout=30)
    took = time.monotonic() - t0
    assert proc.returncode == 130, (stdout, stderr)
    assert stdout.startswith("interrupted")
    # 24 queued files of 0.4 s on 2 workers would take 4.8 s: the queue was dropped
    assert took < (1.0 if scheduler == "threads" else 3.0), took
    assert "CancelledError" not in stderr and "Traceback" not in stderr, stderr
    finished = sorted(out.glob("*.txt"))
    assert 0 < len(finished) < 24 and all(p.read_text() == "done" for p in finished)
    # the rerun resumes: the finished outputs are skipped
    again = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "threads"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    _, written, skipped = again.stdout.split()
    assert int(skipped) == len(finished) and int(written) == 24 - len(finished)
