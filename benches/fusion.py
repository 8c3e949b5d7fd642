"""The fusion paper's experiment (Table 1, Fig. 2 and 3) on a simulated cohort.

Leave-one-out family identification (every other scan is a class) and group ("sex")
classification with (a) 3D keypoints, (b) 2D keypoints on the aligned mid-axial slice,
(c) raw CNN vectors, (d) MI-binarized CNN vectors, (e) 3D keypoints + binarized CNN,
(f) 2D keypoints + binarized CNN (eq. 4, α by 2-fold cross-validation over families),
plus a linear SVM on the raw CNN vectors. Prints the AUC table, the shallow/deep
correlation r, the per-stage feature times (alignment + CNN for the whole cohort) and the
classifier fit/predict times; writes the ROC curves and the scatter as PNGs.

Usage::

    python benches/fusion.py                          # 10 families × 4 scans, 1.5 mm
    python benches/fusion.py --families 6 --resolution 2 --transform truth
    python benches/fusion.py --cohort path/to/simulated-cohort
    python benches/fusion.py --quick                  # 3 families × 2 scans at 4 mm

The experiment itself lives in ``keyfuse.experiments.fusion_table1``; this script adds
the timing of the likelihoods on synthetic data.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from keyfuse import KeypointSet
from keyfuse.experiments.fusion_table1 import report, run_experiment
from keyfuse.fusion import keypoint_log_likelihoods, vector_log_likelihoods

# --quick: 3 families x 2 scans at 4 mm (seed 3 puts both groups in every training set),
# and small synthetic likelihoods
QUICK = {"families": 3, "family_size": 2, "seed": 3, "resolution": 4.0}
QUICK_KDE = {"n_subjects": 6, "n_kp": 200, "dim": 64}


def kde_timing(n_subjects: int = 40, n_kp: int = 1500, dim: int = 512) -> None:
    """Time the likelihoods on synthetic data of a realistic size (1 mm scans carry
    ~700-2500 keypoints): one query scan against all the others, exact sum and k = 5."""
    rng = np.random.default_rng(0)
    desc = np.argsort(rng.random((n_subjects * n_kp, 64)), axis=1).astype(np.uint8)
    sets = [
        KeypointSet(np.zeros((n_kp, 3)), np.ones(n_kp), descriptors=desc[i * n_kp : (i + 1) * n_kp])
        for i in range(n_subjects)
    ]
    classes = np.arange(n_subjects, dtype=np.int64)
    exact5 = None
    for k, checks in ((None, None), (5, None), (5, 64)):
        t0 = time.perf_counter()
        ll = keypoint_log_likelihoods(
            sets[:1], sets, classes, n_subjects, exclude=[0], n_neighbors=k, checks=checks,
            device="cpu",
        )[0]  # fmt: skip
        dt = time.perf_counter() - t0
        how = "exact" if checks is None else f"kd-forest, {checks} checks"
        extra = ""
        if k == 5 and checks is None:
            exact5 = ll
        elif exact5 is not None:
            extra = f", max |Δ log-lik| vs exact k-NN {np.max(np.abs(ll - exact5)):.3g}"
        print(
            f"keypoint KDE, {n_kp} query keypoints vs {n_subjects} scans × {n_kp} "
            f"(k={k or 'all'}, {how}): {dt:.3f} s per query scan{extra}"
        )
    vec = rng.random((n_subjects, dim))
    bits = (vec > 0.5).astype(np.uint8)
    for name, v in (("real", vec), ("binary", bits)):
        t0 = time.perf_counter()
        vector_log_likelihoods(v, v, classes, n_subjects, exclude=classes)
        dt = time.perf_counter() - t0
        print(f"vector KDE ({name}, {dim}-d), all {n_subjects} leave-one-out queries: {dt:.4f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohort", default=None, help="existing cohort directory")
    ap.add_argument(
        "--out", default=None, help="directory for the PNG figures (default: fusion-output)"
    )
    ap.add_argument("--families", type=int, default=10)
    ap.add_argument("--family-size", type=int, default=4)
    ap.add_argument("--resolution", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--transform", choices=["align", "truth", "none"], default="align")
    ap.add_argument("--neighbors", type=int, default=5, help="0 = exact sum over all keypoints")
    ap.add_argument("--checks", type=int, default=0, help="kd-forest checks (0 = exact k-NN)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--kde-only", action="store_true", help="only the likelihood timings")
    ap.add_argument("--quick", action="store_true", help="a tiny run (seconds), for tests")
    args = ap.parse_args()
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args()

    kde_timing(**(QUICK_KDE if args.quick else {}))
    if args.kde_only:
        return

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="keyfuse-fusion-") as scratch:
        res = run_experiment(
            args.cohort,
            out_dir=args.out or (scratch if args.quick else "fusion-output"),
            n_families=args.families,
            family_size=args.family_size,
            resolution_mm=args.resolution,
            seed=args.seed,
            transform_source=args.transform,
            n_neighbors=args.neighbors or None,
            checks=args.checks or None,
            device=args.device,
            progress=not args.quiet,
        )
        print(report(res))
    rows = res["rows"]
    for task in ("family", "group"):
        fused = max(rows[k][task] for k in rows if "+" in k)
        single = max(
            rows[k][task] for k in ("3D keypoints", "2D keypoints", "CNN (raw)", "CNN (binarized)")
        )
        print(
            f"{task}: best fused {fused:.4f} vs best single source {single:.4f} "
            f"({'≥' if fused >= single else '<'}); binarized CNN "
            f"{rows['CNN (binarized)'][task]:.4f} vs raw {rows['CNN (raw)'][task]:.4f}"
        )
    ft = res["feature_timings"]
    print(
        f"alignment + CNN for {res['n_scans']} scans: "
        f"{ft['align'] + ft['resample'] + ft['cnn']:.1f} s (target < 60 s); "
        f"with 3D extraction {ft['extract3d'] + ft['align'] + ft['resample'] + ft['cnn']:.1f} s; "
        f"cohort simulation {res['simulate_s']:.1f} s; total {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
