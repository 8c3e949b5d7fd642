"""Keypoint-transfer segmentation vs a SimpleITK multi-atlas registration baseline.

Runs ``keyfuse.experiments.segmentation`` (its docstring describes both methods and the
crops) and prints per-label Dice (mean ± standard error over test scans), median wall and
CPU seconds per volume, and the speed-up. Usage::

    python benches/segment.py --tests 5            # baseline on 5 scans, 19 atlases (~23 min)
    python benches/segment.py --baseline-atlases 7 --affine-iterations 50 \
        --demons-iterations 20                     # a lighter baseline (~3x faster per scan)
    python benches/segment.py --baseline-tests 0   # keypoint transfer only
    python benches/segment.py --quick              # 4 small scans, seconds
    python benches/segment.py --stages 5 --baseline-tests 0 --tests 2
                                                   # also 5 repeated predictions of scan 0

``--stages N`` first segments scan 0 from the other scans N times and prints the median
CPU and wall seconds of each stage of ``predict`` (extraction, intensity normalisation,
matching, voting, transfer; ``Segmentation.cpu_timings``; the normalisation runs beside
extraction and matching, ``wait`` is predict waiting for it), the median wall and CPU
seconds of the whole ``predict`` call, and the Dice.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from keyfuse.datasets import simulate_cohort
from keyfuse.experiments.segmentation import label_dice, report, run_experiment
from keyfuse.segment import KeypointTransferSegmenter

# --quick: 2 families x 2 scans at 4 mm, one test scan, a short baseline
QUICK = {
    "families": 2,
    "family_size": 2,
    "resolution": 4.0,
    "tests": 1,
    "baseline_tests": 1,
    "affine_iterations": 5,
    "demons_iterations": 3,
    "stages": 2,
}


def stage_profile(families: int, family_size: int, resolution: float, seed: int, reps: int) -> None:
    """Segment scan 0 from the other scans ``reps`` times; print each stage's median CPU
    and wall seconds (extraction included: no precomputed keypoints are passed)."""
    cohort = simulate_cohort(None, families, family_size, 0, seed=seed, resolution_mm=resolution)
    n = len(cohort)
    seg = KeypointTransferSegmenter(progress=False).fit(
        [cohort.image(i) for i in range(1, n)],
        [np.asarray(cohort.label_map(i).data, np.int32) for i in range(1, n)],
    )
    image = cohort.image(0)
    runs, whole = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        runs.append(seg.predict(image))
        whole.append((time.perf_counter() - t, time.process_time() - c))
    cpu = {k: float(np.median([r.cpu_timings[k] for r in runs])) for k in runs[0].cpu_timings}
    wall = {k: float(np.median([r.timings[k] for r in runs])) for k in runs[0].timings}
    # the stages overlap (normalisation runs beside extraction and matching): the total
    # is predict's own wall and CPU time
    total_wall = float(np.median([w for w, _ in whole]))
    total_cpu = float(np.median([c for _, c in whole]))
    dice = label_dice(runs[-1].labels, np.asarray(cohort.label_map(0).data, np.int32))
    print(f"predict stages, scan 0 of {n} at {resolution} mm ({n - 1} atlases, {reps} runs):")
    for k in cpu:
        print(f"  {k:<10} cpu {cpu[k]:.3f} s  wall {wall[k]:.3f} s")
    print(
        f"  {'predict':<10} cpu {total_cpu:.3f} s  wall {total_wall:.3f} s; "
        f"mean Dice {np.mean(list(dice.values())):.4f}",
        flush=True,
    )


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
    ap.add_argument("--stages", type=int, default=0, help="per-stage profile runs (0: none)")
    ap.add_argument("--quick", action="store_true", help="a tiny run (seconds), for tests")
    args = ap.parse_args()
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args()

    if args.stages > 0:
        stage_profile(args.families, args.family_size, args.resolution, args.seed, args.stages)
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
