"""Cohort-level figures: keyfuse soft-Jaccard vs the reference matcher's voting.

Runs ``keyfuse.experiments.cohort`` (its docstring says what is scored and how) and prints
family AUC, mAP, precision@1, rescans at rank 1, twins above every unrelated scan and the
scoring time side by side. Usage::

    python benches/cohort.py                     # 12 families × 3 + 4 rescans, 1.5 mm
    python benches/cohort.py --families 6 --resolution 3
    python benches/cohort.py --quick             # 2 families at 4 mm, seconds
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from keyfuse.experiments.cohort import report, run_experiment

# --quick: 2 families x 2 scans + 1 rescan at 4 mm, in a scratch folder
QUICK = {
    "families": 2,
    "family_size": 2,
    "rescans": 1,
    "resolution": 4.0,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--out", type=Path, default=None, help="cohort and keypoints (default: demo-output)"
    )
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
    ap.add_argument("--quick", action="store_true", help="a tiny run (seconds), for tests")
    args = ap.parse_args()
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="keyfuse-cohort-") as scratch:
        out = args.out or (Path(scratch) if args.quick else Path("demo-output"))
        results = run_experiment(
            out,
            n_families=args.families,
            family_size=args.family_size,
            n_rescans=args.rescans,
            seed=args.seed,
            resolution_mm=args.resolution,
            device=args.device,
            variants=args.variants,
        )
    print(report(results))


if __name__ == "__main__":
    main()
