"""Issue 15, the command-line side: each test runs the command a new user typed and
checks that it now works, or fails with one clear line before doing the work."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import keyfuse as kf
from keyfuse import cli as kcli


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _error(res: object) -> str:
    out = res.output  # type: ignore[attr-defined]
    assert res.exit_code == 1, out  # type: ignore[attr-defined]
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, out
    return lines[0]


def _family_keys(root: Path, n_families: int = 3, size: int = 2) -> list[str]:
    """Keypoint files of families of noisy copies (sub-F<f>M<m>.kfk); their ids."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    ids = []
    for f in range(n_families):
        proto = rng.random((80, 64)) * 64
        for m in range(size):
            noisy = proto + 3.0 * rng.standard_normal(proto.shape)
            desc = np.argsort(np.argsort(noisy, axis=1), axis=1).astype(np.uint8)
            kps = kf.KeypointSet(
                rng.uniform(0, 30, (80, 3)),
                rng.uniform(1, 3, 80),
                descriptors=desc,
                shape=(32, 32, 32),
            )
            sid = f"sub-F{f}M{m}"
            kps.save(root / f"{sid}.kfk")
            ids.append(sid)
    return ids


@pytest.fixture(scope="module")
def small_t1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real MNI152 T1 at 4 mm, as NIfTI."""
    pytest.importorskip("nilearn")
    path = tmp_path_factory.mktemp("t1") / "mni.nii.gz"
    kf.datasets.mni152(resolution_mm=4).to_nifti().to_filename(str(path))
    return path


# ------------------------------------------------------------------------ index add/remove


def test_index_add_is_all_or_nothing(runner: CliRunner, tmp_path: Path) -> None:
    ids = _family_keys(tmp_path / "keys")
    idx = tmp_path / "ix"
    res = runner.invoke(
        kcli.cli, ["index", "build", str(tmp_path / "keys" / f"{ids[0]}.kfk"), "-o", str(idx), "-q"]
    )
    assert res.exit_code == 0, res.output
    new = tmp_path / "new"
    new.mkdir()
    for sid in ids[1:3]:
        (tmp_path / "keys" / f"{sid}.kfk").rename(new / f"{sid}.kfk")
    (new / "zzz-broken.kfk").write_bytes(b"not keypoints")
    res = runner.invoke(kcli.cli, ["index", "add", str(idx), str(new), "-q"])
    _error(res)
    assert len(kf.Index(idx)) == 1  # the good files before the bad one were not committed
    (new / "zzz-broken.kfk").unlink()
    res = runner.invoke(kcli.cli, ["index", "add", str(idx), str(new), "-q"])
    assert res.exit_code == 0 and "3 in all" in res.output, res.output
    # re-running: refused with the fix named, or --skip-existing adds only the new ones
    (tmp_path / "keys" / f"{ids[3]}.kfk").rename(new / f"{ids[3]}.kfk")
    assert "--skip-existing" in _error(
        runner.invoke(kcli.cli, ["index", "add", str(idx), str(new)])
    )
    res = runner.invoke(kcli.cli, ["index", "add", str(idx), str(new), "--skip-existing", "-q"])
    assert res.exit_code == 0 and "added 1 subjects, 2 already there" in res.output, res.output
    # remove
    res = runner.invoke(kcli.cli, ["index", "remove", str(idx), ids[1], ids[3]])
    assert res.exit_code == 0 and "(2 left)" in res.output, res.output
    assert kf.Index(idx).subjects == [ids[0], ids[2]]
    assert "not in the index" in _error(runner.invoke(kcli.cli, ["index", "remove", str(idx), "x"]))


def test_kfk_and_key_of_one_subject_are_explained(runner: CliRunner, tmp_path: Path) -> None:
    ids = _family_keys(tmp_path / "keys", 1, 1)
    kf.write_key(
        kf.KeypointSet.load(tmp_path / "keys" / f"{ids[0]}.kfk"),
        tmp_path / "keys" / f"{ids[0]}.key",
    )
    res = runner.invoke(
        kcli.cli, ["index", "build", str(tmp_path / "keys"), "-o", str(tmp_path / "ix")]
    )
    msg = _error(res)
    assert f"both be subject '{ids[0]}'" in msg and "only the .kfk" in msg


def test_typo_in_index_path_is_an_error(runner: CliRunner, tmp_path: Path) -> None:
    ids = _family_keys(tmp_path / "keys")
    runner.invoke(
        kcli.cli, ["index", "build", str(tmp_path / "keys"), "-o", str(tmp_path / "cohort.kfi")]
    )
    for cmd in (
        ["query", str(tmp_path / "cohrt.kfi"), ids[0]],
        ["index", "info", str(tmp_path / "keys")],
    ):
        res = runner.invoke(kcli.cli, cmd)
        assert res.exit_code != 0 and "Traceback" not in res.output
    assert not (tmp_path / "cohrt.kfi").exists()


# --------------------------------------------------------------------------- label tables


def test_bids_participants_tsv_and_label_mistakes(runner: CliRunner, tmp_path: Path) -> None:
    ids = _family_keys(tmp_path / "keys")
    # BIDS file names carry more entities than participants.tsv's ids
    for sid in ids:
        (tmp_path / "keys" / f"{sid}.kfk").rename(tmp_path / "keys" / f"{sid}_T1w.kfk")
    tsv = tmp_path / "participants.tsv"
    tsv.write_text(
        "participant_id\tfamily\tage\n" + "".join(f"{s}\tF{s[5]}\tn/a\n" for s in ids[:-1])
    )
    res = runner.invoke(
        kcli.cli,
        [
            "index",
            "build",
            str(tmp_path / "keys"),
            "-o",
            str(tmp_path / "ix"),
            "--labels",
            str(tsv),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "1 of 6 subjects have no row" in res.output  # a warning with counts
    labels = kf.Index(tmp_path / "ix").labels
    assert labels[f"{ids[0]}_T1w"] == {"family": "F0"}  # "n/a" is a missing value
    assert labels[f"{ids[-1]}_T1w"] == {}
    # ids matching no subject: an error, not an index without labels
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("subject,family\nx1,A\nx2,B\n")
    res = runner.invoke(
        kcli.cli,
        [
            "index",
            "build",
            str(tmp_path / "keys"),
            "-o",
            str(tmp_path / "i2"),
            "--labels",
            str(wrong),
        ],
    )
    assert "none of the 6 subjects" in _error(res)
    res = runner.invoke(
        kcli.cli,
        [
            "index",
            "build",
            str(tmp_path / "keys"),
            "-o",
            str(tmp_path / "i3"),
            "--labels",
            str(tsv),
            "--columns",
            "family,sex",
        ],
    )
    assert "--columns names sex" in _error(res)
    assert not (tmp_path / "i2").exists() and not (tmp_path / "i3").exists()


# --------------------------------------------------------------------------------- query


def test_query_by_id_excludes_itself_and_shows_labels(runner: CliRunner, tmp_path: Path) -> None:
    ids = _family_keys(tmp_path / "keys")
    table = tmp_path / "labels.csv"
    table.write_text("subject,family\n" + "".join(f"{s},F{s[5]}\n" for s in ids))
    idx = tmp_path / "ix"
    runner.invoke(
        kcli.cli, ["index", "build", str(tmp_path / "keys"), "-o", str(idx), "--labels", str(table)]
    )
    for query in (ids[0], str(tmp_path / "keys" / f"{ids[0]}.kfk")):
        res = runner.invoke(kcli.cli, ["query", str(idx), query, "-k", "3"])
        assert res.exit_code == 0, res.output
        rows = [ln.split() for ln in res.output.splitlines() if ln[:4].strip().isdigit()]
        assert rows[0][2] == ids[1]  # its twin first, itself left out
        assert ids[0] not in [r[2] for r in rows]
        assert rows[0][3] == "F0"  # the labels column
        assert len({r[1] for r in rows}) == 3  # scores that can be told apart (not 0.0000)
    res = runner.invoke(kcli.cli, ["query", str(idx), ids[0], "--keep-self", "-k", "1", "--csv"])
    assert res.output.splitlines()[1].startswith(f"1,{ids[0]},1")
    res = runner.invoke(
        kcli.cli, ["query", str(idx), ids[0], "--exclude", ids[1], "-k", "1", "--csv"]
    )
    assert ids[1] not in res.output
    assert "no subject of that id" in _error(runner.invoke(kcli.cli, ["query", str(idx), "sub-X"]))


def test_query_accepts_what_extract_reads(
    runner: CliRunner, tmp_path: Path, small_t1: Path
) -> None:
    import nibabel as nib

    img = nib.load(small_t1)
    mgz = tmp_path / "scan.mgz"
    nib.save(nib.MGHImage(np.asarray(img.dataobj, np.float32), img.affine), mgz)
    res = runner.invoke(
        kcli.cli, ["index", "build", str(small_t1), "-o", str(tmp_path / "ix"), "-q"]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(kcli.cli, ["query", str(tmp_path / "ix"), str(mgz), "--csv"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[1].startswith("1,mni,")


# ------------------------------------------------------------------------------- extract


def test_extract_missing_path_and_recursive_pattern(
    runner: CliRunner, tmp_path: Path, small_t1: Path
) -> None:
    res = runner.invoke(kcli.cli, ["extract", str(tmp_path / "missing"), "-o", str(tmp_path / "k")])
    assert "no such file or directory" in _error(res) and "missing" in res.output
    assert not (tmp_path / "k").exists()
    bids = tmp_path / "bids" / "sub-01" / "anat"
    bids.mkdir(parents=True)
    (bids / "sub-01_T1w.nii.gz").write_bytes(small_t1.read_bytes())
    (bids / "sub-01_T2w.nii.gz").write_bytes(small_t1.read_bytes())
    res = runner.invoke(
        kcli.cli,
        [
            "extract",
            str(tmp_path / "bids"),
            "-o",
            str(tmp_path / "k"),
            "--pattern",
            "*_T1w.nii.gz",
            "--scheduler",
            "sync",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["sub-01_T1w.kfk"]


def test_extract_cuda_without_gpu_fails_once(
    runner: CliRunner, tmp_path: Path, small_t1: Path
) -> None:
    if kf.cuda_available():
        pytest.skip("a GPU is present")
    res = runner.invoke(
        kcli.cli,
        [
            "extract",
            str(small_t1),
            str(small_t1),
            "-o",
            str(tmp_path / "k"),
            "--device",
            "cuda",
            "--scheduler",
            "sync",
        ],
    )
    line = _error(res)
    assert "--device cuda" in line and not (tmp_path / "k").exists()


# ------------------------------------------------------------------ simulate/evaluate/plot


def test_one_family_and_svg_plot(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(
        kcli.cli, ["simulate", str(tmp_path / "c"), "--families", "1", "--resolution", "4", "-q"]
    )
    assert res.exit_code == 0 and "6 scans" in res.output, res.output
    res = runner.invoke(
        kcli.cli,
        [
            "simulate",
            str(tmp_path / "d"),
            "--families",
            "1",
            "--rescans",
            "9",
            "--resolution",
            "4",
            "-q",
        ],
    )
    assert "--rescans must be in 0..3" in _error(res)  # the option, not n_rescans
    res = runner.invoke(
        kcli.cli,
        [
            "simulate",
            str(tmp_path / "two"),
            "--families",
            "2",
            "--family-size",
            "2",
            "--rescans",
            "1",
            "--resolution",
            "4",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        kcli.cli,
        ["evaluate", "family", str(tmp_path / "two"), "--plot", str(tmp_path / "roc.svg"), "-q"],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "roc.svg").read_text().lstrip().startswith("<?xml")
    res = runner.invoke(
        kcli.cli,
        ["evaluate", "family", str(tmp_path / "two"), "--plot", str(tmp_path / "roc.tiff2"), "-q"],
    )
    assert "unknown figure format" in _error(res)


# ------------------------------------------------------------------------------- segment


def test_segment_checks_its_output_before_working(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "l").mkdir()
    img = tmp_path / "new.nii.gz"
    kf.Image(np.zeros((8, 8, 8), np.float32)).to_nifti().to_filename(str(img))
    res = runner.invoke(
        kcli.cli,
        [
            "segment",
            "--atlases",
            str(tmp_path / "a"),
            "--labels",
            str(tmp_path / "l"),
            str(img),
            "-o",
            str(tmp_path / "out_noext"),
        ],
    )
    assert "name it .nii.gz" in _error(res)  # before the (empty) atlas folder is even read


# ------------------------------------------------------------------------ every command


COMMANDS = [
    ["extract"],
    ["index", "build"],
    ["index", "add"],
    ["index", "remove"],
    ["index", "info"],
    ["query"],
    ["pairwise"],
    ["simulate"],
    ["evaluate", "family"],
    ["evaluate", "fusion"],
    ["segment"],
    ["demo"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_command_has_quiet(runner: CliRunner, cmd: list[str]) -> None:
    out = runner.invoke(kcli.cli, [*cmd, "--help"]).output
    assert "-q, --quiet" in out
    if "--device" in out:
        assert (
            "[auto|cpu|cuda]" in out.replace("\n", " ").replace("  ", " ") or "auto|cpu|cuda" in out
        )


def test_python_m_keyfuse() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keyfuse", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "Usage:" in out.stdout


def test_pairwise_csv_rows_are_subjects(runner: CliRunner, tmp_path: Path) -> None:
    ids = _family_keys(tmp_path / "keys", 2, 2)
    runner.invoke(kcli.cli, ["index", "build", str(tmp_path / "keys"), "-o", str(tmp_path / "ix")])
    res = runner.invoke(
        kcli.cli,
        ["pairwise", str(tmp_path / "ix"), "-o", str(tmp_path / "m.csv"), "--device", "cpu", "-q"],
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.reader((tmp_path / "m.csv").open()))
    assert rows[0][1:] == ids and [r[0] for r in rows[1:]] == ids


def test_segment_writes_bids_label_names(runner: CliRunner, tmp_path: Path) -> None:
    """A simulated cohort carries labels/dseg.tsv; the segmentation's look-up table
    beside its map names the labels from it."""
    import shutil

    res = runner.invoke(
        kcli.cli,
        ["simulate", str(tmp_path / "c"), "--families", "1", "--family-size", "3",
         "--rescans", "0", "--resolution", "4", "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    atlases, labels = tmp_path / "atl", tmp_path / "lab"
    atlases.mkdir()
    labels.mkdir()
    images = sorted((tmp_path / "c" / "images").glob("*.nii.gz"))
    for img in images[1:]:
        shutil.copy(img, atlases / img.name)
        shutil.copy(tmp_path / "c" / "labels" / img.name, labels / img.name)
    shutil.copy(tmp_path / "c" / "labels" / "dseg.tsv", labels / "dseg.tsv")
    out = tmp_path / "seg" / "sub_dseg.nii.gz"
    res = runner.invoke(
        kcli.cli,
        ["segment", "--atlases", str(atlases), "--labels", str(labels), str(images[0]),
         "-o", str(out), "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "seg" / "sub_dseg.tsv").read_text().splitlines()
    assert rows[:3] == ["index\tname", "0\tbackground", "1\tleft_gm"]


@pytest.mark.slow
def test_demo_with_one_family(runner: CliRunner, tmp_path: Path) -> None:
    """``keyfuse demo --families 1``: no different-family pairs, so no ROC curve, but the
    run completes and says so; report.json records what made it."""
    import json

    res = runner.invoke(
        kcli.cli, ["demo", "--families", "1", "--resolution", "4", "-q", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    assert "ROC plot: none" in res.output
    prov = json.loads((tmp_path / "report.json").read_text())["provenance"]
    assert prov["keyfuse_version"] == kf.__version__ and prov["seed"] == 0
    assert prov["cohort"]["n_rescans"] == 3 and prov["index"]["params"]["kernel"] == "posterior"
