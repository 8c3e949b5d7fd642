"""Evaluation: ROC/AUC, average precision, retrieval metrics, Dice and ROC plots.

Two kinds of input appear here:

* **pair scores** — a flat vector of similarity scores and a boolean vector saying
  which pairs are positives (same family, same subject, ...). ``roc_curve``,
  ``roc_auc`` and ``average_precision`` take these (they wrap scikit-learn's metrics
  with input checks and keyfuse errors).
* **score matrices** — ``scores[q, j]`` is the similarity of query ``q`` to database
  item ``j`` (as returned by ``Index.pairwise()``) with a boolean ``relevant`` matrix
  of the same shape. ``mean_average_precision``, ``precision_at_k`` and
  ``recall_at_k`` rank each row (ties broken by column index, so results never depend
  on the sort implementation) and average over queries.

The cohort helpers (``family_pairs``, ``relation_pairs``, ``identification_curves``,
``rescan_rank1``, ``family_report``) turn an N×N score matrix plus the table written by
:func:`keyfuse.datasets.simulate_cohort` into the figures the demo prints.

:func:`retrieval` evaluates an index's retrieval by one label (mAP, P@k, R@k, with and
without the predicted-class restriction; see :mod:`keyfuse.evaluate_retrieval`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from keyfuse.errors import InvalidArgumentError, KeyfuseIOError
from keyfuse.evaluate_retrieval import (
    RetrievalReport,
    choose_fusion_alpha,
    retrieval,
    retrieval_metrics,
)

__all__ = [
    "RetrievalReport",
    "approx_recall_at_k",
    "average_precision",
    "choose_fusion_alpha",
    "cohort_matrix",
    "dice",
    "family_pairs",
    "family_report",
    "identification_curves",
    "mean_average_precision",
    "precision_at_k",
    "recall_at_k",
    "relation_pairs",
    "rescan_rank1",
    "retrieval",
    "retrieval_metrics",
    "roc_auc",
    "roc_curve",
    "roc_plot",
    "table_column",
]


# --------------------------------------------------------------------------- pair scores


def _pair_inputs(
    scores: ArrayLike, labels: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y_raw = np.asarray(labels).ravel()
    if s.shape != y_raw.shape:
        raise InvalidArgumentError(
            f"scores and labels must have the same length, got {s.size} and {y_raw.size}"
        )
    if s.size == 0:
        raise InvalidArgumentError("scores are empty")
    if not np.all(np.isfinite(s)):
        raise InvalidArgumentError("scores contain NaN or infinite values")
    if y_raw.dtype != np.bool_:
        uniq = np.unique(y_raw)
        if not np.all(np.isin(uniq, [0, 1])):
            raise InvalidArgumentError(f"labels must be boolean or 0/1, got values {uniq[:5]}")
    y = y_raw.astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise InvalidArgumentError(
            "labels must contain both positives and negatives to compute a ROC/PR figure"
        )
    return s, y


def roc_curve(
    scores: ArrayLike, labels: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """ROC curve of ``scores`` (higher = more likely positive) against boolean ``labels``.

    Returns ``(fpr, tpr, thresholds)`` as :func:`sklearn.metrics.roc_curve` does (with
    ``drop_intermediate=False`` so every distinct threshold is kept).
    """
    from sklearn.metrics import roc_curve as _sk_roc_curve

    s, y = _pair_inputs(scores, labels)
    fpr, tpr, thr = _sk_roc_curve(y, s, drop_intermediate=False)
    return fpr.astype(np.float64), tpr.astype(np.float64), thr.astype(np.float64)


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve (ties count one half): the probability that a random
    positive scores above a random negative."""
    from sklearn.metrics import roc_auc_score

    s, y = _pair_inputs(scores, labels)
    return float(roc_auc_score(y, s))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision (area under the precision-recall step curve) of pair scores."""
    from sklearn.metrics import average_precision_score

    s, y = _pair_inputs(scores, labels)
    return float(average_precision_score(y, s))


# ------------------------------------------------------------------------ score matrices


def _matrix_inputs(
    scores: ArrayLike, relevant: ArrayLike, exclude: ArrayLike | None
) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_]]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[None, :]
    r = np.asarray(relevant)
    if r.ndim == 1:
        r = r[None, :]
    if s.ndim != 2 or s.shape != r.shape:
        raise InvalidArgumentError(
            f"scores and relevant must be 2-D arrays of the same shape, got {s.shape} and {r.shape}"
        )
    if s.size == 0:
        raise InvalidArgumentError("score matrix is empty")
    if np.isnan(s).any():
        raise InvalidArgumentError("scores contain NaN")
    if exclude is None:
        ex = np.zeros(s.shape, dtype=bool)
    else:
        ex = np.asarray(exclude, dtype=bool)
        if ex.ndim == 1:
            ex = ex[None, :]
        if ex.shape != s.shape:
            raise InvalidArgumentError(f"exclude must have shape {s.shape}, got {ex.shape}")
    return s, r.astype(bool), ex


def _ranked_relevance(
    scores: ArrayLike, relevant: ArrayLike, exclude: ArrayLike | None
) -> list[NDArray[np.bool_]]:
    """Per query, the relevance of its non-excluded items in rank order (best first,
    ties by column index)."""
    s, r, ex = _matrix_inputs(scores, relevant, exclude)
    order = np.argsort(np.where(ex, np.inf, -s), axis=1, kind="stable")
    return [r[q][order[q][~ex[q][order[q]]]] for q in range(s.shape[0])]


def _check_k(k: int) -> None:
    if k < 1:
        raise InvalidArgumentError(f"k must be >= 1, got {k}")


def mean_average_precision(
    scores: ArrayLike,
    relevant: ArrayLike,
    *,
    exclude: ArrayLike | None = None,
) -> float:
    """Mean over queries of the average precision of each query's ranking.

    Parameters
    ----------
    scores : (Q, N) similarities, higher = better.
    relevant : (Q, N) boolean, which items are relevant to each query.
    exclude : (Q, N) boolean or None (default), items removed from the ranking (the
        query itself in an all-pairs matrix, for instance).

    Queries with no relevant (non-excluded) item are skipped; if none remains an
    :class:`InvalidArgumentError` is raised.
    """
    aps: list[float] = []
    for rel in _ranked_relevance(scores, relevant, exclude):
        n_rel = int(rel.sum())
        if n_rel == 0:
            continue
        hits = np.cumsum(rel)
        ranks = np.arange(1, rel.size + 1)
        aps.append(float(np.sum((hits / ranks)[rel]) / n_rel))
    if not aps:
        raise InvalidArgumentError("no query has a relevant item: mAP is undefined")
    return float(np.mean(aps))


def precision_at_k(
    scores: ArrayLike, relevant: ArrayLike, k: int, *, exclude: ArrayLike | None = None
) -> float:
    """Mean over queries of the fraction of the top ``k`` results that are relevant.

    Same inputs as :func:`mean_average_precision`; a query with fewer than ``k``
    non-excluded items is scored over the items it has.
    """
    _check_k(k)
    vals: list[float] = []
    for rel in _ranked_relevance(scores, relevant, exclude):
        if rel.size:
            vals.append(float(rel[:k].mean()))
    if not vals:
        raise InvalidArgumentError("every item is excluded: precision@k is undefined")
    return float(np.mean(vals))


def recall_at_k(
    scores: ArrayLike, relevant: ArrayLike, k: int, *, exclude: ArrayLike | None = None
) -> float:
    """Mean over queries of the fraction of relevant items found in the top ``k``.

    Queries with no relevant item are skipped. For the recall of an approximate search
    against exact search, see :func:`approx_recall_at_k`.
    """
    _check_k(k)
    vals: list[float] = []
    for rel in _ranked_relevance(scores, relevant, exclude):
        n_rel = int(rel.sum())
        if n_rel == 0:
            continue
        vals.append(float(rel[:k].sum()) / n_rel)
    if not vals:
        raise InvalidArgumentError("no query has a relevant item: recall@k is undefined")
    return float(np.mean(vals))


def approx_recall_at_k(approx_ids: ArrayLike, exact_ids: ArrayLike, k: int) -> float:
    """Recall@k of an approximate search against exact search.

    ``approx_ids`` and ``exact_ids`` are (Q, ≥k) arrays of result ids, best first. The
    figure is the mean over queries of ``|approx[:k] ∩ exact[:k]| / k`` (for ``k = 1``:
    the fraction of queries whose true nearest neighbour is found first).
    """
    a = np.asarray(approx_ids)
    e = np.asarray(exact_ids)
    if a.ndim == 1:
        a = a[:, None]
    if e.ndim == 1:
        e = e[:, None]
    if k < 1:
        raise InvalidArgumentError(f"k must be >= 1, got {k}")
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise InvalidArgumentError(
            f"approx_ids and exact_ids need one row per query, got {a.shape} and {e.shape}"
        )
    if a.shape[0] == 0:
        raise InvalidArgumentError("no queries")
    if a.shape[1] < k or e.shape[1] < k:
        raise InvalidArgumentError(f"need at least k={k} results per query")
    found = [len(set(a[q, :k].tolist()) & set(e[q, :k].tolist())) for q in range(a.shape[0])]
    return float(np.mean(found) / k)


# ---------------------------------------------------------------------------- Dice


def dice(
    segmentation: ArrayLike,
    reference: ArrayLike,
    labels: Sequence[int] | None = None,
    *,
    empty_score: float = 1.0,
) -> float | dict[int, float]:
    """Dice overlap 2|A∩B| / (|A| + |B|).

    Parameters
    ----------
    segmentation, reference : arrays of the same shape (label maps or masks; a
        :class:`keyfuse.Image` or anything with ``.data`` is accepted).
    labels : None (default) or the labels to score. With None, boolean inputs give one
        float; integer label maps give a dict over the nonzero labels of either map.
    empty_score : value when a label is absent from both maps (default 1.0: agreeing on
        absence is a perfect answer).
    """
    a = np.asarray(getattr(segmentation, "data", segmentation))
    b = np.asarray(getattr(reference, "data", reference))
    if a.shape != b.shape:
        raise InvalidArgumentError(
            f"segmentation and reference shapes differ: {a.shape} vs {b.shape}"
        )

    def one(ma: NDArray[np.bool_], mb: NDArray[np.bool_]) -> float:
        denom = int(ma.sum()) + int(mb.sum())
        if denom == 0:
            return float(empty_score)
        return 2.0 * int(np.logical_and(ma, mb).sum()) / denom

    if labels is None and a.dtype == np.bool_ and b.dtype == np.bool_:
        return one(a, b)
    if labels is None:
        labs = sorted(int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v != 0)
    else:
        labs = [int(v) for v in labels]
    return {lab: one(a == lab, b == lab) for lab in labs}


# ----------------------------------------------------------------------------- plots


#: figure formats by file suffix (matplotlib's vector and raster writers)
PLOT_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".eps": "eps", ".jpg": "jpg"}


def plot_format(path: str | PathLike[str]) -> str:
    """The figure format a file name asks for (``roc.svg`` → SVG); PNG for a name
    without a suffix; an unknown suffix raises :class:`InvalidArgumentError`."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        return "png"
    if suffix not in PLOT_FORMATS:
        raise InvalidArgumentError(
            f"{path}: unknown figure format {suffix!r} (use {', '.join(PLOT_FORMATS)})"
        )
    return PLOT_FORMATS[suffix]


def roc_plot(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | PathLike[str],
    *,
    title: str = "ROC",
) -> Path:
    """Write a figure with one ROC curve per entry of ``curves`` (name → (scores,
    labels)), in the format of ``path``'s suffix (``.png``, ``.svg``, ``.pdf``, ...).

    The legend gives each curve's AUC. Renders off-screen with matplotlib (no display
    needed, pyplot's state untouched). Returns the path written.
    """
    if not curves:
        raise InvalidArgumentError("roc_plot needs at least one curve")
    # a bare Figure renders with Agg and never touches pyplot's global backend
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 5.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(scores, labels):.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    out = Path(path)
    fmt = plot_format(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format=fmt)
    except OSError as exc:
        raise KeyfuseIOError(f"cannot write ROC plot to {out}: {exc}") from exc
    return out


# ------------------------------------------------------------------ cohort helpers


def table_column(table: Any, name: str) -> list[Any]:
    """Column ``name`` of a cohort table as a list.

    Accepts a :class:`keyfuse.datasets.Cohort`, a pandas DataFrame, a pyarrow Table, a
    mapping of columns, or a sequence of row mappings.
    """
    tab = getattr(table, "table", table)  # a Cohort carries its table
    if hasattr(tab, "column_names") and hasattr(tab, "column"):  # pyarrow
        if name not in tab.column_names:
            raise InvalidArgumentError(f"table has no column {name!r}")
        return list(tab.column(name).to_pylist())
    if hasattr(tab, "columns") and hasattr(tab, "__getitem__") and hasattr(tab, "iloc"):
        if name not in tab.columns:
            raise InvalidArgumentError(f"table has no column {name!r}")
        return list(tab[name].tolist())
    if isinstance(tab, Mapping):
        if name not in tab:
            raise InvalidArgumentError(f"table has no column {name!r}")
        return list(tab[name])
    if isinstance(tab, Sequence) and not isinstance(tab, str):
        try:
            return [row[name] for row in tab]
        except (KeyError, TypeError) as exc:
            raise InvalidArgumentError(f"table rows have no field {name!r}") from exc
    raise InvalidArgumentError(f"unsupported table type {type(tab).__name__}")


def _has_column(table: Any, name: str) -> bool:
    try:
        table_column(table, name)
    except InvalidArgumentError:
        return False
    return True


def _square(scores: ArrayLike, n: int) -> NDArray[np.float64]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape != (n, n):
        raise InvalidArgumentError(
            f"score matrix must be {n}×{n} (one row per table row), got {s.shape}"
        )
    if np.isnan(s).any():
        raise InvalidArgumentError("score matrix contains NaN")
    return s


def cohort_matrix(table: Any, scores: Any) -> NDArray[np.float64]:
    """The N×N score matrix of a cohort's scans, rows and columns in the table's order.

    Parameters
    ----------
    table : a cohort table with a ``subject`` column (a :class:`keyfuse.datasets.Cohort`,
        a DataFrame, ...).
    scores : a :class:`keyfuse.Index` (its pairwise matrix is computed), a pandas
        ``DataFrame`` whose index and columns are subject ids (``index.pairwise(
        as_frame=True)``), or a plain (N, N) array already in the table's order.

    Labelled inputs are matched by subject id, so an index built in another order scores
    the right pairs; subjects of the index that are not in the table are left out.

    Raises
    ------
    InvalidArgumentError
        A subject of the table is missing from the index or the matrix.
    """
    if hasattr(scores, "pairwise") and hasattr(scores, "subjects"):  # a keyfuse.Index
        scores = scores.pairwise(as_frame=True)
    if not (hasattr(scores, "index") and hasattr(scores, "columns") and hasattr(scores, "loc")):
        return np.asarray(scores, dtype=np.float64)
    ids = [str(v) for v in table_column(table, "subject")]
    rows = [str(v) for v in scores.index]
    cols = [str(v) for v in scores.columns]
    for what, have in (("rows", rows), ("columns", cols)):
        missing = [s for s in ids if s not in set(have)]
        if missing:
            raise InvalidArgumentError(
                f"{len(missing)} of the cohort's {len(ids)} subjects are not among the score "
                f"matrix's {what} (e.g. {missing[:3]}): was the index built from this cohort?"
            )
    rpos = {s: i for i, s in enumerate(rows)}
    cpos = {s: i for i, s in enumerate(cols)}
    mat = np.asarray(scores.to_numpy(), dtype=np.float64)
    return mat[np.ix_([rpos[s] for s in ids], [cpos[s] for s in ids])]


def _individuals(table: Any) -> list[str]:
    """The anatomical individual of each scan (rescans share it)."""
    if _has_column(table, "individual"):
        return [str(v) for v in table_column(table, "individual")]
    subjects = [str(v) for v in table_column(table, "subject")]
    if _has_column(table, "rescan_of"):
        out = []
        for sid, orig in zip(subjects, table_column(table, "rescan_of"), strict=True):
            out.append(str(orig) if orig not in (None, "") and not _isnan(orig) else sid)
        return out
    return subjects


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def family_pairs(
    table: Any, scores: Any, *, include_same_individual: bool = False
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Pair scores and same-family labels for every unordered pair of scans.

    Parameters
    ----------
    table : cohort table with a ``family`` column (and ``individual`` or ``rescan_of``
        to recognise rescans), one row per row/column of ``scores``.
    scores : (N, N) similarity matrix, or an Index / labelled DataFrame matched by
        subject id (:func:`cohort_matrix`); asymmetric matrices are symmetrised by the mean
        of ``S[i, j]`` and ``S[j, i]``.
    include_same_individual : keep pairs of scans of the same individual (rescans) as
        positives (default False: they would make family identification look easier).

    Returns ``(pair_scores, same_family)`` over pairs ``i < j``.
    """
    fam = [str(v) for v in table_column(table, "family")]
    n = len(fam)
    s = _square(cohort_matrix(table, scores), n)
    sym = 0.5 * (s + s.T)
    ind = _individuals(table)
    iu, ju = np.triu_indices(n, k=1)
    keep = np.array(
        [include_same_individual or ind[i] != ind[j] for i, j in zip(iu, ju, strict=True)],
        dtype=bool,
    )
    iu, ju = iu[keep], ju[keep]
    labels = np.array([fam[i] == fam[j] for i, j in zip(iu, ju, strict=True)], dtype=bool)
    return sym[iu, ju], labels


def _pair_relation(table: Any) -> list[list[str]]:
    """N×N matrix of relation names between scans."""
    fam = [str(v) for v in table_column(table, "family")]
    ind = _individuals(table)
    twin = [
        str(v) if v not in (None, "") and not _isnan(v) else ""
        for v in (
            table_column(table, "twin_of") if _has_column(table, "twin_of") else [""] * len(fam)
        )
    ]
    ttype = (
        [str(v) for v in table_column(table, "relation")]
        if _has_column(table, "relation")
        else ["sibling"] * len(fam)
    )
    n = len(fam)
    rel = [["" for _ in range(n)] for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                rel[i][j] = "self"
            elif ind[i] == ind[j]:
                rel[i][j] = "rescan"
            elif fam[i] != fam[j]:
                rel[i][j] = "unrelated"
            elif twin[i] == ind[j] or twin[j] == ind[i]:
                rel[i][j] = "mz_twin" if ttype[i] == "mz_twin" else "dz_twin"
            else:
                rel[i][j] = "sibling"
    return rel


def relation_pairs(table: Any, scores: Any) -> dict[str, NDArray[np.float64]]:
    """Symmetrised pair scores grouped by relation: ``rescan``, ``mz_twin``,
    ``dz_twin``, ``sibling``, ``unrelated`` (pairs ``i < j``; absent relations omitted).

    Twins are recognised by the ``twin_of`` column (the co-twin's individual id) and
    ``relation`` (``mz_twin`` / ``dz_twin``) as written by ``simulate_cohort``.
    """
    rel = _pair_relation(table)
    n = len(rel)
    s = _square(cohort_matrix(table, scores), n)
    sym = 0.5 * (s + s.T)
    out: dict[str, list[float]] = {}
    for i in range(n):
        for j in range(i + 1, n):
            out.setdefault(rel[i][j], []).append(float(sym[i, j]))
    return {k: np.asarray(v, dtype=np.float64) for k, v in sorted(out.items())}


def identification_curves(
    table: Any, scores: Any
) -> dict[str, tuple[NDArray[np.float64], NDArray[np.bool_]]]:
    """The cohort's ROC/PR curve inputs, ``{name: (pair scores, pair is positive)}``:
    same family vs different family, and identical twins vs unrelated when the cohort
    has both. Curves without both positives and negatives (one family) are left out."""
    ps, pl = family_pairs(table, scores)
    curves = {"same family vs different family": (ps, pl)}
    groups = relation_pairs(table, scores)
    if "mz_twin" in groups and "unrelated" in groups:
        a, b = groups["mz_twin"], groups["unrelated"]
        curves["identical twins vs unrelated"] = (
            np.concatenate([a, b]),
            np.concatenate([np.ones(a.size, bool), np.zeros(b.size, bool)]),
        )
    return {k: (sc, lab) for k, (sc, lab) in curves.items() if 0 < np.sum(lab) < np.size(lab)}


def rescan_rank1(table: Any, scores: Any) -> float:
    """Fraction of scans with a rescan partner whose best match (row maximum, itself
    excluded) is a scan of the same individual. Both directions count (the original
    querying for its rescan and the rescan for its original). NaN if the cohort has no
    rescans."""
    ind = _individuals(table)
    n = len(ind)
    s = _square(cohort_matrix(table, scores), n).copy()
    np.fill_diagonal(s, -np.inf)
    hits: list[bool] = []
    for i in range(n):
        partners = [j for j in range(n) if j != i and ind[j] == ind[i]]
        if not partners:
            continue
        # ties go against us: the rescan must strictly beat every other individual
        best_other = max(
            (s[i, j] for j in range(n) if j != i and ind[j] != ind[i]), default=-np.inf
        )
        hits.append(max(s[i, j] for j in partners) > best_other)
    return float(np.mean(hits)) if hits else float("nan")


def _twin_above_unrelated(table: Any, scores: ArrayLike, relation: str) -> float:
    """Fraction of twins (of ``relation``) whose co-twin scores strictly above every
    unrelated scan, when the twin queries the cohort."""
    rel = _pair_relation(table)
    n = len(rel)
    s = _square(scores, n)
    hits: list[bool] = []
    for i in range(n):
        twins = [j for j in range(n) if rel[i][j] == relation]
        unrel = [j for j in range(n) if rel[i][j] == "unrelated"]
        if not twins or not unrel:
            continue
        hits.append(max(s[i, j] for j in twins) > max(s[i, j] for j in unrel))
    return float(np.mean(hits)) if hits else float("nan")


def family_report(table: Any, scores: Any) -> dict[str, float]:
    """The family-identification figures of a cohort score matrix.

    ``scores`` is a :class:`keyfuse.Index` built from the cohort's scans, a score matrix
    labelled with subject ids (``index.pairwise(as_frame=True)``), both matched to the
    table by subject id, or a plain (N, N) array whose rows follow the table's order
    (see :func:`cohort_matrix`).

    Returns a dict with ``family_auc`` and ``family_ap`` (same-family vs
    different-family pairs, rescans excluded), ``map`` / ``p_at_1`` / ``r_at_5`` (each
    scan queries all others; relevant = other individuals of its family; scans of the
    same individual are excluded), ``rescan_rank1``, ``mz_above_unrelated`` and
    ``dz_above_unrelated`` (fractions of twins whose co-twin outranks every unrelated
    scan), ``mz_vs_unrelated_auc``, and mean pair scores per relation (``mean_<rel>``).
    """
    fam = [str(v) for v in table_column(table, "family")]
    n = len(fam)
    s = _square(cohort_matrix(table, scores), n)
    ind = _individuals(table)
    out: dict[str, float] = {}
    ps, pl = family_pairs(table, s)
    out["family_auc"] = roc_auc(ps, pl) if 0 < pl.sum() < pl.size else float("nan")
    out["family_ap"] = average_precision(ps, pl) if 0 < pl.sum() < pl.size else float("nan")
    fam_a = np.asarray(fam)
    ind_a = np.asarray(ind)
    relevant = (fam_a[:, None] == fam_a[None, :]) & (ind_a[:, None] != ind_a[None, :])
    exclude = ind_a[:, None] == ind_a[None, :]
    if relevant.any():
        out["map"] = mean_average_precision(s, relevant, exclude=exclude)
        out["p_at_1"] = precision_at_k(s, relevant, 1, exclude=exclude)
        out["r_at_5"] = recall_at_k(s, relevant, 5, exclude=exclude)
    out["rescan_rank1"] = rescan_rank1(table, s)
    out["mz_above_unrelated"] = _twin_above_unrelated(table, s, "mz_twin")
    out["dz_above_unrelated"] = _twin_above_unrelated(table, s, "dz_twin")
    groups = relation_pairs(table, s)
    if "mz_twin" in groups and "unrelated" in groups:
        both = np.concatenate([groups["mz_twin"], groups["unrelated"]])
        lab = np.concatenate(
            [np.ones(groups["mz_twin"].size, bool), np.zeros(groups["unrelated"].size, bool)]
        )
        out["mz_vs_unrelated_auc"] = roc_auc(both, lab)
    for name, vals in groups.items():
        out[f"mean_{name}"] = float(vals.mean())
    return out
