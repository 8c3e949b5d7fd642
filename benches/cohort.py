"""Cohort-level figures: keyfuse soft-Jaccard vs the reference matcher's voting.

On a simulated cohort (families with identical/fraternal twins and siblings, plus
rescans; ``kf.datasets.simulate_cohort``), the SAME keypoint sets are scored two ways:

* keyfuse: the soft Jaccard index of ALGORITHMS.md §3 (``Index.pairwise()``, the
  default posterior kernel: K = 10 neighbours, width half the nearest distance);
* the reference large-scale matcher's voting (``featMatchMultiple``, re-implemented
  deterministically in ``keyfuse.matching.reference_votes``: one kd-forest over all
  images, k = 5, vote = log2(1 + w/Σw)), both as the raw vote matrix V and read as a
  soft intersection J = V / (n_i + n_j − V).

Both are scored with the same neighbour search, exact (the Index default below 100k
keypoints) and the kd-forest (8 trees, 64 checks, the reference matcher's search).

Printed side by side: family AUC (same vs different family, rescans excluded), mAP,
precision@1, rescans at rank 1, identical twins above every unrelated scan, and the
scoring time. Usage::

    python benches/cohort.py                     # 12 families × 3 + 4 rescans, 1.5 mm
    python benches/cohort.py --families 6 --resolution 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo-output"))
    ap.add_argument("--families", type=int, default=12)
    ap.add_argument("--family-size", type=int, default=3)
    ap.add_argument("--rescans", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resolution", type=float, default=1.5)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--variants",
        action="store_true",
        help="also score the symmetric soft Jaccard and the published (uncapped) kernel width",
    )
    args = ap.parse_args()

    from keyfuse import evaluate as ev
    from keyfuse.demo import DemoConfig, stage_extract, stage_simulate
    from keyfuse.index import Index
    from keyfuse.keypoints import KeypointSet
    from keyfuse.matching import reference_votes, votes_to_jaccard

    cfg = DemoConfig(
        out=args.out,
        n_families=args.families,
        family_size=args.family_size,
        n_rescans=args.rescans,
        seed=args.seed,
        resolution_mm=args.resolution,
        device=args.device,
    )
    t0 = time.perf_counter()
    cohort = stage_simulate(cfg)
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    keys = stage_extract(cfg, cohort)
    t_ext = time.perf_counter() - t0
    sets = [KeypointSet.load(k) for k in keys]
    sizes = np.array([len(s) for s in sets], dtype=np.float64)
    print(
        f"cohort: {len(cohort)} scans ({args.resolution:g} mm), {int(sizes.sum())} keypoints "
        f"({sizes.mean():.0f} per scan); simulate {t_sim:.1f} s, extract {t_ext:.1f} s "
        "(cached runs reuse both)"
    )

    index = Index()
    for sid, s in zip(cohort.subjects, sets, strict=True):
        index.add(sid, s)

    def timed(fn: Any) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        out = np.asarray(fn(), dtype=np.float64)
        return out, time.perf_counter() - t0

    sj, t_sj = timed(lambda: index.pairwise(exact=True))
    sjf, t_sjf = timed(lambda: index.pairwise(exact=False))
    votes, t_ref = timed(lambda: reference_votes(sets, exact=True))
    votesf, t_reff = timed(lambda: reference_votes(sets))
    again = reference_votes(sets)
    methods = {
        "soft Jaccard exact": (sj, t_sj),
        "ref. votes as J exact": (votes_to_jaccard(votes, sizes), t_ref),
        "soft Jaccard forest": (sjf, t_sjf),
        "ref. votes as J forest": (votes_to_jaccard(votesf, sizes), t_reff),
        "ref. votes V forest": (votesf, t_reff),
    }
    if args.variants:
        t0 = time.perf_counter()
        sym = np.asarray(index.pairwise(symmetric=True), dtype=np.float64)
        methods["soft Jaccard symmetric"] = (sym, time.perf_counter() - t0)
        raw = Index(kernel="published", alpha2_cap_fraction=float("inf"))
        for sid, s in zip(cohort.subjects, sets, strict=True):
            raw.add(sid, s)
        t0 = time.perf_counter()
        unc = np.asarray(raw.pairwise(), dtype=np.float64)
        methods["published kernel uncapped"] = (unc, time.perf_counter() - t0)
    rows = [
        ("family AUC", "family_auc"),
        ("family AP", "family_ap"),
        ("mAP (family retrieval)", "map"),
        ("precision@1", "p_at_1"),
        ("rescans at rank 1", "rescan_rank1"),
        ("MZ twin above all unrelated", "mz_above_unrelated"),
        ("DZ twin above all unrelated", "dz_above_unrelated"),
        ("MZ vs unrelated AUC", "mz_vs_unrelated_auc"),
    ]
    reports = {name: ev.family_report(cohort, m) for name, (m, _) in methods.items()}
    width = max(len(r[0]) for r in rows) + 2
    print()
    print(" " * width + "".join(f"{n:>26}" for n in methods))
    for label, key in rows:
        print(
            f"{label:<{width}}"
            + "".join(f"{reports[n].get(key, float('nan')):>26.4f}" for n in methods)
        )
    print(f"{'scoring time (s)':<{width}}" + "".join(f"{t:>26.3f}" for _, t in methods.values()))
    print()
    same = np.array_equal(sj, np.asarray(index.pairwise(exact=True)))
    print(f"soft Jaccard bit-identical on a second run: {same}")
    print(f"reference votes bit-identical on a second run: {np.array_equal(votesf, again)}")
    for search in ("exact", "forest"):
        sjr, ref = reports[f"soft Jaccard {search}"], reports[f"ref. votes as J {search}"]
        wins = [k for k in ("family_auc", "map") if sjr[k] > ref[k]]
        print(
            f"target ({search} k-NN for both): soft Jaccard beats the reference voting on "
            f"{' and '.join(wins) if wins else 'NEITHER family AUC nor mAP'}"
        )


if __name__ == "__main__":
    main()
