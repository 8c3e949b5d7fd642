"""The fusion paper's experiment: Table 1, Fig. 2 and Fig. 3 on a (simulated) cohort.

Leave-one-out family identification (every other scan is a class) and group ("sex")
classification with 3D keypoints, 2D keypoints of the aligned mid-axial slice, raw and
MI-binarized CNN vectors, and keypoints + binarized CNN fused by eq. (4) with α chosen
by 2-fold cross-validation over families; a linear SVM on the raw CNN vectors is the
baseline. Built on the public functions of :mod:`keyfuse.fusion`; ``keyfuse evaluate
fusion`` and ``benches/fusion.py`` run it.

>>> from keyfuse.experiments import fusion_table1
>>> res = fusion_table1.run_experiment(n_families=10, family_size=4)
>>> print(fusion_table1.report(res))
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError
from keyfuse.fusion import (
    FusionClassifier,
    MIBinarizer,
    alpha_grid,
    keypoint_log_likelihoods,
    log_posterior,
    pick_alpha,
    vector_log_likelihoods,
)

__all__ = [
    "CohortFeatures",
    "cohort_features",
    "evaluate_fusion",
    "format_table",
    "report",
    "run_experiment",
    "save_figures",
]

FloatArray = npt.NDArray[np.float64]


#: the stages of :func:`cohort_features`, timed in :attr:`CohortFeatures.timings`
FEATURE_STAGES = ("extract3d", "align", "resample", "extract2d", "cnn")


@dataclasses.dataclass
class CohortFeatures:
    """Everything the fusion experiment needs from a cohort, one entry per scan.

    Attributes
    ----------
    table : the cohort table rows (``family``, ``group``, ``individual``, ...).
    kps3d, kps2d : 3-D keypoints of each scan; 2-D keypoints of its aligned mid-axial slice.
    vectors : (n, d) float32 CNN vectors of the aligned mid-axial slices.
    transforms : image → atlas 4×4 matrices used for the spatial normalisation.
    align_ok : whether the keypoint alignment passed its sanity check (else identity).
    align_failures : subject → why its alignment failed the check.
    timings : seconds per stage (``extract3d``, ``align``, ``resample``, ``extract2d``,
        ``cnn``).
    """

    table: list[dict[str, Any]]
    kps3d: list[Any] = dataclasses.field(default_factory=list)
    kps2d: list[Any] = dataclasses.field(default_factory=list)
    vectors: npt.NDArray[np.float32] = dataclasses.field(
        default_factory=lambda: np.zeros((0, 0), np.float32)
    )
    transforms: list[FloatArray] = dataclasses.field(default_factory=list)
    align_ok: list[bool] = dataclasses.field(default_factory=list)
    timings: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(FEATURE_STAGES, 0.0)
    )
    align_failures: dict[str, str] = dataclasses.field(default_factory=dict)


def _plane_affine(affine: FloatArray, axis: int, idx: int) -> FloatArray:
    """4×4 affine of plane ``idx`` across ``axis`` as a 2-D image: the two in-plane
    columns first, the normal third, the origin moved onto the plane."""
    keep = [a for a in range(3) if a != axis]
    aff = np.eye(4)
    aff[:3, :3] = affine[:3, [*keep, axis]]
    aff[:3, 3] = affine[:3, 3] + affine[:3, axis] * idx
    return aff


def _slice_image(vol: Any, axis: int) -> Any:
    """The mid slice across ``axis`` of a 3-D image as a 2-D :class:`~keyfuse.Image`."""
    from keyfuse.image import Image

    idx = (vol.shape[axis] - 1) // 2
    data = np.take(np.asarray(vol.data, dtype=np.float32), idx, axis=axis)
    return Image(data, _plane_affine(vol.affine, axis, idx))


def cohort_features(
    cohort: Any,
    *,
    atlas: Any = None,
    cnn: Any = None,
    transform_source: Literal["align", "truth", "none"] = "align",
    device: str = "auto",
    extract_params: dict[str, Any] | None = None,
    progress: bool = True,
) -> CohortFeatures:
    """Keypoints, spatial normalisation and CNN vectors of every scan of a cohort.

    Parameters
    ----------
    cohort:
        A :class:`keyfuse.datasets.cohort.Cohort` (simulated or loaded).
    atlas:
        The normalisation target (default: MNI152 at the cohort's voxel size).
    cnn:
        A :class:`keyfuse.CNNFeatures` (default: the VGG16 of ``keyfuse[cnn]``).
    transform_source:
        ``"align"`` (default): ``kf.align(scan keypoints, atlas keypoints)``, falling
        back to the identity when the result fails :func:`keyfuse.atlas_space.check_alignment`
        (scale outside [0.75, 1.33], or a correlation with the atlas on the three
        central planes more than 0.01 below the identity's); ``"truth"``: the simulator's known pose
        (an oracle, for comparison); ``"none"``: no normalisation.
    device, extract_params:
        Passed to ``kf.extract`` (and ``kf.align``).
    progress:
        tqdm progress bars.
    """
    import json

    from tqdm.auto import tqdm

    from keyfuse.atlas_space import axial_axis, check_alignment, resample_planes
    from keyfuse.cnn import CNNFeatures
    from keyfuse.datasets import mni152
    from keyfuse.extraction import extract
    from keyfuse.image import Image
    from keyfuse.matching import align

    params = dict(extract_params or {})
    first = cohort.image(0)
    if atlas is None:
        atlas = mni152(resolution_mm=float(np.min(first.spacing)))
    cnn = cnn or CNNFeatures(device=device, atlas=atlas)
    atlas_kps = extract(atlas, device=device, **params) if transform_source == "align" else None
    axis = axial_axis(atlas.affine)
    mid = (atlas.shape[axis] - 1) // 2
    feats = CohortFeatures(table=list(cohort.table))
    timings = feats.timings
    slices: list[npt.NDArray[Any]] = []
    for i in tqdm(range(len(cohort)), desc="cohort features", disable=not progress):
        img = cohort.image(i)
        t0 = time.perf_counter()
        k3 = extract(img, device=device, **params)
        t1 = time.perf_counter()
        mat, good = np.eye(4), True
        if transform_source == "align":
            try:
                assert atlas_kps is not None
                al = align(k3, atlas_kps, device=device)
                # verification: a plausible scale, and a better correlation with the
                # atlas (three central planes) than no transform at all
                why = check_alignment(img, al.matrix, atlas)
            except InvalidArgumentError as exc:
                why = str(exc)
            good = why is None
            if good:
                mat = al.matrix
            else:
                feats.align_failures[str(cohort.table[i]["subject"])] = str(why)
        elif transform_source == "truth":
            pose = np.asarray(json.loads(cohort.table[i]["transform"]), float).reshape(4, 4)
            mat = np.linalg.inv(pose)  # table: subject mm -> scan mm; we need scan -> atlas
        t2 = time.perf_counter()
        plane = resample_planes(img, mat, atlas, axis, [mid])[0]
        sl = Image(plane, _plane_affine(atlas.affine, axis, mid))
        t3 = time.perf_counter()
        k2 = extract(sl, device=device, **params)
        t4 = time.perf_counter()
        timings["extract3d"] += t1 - t0
        timings["align"] += t2 - t1
        timings["resample"] += t3 - t2
        timings["extract2d"] += t4 - t3
        feats.kps3d.append(k3)
        feats.kps2d.append(k2)
        slices.append(np.asarray(sl.data))
        feats.transforms.append(np.asarray(mat, dtype=np.float64))
        feats.align_ok.append(bool(good))
    t0 = time.perf_counter()
    feats.vectors = cnn.batch(slices, progress=progress)
    timings["cnn"] = time.perf_counter() - t0
    return feats


def _masked_posterior(scores: FloatArray, same: npt.NDArray[np.bool_]) -> FloatArray:
    """Row-normalised log posterior over the scans of *other* individuals (``same``
    marks the query itself and its rescans)."""
    s = np.array(scores, dtype=np.float64)
    s[same] = -np.inf
    return log_posterior(s)


def _ordered_pair_auc(
    lp: FloatArray, fam: npt.NDArray[Any], ind: npt.NDArray[Any], rows: npt.NDArray[np.int64]
) -> float:
    from sklearn.metrics import roc_auc_score

    r, c = np.meshgrid(rows, np.arange(len(fam)), indexing="ij")
    keep = ind[r] != ind[c]
    lab = (fam[r] == fam[c])[keep]
    if lab.all() or not lab.any():
        return float("nan")
    return float(roc_auc_score(lab, lp[r[keep], c[keep]]))


def _fold_alpha(
    l_kp: FloatArray,
    l_v: FloatArray,
    folds: npt.NDArray[np.int64],
    score: Any,
    combine: Any,
) -> tuple[FloatArray, list[float]]:
    """Scores with α chosen on the other fold's rows (2-fold cross-validation over the
    rows of leave-one-out likelihood matrices)."""
    grid = alpha_grid(l_kp, l_v)
    out = np.zeros_like(l_kp)
    chosen = []
    for f in np.unique(folds):
        rows, other = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        aucs = np.array([score(combine(a * l_kp + (1 - a) * l_v), other) for a in grid])
        a = pick_alpha(grid, aucs, undecided=float(grid[0]))
        chosen.append(a)
        out[rows] = combine(a * l_kp + (1 - a) * l_v)[rows]
    return out, chosen


def evaluate_fusion(
    feats: CohortFeatures,
    *,
    n_neighbors: int | None = 5,
    checks: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Leave-one-out family identification and group classification (paper's Table 1).

    Family identification: every other scan is a class (instance-based indexing); the
    score of a pair is the row-normalised log posterior (eq. 4 over the other scans),
    symmetrised; AUC over unordered pairs of different individuals, positive = same
    family (a query's own rescans are left out of its posterior). Group classification:
    two classes, leave one individual out (the binariser is refitted without it); AUC
    of the log-odds. Fused models pick α by 2-fold
    cross-validation over families. Baseline: a linear SVM on standardised raw CNN
    vectors (leave-one-out decision values; group task only — one scan per class
    leaves nothing to train on for families).

    Returns a dict with ``rows`` (model → {"family": auc, "group": auc}), ``curves``
    (task → model → (scores, labels)), ``hindsight`` (fused AUCs with the best α chosen
    on the evaluated rows — an upper bound, not an estimate), ``correlation`` (r between
    the shallow and deep pair log-likelihoods), ``scatter`` (their values), ``alphas``
    and ``timings``.
    """
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from keyfuse.evaluate import family_pairs, roc_auc

    table = feats.table
    n = len(table)
    fam = np.array([str(r["family"]) for r in table])
    ind = np.array([str(r.get("individual") or r["subject"]) for r in table])
    grp_names, grp = np.unique([str(r["group"]) for r in table], return_inverse=True)
    fam_ids = {f: k for k, f in enumerate(sorted(set(fam)))}
    folds = np.array([fam_ids[f] % 2 for f in fam], dtype=np.int64)
    loo = np.arange(n)
    subj = np.arange(n)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    kw: dict[str, Any] = {
        "exclude": loo,
        "n_neighbors": n_neighbors,
        "checks": checks,
        "progress": progress,
    }
    fam_kp3 = keypoint_log_likelihoods(feats.kps3d, feats.kps3d, subj, n, **kw)
    fam_kp2 = keypoint_log_likelihoods(feats.kps2d, feats.kps2d, subj, n, **kw)
    same = ind[:, None] == ind[None, :]
    # group task: leave one *individual* out, so a rescan never trains its own query
    held = [np.flatnonzero(~same[i]) for i in range(n)]
    grp_kp3, grp_kp2 = np.zeros((n, 2)), np.zeros((n, 2))
    for i, tr in enumerate(held):
        for out, sets in ((grp_kp3, feats.kps3d), (grp_kp2, feats.kps2d)):
            out[i] = keypoint_log_likelihoods(
                [sets[i]], [sets[j] for j in tr], grp[tr], 2, n_neighbors=n_neighbors, checks=checks
            )[0]
    timings["keypoint_likelihoods"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    v = np.asarray(feats.vectors, dtype=np.float64)
    fam_raw = vector_log_likelihoods(v, v, subj, n, exclude=loo)
    # one scan per class: the MI thresholds reduce to entropy-maximising (median) splits,
    # which use no labels, so fitting them on every scan leaks nothing
    vb = MIBinarizer().fit(v).transform(v)
    fam_bin = vector_log_likelihoods(vb, vb, subj, n, exclude=loo)
    grp_raw, grp_bin = np.zeros((n, 2)), np.zeros((n, 2))
    for i, tr in enumerate(held):
        grp_raw[i] = vector_log_likelihoods(v[i : i + 1], v[tr], grp[tr], 2)[0]
        b = MIBinarizer().fit(v[tr], grp[tr])  # refitted without the held-out individual
        grp_bin[i] = vector_log_likelihoods(
            b.transform(v[i : i + 1]), b.transform(v[tr]), grp[tr], 2
        )[0]
    timings["vector_likelihoods"] = time.perf_counter() - t0

    def fam_score(lp: FloatArray, rows: npt.NDArray[np.int64]) -> float:
        return _ordered_pair_auc(lp, fam, ind, rows)

    def grp_score(lp: FloatArray, rows: npt.NDArray[np.int64]) -> float:
        y = grp[rows] == 1
        return float("nan") if y.all() or not y.any() else roc_auc(lp[rows, 1] - lp[rows, 0], y)

    models: dict[str, tuple[FloatArray, FloatArray]] = {}
    alphas: dict[str, list[float]] = {}
    hindsight: dict[str, dict[str, float]] = {}
    single = {
        "3D keypoints": (fam_kp3, grp_kp3),
        "2D keypoints": (fam_kp2, grp_kp2),
        "CNN (raw)": (fam_raw, grp_raw),
        "CNN (binarized)": (fam_bin, grp_bin),
    }
    for name, (f, g) in single.items():
        models[name] = (_masked_posterior(f, same), log_posterior(g))
    for name, kf_, kg in (
        ("3D keypoints + CNN (B)", fam_kp3, grp_kp3),
        ("2D keypoints + CNN (B)", fam_kp2, grp_kp2),
    ):
        f, af = _fold_alpha(kf_, fam_bin, folds, fam_score, lambda x: _masked_posterior(x, same))
        g, ag = _fold_alpha(kg, grp_bin, folds, grp_score, log_posterior)
        models[name] = (f, g)
        alphas[name] = af + ag
        # for reference only: the best α in hindsight (chosen on the evaluated rows)
        everyone = np.arange(n)
        best_f = max(
            fam_score(_masked_posterior(a * kf_ + (1 - a) * fam_bin, same), everyone)
            for a in alpha_grid(kf_, fam_bin)
        )
        best_g = max(
            grp_score(log_posterior(a * kg + (1 - a) * grp_bin), everyone)
            for a in alpha_grid(kg, grp_bin)
        )
        hindsight[name] = {"family": float(best_f), "group": float(best_g)}

    rows: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, tuple[FloatArray, npt.NDArray[np.bool_]]]] = {
        "family": {},
        "group": {},
    }
    y_grp = grp == 1
    for name, (f, g) in models.items():
        s, lab = family_pairs(table, f)
        d = g[:, 1] - g[:, 0]
        rows[name] = {"family": roc_auc(s, lab), "group": roc_auc(d, y_grp)}
        curves["family"][name] = (s, lab)
        curves["group"][name] = (d, y_grp)

    t0 = time.perf_counter()
    svm = make_pipeline(StandardScaler(), LinearSVC(C=1.0, max_iter=20000))
    dec = cross_val_predict(
        svm, v, grp, groups=ind, cv=LeaveOneGroupOut(), method="decision_function"
    )
    rows["linear SVM on CNN (raw)"] = {"family": float("nan"), "group": roc_auc(dec, y_grp)}
    curves["group"]["linear SVM on CNN (raw)"] = (np.asarray(dec, dtype=np.float64), y_grp)
    timings["svm_loo"] = time.perf_counter() - t0

    # Fig. 3: shallow vs deep log-likelihoods of every (query, other scan) pair
    off = ~np.eye(n, dtype=bool)
    shallow, deep = fam_kp3[off], fam_bin[off]
    r = float(np.corrcoef(shallow, deep)[0, 1]) if shallow.std() > 0 and deep.std() > 0 else 0.0

    # fit / predict time of the estimator itself (group task, α by cross-validation)
    pairs = list(zip(feats.kps3d, v, strict=True))
    t0 = time.perf_counter()
    clf = FusionClassifier(alpha="auto", binarize=True, n_neighbors=n_neighbors, checks=checks).fit(
        pairs, grp_names[grp]
    )
    timings["classifier_fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    clf.predict_proba(pairs)
    timings["classifier_predict"] = time.perf_counter() - t0
    return {
        "rows": rows,
        "curves": curves,
        "correlation": r,
        "scatter": (shallow, deep),
        "alphas": alphas,
        "hindsight": hindsight,
        "timings": timings,
        "n_scans": n,
        "groups": [str(g) for g in grp_names],
    }


def format_table(results: dict[str, Any]) -> str:
    """The AUC table, shaped like the paper's Table 1 (best first by family AUC)."""
    rows = results["rows"]
    order = sorted(rows, key=lambda k: -np.nan_to_num(rows[k]["family"], nan=-1.0))
    width = max(len(k) for k in rows) + 2
    lines = [f"{'Model':<{width}}{'Family (AUC)':>14}{'Group (AUC)':>14}"]
    for k in order:
        fa, ga = rows[k]["family"], rows[k]["group"]
        fs = "-" if np.isnan(fa) else f"{fa:.4f}"
        gs = "-" if np.isnan(ga) else f"{ga:.4f}"
        lines.append(f"{k:<{width}}{fs:>14}{gs:>14}")
    return "\n".join(lines)


def save_figures(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """ROC curves of both tasks and the shallow-vs-deep scatter (paper's Fig. 2 and 3)
    as PNG files in ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from keyfuse.evaluate import roc_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        roc_plot(results["curves"]["family"], out / "fusion_roc_family.png", title="Family"),
        roc_plot(results["curves"]["group"], out / "fusion_roc_group.png", title="Group"),
    ]
    shallow, deep = results["scatter"]
    fig = Figure(figsize=(5.0, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(shallow, deep, s=4, alpha=0.4)
    ax.set_xlabel("log p({f_i}|C)  (3D keypoints)")
    ax.set_ylabel("log p(v|C,T)  (binarized CNN)")
    ax.set_title(f"shallow vs deep, r = {results['correlation']:.3f}")
    path = out / "fusion_scatter.png"
    fig.savefig(path, format="png")
    paths.append(path)
    return paths


def run_experiment(
    cohort: Any = None,
    *,
    out_dir: str | os.PathLike[str] = "fusion-output",
    n_families: int = 10,
    family_size: int = 4,
    resolution_mm: float = 1.5,
    seed: int = 0,
    transform_source: Literal["align", "truth", "none"] = "align",
    n_neighbors: int | None = 5,
    checks: int | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Simulate (or take) a cohort, extract features, evaluate and save the figures.

    Parameters
    ----------
    cohort:
        A Cohort, a cohort directory, or ``None`` to simulate ``n_families`` ×
        ``family_size`` scans (no rescans) at ``resolution_mm`` with ``seed``.
    out_dir:
        Where the PNG figures go (default ``fusion-output``).
    transform_source, n_neighbors, checks, device, progress:
        See :func:`cohort_features`, :func:`evaluate_fusion` and
        :func:`keypoint_log_likelihoods`.

    Returns the :func:`evaluate_fusion` dict plus ``feature_timings``, ``align_ok``,
    ``simulate_s`` and ``figures``.
    """
    from keyfuse.datasets.cohort import Cohort, simulate_cohort

    t0 = time.perf_counter()
    if cohort is None:
        cohort = simulate_cohort(
            None,
            n_families=n_families,
            family_size=family_size,
            n_rescans=0,
            seed=seed,
            resolution_mm=resolution_mm,
            progress=progress,
        )
    elif not isinstance(cohort, Cohort):
        cohort = Cohort.load(cohort)
    t_sim = time.perf_counter() - t0
    feats = cohort_features(
        cohort, transform_source=transform_source, device=device, progress=progress
    )
    results = evaluate_fusion(feats, n_neighbors=n_neighbors, checks=checks, progress=progress)
    results["feature_timings"] = feats.timings
    results["normalisation_error_mm"] = _pose_errors(feats)
    results["align_ok"] = int(sum(feats.align_ok))
    results["align_failures"] = dict(feats.align_failures)
    results["simulate_s"] = t_sim
    results["keypoints_per_scan"] = (
        float(np.mean([len(k) for k in feats.kps3d])),
        float(np.mean([len(k) for k in feats.kps2d])),
    )
    results["figures"] = [str(p) for p in save_figures(results, out_dir)]
    return results


def _pose_errors(feats: CohortFeatures) -> list[float]:
    """Mean distance (mm, over points within 60 mm of the origin) between where each
    normalisation transform and the simulator's true pose send the scan; empty when
    the table has no true pose."""
    import json

    if not feats.table or not feats.table[0].get("transform"):
        return []
    rng = np.random.default_rng(0)
    pts = np.c_[rng.uniform(-60.0, 60.0, (500, 3)), np.ones(500)]
    errs = []
    for row, mat in zip(feats.table, feats.transforms, strict=True):
        pose = np.asarray(json.loads(row["transform"]), float).reshape(4, 4)
        diff = pts @ mat.T - pts @ np.linalg.inv(pose).T
        errs.append(float(np.linalg.norm(diff[:, :3], axis=1).mean()))
    return errs


def report(results: dict[str, Any]) -> str:
    """A printable report of :func:`run_experiment`'s results."""
    ft = results.get("feature_timings", {})
    t = results["timings"]
    n = results["n_scans"]
    lines = [format_table(results), ""]
    lines.append(
        f"shallow/deep log-likelihood correlation r = {results['correlation']:.3f} (paper: 0.208)"
    )
    for name, a in results["alphas"].items():
        lines.append(f"alpha chosen per fold for {name}: " + ", ".join(f"{x:.3g}" for x in a))
    for name, h in results.get("hindsight", {}).items():
        lines.append(
            f"{name} with the best alpha in hindsight (not a fair estimate): "
            f"family {h['family']:.4f}, group {h['group']:.4f}"
        )
    if ft:
        kp3, kp2 = results.get("keypoints_per_scan", (0.0, 0.0))
        lines.append(
            f"{n} scans, {kp3:.0f} 3D / {kp2:.0f} 2D keypoints per scan; alignment passed "
            f"its check on {results.get('align_ok', n)}/{n}"
        )
        for subject, why in results.get("align_failures", {}).items():
            lines.append(f"  alignment failed for {subject}: {why} (identity used)")
        err = results.get("normalisation_error_mm") or []
        if err:
            lines.append(
                f"normalisation error vs the true pose: median {np.median(err):.1f} mm, "
                f"max {np.max(err):.1f} mm"
            )
        norm = ft["align"] + ft["resample"] + ft["cnn"]
        lines.append(
            "feature time: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in ft.items())
            + f" | alignment + resampling + CNN {norm:.1f}s"
        )
    lines.append("model time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
    if results.get("figures"):
        lines.append("figures: " + ", ".join(results["figures"]))
    return "\n".join(lines)
