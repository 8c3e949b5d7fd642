"""BIDS datasets (``kf.bids``, ``keyfuse extract --bids``): T1w scans found by their
layout, keypoints written as a BIDS derivative named by the scans' entities, and indexed
with labels from ``participants.tsv``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import keyfuse as kf
from keyfuse import _core
from keyfuse.cli import cli
from keyfuse.errors import InvalidArgumentError, KeyfuseIOError, UnlabelledSubjectsWarning

pytestmark = [
    pytest.mark.skipif(not hasattr(_core, "extract3d"), reason="extension built without extract3d"),
]

SCANS = [  # (folder below the dataset, entities)
    ("sub-01/ses-1/anat", "sub-01_ses-1"),
    ("sub-01/ses-2/anat", "sub-01_ses-2"),
    ("sub-02/anat", "sub-02_run-1"),
    ("sub-03/anat", "sub-03"),
]


@pytest.fixture(scope="module")
def template() -> kf.Image:
    pytest.importorskip("nilearn")
    return kf.datasets.mni152(resolution_mm=3.0)  # a real T1, small (66×78×63)


def _dataset(root: Path, template: kf.Image) -> Path:
    """A tiny BIDS dataset: the downsampled MNI152 template, a little different per scan;
    sub-03 is missing from participants.tsv."""
    rng = np.random.default_rng(0)
    for n, (folder, entities) in enumerate(SCANS):
        data = np.asarray(template.data, np.float32) * (1.0 + 0.05 * n)
        data = data + rng.normal(0, 1.0, data.shape).astype(np.float32)
        kf.Image(data, template.affine).save(root / folder / f"{entities}_T1w.nii.gz")
    (root / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T2w.nii.gz").write_bytes(b"")
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.9.0"}')
    (root / "participants.tsv").write_text(
        "participant_id\tage\tgroup\nsub-01\t31\tpatient\nsub-02\tn/a\tcontrol\n"
    )
    return root


def test_extract_bids_writes_a_derivative_and_indexes_it(
    tmp_path: Path, template: kf.Image
) -> None:
    ds = _dataset(tmp_path / "ds", template)
    scans = kf.bids.find_t1w(ds)
    assert [s.entities for s in scans] == [e for _, e in SCANS]
    assert [s.session for s in scans] == ["ses-1", "ses-2", None, None]
    idx_path = tmp_path / "ds.kfi"
    with pytest.warns(UnlabelledSubjectsWarning, match="sub-03"):
        res = kf.bids.extract_bids(ds, index=idx_path, scheduler="threads", progress=False)
    deriv = ds / "derivatives" / "keyfuse"
    assert res.ok and res.derivative == deriv
    expected = [deriv / f / f"{e}_keypoints.kfk" for f, e in SCANS]
    assert res.extraction.written == expected
    kps = kf.KeypointSet.load(expected[2])
    assert len(kps) > 20 and kps == kf.extract(ds / SCANS[2][0] / "sub-02_run-1_T1w.nii.gz")
    desc = json.loads((deriv / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "keyfuse"
    assert desc["GeneratedBy"][0]["Version"] == kf.__version__
    idx = kf.Index(idx_path)
    assert idx.subjects == [e for _, e in SCANS]
    assert idx.labels["sub-01_ses-2"] == {"age": "31", "group": "patient"}
    assert idx.labels["sub-02_run-1"] == {"group": "control"}  # n/a: missing
    assert idx.labels["sub-03"] == {}
    # a scan's own keypoints find it first
    assert idx.search(kps, k=1)[0][0] == "sub-02_run-1"
    # resume: nothing is extracted or indexed twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing added, nothing to warn about
        again = kf.bids.extract_bids(ds, index=idx_path, scheduler="sync", progress=False)
    assert again.extraction.skipped == expected and again.build is not None
    assert again.build.added == [] and len(kf.Index(idx_path)) == 4


def test_cli_extract_bids(tmp_path: Path, template: kf.Image) -> None:
    ds = _dataset(tmp_path / "ds", template)
    (ds / "sub-03" / "anat" / "sub-03_T1w.nii.gz").write_bytes(b"corrupt")
    (ds / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz").unlink()
    out = tmp_path / "deriv"
    r = CliRunner().invoke(
        cli,
        ["extract", "--bids", str(ds), "-o", str(out), "--index", str(tmp_path / "i.kfi"), "-q"],
    )
    assert r.exit_code == 1, r.output
    assert "2 extracted, 0 already done, 1 failed" in r.output
    assert "indexed 2 subjects" in r.output and "sub-03_T1w.nii.gz" in r.output
    assert (out / "sub-01" / "ses-2" / "anat" / "sub-01_ses-2_keypoints.kfk").exists()
    assert (out / "failures.csv").exists() and (out / "dataset_description.json").exists()
    r = CliRunner().invoke(cli, ["extract", "--bids", str(ds), "scan.nii.gz", "-o", str(out)])
    assert r.exit_code == 2 and "not both" in r.output


def test_bad_bids_layouts(tmp_path: Path) -> None:
    with pytest.raises(KeyfuseIOError, match="no such BIDS dataset"):
        kf.bids.find_t1w(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "scan_T1w.nii.gz").write_bytes(b"")
    with pytest.raises(InvalidArgumentError, match="not a BIDS dataset"):
        kf.bids.find_t1w(tmp_path / "flat")
    (tmp_path / "ds" / "sub-01" / "anat").mkdir(parents=True)
    (tmp_path / "ds" / "sub-01" / "anat" / "sub-01_T2w.nii.gz").write_bytes(b"")
    with pytest.raises(InvalidArgumentError, match="no T1w scans"):
        kf.bids.extract_bids(tmp_path / "ds", progress=False)
    r = CliRunner().invoke(cli, ["extract", "--bids", str(tmp_path / "ds")])
    assert r.exit_code == 1 and "no T1w scans" in r.output and "Traceback" not in r.output
    (tmp_path / "ds" / "sub-01" / "anat" / "sub-02_T1w.nii.gz").write_bytes(b"")
    with pytest.raises(InvalidArgumentError, match="must match its folder"):
        kf.bids.find_t1w(tmp_path / "ds")
