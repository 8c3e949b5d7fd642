"""Retrieval mAP of keypoint, vector and fused search on simulated cohorts; prints figures.

    .venv/bin/python benches/retrieval.py [--cohort small|large|both] [--cache DIR] [--quick]

Target (issue 14): fused retrieval mAP ≥ max(keypoint-only, vector-only) on the simulated
cohort, for the family and the group label. Each cohort comes from
``kf.datasets.simulate_cohort`` at 3 mm (3-D SIFT-Rank keypoints, and the VGG16 vector of
the mid-axial slice after the simulator's known pose, as in ``benches/active.py``):

* ``small``: 6 families × 3 + 2 rescans = 20 scans (seed 0), the cohort of the issue's
  earlier figures;
* ``large``: 16 families × 3 + 4 rescans = 52 scans (seed 1), for a smaller standard error.

For each label, ``kf.evaluate.retrieval(index, label, by=[...], alpha="auto")`` scores
every labelled scan as a leave-one-out query (the fused α of each query chosen on the
other queries). Printed: mAP of each source, the median fused α, and fused − the better
single source with the standard error of the paired per-query AP difference
(``RetrievalReport.ap``). Features are cached with ``--cache`` (one pickle per cohort);
computing them took about 1.5 (small) and 4.5 (large) minutes on 2 busy cores, the
evaluation itself under a second (about 60 keypoints per 3 mm scan).
"""

from __future__ import annotations

import argparse
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import keyfuse as kf
from keyfuse.experiments.fusion_table1 import cohort_features

COHORTS = {
    "small": {"n_families": 6, "family_size": 3, "n_rescans": 2, "seed": 0},
    "large": {"n_families": 16, "family_size": 3, "n_rescans": 4, "seed": 1},
    # --quick: a smoke test of the whole path (seconds), no figures worth reading
    "tiny": {"n_families": 3, "family_size": 2, "n_rescans": 1, "seed": 0},
}
BY = ("keypoints", "vector", "fused")


def features(name: str, resolution: float, cache: Path | None) -> tuple[Any, dict[str, list[str]]]:
    """(cohort features, the subject/family/group columns), from the cache when present."""
    path = None if cache is None else cache / f"retrieval-{name}-{resolution:g}mm.pkl"
    if path is not None and path.exists():
        with path.open("rb") as f:
            return pickle.load(f)  # type: ignore[no-any-return]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cohort = kf.datasets.simulate_cohort(
            None, **COHORTS[name], resolution_mm=resolution, progress=False
        )
        feats = cohort_features(cohort, transform_source="truth", device="cpu", progress=False)
    cols = {c: [str(v) for v in cohort.column(c)] for c in ("subject", "family", "group")}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            pickle.dump((feats, cols), f)
    return feats, cols


def run(name: str, resolution: float, cache: Path | None) -> None:
    t0 = time.process_time()
    feats, cols = features(name, resolution, cache)
    index = kf.Index()
    for i, sid in enumerate(cols["subject"]):
        index.add(
            sid,
            feats.kps3d[i],
            vector=feats.vectors[i],
            family=cols["family"][i],
            group=cols["group"][i],
        )
    n_kp = np.mean([len(index.keypoints(s)) for s in index.subjects])
    print(
        f"cohort {name!r}: {len(index)} scans, {len(set(cols['family']))} families, "
        f"{resolution:g} mm, {n_kp:.0f} keypoints per scan "
        f"(features: {time.process_time() - t0:.1f} CPU s)"
    )
    print("  label     queries  keypoints  vector   fused  (α)   fused − best single ± SE")
    for label in ("family", "group"):
        t1 = time.process_time()
        rep = kf.evaluate.retrieval(index, label, by=list(BY), alpha="auto")
        m = {b: float(rep.table.loc[(b, "all"), "mAP"]) for b in BY}
        best = max(("keypoints", "vector"), key=lambda b: m[b])
        d = rep.ap["fused"] - rep.ap[best]
        se = float(d.std(ddof=1) / np.sqrt(len(d)))
        verdict = "≥" if d.mean() >= 0 else ("within 1 SE" if d.mean() >= -se else "BELOW")
        print(
            f"  {label:8s}  {len(d):7d}  {m['keypoints']:9.3f}  {m['vector']:6.3f}  "
            f"{m['fused']:6.3f}  ({rep.alpha:.2g})  {d.mean():+.3f} ± {se:.3f} vs {best} "
            f"[{verdict}]  ({time.process_time() - t1:.1f} CPU s)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", choices=[*COHORTS, "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="the tiny cohort at 4 mm (a smoke test)")
    ap.add_argument("--resolution", type=float, default=3.0, help="voxel size, mm (3)")
    ap.add_argument("--cache", default=None, help="directory for the cohorts' feature pickles")
    args = ap.parse_args()
    cache = Path(args.cache) if args.cache else None
    if args.quick:
        args.cohort, args.resolution = "tiny", 4.0
    for name in ("small", "large") if args.cohort == "both" else [args.cohort]:
        run(name, args.resolution, cache)


if __name__ == "__main__":
    main()
