"""Every benchmark script runs: ``python benches/X.py --quick`` is a tiny version of the full
benchmark (seconds), which must exit 0 and print its figures.

The scripts run in a fresh interpreter (this one's, so the keyfuse under test) from a
scratch directory, as ``make bench`` runs them at full size.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parents[2] / "benches"
# helper modules (benches/_*.py) are imported by the scripts, not run
SCRIPTS = sorted(p for p in BENCHES.glob("*.py") if not p.name.startswith("_"))
# a figure: a number with a decimal point (times, scores, fractions, percentages)
FIGURE = re.compile(r"\d\.\d")


def test_the_benchmarks_are_found() -> None:
    assert {
        "active.py",
        "align.py",
        "extract.py",
        "gpu.py",
        "index.py",
        "matching.py",
        "scale.py",
        "vectors.py",
    } <= {p.name for p in SCRIPTS}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_runs_quick(script: Path, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(script), "--quick"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{script.name} --quick exited {run.returncode}:\n{output}"
    figures = [line for line in run.stdout.splitlines() if FIGURE.search(line)]
    assert len(figures) >= 2, f"{script.name} --quick printed no figures:\n{output}"
