"""Keypoint-transfer segmentation vs a SimpleITK multi-atlas registration baseline.

Runs ``keyfuse.experiments.segmentation`` (its docstring describes both methods and the
crops) and prints per-label Dice (mean ± standard error over test scans), median wall and
CPU seconds per volume, and the speed-up. Usage::

    python benches/segment.py --tests 5            # baseline on 5 scans, 19 atlases (~23 min)
    python benches/segment.py --baseline-atlases 7 --affine-iterations 50 \
        --demons-iterations 20                     # a lighter baseline (~3x faster per scan)
    python benches/segment.py --baseline-tests 0   # keypoint transfer only
    python benches/segment.py --quick              # 4 small scans, seconds
"""

from __future__ import annotations

import argparse

from keyfuse.experiments.segmentation import report, run_experiment

# --quick: 2 families x 2 scans at 4 mm, one test scan, a short baseline
QUICK = {
    "families": 2,
    "family_size": 2,
    "resolution": 4.0,
    "tests": 1,
    "baseline_tests": 1,
    "affine_iterations": 5,
    "demons_iterations": 3,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", type=int, default=5)
    ap.add_argument("--family-size", type=int, default=4)
    ap.add_argument("--resolution", type=float, default=2.0, help="voxel size in mm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tests", type=int, default=0, help="keypoint-transfer test scans (0: all)")
    ap.add_argument("--baseline-tests", type=int, default=5)
    ap.add_argument("--baseline-atlases", type=int, default=0, help="registration atlases (0: all)")
    ap.add_argument("--affine-iterations", type=int, default=100)
    ap.add_argument("--demons-iterations", type=int, default=30)
    ap.add_argument("--nu", type=float, default=300.0)
    ap.add_argument("--no-crop", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a tiny run (seconds), for tests")
    args = ap.parse_args()
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args()

    results = run_experiment(
        n_families=args.families,
        family_size=args.family_size,
        resolution_mm=args.resolution,
        seed=args.seed,
        n_tests=args.tests,
        baseline_tests=args.baseline_tests,
        baseline_atlases=args.baseline_atlases,
        affine_iterations=args.affine_iterations,
        demons_iterations=args.demons_iterations,
        nu=args.nu,
        crop=not args.no_crop,
        echo=lambda line: print(line, flush=True),
    )
    print(report(results))


if __name__ == "__main__":
    main()
