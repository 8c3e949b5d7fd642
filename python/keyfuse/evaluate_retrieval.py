"""Content-based retrieval evaluation of an index (ALGORITHMS.md §6, the CBMIR paper).

Every indexed subject that carries the label is a query against all the other labelled
subjects (leave-one-out); a hit is relevant when it has the query's label value. Each
ranking is scored twice, side by side: over every other subject, and restricted to the
query's **predicted** class (as ``restrict={label: "predicted"}`` does in a search), the
class predicted by the index's :class:`~keyfuse.FusionClassifier` *without* the query in its
training set. A query whose class is mispredicted retrieves none of its relevant subjects.

Metrics (mean over the queries that have at least one relevant subject):

* AP: Σ over the relevant hits of the precision at their rank / number of relevant
  subjects (those the restriction hides count as never retrieved); mAP its mean;
* P@k: relevant hits among the first k / min(k, number of other subjects);
* R@k: relevant hits among the first k / number of relevant subjects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError
from keyfuse.vector_search import check_by

if TYPE_CHECKING:
    from keyfuse.index import Index

__all__ = ["RetrievalReport", "choose_fusion_alpha", "retrieval", "retrieval_metrics"]

RECALL_GRID = np.linspace(0.0, 1.0, 101)


@dataclass
class RetrievalReport:
    """What :func:`retrieval` measured.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per (``by``, class) — class ``"all"`` first — and columns ``queries``,
        then each metric unrestricted and with the predicted-class restriction side by side
        (``mAP``, ``mAP|pred``, ``P@1``, ``P@1|pred``, …).
    accuracy : dict
        Per ``by``: the leave-one-out accuracy of the class prediction.
    curves : dict
        Per ``by`` and restriction (``"vector"``, ``"vector|pred"``): the mean interpolated
        precision at the recall levels :data:`RECALL_GRID`.
    plots : list of Path
        The precision–recall PNGs written.
    ap : dict
        Per ``by``: the unrestricted average precision of each scored query (in subject
        order), for paired comparisons between sources.
    """

    label: str
    table: Any
    accuracy: dict[str, float]
    curves: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)
    ap: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    #: with ``alpha="auto"``: the median of the α chosen for each query (nested)
    alpha: float | None = None

    def __str__(self) -> str:
        acc = ", ".join(f"{b} {a:.3f}" for b, a in self.accuracy.items())
        fused = (
            ""
            if self.alpha is None
            else f"; fused α, median of the nested choices: {self.alpha:.3g}"
        )
        return (
            f"retrieval of {self.label!r} (|pred = restricted to the predicted class; "
            f"leave-one-out class accuracy: {acc}{fused})\n"
            + self.table.to_string(float_format="%.3f")
        )


def _query_metrics(
    ranked_rel: npt.NDArray[np.bool_], n_rel: int, n_other: int, ks: Sequence[int]
) -> tuple[float, list[float], list[float], npt.NDArray[np.float64]]:
    """AP, P@ks, R@ks and the interpolated precision on RECALL_GRID of one ranking."""
    hits = np.cumsum(ranked_rel)
    ranks = np.arange(1, len(ranked_rel) + 1)
    prec = hits / ranks if len(ranks) else np.zeros(0)
    ap = float(prec[ranked_rel].sum() / n_rel)
    p_at = [float(hits[:k][-1] if len(hits) else 0) / min(k, n_other) for k in ks]
    r_at = [float(hits[:k][-1] if len(hits) else 0) / n_rel for k in ks]
    rec = hits / n_rel if len(hits) else np.zeros(0)
    # interpolated precision: the best precision at any recall ≥ r (0 where never reached)
    best = np.maximum.accumulate(prec[::-1])[::-1] if len(prec) else prec
    idx = np.searchsorted(rec, RECALL_GRID, side="left")
    interp = np.where(idx < len(rec), best[np.minimum(idx, max(len(best) - 1, 0))], 0.0)
    return ap, p_at, r_at, interp


def retrieval_metrics(
    scores: npt.ArrayLike,
    classes: Sequence[Any],
    *,
    predicted: Sequence[Any] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, Any]:
    """Per-query retrieval metrics of an all-pairs score matrix (row = query; its own
    column is left out), optionally restricted to each query's ``predicted`` class.

    Returns ``{"class", "ap", "p@k", "r@k", "interp"}`` arrays over the scored queries
    (those with a relevant subject).
    """
    s = np.asarray(scores, dtype=np.float64)
    n = len(classes)
    if s.shape != (n, n):
        raise InvalidArgumentError(f"scores must be {n}×{n}, got {s.shape}")
    if np.isnan(s).any():
        raise InvalidArgumentError("scores contain NaN")
    for k in ks:
        if k < 1:
            raise InvalidArgumentError(f"k must be ≥ 1, got {k}")
    cls = np.asarray([str(c) for c in classes])
    out: dict[str, list[Any]] = {"class": [], "ap": [], "p": [], "r": [], "interp": []}
    cols = np.arange(n)
    for q in range(n):
        other = cols != q
        rel = (cls == cls[q]) & other
        n_rel = int(rel.sum())
        if n_rel == 0:
            continue
        cand = cols[other]
        if predicted is not None:
            cand = cand[cls[cand] == str(predicted[q])]
        order = cand[np.lexsort((cand, -s[q, cand]))]
        ap, p_at, r_at, interp = _query_metrics(rel[order], n_rel, n - 1, ks)
        out["class"].append(cls[q])
        out["ap"].append(ap)
        out["p"].append(p_at)
        out["r"].append(r_at)
        out["interp"].append(interp)
    if not out["ap"]:
        raise InvalidArgumentError("no query has a relevant subject (every class has one member)")
    return {
        "class": np.asarray(out["class"]),
        "ap": np.asarray(out["ap"]),
        "p": np.asarray(out["p"]),
        "r": np.asarray(out["r"]),
        "interp": np.asarray(out["interp"]),
    }


def loo_predictions(index: Index, label: str, by: str, rows: Sequence[int]) -> list[Any]:
    """Leave-one-out class of each subject in ``rows``: the index's class predictor (α as
    it chose on all the labelled subjects) with the subject left out of the training set."""
    from keyfuse.fusion import keypoint_log_likelihoods, vector_log_likelihoods

    parts = by
    clf = index._classifiers.classifier(index, label, parts)
    values = [index.label(label)[i] for i in rows]
    classes = list(clf.classes_)
    pos = {str(c): j for j, c in enumerate(classes)}
    codes = np.asarray([pos[str(v)] for v in values], dtype=np.int64)
    loo = np.arange(len(rows))
    total = np.zeros((len(rows), len(classes)))
    a = float(clf.alpha_)
    if parts != "vector" and a > 0:
        kps = [index.keypoints(index.subjects[i]) for i in rows]
        total += a * keypoint_log_likelihoods(
            kps, kps, codes, len(classes), exclude=loo, n_neighbors=clf.n_neighbors
        )
    if parts != "keypoints" and a < 1:
        v = np.stack([np.asarray(index._vectors[i], dtype=np.float64) for i in rows])
        total += (1 - a) * vector_log_likelihoods(v, v, codes, len(classes), exclude=loo)
    pred = [classes[j] for j in np.argmax(total, axis=1)]
    return [p.item() if hasattr(p, "item") else p for p in pred]


def _scored_rows(classes: Sequence[Any]) -> list[int]:
    """The queries :func:`retrieval_metrics` scores (those with a relevant subject)."""
    cls = [str(c) for c in classes]
    return [q for q, c in enumerate(cls) if cls.count(c) > 1]


def _ap_by_alpha(
    l_kp: npt.NDArray[np.float64],
    l_v: npt.NDArray[np.float64],
    classes: Sequence[Any],
    n: int = 13,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(candidate α, AP of every scored query at each α)."""
    from keyfuse.fusion import alpha_grid
    from keyfuse.index_query import fuse

    off = ~np.eye(len(l_kp), dtype=bool)
    fill = (
        np.where(off, l_kp, l_kp[off].mean() if off.any() else 0.0),
        np.where(off, l_v, l_v[off].mean() if off.any() else 0.0),
    )
    alphas = alpha_grid(*fill, n=n)
    ap = np.stack([retrieval_metrics(fuse(l_kp, l_v, a), classes, ks=(1,))["ap"] for a in alphas])
    return alphas, ap


#: fusion must beat the better single source by more than this many standard errors of
#: the paired per-query AP difference to be chosen (see docs/decisions.md)
FALLBACK_SE = 1.5


def _pick_alpha(
    alphas: npt.NDArray[np.float64], ap: npt.NDArray[np.float64], rows: npt.NDArray[np.bool_]
) -> float:
    """The α of best mean AP over ``rows``; the better single source (α = 0 or 1) wins
    unless the best beats it by more than ``FALLBACK_SE`` standard errors of their paired
    per-query difference (fusion must not lose to the source that carries the signal)."""
    means = ap[:, rows].mean(axis=1)
    best = int(np.argmax(means))
    singles = [i for i, a in enumerate(alphas) if a in (0.0, 1.0)]
    single = max(singles, key=lambda i: (means[i], -i))
    d = ap[best, rows] - ap[single, rows]
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(
        alphas[single] if means[best] - means[single] <= FALLBACK_SE * se else alphas[best]
    )


def _labelled(index: Index, label: str, by: str) -> tuple[list[int], list[Any]]:
    """The subjects with ``label`` (and a vector, unless ``by="keypoints"``), their values."""
    values = index.label(label)
    if all(v is None for v in values):
        names = sorted({k for lab in index._labels for k in lab})
        raise InvalidArgumentError(
            f"no subject of the index has the label {label!r}; labels: {names or 'none'}"
        )
    keep = [i for i, v in enumerate(values) if v is not None]
    if by != "keypoints":
        keep = [i for i in keep if index._vectors[i] is not None]
    return keep, [values[i] for i in keep]


def choose_fusion_alpha(index: Index, label: str) -> float:
    """The α of eq. 4 for fused search, chosen on the index's own subjects: the candidate
    (:func:`keyfuse.fusion.alpha_grid`) of best leave-one-out retrieval mAP by ``label``,
    a single source unless fusion beats it by more than 1.5 standard errors.

    >>> alpha = kf.evaluate.choose_fusion_alpha(index, "family")
    >>> index.search(query, by="fused", alpha=alpha)
    """
    from keyfuse.index_query import fused_term_matrices

    keep, cls = _labelled(index, label, "fused")
    l_kp, l_v = fused_term_matrices(index)
    sub = np.ix_(keep, keep)
    alphas, ap = _ap_by_alpha(l_kp[sub], l_v[sub], cls)
    return _pick_alpha(alphas, ap, np.ones(ap.shape[1], dtype=bool))


def _nested_fused(
    index: Index, keep: list[int], cls: list[Any]
) -> tuple[npt.NDArray[np.float64], float]:
    """The fused matrix with each query's α chosen on the other queries (nested
    leave-one-out), and the median α chosen."""
    from keyfuse.index_query import fuse, fused_term_matrices

    l_kp, l_v = fused_term_matrices(index)
    sub = np.ix_(keep, keep)
    l_kp, l_v = l_kp[sub], l_v[sub]
    alphas, ap = _ap_by_alpha(l_kp, l_v, cls)
    out = fuse(l_kp, l_v, 0.5)
    chosen = []
    for p, q in enumerate(_scored_rows(cls)):
        others = np.arange(ap.shape[1]) != p
        a = _pick_alpha(alphas, ap, others) if others.any() else 0.5
        chosen.append(a)
        out[q] = fuse(l_kp, l_v, a)[q]
    return out, float(np.median(chosen)) if chosen else 0.5


def retrieval(
    index: Index,
    label: str,
    *,
    by: str | Sequence[str] = "keypoints",
    ks: Sequence[int] = (1, 5, 10),
    alpha: Any = None,
    metric: str = "euclidean",
    plot: str | PathLike[str] | None = None,
) -> RetrievalReport:
    """mAP, P@k and R@k of retrieval by ``label``, overall and per class, with and without
    the predicted-class restriction (see the module docstring).

    Parameters
    ----------
    index : Index
    label : str
        The label that defines relevance (and that the classifier predicts).
    by : str or sequence of str
        ``"keypoints"``, ``"vector"``, ``"fused"`` or several of them (one block of rows
        each).
    ks : the k of P@k and R@k (default 1, 5, 10).
    alpha, metric : as in :meth:`keyfuse.Index.search`; ``alpha="auto"`` chooses each
        query's α on the other queries (nested leave-one-out, see
        :func:`choose_fusion_alpha`), so the fused figures are not tuned on themselves.
    plot : str or Path, optional
        A ``.png`` file, or a directory that receives ``pr-<label>.png``: the mean
        interpolated precision–recall curves, one per ``by`` and restriction.
    """
    import pandas as pd

    bys = [by] if isinstance(by, str) else list(by)
    for b in bys:
        check_by(b)
    _labelled(index, label, "keypoints")  # the label exists
    rows: list[dict[str, Any]] = []
    accuracy: dict[str, float] = {}
    curves: dict[str, npt.NDArray[np.float64]] = {}
    per_query: dict[str, npt.NDArray[np.float64]] = {}
    chosen_alpha = None
    for b in bys:
        keep, cls = _labelled(index, label, b)
        if b == "fused" and isinstance(alpha, str) and alpha == "auto":
            mat, chosen_alpha = _nested_fused(index, keep, cls)
        else:
            full = index.pairwise(by=b, alpha=alpha, metric=metric)
            mat = np.asarray(full)[np.ix_(keep, keep)]
        pred = loo_predictions(index, label, b, keep)
        accuracy[b] = float(np.mean([str(p) == str(c) for p, c in zip(pred, cls, strict=True)]))
        plain = retrieval_metrics(mat, cls, ks=ks)
        restricted = retrieval_metrics(mat, cls, predicted=pred, ks=ks)
        curves[b] = plain["interp"].mean(axis=0)
        per_query[b] = np.asarray(plain["ap"], dtype=np.float64)
        curves[f"{b}|pred"] = restricted["interp"].mean(axis=0)
        for name in ["all", *sorted({str(c) for c in plain["class"]})]:
            sel = np.ones(len(plain["ap"]), bool) if name == "all" else plain["class"] == name
            row: dict[str, Any] = {"by": b, "class": name, "queries": int(sel.sum())}
            for tag, m in (("", plain), ("|pred", restricted)):
                row[f"mAP{tag}"] = float(m["ap"][sel].mean())
            for j, k in enumerate(ks):
                for tag, m in (("", plain), ("|pred", restricted)):
                    row[f"P@{k}{tag}"] = float(m["p"][sel, j].mean())
            for j, k in enumerate(ks):
                for tag, m in (("", plain), ("|pred", restricted)):
                    row[f"R@{k}{tag}"] = float(m["r"][sel, j].mean())
            rows.append(row)
    table = pd.DataFrame(rows).set_index(["by", "class"])
    report = RetrievalReport(label, table, accuracy, curves, ap=per_query, alpha=chosen_alpha)
    if plot is not None:
        report.plots.append(_plot(report, Path(plot)))
    return report


def _plot(report: RetrievalReport, target: Path) -> Path:
    from keyfuse.plotting import save_figure
    from keyfuse.plotting._slices import _new_figure

    if target.suffix.lower() != ".png":
        target = target / f"pr-{report.label}.png"
    fig = _new_figure(5.6, 4.8, dark=False)
    ax = fig.add_subplot(1, 1, 1)
    colours: dict[str, Any] = {}
    for name, prec in report.curves.items():
        b, _, restricted = name.partition("|")
        m = report.table.loc[(b, "all"), "mAP|pred" if restricted else "mAP"]
        (line,) = ax.plot(
            RECALL_GRID,
            prec,
            ls="--" if restricted else "-",
            lw=1.6,
            color=colours.get(b),
            label=f"{b}{' (predicted class)' if restricted else ''}: mAP {m:.3f}",
        )
        colours.setdefault(b, line.get_color())
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision (mean over queries)")
    ax.grid(True, color="0.9", lw=0.6)
    ax.set_title(f"retrieval by {report.label!r}", fontsize=11)
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, target)
