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
central part of the head, the crop moves the image origin, nothing else changes); on the
crops keypoint transfer is also run with ``transfer_from={5: [3, 4, 5]}`` (ventricles
transferred by white-matter keypoints too, the paper's "spleen across").

Prints per-label Dice (mean ± standard error over test scans) and seconds per volume.

    python benches/segment.py                      # 20 scans at 2 mm, baseline on 3
    python benches/segment.py --baseline-tests 0   # keypoint transfer only
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import keyfuse as kf
from keyfuse.segment import KeypointTransferSegmenter

LABEL_NAMES = {1: "L GM", 2: "R GM", 3: "L WM", 4: "R WM", 5: "ventricles"}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float("nan") if s == 0 else 2.0 * float(np.logical_and(a, b).sum()) / s


def label_dice(pred: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    return {lab: dice(pred == lab, truth == lab) for lab in LABEL_NAMES if (truth == lab).any()}


def crop_box(shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """Limited field of view: full left-right, central 60% front-back, upper 55%."""
    x, y, z = shape
    return (slice(0, x), slice(int(0.2 * y), int(0.8 * y)), slice(int(0.45 * z), z))


def crop_image(img: kf.Image, box: tuple[slice, slice, slice]) -> kf.Image:
    lo = np.array([s.start for s in box], dtype=np.float64)
    aff = img.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]
    return kf.Image(np.ascontiguousarray(img.data[box]), aff)


# --------------------------------------------------------------------- the baseline
def to_sitk(data: np.ndarray, affine: np.ndarray, pixel: Any = None) -> Any:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    if pixel is not None:
        img = sitk.Cast(img, pixel)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in affine[:3, 3]])
    img.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    return img


def register_labels(
    fixed: Any, moving: Any, moving_labels: Any, iterations: int, demons_iterations: int
) -> np.ndarray:
    """Affine + demons registration of one atlas to the test scan; its labels resampled."""
    import SimpleITK as sitk

    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsGradientDescent(
        learningRate=1.0,
        numberOfIterations=iterations,
        convergenceMinimumValue=1e-6,
        convergenceWindowSize=10,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2, 1])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    affine = reg.Execute(fixed, moving)

    moved = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moved = sitk.HistogramMatching(moved, fixed, 256, 7, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(demons_iterations)
    demons.SetStandardDeviations(1.5)
    field = demons.Execute(fixed, moved)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(
        sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    )
    lab = sitk.Resample(moving_labels, fixed, composite, sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(lab).transpose(2, 1, 0)


def baseline_segment(
    test: kf.Image,
    atlases: Sequence[kf.Image],
    atlas_labels: Sequence[np.ndarray],
    iterations: int,
    demons_iterations: int,
) -> np.ndarray:
    import SimpleITK as sitk

    fixed = to_sitk(np.asarray(test.data, np.float32), test.affine, sitk.sitkFloat32)
    votes = np.zeros((max(LABEL_NAMES) + 1, *test.shape), np.int16)
    for img, lab in zip(atlases, atlas_labels, strict=True):
        moving = to_sitk(np.asarray(img.data, np.float32), img.affine, sitk.sitkFloat32)
        moving_labels = to_sitk(lab.astype(np.uint8), img.affine)
        warped = register_labels(fixed, moving, moving_labels, iterations, demons_iterations)
        for v in range(votes.shape[0]):
            votes[v] += warped == v
    return votes.argmax(axis=0).astype(np.int32)


# ------------------------------------------------------------------------ reporting
def summary(rows: list[dict[int, float]]) -> dict[int, tuple[float, float, int]]:
    out = {}
    for lab in LABEL_NAMES:
        vals = np.array([r[lab] for r in rows if lab in r and np.isfinite(r[lab])])
        if vals.size:
            se = vals.std(ddof=1) / np.sqrt(vals.size) if vals.size > 1 else 0.0
            out[lab] = (float(vals.mean()), float(se), int(vals.size))
    return out


def print_table(title: str, results: dict[str, tuple[list[dict[int, float]], list[float]]]) -> None:
    print(f"\n{title}")
    header = f"{'method':<34}" + "".join(f"{LABEL_NAMES[k]:>16}" for k in LABEL_NAMES)
    print(header + f"{'mean':>8}{'s/volume':>10}")
    for name, (rows, secs) in results.items():
        s = summary(rows)
        cells = "".join(
            f"{s[k][0]:>9.3f}±{s[k][1]:.3f}" + " " * 0 if k in s else f"{'-':>16}"
            for k in LABEL_NAMES
        )
        mean = np.mean([v[0] for v in s.values()]) if s else float("nan")
        print(f"{name:<34}{cells}{mean:>8.3f}{np.median(secs):>10.2f}")


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
    args = ap.parse_args()

    t0 = time.perf_counter()
    cohort = kf.datasets.simulate_cohort(
        n_families=args.families,
        family_size=args.family_size,
        n_rescans=0,
        resolution_mm=args.resolution,
        seed=args.seed,
    )
    n = len(cohort)
    images = [cohort.image(i) for i in range(n)]
    labels = [np.asarray(cohort.label_map(i).data, np.int32) for i in range(n)]
    print(
        f"cohort: {n} scans of shape {images[0].shape} at {args.resolution} mm "
        f"({time.perf_counter() - t0:.1f} s to simulate); leave-one-out with {n - 1} atlases"
    )

    # atlas keypoints, extracted once (extraction of a test scan is timed per volume)
    kps, ext_secs = [], []
    extractor = KeypointTransferSegmenter()
    for img in images:
        t = time.perf_counter()
        kps.append(extractor.extract_keypoints(img))
        ext_secs.append(time.perf_counter() - t)
    print(
        f"extraction: {np.median(ext_secs):.2f} s per volume, "
        f"{np.mean([len(k) for k in kps]):.0f} keypoint rows per volume"
    )

    tests = list(range(n if args.tests <= 0 else min(args.tests, n)))
    box = crop_box(images[0].shape)
    full_rows: list[dict[int, float]] = []
    full_secs: list[float] = []
    crop_rows: list[dict[int, float]] = []
    crop_secs: list[float] = []
    across_rows: list[dict[int, float]] = []
    across_secs: list[float] = []
    parts: dict[str, list[float]] = {}
    for t in tests:
        train = [i for i in range(n) if i != t]
        seg = KeypointTransferSegmenter(nu=args.nu, progress=False)
        seg.fit([images[i] for i in train], [labels[i] for i in train], [kps[i] for i in train])
        start = time.perf_counter()
        out = seg.predict(images[t], keypoints=kps[t])
        full_secs.append(time.perf_counter() - start + ext_secs[t])
        for k, v in out.timings.items():
            parts.setdefault(k, []).append(v)
        full_rows.append(label_dice(out.labels, labels[t]))
        if not args.no_crop:
            cropped = crop_image(images[t], box)
            start = time.perf_counter()
            cout = seg.predict(cropped)  # extraction of the crop included
            crop_secs.append(time.perf_counter() - start)
            crop_rows.append(label_dice(cout.labels, labels[t][box]))
            # the paper's "spleen across": ventricles also transferred by WM keypoints
            seg.transfer_from = {5: [3, 4, 5]}
            start = time.perf_counter()
            aout = seg.predict(cropped, keypoints=cout.keypoints)
            across_secs.append(time.perf_counter() - start + cout.timings["extract"])
            across_rows.append(label_dice(aout.labels, labels[t][box]))
        print(
            f"  test {t:2d}: KT full {full_secs[-1]:.2f} s "
            f"(mean Dice {np.nanmean(list(full_rows[-1].values())):.3f}, "
            f"{out.n_matches} matches, {out.n_transfers} transfers)"
            + (
                f", crop {crop_secs[-1]:.2f} s (mean Dice "
                f"{np.nanmean(list(crop_rows[-1].values())):.3f})"
                if crop_rows
                else ""
            ),
            flush=True,
        )
    print(
        "keypoint transfer time parts (median s): "
        + ", ".join(f"{k} {np.median(v):.3f}" for k, v in parts.items())
        + f", extraction {np.median([ext_secs[t] for t in tests]):.3f}"
    )

    results = {f"keypoint transfer ({len(tests)} scans)": (full_rows, full_secs)}
    crop_results = {
        f"keypoint transfer ({len(tests)} scans)": (crop_rows, crop_secs),
        f"KT, ventricles across ({len(tests)} scans)": (across_rows, across_secs),
    }
    nb = min(args.baseline_tests, len(tests))
    if nb > 0:
        b_rows, b_secs, bc_rows, bc_secs = [], [], [], []
        for t in tests[:nb]:
            train = [i for i in range(n) if i != t]
            start = time.perf_counter()
            pred = baseline_segment(
                images[t],
                [images[i] for i in train],
                [labels[i] for i in train],
                args.affine_iterations,
                args.demons_iterations,
            )
            b_secs.append(time.perf_counter() - start)
            b_rows.append(label_dice(pred, labels[t]))
            msg = f"  baseline test {t:2d}: {b_secs[-1]:.1f} s, mean Dice " + (
                f"{np.nanmean(list(b_rows[-1].values())):.3f}"
            )
            if not args.no_crop:
                cropped = crop_image(images[t], box)
                start = time.perf_counter()
                pred = baseline_segment(
                    cropped,
                    [images[i] for i in train],
                    [labels[i] for i in train],
                    args.affine_iterations,
                    args.demons_iterations,
                )
                bc_secs.append(time.perf_counter() - start)
                bc_rows.append(label_dice(pred, labels[t][box]))
                msg += (
                    f"; crop {bc_secs[-1]:.1f} s, mean Dice "
                    f"{np.nanmean(list(bc_rows[-1].values())):.3f}"
                )
            print(msg, flush=True)
        results[f"keypoint transfer (same {nb} scans)"] = (full_rows[:nb], full_secs[:nb])
        results[f"registration + majority ({nb} scans)"] = (b_rows, b_secs)
        if not args.no_crop:
            crop_results[f"keypoint transfer (same {nb} scans)"] = (
                crop_rows[:nb],
                crop_secs[:nb],
            )
            crop_results[f"registration + majority ({nb} scans)"] = (bc_rows, bc_secs)
        speed = np.median(b_secs) / np.median(full_secs[:nb])
        print(f"\nspeed-up of keypoint transfer over registration: {speed:.0f}×")
    print_table("full field of view: Dice mean ± s.e., median seconds per volume", results)
    if not args.no_crop:
        print_table(
            "cropped (limited field of view) test scans: Dice within the crop", crop_results
        )


if __name__ == "__main__":
    main()
