"""The command line of vector/fused search: keyfuse query --by/--predicted, keyfuse
pairwise --by, keyfuse evaluate retrieval."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from _vector_data import family_index
from click.testing import CliRunner

from keyfuse import cli as kcli


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ix, _ = family_index(n_families=3, size=3)
    path = tmp_path_factory.mktemp("cli") / "fam.kfi"
    ix.save(path)
    return path


def run(*args: str) -> str:
    res = CliRunner().invoke(kcli.cli, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def test_query_by_vector_and_fused_in_the_predicted_class(saved: Path) -> None:
    out = run("query", str(saved), "f1m0", "--by", "vector", "--csv", "-k", "5")
    rows = list(csv.DictReader(out.splitlines()))
    assert [r["subject"] for r in rows][:2] == ["f1m1", "f1m2"] or {
        r["subject"] for r in rows[:2]
    } == {"f1m1", "f1m2"}
    assert all(float(r["score"]) <= 0 for r in rows)  # minus the Euclidean distance
    out = run("query", str(saved), "f2m1", "--by", "fused", "--predicted", "family", "--csv")
    rows = list(csv.DictReader(out.splitlines()))
    assert {r["family"] for r in rows} == {"F2"} and len(rows) == 2
    res = CliRunner().invoke(kcli.cli, ["query", str(saved), "f0m0", "--by", "pixels"])
    assert res.exit_code != 0 and "pixels" in res.output


def test_pairwise_by_vector(saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.csv"
    run("pairwise", str(saved), "-o", str(out), "--by", "vector", "--metric", "cosine")
    rows = list(csv.reader(out.open()))
    mat = np.array([[float(x) for x in r[1:]] for r in rows[1:]])
    assert mat.shape == (9, 9)
    np.testing.assert_allclose(np.diag(mat), 1.0, atol=1e-5)


def test_evaluate_retrieval(saved: Path, tmp_path: Path) -> None:
    out = run(
        "evaluate", "retrieval", str(saved), "--label", "family", "--out", str(tmp_path),
        "--csv", str(tmp_path / "t.csv"),
    )  # fmt: skip
    assert "mAP|pred" in out and "keypoints" in out and "fused" in out
    assert (tmp_path / "pr-family.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "t.csv").exists()
    out = run(
        "evaluate", "retrieval", str(saved), "--label", "family", "--by", "fused",
        "--alpha", "auto", "--out", str(tmp_path / "auto.png"),
    )  # fmt: skip
    assert "fused α, median of the nested choices" in out and (tmp_path / "auto.png").exists()
    res = CliRunner().invoke(
        kcli.cli, ["evaluate", "retrieval", str(saved), "--label", "colour", "--out", str(tmp_path)]
    )
    assert res.exit_code != 0 and "colour" in res.output
