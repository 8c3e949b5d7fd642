"""The streaming index build (``kf.batch.build_index``, ``keyfuse index build KEYDIR``):
chunked atomic appends, resume, labels from a table, bad files reported, the same index
whatever the scheduler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import keyfuse as kf
from keyfuse import batch
from keyfuse.cli import cli
from keyfuse.errors import InvalidArgumentError, UnlabelledSubjectsWarning


def _kps(seed: int, n: int = 40) -> kf.KeypointSet:
    rng = np.random.default_rng(seed)
    return kf.KeypointSet(
        ijk=rng.uniform(0, 20, (n, 3)),
        scale=rng.uniform(1, 3, n),
        descriptors=np.stack([rng.permutation(64) for _ in range(n)]).astype(np.uint8),
        affine=np.eye(4),
        shape=(20, 20, 20),
    )


def _keydir(tmp_path: Path, n: int = 7) -> Path:
    keys = tmp_path / "keys"
    keys.mkdir()
    for i in range(n):
        _kps(i).save(keys / f"s{i:02d}.kfk")
    kf.write_key(_kps(99), keys / "t00.key")  # featExtract text files are read too
    (keys / "failures.csv").write_text("input,error,message\n")  # batch's report: ignored
    return keys


def test_build_appends_in_chunks_with_labels_and_resumes(tmp_path: Path) -> None:
    keys = _keydir(tmp_path)
    table = tmp_path / "labels.csv"
    table.write_text("subject,group\ns00,a\ns01,b\ns02,n/a\n")
    out = tmp_path / "cohort.kfi"
    # a first build stopped after three subjects: only they are in the index
    first = batch.build_index(
        sorted(keys.glob("s0[0-2].kfk")), out, labels=table, chunk=2, progress=False
    )
    assert first.added == ["s00", "s01", "s02"] and first.ok
    with pytest.warns(UnlabelledSubjectsWarning, match="5 of 5 subjects have no row"):
        res = batch.build_index(keys, out, labels=table, chunk=2, progress=False)
    assert res.skipped == ["s00", "s01", "s02"]
    assert res.added == ["s03", "s04", "s05", "s06", "t00"]
    idx = kf.Index(out)
    assert idx.subjects == [f"s{i:02d}" for i in range(7)] + ["t00"]
    assert idx.labels["s00"] == {"group": "a"} and idx.labels["s02"] == {}  # n/a: missing
    got, want = idx.keypoints("s04"), _kps(4)  # compact geometry: positions on a grid
    assert np.array_equal(got.descriptors, want.descriptors)
    assert np.abs(got.ijk - want.ijk).max() < 1e-2
    assert idx.source("t00") == str(keys / "t00.key")
    # one atomic append per chunk: 2 + 3 parts
    import json

    assert len(json.loads((out / "manifest.json").read_text())["parts"]) == 5
    again = batch.build_index(keys, out, progress=False)  # everything there: a no-op
    assert again.added == [] and len(again.skipped) == 8


def test_build_is_the_same_whatever_the_scheduler(tmp_path: Path) -> None:
    keys = _keydir(tmp_path, n=5)
    a = batch.build_index(keys, tmp_path / "a.kfi", scheduler="sync", chunk=3, progress=False)
    b = batch.build_index(
        keys, tmp_path / "b.kfi", scheduler="threads", n_workers=3, chunk=2, progress=False
    )
    assert a.added == b.added
    ia, ib = kf.Index(tmp_path / "a.kfi"), kf.Index(tmp_path / "b.kfi")
    q = _kps(3)
    assert ia.search(q, k=5) == ib.search(q, k=5)
    distributed = pytest.importorskip("distributed")
    (keys / "s01.kfk").write_bytes(b"junk")  # read on a Dask worker: a failure, not a crash
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        c = batch.build_index(
            keys, tmp_path / "c.kfi", scheduler=cluster.scheduler_address, chunk=2, progress=False
        )
    assert c.added == [s for s in a.added if s != "s01"]
    assert [Path(f.input).name for f in c.failures] == ["s01.kfk"]
    assert kf.Index(tmp_path / "c.kfi").search(q, k=1)[0][0] == "s03"


def test_bad_files_are_reported_and_left_out(tmp_path: Path) -> None:
    keys = _keydir(tmp_path, n=4)
    (keys / "s01.kfk").write_bytes(b"not a keypoint file")
    flat = kf.KeypointSet(
        ijk=np.zeros((3, 3)), scale=np.ones(3), affine=np.eye(4), shape=(20, 20)
    )  # keypoints of a 2D image: not in an index of 3D ones
    flat.save(keys / "s02.kfk")
    res = batch.build_index(keys, tmp_path / "i.kfi", chunk=2, progress=False)
    assert res.added == ["s00", "s03", "t00"]
    assert [Path(f.input).name for f in res.failures] == ["s01.kfk", "s02.kfk"]
    assert "2D image" in res.failures[1].message
    _kps(1).save(keys / "s01.kfk")  # fixed: the rerun adds it
    assert batch.build_index(keys, tmp_path / "i.kfi", progress=False).added == ["s01"]


def test_ctrl_c_keeps_the_chunks_appended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import keyfuse.batch_build as bb

    keys = _keydir(tmp_path, n=6)
    read = bb.read_keypoint_file

    def interrupted_at_s04(path: str) -> bb.Read:
        if path.endswith("s04.kfk"):
            raise KeyboardInterrupt
        return read(path)

    monkeypatch.setattr(bb, "read_keypoint_file", interrupted_at_s04)
    out = tmp_path / "i.kfi"
    with pytest.raises(batch.BuildInterrupted) as stop:
        batch.build_index(keys, out, scheduler="sync", chunk=2, progress=False)
    assert stop.value.result.added == ["s00", "s01"]  # s02, s03 read, not yet committed
    assert kf.Index(out).subjects == ["s00", "s01"]
    monkeypatch.setattr(bb, "read_keypoint_file", read)
    res = batch.build_index(keys, out, chunk=2, progress=False)
    assert res.skipped == ["s00", "s01"] and len(kf.Index(out)) == 7


def test_bad_build_arguments(tmp_path: Path) -> None:
    keys = _keydir(tmp_path, n=2)
    with pytest.raises(InvalidArgumentError, match="chunk"):
        batch.build_index(keys, tmp_path / "i.kfi", chunk=0)
    (tmp_path / "x.nii.gz").write_bytes(b"")
    with pytest.raises(InvalidArgumentError, match="not a keypoint file"):
        batch.build_index([tmp_path / "x.nii.gz"], tmp_path / "i.kfi")
    table = tmp_path / "t.csv"
    table.write_text("subject,group\nnobody,a\n")
    with pytest.raises(InvalidArgumentError, match="none of the"):
        batch.build_index(keys, tmp_path / "i.kfi", labels=table)
    assert not (tmp_path / "i.kfi").exists()  # refused before anything was written


def test_cli_index_build_streams_and_resumes(tmp_path: Path) -> None:
    keys = _keydir(tmp_path, n=4)
    table = tmp_path / "participants.tsv"
    table.write_text("participant_id\tage\ns00\t31\ns01\tn/a\n")
    out = tmp_path / "c.kfi"
    runner = CliRunner()
    args = ["index", "build", str(keys), "-o", str(out), "--labels", str(table), "-q"]
    r = runner.invoke(cli, [*args, "--chunk", "2"])
    assert r.exit_code == 0, r.output
    assert "indexed 5 subjects" in r.output
    assert kf.Index(out).labels["s00"] == {"age": "31"}
    _kps(50).save(keys / "s09.kfk")
    r = runner.invoke(cli, args)  # a rerun resumes: only the new subject is read
    assert r.exit_code == 0 and "indexed 1 subjects, 5 already there" in r.output, r.output
    (keys / "s10.kfk").write_bytes(b"junk")
    r = runner.invoke(cli, args)
    assert r.exit_code == 1 and "s10.kfk" in r.output and "could not be read" in r.output
    r = runner.invoke(cli, [*args, "--overwrite", "--scheduler", "sync"])
    assert r.exit_code == 1 and "indexed 6 subjects ->" in r.output


def test_cli_index_build_chooses_the_geometry(tmp_path: Path) -> None:
    keys = _keydir(tmp_path, n=2)
    runner = CliRunner()
    out = tmp_path / "exact.kfi"
    r = runner.invoke(
        cli, ["index", "build", str(keys), "-o", str(out), "-q", "--geometry", "exact"]
    )
    assert r.exit_code == 0, r.output
    exact = kf.Index(out)
    assert exact.geometry == "exact"
    original = kf.KeypointSet.load(keys / "s00.kfk")
    np.testing.assert_array_equal(np.asarray(exact.keypoints("s00").ijk), np.asarray(original.ijk))
    r = runner.invoke(cli, ["index", "info", str(out)])
    assert r.exit_code == 0 and "geometry:   exact" in r.output, r.output
    # the default is compact; resuming an index with the other choice is refused clearly
    compact = tmp_path / "compact.kfi"
    r = runner.invoke(cli, ["index", "build", str(keys), "-o", str(compact), "-q"])
    assert r.exit_code == 0 and kf.Index(compact).geometry == "compact", r.output
    r = runner.invoke(
        cli, ["index", "build", str(keys), "-o", str(compact), "-q", "--geometry", "exact"]
    )
    assert r.exit_code != 0 and "compact geometry" in r.output, r.output
