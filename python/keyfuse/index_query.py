"""What :meth:`keyfuse.Index.search` accepts as a query, and its vector and fused searches
(the keypoint search itself runs in the Rust engine, see :mod:`keyfuse.index`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError
from keyfuse.index_results import Hit, SearchResult
from keyfuse.keypoints import KeypointSet
from keyfuse.vector_search import (
    VectorMatrix,
    balanced_alpha,
    check_by,
    check_metric,
    check_vector,
    keypoint_terms,
    resolve_alpha,
)

if TYPE_CHECKING:
    from keyfuse.index import Index

__all__ = ["Query", "pairwise_by", "parse_query", "run_search"]

PREDICTED = "predicted"


@dataclass
class Query:
    """A parsed query: its keypoints and/or vector, and the indexed subject it is (left
    out of its own results)."""

    kps: KeypointSet | None
    vector: npt.NDArray[np.float32] | None
    exclude: str | None


def _is_vector(obj: Any) -> bool:
    if isinstance(obj, np.ndarray):
        return obj.ndim == 1 or (obj.ndim == 2 and 1 in obj.shape and obj.dtype != np.uint8)
    if (
        isinstance(obj, (list, tuple))
        and obj
        and all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool) for x in obj)
    ):
        return True
    return False


_CNN: dict[str, Any] = {}


def _cnn_vector(image: Any, cnn: Any) -> npt.NDArray[np.float32]:
    """The CNN vector of an image or image path (``cnn`` or the default CNNFeatures)."""
    from keyfuse.image import load_image

    if cnn is None:
        if "default" not in _CNN:
            from keyfuse.cnn import CNNFeatures

            _CNN["default"] = CNNFeatures()
        cnn = _CNN["default"]
    img = load_image(image) if isinstance(image, (str, os.PathLike)) else image
    return np.asarray(cnn(img), dtype=np.float32)


def _query_image(index: Index, query: Any) -> Any:
    """The query image, read once, refused when its dimension is not the index's (a 2D
    image against an index of volumes, or the reverse); keypoint files pass through."""
    from keyfuse.image import Image, load_image

    if isinstance(query, (str, os.PathLike)) and os.fspath(query).endswith((".kfk", ".key")):
        return query
    img = query if isinstance(query, Image) else load_image(query)
    nd = index._ndim
    if nd is not None and img.ndim != nd:
        raise InvalidArgumentError(
            f"the query is a {img.ndim}D image but the index holds {nd}D images: their CNN "
            "vectors and SIFT-Rank keypoints are not comparable (query an index of "
            f"{img.ndim}D images)"
        )
    return img


def parse_query(
    index: Index, query: Any, by: str, *, device: str = "auto", cnn: Any = None
) -> Query:
    """The keypoints and vector ``by`` needs from any accepted query form."""
    from keyfuse.matching import _as_keypoints

    need_kps = by in ("keypoints", "fused")
    need_vec = by in ("vector", "fused")
    kps: KeypointSet | None = None
    vec: Any = None
    exclude = None
    if isinstance(query, str) and query in index._pos:
        exclude = query
        i = index._pos[query]
        if need_kps:
            kps = index.keypoints(query)
        vec = index._vectors[i] if need_vec else None
        if need_vec and vec is None:
            raise InvalidArgumentError(f"subject {query!r} has no vector to search {by!r} with")
    elif isinstance(query, tuple) and len(query) == 2 and not _is_vector(query):
        kps_part, vec = query
        if kps_part is not None:
            kps = _as_keypoints(kps_part, device, "the query's keypoints")
    elif _is_vector(query):
        vec = query
    elif isinstance(query, KeypointSet):
        kps = query
    else:  # an image or a path: extract what is needed (from one read of the image)
        image = _query_image(index, query) if need_vec else query
        if need_kps:
            kps = _as_keypoints(image, device, "query")
        if need_vec:
            vec = _cnn_vector(image, cnn)
    if need_kps and kps is None:
        raise InvalidArgumentError(
            f"by={by!r} needs the query's keypoints: pass a KeypointSet, a "
            "(KeypointSet, vector) pair, an image or a path (or search by='vector')"
        )
    if need_vec and vec is None:
        raise InvalidArgumentError(
            f"by={by!r} needs the query's CNN vector: pass a vector, a (KeypointSet, "
            "vector) pair, an image or a path (or search by='keypoints')"
        )
    # only the parts ``by`` uses (the class prediction of ``restrict`` uses the same)
    kps = kps if need_kps else None
    v = None
    if vec is not None and need_vec:
        dim = index._vector_matrix().dim
        v = check_vector(vec, dim)
    return Query(kps, v, exclude)


def predicted_restriction(index: Index, restrict: Any, q: Query) -> tuple[Any, dict[str, Any]]:
    """``restrict`` with each ``"predicted"`` value replaced by the query's predicted
    class, and those predictions."""
    if not isinstance(restrict, Mapping):
        return restrict, {}
    names = [key for key, want in restrict.items() if isinstance(want, str) and want == PREDICTED]
    if not names:
        return restrict, {}
    index._check_restrict_labels({k: None for k in names})
    predicted = {name: index._classifiers.predict(index, name, q.kps, q.vector) for name in names}
    return {**restrict, **predicted}, predicted


def vector_scores(
    index: Index, q: Query, metric: str, mask: npt.NDArray[np.bool_] | None
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
    """(allowed subjects, every subject's score) of a vector query."""
    vm = index._vector_matrix()
    vm.require()
    assert q.vector is not None
    allowed = vm.row_of >= 0
    if mask is not None:
        allowed &= mask
    if q.exclude is not None:
        allowed[index._pos[q.exclude]] = False
    return allowed, vm.all_scores(q.vector, metric)


def vector_top(
    index: Index, q: Query, k: int | None, metric: str, mask: npt.NDArray[np.bool_] | None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The ``k`` best subjects of a vector query and their scores (fast path)."""
    vm = index._vector_matrix()
    vm.require()
    assert q.vector is not None
    allowed = mask.copy() if mask is not None else None
    if q.exclude is not None:
        if allowed is None:
            allowed = np.ones(len(index), dtype=bool)
        allowed[index._pos[q.exclude]] = False
    return vm.top(q.vector, k, metric, allowed)


def fused_scores(
    index: Index,
    q: Query,
    alpha: float | None,
    mask: npt.NDArray[np.bool_] | None,
    exact: bool,
    scheduler: Any = None,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64], float]:
    """(allowed, eq. 4 score of every subject, the α used) of a fused query; the keypoint
    term from the keypoint search's own k-NN pass (exact or kd-forest), over the subjects
    the restriction ``mask`` allows, as the keypoint search does."""
    vm = index._vector_matrix()
    vm.require("fused search")
    assert q.kps is not None and q.vector is not None
    ex = None if q.exclude is None else index._pos[q.exclude]
    allowed = vm.row_of >= 0
    if mask is not None:
        allowed &= mask
    if ex is not None:
        allowed[ex] = False
    l_kp = (
        keypoint_terms(index, [(q.kps.descriptors, ex)], exact, scheduler, mask)[0]
        if alpha != 0.0
        else np.zeros(len(index))
    )
    l_v = (
        _vector_terms(vm, q.vector, ex) if alpha != 1.0 else np.where(vm.row_of >= 0, 0.0, -np.inf)
    )
    a = alpha
    if a is None:
        a = balanced_alpha(l_kp[allowed], l_v[allowed])
    s = a * l_kp + (1.0 - a) * l_v if 0.0 < a < 1.0 else (l_kp if a == 1.0 else l_v)
    s = np.where(vm.row_of >= 0, s, -np.inf)
    return allowed, np.asarray(s, dtype=np.float64), float(a)


def _vector_terms(
    vm: VectorMatrix, v: npt.NDArray[np.float32], ex: int | None
) -> npt.NDArray[np.float64]:
    from keyfuse.vector_search import vector_terms

    exclude = None if ex is None else np.array([ex], dtype=np.int64)
    return vector_terms(vm, v[None, :], exclude)[0]


#: query subjects per k-NN pass of the fused pairwise matrix (bounds the lists held)
FUSED_BLOCK_ROWS = 64


def fused_term_matrices(
    index: Index, exact: bool | None = None, scheduler: Any = None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The two N×N terms of eq. 4: row a = log p({f_i}|j) and log p(v|j) of subject a
    against every subject j, a left out (its own entries are not meaningful). The keypoint
    rows come from the keypoint search's k-NN (``exact`` as in :meth:`Index.pairwise`)."""
    from keyfuse.vector_search import vector_terms

    vm = index._vector_matrix()
    vm.require("fused pairwise")
    if len(vm) != len(index):
        raise InvalidArgumentError(
            f"pairwise(by='fused') needs a vector for every subject: {len(index) - len(vm)} "
            "of the index's subjects have none"
        )
    n = len(index)
    l_v = vector_terms(vm, vm.matrix, np.arange(n, dtype=np.int64))
    l_kp = np.empty((n, n))
    use_exact = index._use_exact(exact)
    shards = index._engine
    for a in range(0, n, FUSED_BLOCK_ROWS):
        rows = range(a, min(n, a + FUSED_BLOCK_ROWS))
        queries = [(shards.subject_descriptors(i), i) for i in rows]
        l_kp[a : a + len(rows)] = keypoint_terms(index, queries, use_exact, scheduler)
    return l_kp, l_v


def fuse(
    l_kp: npt.NDArray[np.float64], l_v: npt.NDArray[np.float64], alpha: float | None
) -> npt.NDArray[np.float64]:
    """Eq. 4 from the term matrices (``alpha=None``: balanced per row); the diagonal is
    the matrix's largest value (a subject is its own best match)."""
    n = len(l_kp)
    out = np.empty((n, n))
    for a_i in range(n):
        off = np.arange(n) != a_i
        a = balanced_alpha(l_kp[a_i][off], l_v[a_i][off]) if alpha is None else alpha
        out[a_i] = a * l_kp[a_i] + (1.0 - a) * l_v[a_i]
    off = ~np.eye(n, dtype=bool)
    np.fill_diagonal(out, out[off].max() if n > 1 else 0.0)
    return out


def fused_pairwise(
    index: Index, alpha: float | None, exact: bool | None = None, scheduler: Any = None
) -> npt.NDArray[np.float64]:
    """N×N eq. 4 scores: row a = subject a (keypoints and vector) against every other
    subject, leaving a out; the diagonal is the matrix's largest value."""
    return fuse(*fused_term_matrices(index, exact, scheduler), alpha)


def run_search(
    index: Index,
    query: Any,
    k: int | None,
    restrict: Any,
    *,
    by: str,
    alpha: Any,
    metric: str,
    exclude: str | None,
    exact: bool | None,
    device: str,
    cnn: Any,
    scheduler: Any = None,
) -> SearchResult:
    """:meth:`keyfuse.Index.search` (see there)."""
    check_by(by)
    check_metric(metric)
    a = resolve_alpha(alpha)
    if k is not None and k < 1:
        raise InvalidArgumentError("k must be ≥ 1 (or None)")
    q = parse_query(index, query, by, device=device, cnn=cnn)
    drop = [e for e in (q.exclude, exclude) if e is not None]
    for e in drop:
        index._index_of(e)
    q.exclude = drop[-1] if drop else None  # left out of the likelihoods too
    restrict, predicted = predicted_restriction(index, restrict, q)
    mask = index._mask(restrict)
    if len(drop) > 1:  # a subject-id query and another exclusion: both left out
        mask = np.ones(len(index), dtype=bool) if mask is None else mask.copy()
        mask[index._pos[drop[0]]] = False
    if by == "vector":
        order, scores = vector_top(index, q, k, metric, mask)
        return _result(index, order, scores, predicted)
    if by == "fused":
        allowed, s, a = fused_scores(index, q, a, mask, index._use_exact(exact), scheduler)
    else:
        s = index._scores(
            q.kps, mask, exclude=q.exclude, exact=exact, device=device, scheduler=scheduler
        )
        allowed = np.ones(len(s), dtype=bool) if mask is None else mask.copy()
        if q.exclude is not None:
            allowed[index._pos[q.exclude]] = False
    cand = np.flatnonzero(allowed)
    order = cand[np.lexsort((cand, -s[cand]))]
    if k is not None:
        order = order[:k]
    res = _result(index, order, s[order], predicted)
    if by == "fused":
        res.alpha = a
    return res


def _result(
    index: Index,
    order: npt.NDArray[np.int64],
    scores: npt.ArrayLike,
    predicted: dict[str, Any],
) -> SearchResult:
    ids, labels = index._ids, index._labels
    res = SearchResult(
        (Hit(ids[i], float(v)) for i, v in zip(order, np.asarray(scores), strict=True)),
        labels={ids[i]: labels[i] for i in order},
    )
    res.predicted = predicted
    return res


def pairwise_by(
    index: Index,
    by: str,
    alpha: Any,
    metric: str,
    exact: bool | None = None,
    scheduler: Any = None,
) -> npt.NDArray[np.float64]:
    """:meth:`keyfuse.Index.pairwise` by ``"vector"`` or ``"fused"``."""
    check_by(by)
    check_metric(metric)
    if by == "fused":
        return fused_pairwise(index, resolve_alpha(alpha), exact, scheduler)
    vm = index._vector_matrix()
    vm.require("pairwise(by='vector')")
    if len(vm) != len(index):
        raise InvalidArgumentError(
            f"pairwise(by='vector') needs a vector for every subject: "
            f"{len(index) - len(vm)} of the {len(index)} subjects have none"
        )
    return vm.pairwise(metric)
