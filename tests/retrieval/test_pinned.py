"""No behaviour change across refactors: the exact bytes of one MNI152 extraction and of
the demo cohort's pairwise soft-Jaccard matrix are pinned.

The hashes were taken on the code before the reshaping of the codebase (issue 16). A
change here means results changed: either a bug, or a deliberate change of behaviour
that must be recorded in ``docs/decisions.md`` together with the new hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import keyfuse as kf

MNI152_1MM_EXTRACTION = "22bf189f2248d9eaaa389e04767315e813632cb686abddbbc2c4cffe57ec33e2"
DEMO_COHORT_PAIRWISE = "b786769fc23fa1ad8609c2712b50f881a847fb0f6c1a5a7a199da06464837b8d"


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def keypoints_digest(kps: kf.KeypointSet) -> str:
    return _digest(
        np.asarray(kps.ijk),
        np.asarray(kps.scale),
        np.asarray(kps.orientation),
        np.asarray(kps.descriptors),
        np.asarray(kps.polarity),
        np.asarray(kps.response),
    )


@pytest.mark.slow
def test_mni152_extraction_is_unchanged() -> None:
    kps = kf.extract(kf.datasets.mni152(), device="cpu")
    assert len(kps) == 2566
    assert keypoints_digest(kps) == MNI152_1MM_EXTRACTION


@pytest.mark.slow
def test_demo_cohort_pairwise_is_unchanged(tmp_path: Path) -> None:
    from keyfuse.demo import DemoConfig

    params = DemoConfig().cohort_params()
    cohort = kf.datasets.simulate_cohort(tmp_path / "cohort", progress=False, **params)
    index = kf.Index()
    for i, sid in enumerate(cohort.subjects):
        index.add(sid, kf.extract(cohort.image(i), device="cpu"))
    scores = np.asarray(index.pairwise(), dtype=np.float64)
    assert scores.shape == (len(cohort), len(cohort))
    assert _digest(scores) == DEMO_COHORT_PAIRWISE
