"""The keyfuse command line: help texts, clean errors, simulate/evaluate/index round trips."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from keyfuse import cli as kcli
from keyfuse.keypoints import KeypointSet

COMMANDS = [
    [],
    ["extract"],
    ["index"],
    ["index", "build"],
    ["index", "add"],
    ["index", "remove"],
    ["index", "info"],
    ["query"],
    ["pairwise"],
    ["simulate"],
    ["evaluate"],
    ["evaluate", "family"],
    ["evaluate", "fusion"],
    ["segment"],
    ["demo"],
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "keyfuse")
def test_help(runner: CliRunner, cmd: list[str]) -> None:
    res = runner.invoke(kcli.cli, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage: keyfuse" in res.output
    if cmd and cmd not in (["index"], ["evaluate"]):
        assert "Example" in res.output  # every leaf command teaches by example


def test_cli_import_is_light() -> None:
    """``keyfuse --help`` loads no numerical module: commands import the library inside."""
    code = (
        "import sys, keyfuse.cli as c; c.cli.main(['--help'], standalone_mode=False); "
        "c.cli.main(['evaluate', '--help'], standalone_mode=False); "
        "heavy = {'numpy', 'sklearn', 'keyfuse._core', 'keyfuse.segment', 'keyfuse.fusion'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_missing_module_is_a_clean_error(runner: CliRunner, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "keyfuse.datasets.cohort", None)  # import fails
    res = runner.invoke(kcli.cli, ["simulate", str(tmp_path / "c"), "-q"])
    assert "missing module" in _one_error_line(res)
    assert "segment" in runner.invoke(kcli.cli, ["--help"]).output
    assert "fusion" in runner.invoke(kcli.cli, ["evaluate", "--help"]).output


def test_segment_default_nu_is_the_segmenters() -> None:
    from keyfuse import segment
    from keyfuse.cli import segment as segment_cli

    assert segment_cli.DEFAULT_NU == segment.DEFAULT_NU


def _one_error_line(res: object) -> str:
    out = res.output  # type: ignore[attr-defined]
    assert res.exit_code == 1, out  # type: ignore[attr-defined]
    assert "Traceback" not in out
    assert res.exception is None or isinstance(res.exception, SystemExit)  # type: ignore[attr-defined]
    lines = [ln for ln in out.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, out
    return lines[0]


def test_bad_inputs_give_one_line(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "broken.nii.gz").write_bytes(b"garbage")
    res = runner.invoke(
        kcli.cli,
        [
            "extract",
            str(tmp_path / "broken.nii.gz"),
            "-o",
            str(tmp_path / "k"),
            "-q",
            "--scheduler",
            "sync",
        ],
    )
    assert "failures.csv" in _one_error_line(res)
    assert (tmp_path / "k" / "failures.csv").exists()
    res = runner.invoke(kcli.cli, ["evaluate", "family", str(tmp_path)])
    assert "not a cohort directory" in _one_error_line(res)
    res = runner.invoke(kcli.cli, ["simulate", str(tmp_path / "s"), "--resolution", "-2", "-q"])
    assert "--resolution must be" in _one_error_line(res)  # the option, not resolution_mm
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    res = runner.invoke(kcli.cli, ["index", "build", str(notes), "-o", str(tmp_path / "i")])
    assert "neither" in _one_error_line(res)
    # an unwritable output is an OSError: still one line
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(
        kcli.cli,
        [
            "simulate",
            str(blocker / "sub"),
            "-q",
            "--resolution",
            "4",
            "--families",
            "1",
            "--family-size",
            "1",
            "--rescans",
            "0",
        ],
    )
    _one_error_line(res)


def test_simulate_command(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "c"
    res = runner.invoke(
        kcli.cli,
        [
            "simulate",
            str(out),
            "--families",
            "1",
            "--family-size",
            "2",
            "--rescans",
            "1",
            "--resolution",
            "4",
            "--seed",
            "2",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "cohort.csv").open()))
    assert len(rows) == 3 and all((out / r["image"]).exists() for r in rows)
    assert sum(1 for r in rows if r["rescan_of"]) == 1


def _random_set(rng: np.random.Generator, base: np.ndarray | None = None) -> KeypointSet:
    n = 60
    if base is None:
        desc = np.array([rng.permutation(64) for _ in range(n)], dtype=np.uint8)
    else:  # a noisy copy: swap a few ranks per row
        desc = base.copy()
        for row in desc:
            i, j = rng.integers(0, 64, 2)
            row[[i, j]] = row[[j, i]]
    return KeypointSet(
        rng.uniform(0, 30, (n, 3)), rng.uniform(1, 3, n), descriptors=desc, shape=(32, 32, 32)
    )


def test_index_query_pairwise(runner: CliRunner, tmp_path: Path) -> None:
    pytest.importorskip("keyfuse.index")
    rng = np.random.default_rng(0)
    keys = tmp_path / "keys"
    keys.mkdir()
    sets = {f"s{i}": _random_set(rng) for i in range(4)}
    for name, kps in sets.items():
        kps.save(keys / f"{name}.kfk")
    twin = _random_set(rng, sets["s1"].descriptors)
    twin.save(tmp_path / "q.kfk")
    table = tmp_path / "labels.csv"
    table.write_text("subject,family\ns0,A\ns1,B\ns2,B\ns3,C\n")
    idx = tmp_path / "idx"
    res = runner.invoke(
        kcli.cli, ["index", "build", str(keys), "-o", str(idx), "--labels", str(table), "-q"]
    )
    assert res.exit_code == 0, res.output
    # building keypoint files into an existing index resumes it: nothing is added twice
    res = runner.invoke(kcli.cli, ["index", "build", str(keys), "-o", str(idx), "-q"])
    assert res.exit_code == 0 and "indexed 0 subjects, 4 already there" in res.output
    res = runner.invoke(kcli.cli, ["index", "info", str(idx)])
    assert res.exit_code == 0 and "subjects:   4" in res.output, res.output
    res = runner.invoke(kcli.cli, ["query", str(idx), str(tmp_path / "q.kfk"), "-k", "2", "--csv"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0] == "rank,subject,score,family" and lines[1].startswith("1,s1,")
    more = tmp_path / "more"
    more.mkdir()
    _random_set(rng).save(more / "s4.kfk")
    res = runner.invoke(kcli.cli, ["index", "add", str(idx), str(more), "-q"])
    assert res.exit_code == 0 and "5 in all" in res.output, res.output
    res = runner.invoke(kcli.cli, ["pairwise", str(idx), "-o", str(tmp_path / "m.csv")])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader((tmp_path / "m.csv").open()))
    assert rows[0][0] == "subject" and len(rows) == 6 and all(len(r) == 6 for r in rows)
    # the small index is searched exactly by default: --search exact gives the same matrix
    res = runner.invoke(
        kcli.cli, ["pairwise", str(idx), "-o", str(tmp_path / "e.csv"), "--search", "exact"]
    )
    assert (
        res.exit_code == 0 and (tmp_path / "e.csv").read_text() == (tmp_path / "m.csv").read_text()
    )
    res = runner.invoke(
        kcli.cli, ["pairwise", str(idx), "-o", str(tmp_path / "f.csv"), "--search", "forest"]
    )
    assert res.exit_code == 0 and len(list(csv.reader((tmp_path / "f.csv").open()))) == 6
    res = runner.invoke(kcli.cli, ["pairwise", str(idx), "-o", "x.csv", "--search", "fast"])
    assert res.exit_code == 2 and "Invalid value" in res.output
    res = runner.invoke(kcli.cli, ["index", "info", str(tmp_path / "keys")])
    assert res.exit_code == 1 and "Traceback" not in res.output
