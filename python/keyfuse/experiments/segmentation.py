"""Keypoint-transfer segmentation vs a SimpleITK multi-atlas registration baseline.

On a simulated cohort (label maps: left/right GM, left/right WM, ventricles), leave-one-out:
every scan is segmented from the other scans (19 atlases by default) by

* keypoint transfer (``kf.KeypointTransferSegmenter``; timed per volume including the
  test image's keypoint extraction; the atlases' keypoints are extracted once), and
* multi-atlas registration: for each atlas an affine (Mattes MI, 2 levels) and then a
  deformable (fast symmetric-forces demons) SimpleITK registration to the test scan, the
  atlas labels resampled through both, and majority voting. This is slow, so it runs on
  the first ``baseline_tests`` scans only (keypoint transfer is reported on those and on
  all scans).

Then both are repeated on cropped test scans (a limited field of view: the superior and
central part of the head, the crop moves the image origin, nothing else changes).
Keypoint transfer runs with its defaults (an organ is also carried, at a tenth of the
weight, by the keypoints of the organs it touches); for comparison also with each organ
transferred by its own keypoints only (``transfer_from=None``) and, on the crops, with
``transfer_from={5: [3, 4, 5]}, across_weight=1`` (ventricles carried by white-matter
keypoints at full weight).

:func:`report` gives per-label Dice (mean ± standard error over test scans), median wall
seconds per volume and median CPU seconds per volume (all threads; the machine may be
shared, so the speed-up is measured on the same scans in the same run).
``benches/segment.py`` runs it; SimpleITK is needed for the baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

import keyfuse as kf
from keyfuse.datasets.cohort import simulate_cohort
from keyfuse.evaluate import dice
from keyfuse.segment import KeypointTransferSegmenter

__all__ = ["LABEL_NAMES", "crop_box", "crop_image", "format_table", "report", "run_experiment"]

LABEL_NAMES = {1: "L GM", 2: "R GM", 3: "L WM", 4: "R WM", 5: "ventricles"}


def label_dice(pred: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    """Dice of each label present in ``truth``."""
    present = [lab for lab in LABEL_NAMES if (truth == lab).any()]
    scores = dice(pred, truth, labels=present)
    assert isinstance(scores, dict)
    return scores


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


Result = tuple[list[dict[int, float]], list[float], list[float]]
Run = tuple[dict[int, float], float, float]  # one test scan: Dice per label, wall s, CPU s


def _columns(runs: list[Run]) -> Result:
    return [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]


def _mean_dice(scores: dict[int, float]) -> float:
    return float(np.nanmean(list(scores.values())))


def format_table(title: str, results: dict[str, Result]) -> str:
    """Per-label Dice (mean ± s.e.), their mean, median wall and CPU seconds per volume."""
    header = f"{'method':<38}" + "".join(f"{LABEL_NAMES[k]:>16}" for k in LABEL_NAMES)
    lines = ["", title, header + f"{'mean':>8}{'s/volume':>10}{'cpu s':>9}"]
    for name, (rows, secs, cpu) in results.items():
        s = summary(rows)
        cells = "".join(
            f"{s[k][0]:>9.3f}±{s[k][1]:.3f}" + " " * 0 if k in s else f"{'-':>16}"
            for k in LABEL_NAMES
        )
        mean = np.mean([v[0] for v in s.values()]) if s else float("nan")
        lines.append(f"{name:<38}{cells}{mean:>8.3f}{np.median(secs):>10.2f}{np.median(cpu):>9.2f}")
    return "\n".join(lines)


def run_experiment(
    *,
    n_families: int = 5,
    family_size: int = 4,
    resolution_mm: float = 2.0,
    seed: int = 0,
    n_tests: int = 0,
    baseline_tests: int = 5,
    baseline_atlases: int = 0,
    affine_iterations: int = 100,
    demons_iterations: int = 30,
    nu: float = 300.0,
    crop: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, dict[str, Result]]:
    """Leave-one-out segmentation of a simulated cohort, keypoint transfer vs registration.

    Parameters
    ----------
    n_families, family_size, resolution_mm, seed : int, int, float, int
        The simulated cohort (no rescans).
    n_tests : int, default=0
        Keypoint-transfer test scans (0: all).
    baseline_tests : int, default=5
        Registration-baseline test scans (the first ones; 0: none).
    baseline_atlases : int, default=0
        Atlases of the registration baseline (0: all ``n - 1``; else that many spread
        evenly over the training scans, and keypoint transfer is also reported with the
        same atlases, so the two compare on equal evidence). With the defaults (all 19
        atlases, 100 affine and 30 demons iterations) 5 baseline scans took 23 minutes on
        two shared cores; 7 atlases, 50 and 20 iterations take about a third of that per
        scan (see docs/decisions.md).
    affine_iterations, demons_iterations : int, default=100, 30
        Iterations of the baseline's affine and demons registrations.
    nu : float, default=300.0
        The segmenter's intensity likelihood σ.
    crop : bool, default=True
        Also segment cropped test scans (a limited field of view).
    echo : callable, default=print
        Receives one line per stage and test scan as the experiment runs.

    Returns
    -------
    dict
        ``{"full": table, "crop": table}`` (``"crop"`` empty without ``crop``), each a
        {method: (per-scan label Dice, wall seconds, CPU seconds)} for :func:`report`.
    """
    t0 = time.perf_counter()
    cohort = simulate_cohort(
        n_families=n_families,
        family_size=family_size,
        n_rescans=0,
        resolution_mm=resolution_mm,
        seed=seed,
    )
    n = len(cohort)
    images = [cohort.image(i) for i in range(n)]
    labels = [np.asarray(cohort.label_map(i).data, np.int32) for i in range(n)]
    echo(
        f"cohort: {n} scans of shape {images[0].shape} at {resolution_mm} mm "
        f"({time.perf_counter() - t0:.1f} s to simulate); leave-one-out with {n - 1} atlases"
    )

    # atlas keypoints, extracted once (extraction of a test scan is timed per volume)
    kps, ext_secs, ext_cpu = [], [], []
    extractor = KeypointTransferSegmenter()
    for img in images:
        t, c = time.perf_counter(), time.process_time()
        kps.append(extractor.extract_keypoints(img))
        ext_secs.append(time.perf_counter() - t)
        ext_cpu.append(time.process_time() - c)
    echo(
        f"extraction: {np.median(ext_secs):.2f} s per volume, "
        f"{np.mean([len(k) for k in kps]):.0f} keypoint rows per volume"
    )

    tests = list(range(n if n_tests <= 0 else min(n_tests, n)))
    box = crop_box(images[0].shape)
    names = ("default", "own", "across", "other_rule", "same_atlases")
    # the background rule the default does not use, measured side by side
    rule = extractor.background_rule
    other: Literal["per_label", "max_vote"] = "max_vote" if rule == "per_label" else "per_label"
    rows: dict[str, list[dict[int, float]]] = {f"{v}{n}": [] for v in "fc" for n in names}
    secs: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    parts: dict[str, list[float]] = {}

    def run(key: str, seg: KeypointTransferSegmenter, img: kf.Image, truth: np.ndarray,
            kp: Any, extra: tuple[float, float]) -> Any:  # fmt: skip
        start, c0 = time.perf_counter(), time.process_time()
        out = seg.predict(img, keypoints=kp)
        secs[key].append(time.perf_counter() - start + extra[0])
        cpu[key].append(time.process_time() - c0 + extra[1])
        rows[key].append(label_dice(out.labels, truth))
        return out

    def baseline_train(t: int) -> list[int]:
        train = [i for i in range(n) if i != t]
        if 0 < baseline_atlases < len(train):
            pick = np.linspace(0, len(train) - 1, baseline_atlases).round().astype(int)
            train = [train[k] for k in pick]
        return train

    nb = min(baseline_tests, len(tests))
    for t in tests:
        train = [i for i in range(n) if i != t]
        if t in tests[:nb] and 0 < baseline_atlases < n - 1:
            few = baseline_train(t)
            seg = KeypointTransferSegmenter(nu=nu, progress=False)
            seg.fit([images[i] for i in few], [labels[i] for i in few], [kps[i] for i in few])
            run("fsame_atlases", seg, images[t], labels[t], kps[t], (ext_secs[t], ext_cpu[t]))
            if crop:
                run("csame_atlases", seg, crop_image(images[t], box), labels[t][box], None,
                    (0.0, 0.0))  # fmt: skip
        seg = KeypointTransferSegmenter(nu=nu, progress=False)
        seg.fit([images[i] for i in train], [labels[i] for i in train], [kps[i] for i in train])
        out = run("fdefault", seg, images[t], labels[t], kps[t], (ext_secs[t], ext_cpu[t]))
        for k, v in out.timings.items():
            parts.setdefault(k, []).append(v)
        for k, v in out.cpu_timings.items():
            parts.setdefault(f"{k} cpu", []).append(v)
        seg.background_rule = other
        run("fother_rule", seg, images[t], labels[t], kps[t], (ext_secs[t], ext_cpu[t]))
        seg.background_rule = rule
        seg.transfer_from = None
        run("fown", seg, images[t], labels[t], kps[t], (ext_secs[t], ext_cpu[t]))
        seg.transfer_from = "auto"
        msg = (
            f"  test {t:2d}: KT full {secs['fdefault'][-1]:.2f} s "
            f"(mean Dice {_mean_dice(rows['fdefault'][-1]):.3f}, "
            f"{out.n_matches} matches, {out.n_transfers} transfers)"
        )
        if crop:
            cropped = crop_image(images[t], box)
            truth = labels[t][box]
            cout = run("cdefault", seg, cropped, truth, None, (0.0, 0.0))  # extraction included
            ext = (cout.timings["extract"], cout.timings["extract"])
            seg.background_rule = other
            run("cother_rule", seg, cropped, truth, cout.keypoints, ext)
            seg.background_rule = rule
            seg.transfer_from = None
            run("cown", seg, cropped, truth, cout.keypoints, ext)
            # the paper's "spleen across": ventricles also by WM keypoints, full weight
            seg.transfer_from, seg.across_weight = {5: [3, 4, 5]}, 1.0
            run("cacross", seg, cropped, truth, cout.keypoints, ext)
            msg += (
                f", crop {secs['cdefault'][-1]:.2f} s (mean Dice "
                f"{_mean_dice(rows['cdefault'][-1]):.3f})"
            )
        echo(msg)
    echo(
        "keypoint transfer time parts (median wall and CPU s): "
        + ", ".join(f"{k} {np.median(v):.3f}" for k, v in parts.items())
        + f", extraction {np.median([ext_secs[t] for t in tests]):.3f}"
        + f" (cpu {np.median([ext_cpu[t] for t in tests]):.3f})"
    )

    def res(key: str, m: int | None = None) -> Result:
        return rows[key][:m], secs[key][:m], cpu[key][:m]

    nt = len(tests)
    results = {
        f"keypoint transfer ({nt} scans)": res("fdefault"),
        f"KT, own keypoints only ({nt} scans)": res("fown"),
        f"KT, background rule {other} ({nt})": res("fother_rule"),
    }
    crop_results = {
        f"keypoint transfer ({nt} scans)": res("cdefault"),
        f"KT, own keypoints only ({nt} scans)": res("cown"),
        f"KT, background rule {other} ({nt})": res("cother_rule"),
        f"KT, ventricles across WM, w=1 ({nt})": res("cacross"),
    }
    if nb > 0:

        def baseline(img: kf.Image, truth: np.ndarray, train: list[int]) -> Run:
            start, c0 = time.perf_counter(), time.process_time()
            pred = baseline_segment(
                img,
                [images[i] for i in train],
                [labels[i] for i in train],
                affine_iterations,
                demons_iterations,
            )
            return label_dice(pred, truth), time.perf_counter() - start, time.process_time() - c0

        full_runs: list[Run] = []
        crop_runs: list[Run] = []
        for t in tests[:nb]:
            train = baseline_train(t)
            full_runs.append(baseline(images[t], labels[t], train))
            d, sec, _ = full_runs[-1]
            msg = f"  baseline test {t:2d}: {sec:.1f} s, mean Dice {_mean_dice(d):.3f}"
            if crop:
                crop_runs.append(baseline(crop_image(images[t], box), labels[t][box], train))
                d, sec, _ = crop_runs[-1]
                msg += f"; crop {sec:.1f} s, mean Dice {_mean_dice(d):.3f}"
            echo(msg)
        b_rows, b_secs, b_cpu = _columns(full_runs)
        results[f"keypoint transfer (same {nb} scans)"] = res("fdefault", nb)
        na = len(baseline_train(tests[0]))
        if rows["fsame_atlases"]:
            results[f"KT, the baseline's {na} atlases ({nb})"] = res("fsame_atlases")
        results[f"registration + majority ({nb} scans)"] = (b_rows, b_secs, b_cpu)
        if crop:
            crop_results[f"keypoint transfer (same {nb} scans)"] = res("cdefault", nb)
            if rows["csame_atlases"]:
                crop_results[f"KT, the baseline's {na} atlases ({nb})"] = res("csame_atlases")
            crop_results[f"registration + majority ({nb} scans)"] = _columns(crop_runs)
        speed = np.median(b_secs) / np.median(secs["fdefault"][:nb])
        speed_cpu = np.median(b_cpu) / np.median(cpu["fdefault"][:nb])
        echo(
            f"\nspeed-up of keypoint transfer over registration: {speed:.0f}× wall, "
            f"{speed_cpu:.0f}× CPU"
        )
    return {"full": results, "crop": crop_results if crop else {}}


def report(results: dict[str, dict[str, Result]]) -> str:
    """The Dice and timing tables of :func:`run_experiment`'s results."""
    text = format_table(
        "full field of view: Dice mean ± s.e., median seconds per volume", results["full"]
    )
    if results["crop"]:
        text += "\n" + format_table(
            "cropped (limited field of view) test scans: Dice within the crop", results["crop"]
        )
    return text
