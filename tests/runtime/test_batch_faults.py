"""Faults lose nothing: a batch over good, corrupt, missing and 4D inputs, on a Dask
cluster of two worker processes one of which is killed mid-run, processes every good
input exactly once and lists the others in the failure report."""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import keyfuse as kf
from keyfuse import _core, batch
from keyfuse.errors import KeyfuseIOError

pytestmark = pytest.mark.skipif(
    not hasattr(_core, "extract3d"), reason="extension built without extract3d"
)


@dataclass(frozen=True)
class KillOnce:
    """Extraction whose first run on ``victim`` kills its worker process (as the kernel's
    OOM killer or a lost node would) before writing anything; every finished run is
    logged, so the test can count how often each input was processed."""

    victim: str
    log: str

    def __call__(self, inp: str, out: str) -> None:
        sentinel = Path(self.log) / "killed"
        if Path(inp).name == self.victim and not sentinel.exists():
            sentinel.write_text(str(os.getpid()))
            os._exit(1)
        batch.ExtractTask(device="cpu")(inp, out)
        with open(Path(self.log) / "runs.txt", "a") as fh:
            fh.write(Path(inp).name + "\n")


def _volume(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = np.zeros((24, 24, 24), np.float32)
    zz, yy, xx = np.indices(data.shape)
    for c in rng.uniform(6, 18, size=(6, 3)):
        data += 100 * np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / 6.0)
    return data


def _inputs(d: Path) -> tuple[list[Path], list[Path]]:
    """Four good scans and three bad ones (corrupt, missing, 4D), interleaved."""
    import nibabel as nib

    d.mkdir()
    good = []
    for i in range(4):
        p = d / f"good{i}.nii.gz"
        kf.Image(_volume(i), np.diag([2.0, 2.0, 2.0, 1.0])).save(p)
        good.append(p)
    corrupt = d / "corrupt.nii.gz"
    corrupt.write_bytes(good[0].read_bytes()[:200])  # a truncated download
    missing = d / "missing.nii.gz"
    four_d = d / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12, 3), np.float32), np.eye(4)), four_d)
    bad = [corrupt, missing, four_d]
    return [good[0], corrupt, good[1], good[2], missing, four_d, good[3]], bad


def test_a_worker_killed_mid_batch_loses_nothing(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    ins, bad = _inputs(tmp_path / "in")
    good = [p for p in ins if p not in bad]
    log = tmp_path / "log"
    log.mkdir()
    outs = [batch.output_path(p, tmp_path / "keys") for p in ins]
    task = KillOnce(victim="good2.nii.gz", log=str(log))
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        pids = set(client.run(os.getpid).values())
        res = batch.run_batch(
            task, ins, outs, scheduler=client, progress=False,
            failures_path=tmp_path / "keys" / "failures.csv",
        )  # fmt: skip
    killed = int((log / "killed").read_text())
    assert killed in pids  # a worker process really died mid-run

    good_outs = [batch.output_path(p, tmp_path / "keys") for p in good]
    assert res.written == good_outs and all(o.exists() for o in good_outs)
    runs = (log / "runs.txt").read_text().split()
    assert sorted(runs) == sorted(p.name for p in good)  # each good input exactly once
    assert kf.KeypointSet.load(good_outs[2]) == kf.extract(good[2], device="cpu")
    assert [Path(f.input).name for f in res.failures] == [p.name for p in bad]
    rows = list(csv.DictReader((tmp_path / "keys" / "failures.csv").open()))
    assert [Path(r["input"]).name for r in rows] == [p.name for p in bad]
    assert not any(o.exists() for o in outs if o not in good_outs)


def test_missing_corrupt_and_4d_inputs_are_failures_not_aborts(tmp_path: Path) -> None:
    ins, bad = _inputs(tmp_path / "in")
    res = batch.extract_batch(ins, tmp_path / "keys", scheduler="threads", progress=False)
    assert len(res.written) == 4
    fails = {Path(f.input).name: f for f in res.failures}
    assert list(fails) == ["corrupt.nii.gz", "missing.nii.gz", "fmri.nii.gz"]
    assert "missing.nii.gz" in fails["missing.nii.gz"].message
    assert "4" in fails["fmri.nii.gz"].message  # names the dimension it cannot take
    # a rerun retries only the failures; nothing good is recomputed
    again = batch.extract_batch(ins, tmp_path / "keys", scheduler="sync", progress=False)
    assert len(again.skipped) == 4 and len(again.failures) == 3
    # the command line: the same failures, and the good scans indexed (--index)
    from click.testing import CliRunner

    from keyfuse.cli import cli

    args = ["extract", *map(str, ins), "-o", str(tmp_path / "keys"), "--scheduler", "sync"]
    r = CliRunner().invoke(cli, [*args, "--index", str(tmp_path / "i.kfi"), "-q"])
    assert r.exit_code == 1 and "4 already done, 3 failed" in r.output, r.output
    assert "indexed 4 subjects" in r.output and "fmri.nii.gz" in r.output
    assert kf.Index(tmp_path / "i.kfi").subjects == ["good0", "good1", "good2", "good3"]
    # a batch of which no named input exists is a mistake, refused before any work
    with pytest.raises(KeyfuseIOError, match="no such file"):
        batch.extract_batch([bad[1], tmp_path / "nope.nii"], tmp_path / "keys2")
    assert not (tmp_path / "keys2").exists()
