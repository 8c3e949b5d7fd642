"""Keypoint-transfer segmentation vs a SimpleITK multi-atlas registration baseline.

On a simulated cohort (label maps: left/right GM, left/right WM, ventricles), leave-one-out:
every scan is segmented from the other scans (19 atlases by default) by

* keypoint transfer (``kf.KeypointTransferSegmenter``; timed per volume including the
  test image's keypoint extraction; the atlases' keypoints are extracted once), and
* multi-atlas registration: for each atlas an affine (Mattes MI, 2 levels) and then a
  deformable (fast symmetric-forces demons) SimpleITK registration to the test scan, the
  atlas labels resampled through both, and majority voting. This is slow, so it runs on
  the first ``--baseline-tests`` scans only (keypoint transfer is reported on those and on
  all scans).

Then both are repeated on cropped test scans (a limited field of view: the superior and
central part of the head, the crop moves the image origin, nothing else changes).
Keypoint transfer runs with its defaults (an organ is also carried, at a tenth of the
weight, by the keypoints of the organs it touches); for comparison also with each organ
transferred by its own keypoints only (``transfer_from=None``) and, on the crops, with
``transfer_from={5: [3, 4, 5]}, across_weight=1`` (ventricles carried by white-matter
keypoints at full weight).

Prints per-label Dice (mean ± standard error over test scans), median wall seconds per
volume and median CPU seconds per volume (all threads; the machine may be shared, so the
speed-up is measured on the same scans in the same run).

    python benches/segment.py                      # 20 scans at 2 mm, baseline on 3
    python benches/segment.py --baseline-tests 0   # keypoint transfer only
    python benches/segment.py --quick              # 4 small scans, seconds

The experiment itself lives in ``keyfuse.experiments.segmentation``.
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
    ap.add_argument("--baseline-tests", type=int, default=3)
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
        affine_iterations=args.affine_iterations,
        demons_iterations=args.demons_iterations,
        nu=args.nu,
        crop=not args.no_crop,
        echo=lambda line: print(line, flush=True),
    )
    print(report(results))


if __name__ == "__main__":
    main()
