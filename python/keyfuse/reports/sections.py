"""Section builders: each adds one section to a :class:`Report` (new content slots in
as one more builder)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import KeyfuseError
from keyfuse.reports.document import Report, Section

# ------------------------------------------------------------------ section builders


def _keypoints_of(image: Any, keypoints: Any) -> Any:
    from keyfuse.extraction import extract
    from keyfuse.keypoints import KeypointSet

    if keypoints is None:
        return extract(image)
    if isinstance(keypoints, KeypointSet):
        return keypoints
    return KeypointSet.load(keypoints)


def keypoints_section(
    rep: Report, image: Any, keypoints: Any = None, *, name: str = "", radiological: bool = False
) -> Section:
    """Keypoints over orthogonal slices, with counts by polarity and scale range."""
    from keyfuse.plotting import plot_keypoints
    from keyfuse.plotting._slices import _as_image

    img = _as_image(image)
    kps = _keypoints_of(img, keypoints)
    sec = rep.section(
        f"Keypoints {name}".strip(),
        "3D SIFT-Rank keypoints: position (dot), scale (circle where the slice cuts the "
        "keypoint's sphere) and polarity (colour).",
    )
    pol = np.asarray(kps.polarity)
    scale = np.asarray(kps.scale, dtype=np.float64)
    sec.metrics(
        {
            "keypoints": len(kps),
            "DoG maxima / minima": f"{int((pol > 0).sum())} / {int((pol < 0).sum())}",
            "scale σ (mm), median [min, max]": (
                f"{np.median(scale):.1f} [{scale.min():.1f}, {scale.max():.1f}]"
                if scale.size
                else "–"
            ),
            "image": f"{'×'.join(map(str, img.shape))} at "
            f"{'×'.join(f'{s:g}' for s in np.round(img.spacing, 2))} mm",
        }
    )
    sec.figure(plot_keypoints(img, kps, radiological=radiological), "keypoints over slices")
    return sec


def _default_atlas(image: Any) -> Any:
    from keyfuse.datasets.mni import mni152

    return mni152("t1", max(1.0, float(np.round(np.mean(image.spacing), 2))))


#: fewer RANSAC inliers than this flag an alignment as unreliable in the report
MIN_INLIERS = 8


def alignment_section(
    rep: Report,
    image: Any,
    keypoints: Any = None,
    *,
    atlas: Any = "mni152",
    atlas_keypoints: Any = None,
    name: str = "",
    target: str = "the atlas",
    radiological: bool = False,
) -> Section:
    """The subject aligned to an atlas with ``kf.align``: edges before and after, and the
    transform's figures. ``atlas="mni152"`` uses the template at the image's resolution;
    any other image (e.g. another scan) works, ``target`` names it in the title."""
    from keyfuse.matching import align
    from keyfuse.plotting import plot_alignment, plot_matches
    from keyfuse.plotting._slices import _as_image

    img = _as_image(image)
    kps = _keypoints_of(img, keypoints)
    sec = rep.section(
        f"Alignment of {name or 'the subject'} to {target}",
        f"kf.align: keypoint matches → RANSAC similarity. The subject's edges (orange) on "
        f"{target}, before and after the transform.",
    )
    try:
        atlas_img = (
            _default_atlas(img)
            if isinstance(atlas, str) and atlas == "mni152"
            else (_as_image(atlas, "atlas"))
        )
        atlas_kps = _keypoints_of(atlas_img, atlas_keypoints)
        al = align(kps, atlas_kps)
    except KeyfuseError as exc:
        sec.note(f"no alignment: {exc}")
        return sec
    rot = float(np.degrees(np.arccos(np.clip((np.trace(al.rotation) - 1) / 2, -1, 1))))
    sec.metrics(
        {
            "inliers / matches": f"{al.n_inliers} / {len(al.inliers)}",
            "inlier rmse (mm)": al.rmse,
            "scale": f"{al.scale:.3f}",
            "rotation (°)": f"{rot:.1f}",
            "translation (mm)": ", ".join(f"{t:.1f}" for t in al.translation),
        }
    )
    if al.n_inliers < MIN_INLIERS or not 0.8 <= al.scale <= 1.25:
        sec.note(
            f"this alignment looks unreliable ({al.n_inliers} inliers, scale {al.scale:.2f}): "
            "check the edges below. Too few keypoints (a coarse resolution) or a target "
            "that looks unlike the scan (another contrast or texture) make alignment fail"
        )
    sec.figure(plot_alignment(img, atlas_img, al, radiological=radiological), "alignment check")
    sec.figure(
        plot_matches(
            img,
            kps,
            atlas_img,
            atlas_kps,
            al.matches,
            inliers=al.inliers,
            radiological=radiological,
        ),
        f"keypoint matches {name or 'subject'} → {target} (green: RANSAC inliers)",
    )
    return sec


#: a hit scoring this high is the query's own entry in the index
SELF_SCORE = 0.999


def neighbours_section(
    rep: Report,
    query: Any,
    index: Any,
    *,
    query_image: Any = None,
    images: Mapping[str, Any] | Callable[[str], Any] | None = None,
    k: int = 5,
    exclude: str | None = None,
    name: str = "query",
    label: str | None = None,
    relevant: Callable[[str], bool] | None = None,
) -> Section:
    """The query's nearest subjects in ``index`` (``Index.search``): a table and, given
    the ``query_image``, a montage. Hit images come from ``images`` (a mapping or
    function id → image/path), else the index's recorded source paths; hits without an
    image are only listed."""
    sec = rep.section(f"Nearest subjects of {name}", f"Index.search, top {k} by soft Jaccard.")
    hits = list(index.search(query, k=k, exclude=exclude))
    if exclude is None and hits and hits[0].score >= SELF_SCORE:
        # the query is itself in the index: its own entry takes all the soft Jaccard
        sec.text(f"{hits[0].subject_id} is the query itself (score 1) and is left out.")
        hits = list(index.search(query, k=k, exclude=hits[0].subject_id))
    labels = index.labels
    rows = []
    for rank, h in enumerate(hits, 1):
        lab = labels.get(h.subject_id, {})
        rows.append(
            [rank, h.subject_id, float(h.score), ", ".join(f"{a}={b}" for a, b in lab.items())]
        )
    sec.table(["rank", "subject", "score", "labels"], rows)
    panels = []
    for h in hits:
        src = (
            (images(h.subject_id) if callable(images) else images.get(h.subject_id))
            if images is not None
            else index.source(h.subject_id)
        )
        if src is None or (isinstance(src, (str, Path)) and not Path(src).exists()):
            continue
        lab = labels.get(h.subject_id, {})
        text = label and lab.get(label)
        rel = relevant(h.subject_id) if relevant else None
        panels.append((src, h.subject_id, float(h.score), str(text) if text else None, rel))
    if panels and query_image is not None:
        from keyfuse.plotting import plot_retrieval

        sec.figure(plot_retrieval(query_image, panels, query_id=name), "retrieval montage")
    elif not panels:
        sec.note("no images of the hits are known (index without source paths)")
    return sec


def segmentation_section(
    rep: Report,
    image: Any,
    segmentation: Any,
    *,
    label_names: Mapping[int, str] | None = None,
    name: str = "",
    radiological: bool = False,
) -> Section:
    """The segmentation over its image, per-label probability maps and label volumes."""
    from keyfuse.plotting import plot_segmentation
    from keyfuse.plotting._slices import _as_image
    from keyfuse.plotting.anatomy import _label_image

    img = _as_image(image)
    lab, probs = _label_image(segmentation, img)
    names = dict(label_names or {})
    sec = rep.section(f"Segmentation {name}".strip())
    data = np.asarray(lab.data)
    voxel_ml = float(abs(np.linalg.det(lab.affine[:3, :3]))) / 1000.0
    rows = []
    for v in sorted(set(int(u) for u in np.unique(data) if u != 0) | set(probs)):
        n = int((data == v).sum())
        row: list[Any] = [v, names.get(v, f"label {v}"), n, n * voxel_ml]
        if probs:
            p = np.asarray(probs[v].data) if v in probs else None
            row.append(float(p[data == v].mean()) if p is not None and n else float("nan"))
        rows.append(row)
    cols = ["label", "name", "voxels", "volume (ml)"] + (["mean p inside"] if probs else [])
    sec.table(cols, rows, "per-label volumes")
    extra: dict[str, Any] = {}
    for attr in ("n_matches", "n_transfers"):
        if hasattr(segmentation, attr):
            extra[attr.replace("n_", "").replace("_", " ")] = int(getattr(segmentation, attr))
    if extra:
        sec.metrics(extra)
    sec.figure(
        plot_segmentation(img, segmentation, label_names=names, radiological=radiological),
        "labels over orthogonal slices; below, each label's probability map",
    )
    return sec


_METRIC_NAMES = {
    "family_auc": "same-family vs different-family AUC",
    "family_ap": "same-family average precision",
    "map": "mean average precision (mAP)",
    "p_at_1": "precision@1",
    "r_at_5": "recall@5",
    "rescan_rank1": "rescans found at rank 1",
    "mz_above_unrelated": "identical twins above all unrelated",
    "dz_above_unrelated": "fraternal twins above all unrelated",
    "mz_vs_unrelated_auc": "identical twins vs unrelated AUC",
}


def evaluation_section(rep: Report, cohort: Any, scores: npt.ArrayLike) -> Section:
    """Family-identification figures (as ``keyfuse evaluate family`` prints them), mean
    score by relation and the ROC and precision–recall curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from keyfuse import evaluate as ev
    from keyfuse.plotting import plot_precision_recall, plot_roc

    s = np.asarray(scores, dtype=np.float64)
    figures = ev.family_report(cohort, s)
    sec = rep.section(
        "Cohort identification",
        f"{len(cohort)} scans; every scan queries all others (scans of the same "
        "individual excluded from the family figures).",
    )
    sec.metrics({_METRIC_NAMES[k]: v for k, v in figures.items() if k in _METRIC_NAMES})
    means = sorted(
        ((k[5:], v) for k, v in figures.items() if k.startswith("mean_")), key=lambda x: -x[1]
    )
    groups = ev.relation_pairs(cohort, s)
    sec.table(
        ["relation", "pairs", "mean score"],
        [[k, int(groups[k].size) if k in groups else 0, v] for k, v in means],
        "mean pair score by relation",
    )
    from keyfuse.evaluate import identification_curves

    curves = identification_curves(cohort, s)
    if curves:
        fig = Figure(figsize=(10.0, 4.6), dpi=100)
        FigureCanvasAgg(fig)
        plot_roc(curves, ax=fig.add_subplot(1, 2, 1), title="ROC")
        plot_precision_recall(curves, ax=fig.add_subplot(1, 2, 2), title="precision–recall")
        fig.subplots_adjust(left=0.07, right=0.98, top=0.92, bottom=0.11, wspace=0.25)
        sec.figure(fig, "ROC and precision–recall curves of pair scores")
    else:
        sec.note("no positive and negative pairs: no curves")
    return sec


def worst_cases_section(
    rep: Report, cohort: Any, scores: npt.ArrayLike, *, n_worst: int = 3, k: int = 5
) -> Section:
    """The queries with the lowest average precision (relevant: other individuals of the
    family), each as a montage of its top-``k`` hits (green: same family)."""
    from keyfuse import evaluate as ev
    from keyfuse.plotting import plot_retrieval

    s = np.asarray(scores, dtype=np.float64)
    fam = np.asarray([str(v) for v in ev.table_column(cohort, "family")])
    ind = np.asarray(ev._individuals(cohort))
    ids = [str(v) for v in ev.table_column(cohort, "subject")]
    relevant = (fam[:, None] == fam[None, :]) & (ind[:, None] != ind[None, :])
    exclude = ind[:, None] == ind[None, :]
    sec = rep.section(
        "Worst cases",
        f"The {n_worst} queries with the lowest average precision, with their top {k} hits "
        "(green frame: same family; scans of the query's own individual left out).",
    )
    aps = []
    for q in range(len(ids)):
        if relevant[q].any():
            aps.append((ev.mean_average_precision(s[q], relevant[q], exclude=exclude[q]), q))
    if not aps:
        sec.note("no query has a relative in the cohort")
        return sec
    worst = sorted(aps)[: max(0, int(n_worst))]
    for ap, q in worst:
        cand = [j for j in np.argsort(-s[q], kind="stable") if not exclude[q, j]][:k]
        hits = [
            (cohort.image(int(j)), ids[j], float(s[q, j]), f"family {fam[j]}", bool(relevant[q, j]))
            for j in cand
        ]
        fig = plot_retrieval(
            cohort.image(q),
            hits,
            query_id=ids[q],
            query_label=f"family {fam[q]}",
            title=f"{ids[q]}: average precision {ap:.3f}",
        )
        sec.figure(fig, f"{ids[q]} (family {fam[q]}): AP {ap:.3f}")
    return sec
