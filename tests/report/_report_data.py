"""Small real data for the figure and report tests: the MNI152 template at 3 mm and a
tiny simulated cohort (3 families × 2 + 1 rescan, 3 mm) with keypoints and scores.

Plain cached functions rather than fixtures: a ``conftest.py`` here would replace the
suite's root ``conftest`` module that other test folders import helpers from."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

import keyfuse as kf

#: where screenshots and reports are kept after the run (gitignored)
ARTIFACTS = Path(
    os.environ.get("KEYFUSE_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")
)


@cache
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@cache
def mni() -> Any:
    return kf.datasets.mni152("t1", 3.0)


@cache
def mni_kps() -> Any:
    return kf.extract(mni(), device="cpu")


@cache
def cohort() -> Any:
    return kf.datasets.simulate_cohort(
        None, n_families=3, family_size=2, n_rescans=1, resolution_mm=3.0, seed=3, progress=False
    )


@cache
def cohort_keys() -> list[Any]:
    return [kf.extract(img, device="cpu") for img in cohort().images()]


@cache
def cohort_index() -> Any:
    index = kf.Index()
    for row, kps in zip(cohort().table, cohort_keys(), strict=True):
        index.add(row["subject"], kps, family=row["family"], group=row["group"])
    return index


@cache
def cohort_scores() -> np.ndarray:
    return np.asarray(cohort_index().pairwise(device="cpu"))
