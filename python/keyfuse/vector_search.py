"""Searching an :class:`~keyfuse.Index` by its subjects' CNN vectors and by the fused model.

* **Vector search** (``index.search(v, by="vector")``): exact nearest neighbours over the
  stored per-subject vectors, by Euclidean distance (the CBMIR paper's; the default) or by
  cosine similarity. The vectors are kept as one contiguous float32 matrix (with their
  squared norms) built on first use and rebuilt only after subjects are added or removed;
  a query is one matrix–vector product, a partial selection of the best candidates and an
  exact float64 re-scoring of those (so ties are exact and broken by subject order).
  Scores are "higher is better": the cosine similarity, or minus the Euclidean distance.
* **Fused search** (``by="fused"``): the fusion paper's eq. 4 applied per candidate
  subject j (one class per subject): ``α log p({f_i} | j) + (1 − α) log p(v | j)``, the
  keypoint term the log soft Jaccard of the keypoint search itself (:func:`keypoint_terms`:
  the same k-NN pass, no second search), the vector term by eqs. 8–9.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError

if TYPE_CHECKING:
    from keyfuse.index import Index

__all__ = ["BY", "METRICS", "VectorMatrix", "balanced_alpha", "check_vector", "keypoint_terms"]

BY = ("keypoints", "vector", "fused")
METRICS = ("euclidean", "cosine")
FloatArray = npt.NDArray[np.float64]


def check_by(by: str) -> str:
    if by not in BY:
        raise InvalidArgumentError(f"by must be one of {', '.join(map(repr, BY))}; got {by!r}")
    return by


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise InvalidArgumentError(
            f"metric must be one of {', '.join(map(repr, METRICS))}; got {metric!r}"
        )
    return metric


def check_vector(
    v: Any, dim: int | None, what: str = "the query vector"
) -> npt.NDArray[np.float32]:
    """A finite 1-D float32 vector of length ``dim`` (any length when ``dim`` is None)."""
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{what} is not a numeric vector: {e}") from e
    if a.ndim != 1:
        a = a.squeeze()
        if a.ndim != 1:
            raise InvalidArgumentError(f"{what} must be 1-D, got shape {np.shape(v)}")
    if dim is not None and a.shape[0] != dim:
        raise InvalidArgumentError(
            f"{what} has {a.shape[0]} elements but the index's vectors have {dim} (was it "
            "made by the same CNN layer and slices as the indexed vectors?)"
        )
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise InvalidArgumentError(f"{what} has {bad} NaN or infinite element(s)")
    return a.astype(np.float32)


#: matrices of at least this many values are scanned as int8 (a quarter of the bytes of
#: float32: the scan is memory-bound); smaller ones by a float32 matrix-vector product
INT8_MIN_VALUES = 1 << 20


class QuantisedRows:
    """Rows as int8 codes times one float32 scale each (``v ≈ scale · code``), with the
    norm of each row's quantisation error, for a scan that reads a quarter of the bytes.

    ``dots(q)`` returns every ``q·v`` approximately and a bound on each error:
    ``‖q‖·‖v − scale·code‖`` (Cauchy–Schwarz) plus the float32 rounding of the scan.
    """

    def __init__(self, matrix: npt.NDArray[np.float32]) -> None:
        m = np.asarray(matrix, dtype=np.float32)
        peak = np.abs(m).max(axis=1) if m.size else np.zeros(len(m), np.float32)
        self.scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        codes = np.empty(m.shape, dtype=np.int8)
        err = np.empty(len(m))
        code_norm = np.empty(len(m))
        u = 2.0**-24  # float32 unit roundoff
        for start in range(0, len(m), 8192):  # in blocks: small temporaries
            block = m[start : start + 8192]
            sc = self.scale[start : start + 8192, None]
            c = np.rint(block / sc)
            np.clip(c, -127, 127, out=c)
            codes[start : start + 8192] = c
            # float32 e = fl(v − fl(scale·code)): the true error is within
            # (1 + 2u)|e| + u|scale·code| per element (the squares are summed in float64)
            e = block - sc * c
            err[start : start + 8192] = np.sqrt(np.einsum("ij,ij->i", e, e, dtype=np.float64))
            code_norm[start : start + 8192] = sc[:, 0].astype(np.float64) * np.sqrt(
                np.einsum("ij,ij->i", c, c, dtype=np.float64)
            )
        self.codes = np.ascontiguousarray(codes)
        dim = m.shape[1] if m.ndim == 2 else 0
        # per unit ‖q‖: the quantisation error (with its float32 rounding, doubled) and the
        # float32 rounding of the scan (≤ (d + 4) units of 2⁻²⁴ of Σ|q_j · scale · code_j|
        # ≤ ‖q‖‖scale · code‖, counted twice)
        self.err_per_q = (1.0 + 4 * u) * err + (2 * u + (dim + 4) * 2.0**-23) * code_norm

    def dots(
        self, q: npt.NDArray[np.float32], q_norm: float
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        from keyfuse import _core

        approx = _core.vector_dots_i8(self.codes, self.scale, np.ascontiguousarray(q, np.float32))
        return np.asarray(approx, dtype=np.float64), q_norm * self.err_per_q + 1e-30


class VectorMatrix:
    """The stored vectors of an index as one contiguous float32 matrix.

    ``rows[r]`` is the subject position of matrix row ``r``; subjects without a vector
    have no row (``row_of[i] == -1``).
    """

    def __init__(self, vectors: Sequence[npt.NDArray[Any] | None]) -> None:
        have = [i for i, v in enumerate(vectors) if v is not None]
        dims = {int(np.asarray(vectors[i]).size) for i in have}
        if len(dims) > 1:
            raise InvalidArgumentError(
                f"the index's vectors differ in length ({sorted(dims)}): vector search needs "
                "one length (vectors of the same CNN layer and slices)"
            )
        self.n_subjects = len(vectors)
        self.dim: int | None = dims.pop() if dims else None
        self.rows = np.asarray(have, dtype=np.int64)
        self.row_of = np.full(len(vectors), -1, dtype=np.int64)
        self.row_of[self.rows] = np.arange(len(have))
        mat = np.empty((len(have), self.dim or 0), dtype=np.float32)
        for r, i in enumerate(have):
            mat[r] = np.asarray(vectors[i], dtype=np.float32).ravel()
        self.matrix = np.ascontiguousarray(mat)
        self._m64: FloatArray | None = None
        self._q8: QuantisedRows | None = None
        self.sq64 = np.einsum("ij,ij->i", self.matrix, self.matrix, dtype=np.float64)
        self.norms64 = np.sqrt(self.sq64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def matrix64(self) -> FloatArray:
        """The vectors as float64 (for the eq. 8–9 likelihoods), made once."""
        if self._m64 is None:
            self._m64 = np.ascontiguousarray(self.matrix, dtype=np.float64)
        return self._m64

    def require(self, what: str = "vector search") -> int:
        if self.dim is None or len(self.rows) == 0:
            raise InvalidArgumentError(
                f"{what} needs CNN vectors, but no subject of the index has one: add "
                "subjects with index.add(id, kps, vector=...) (e.g. kf.CNNFeatures()(image))"
            )
        return self.dim

    # -- scoring ---------------------------------------------------------------------
    @property
    def quantised(self) -> QuantisedRows | None:
        """The int8 copy the scan of large matrices reads (``None`` below
        :data:`INT8_MIN_VALUES` values: there the float32 product is as fast), made once."""
        if self.matrix.size < INT8_MIN_VALUES:
            return None
        if self._q8 is None:
            self._q8 = QuantisedRows(self.matrix)
        return self._q8

    def _bounds(
        self, q: npt.NDArray[np.float32], metric: str
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(approximate score, bound of its error) of every row: the true score (cosine, or
        2 q·v − ‖v‖², which orders rows like minus the Euclidean distance) lies within."""
        qn = float(np.sqrt(np.dot(q.astype(np.float64), q.astype(np.float64))))
        q8 = self.quantised
        if q8 is not None:
            dots, err = q8.dots(q, qn)
        else:
            dots = (self.matrix @ q).astype(np.float64)
            # float32 products: relative rounding of the sum of |terms| ≤ ‖q‖‖v‖
            err = (len(q) + 4) * 2.0**-23 * qn * self.norms64
        if metric == "cosine":
            den = qn * self.norms64
            safe = np.where(den > 0, den, 1.0)
            return np.where(den > 0, dots / safe, 0.0), np.where(den > 0, err / safe, 0.0)
        return 2.0 * dots - self.sq64, 2.0 * err

    def exact(
        self, q: npt.NDArray[np.float32], rows: npt.NDArray[np.int64], metric: str
    ) -> FloatArray:
        """float64 scores of ``rows``: cosine similarity, or minus the Euclidean distance."""
        v = self.matrix[rows].astype(np.float64)
        q64 = q.astype(np.float64)
        if metric == "cosine":
            nv = np.sqrt(np.einsum("ij,ij->i", v, v))
            nq = float(np.sqrt(q64 @ q64))
            dots = np.einsum("ij,j->i", v, q64)
            den = nv * nq
            return np.where(den > 0, dots / np.where(den > 0, den, 1.0), 0.0)
        d = v - q64
        return -np.sqrt(np.einsum("ij,ij->i", d, d))

    def top(
        self,
        q: npt.NDArray[np.float32],
        k: int | None,
        metric: str,
        allowed: npt.NDArray[np.bool_] | None,
    ) -> tuple[npt.NDArray[np.int64], FloatArray]:
        """The best ``k`` subjects (positions in the index) and their exact scores, best
        first, ties by subject order; ``allowed`` (per subject) limits the candidates.

        Every row's score is first approximated with a bound on its error (the int8 scan
        for large matrices, else float32); only the rows whose upper bound reaches the
        k-th best lower bound can be among the best k, and those are re-scored exactly in
        float64 — the result is that of an exact float64 search."""
        ok_rows = None if allowed is None else np.flatnonzero(allowed[self.rows])
        n_ok = len(self.rows) if ok_rows is None else len(ok_rows)
        if n_ok == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        if k is not None and k < n_ok:
            approx, err = self._bounds(q, metric)
            if ok_rows is not None:
                approx, err = approx[ok_rows], err[ok_rows]
            lower = approx - err
            kth = np.partition(lower, n_ok - k)[n_ok - k]
            cand = np.flatnonzero(approx + err >= kth)
            rows = cand if ok_rows is None else ok_rows[cand]
        else:
            rows = np.arange(len(self.rows)) if ok_rows is None else ok_rows
        s = self.exact(q, rows, metric)
        subj = self.rows[rows]
        order = np.lexsort((subj, -s))
        if k is not None:
            order = order[:k]
        return subj[order], s[order]

    def all_scores(self, q: npt.NDArray[np.float32], metric: str) -> FloatArray:
        """Exact scores of every subject (``-inf`` for subjects without a vector)."""
        out = np.full(self.n_subjects, -np.inf)
        out[self.rows] = self.exact(q, np.arange(len(self.rows)), metric)
        return out

    def pairwise(self, metric: str) -> FloatArray:
        """N×N exact scores (cosine similarity or minus the Euclidean distance)."""
        v = self.matrix.astype(np.float64)
        if metric == "cosine":
            n = np.sqrt(np.einsum("ij,ij->i", v, v))
            u = v / np.where(n > 0, n, 1.0)[:, None]
            return np.asarray(u @ u.T)
        sq = np.einsum("ij,ij->i", v, v)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (v @ v.T), 0.0)
        np.fill_diagonal(d2, 0.0)
        return np.asarray(-np.sqrt(d2))


def balanced_alpha(l_kp: FloatArray, l_vec: FloatArray) -> float:
    """The α at which both terms of eq. 4 have the same spread over the candidates
    (α·sd(keypoint term) = (1 − α)·sd(vector term)); 0.5 when neither varies. The keypoint
    term sums over thousands of keypoints, so equal weights would let it dominate."""
    s_kp = float(np.std(l_kp)) if len(l_kp) else 0.0
    s_v = float(np.std(l_vec)) if len(l_vec) else 0.0
    if not (s_kp > 0 or s_v > 0) or not (math.isfinite(s_kp) and math.isfinite(s_v)):
        return 0.5
    return s_v / (s_kp + s_v)


def resolve_alpha(alpha: Any) -> float | None:
    """``None`` (balanced per query), a number in [0, 1], or a fitted FusionClassifier."""
    if alpha is None:
        return None
    if hasattr(alpha, "alpha_") or hasattr(alpha, "fit"):
        if not hasattr(alpha, "alpha_"):
            raise InvalidArgumentError(
                "alpha: the FusionClassifier is not fitted (fit it first, or pass a number)"
            )
        return float(alpha.alpha_)
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"alpha must be a number in [0, 1], a fitted FusionClassifier or None; got {alpha!r}"
        ) from None
    if not 0.0 <= a <= 1.0:
        raise InvalidArgumentError(f"alpha must be in [0, 1], got {a}")
    return a


# ------------------------------------------------------------------- fused (eq. 4)


def keypoint_background(n_query: int, sizes: npt.NDArray[np.int64]) -> float:
    """The uniform background of the keypoint term: the soft Jaccard of one matched
    keypoint in a union of the query's and a mean subject's keypoints, ``1 / (|A| + mean
    |B|)`` (the counterpart of eq. 6's ``+1``: an unmatched subject scores ``ln`` of it,
    not ``-inf``)."""
    return 1.0 / max(1.0, n_query + (float(np.mean(sizes)) if len(sizes) else 0.0))


def keypoint_terms(
    index: Index,
    queries: Sequence[tuple[npt.NDArray[np.uint8], int | None]],
    exact: bool,
    scheduler: Any = None,
    allowed: npt.NDArray[np.bool_] | None = None,
) -> FloatArray:
    """(Q, N) keypoint term log p({f_i} | subject j) of eq. 4 for each query (descriptors,
    the subject left out or None): ``ln(J_j + b)``, J_j the soft Jaccard of the query's
    keypoints with subject j's (the fusion paper: the first term of eq. 4 is
    proportional to the log Jaccard keypoint-signature similarity) and b
    :func:`keypoint_background`.

    J is the keypoint search's own score, from the same k-NN pass (every shard's k
    nearest, exact or kd-forest as ``exact`` says, merged by (distance, global id);
    :mod:`keyfuse.index_dask`) over the ``allowed`` subjects, so at α = 1 the fused
    ranking is the keypoint search's, bit for bit sharded or not. The per-subject
    eq. 5–7 KDE on those lists (``kf.fusion.keypoint_log_likelihoods`` with one class
    per subject) ranks subjects worse: it sums every neighbour a query keypoint has in a
    subject with a kernel that barely separates the 1st from the k-th (width 1 + dNN²)
    and divides by the subject's keypoint count, while the soft Jaccard keeps each
    keypoint's best, normalised share (see docs/decisions.md).
    """
    from keyfuse.index_dask import _knn_all, _params
    from keyfuse.index_shards import jaccard_from, merge_scores

    p = _params(index, exact)
    shards = index._engine
    offsets, stats = shards.offsets(), shards.stats()
    sizes = np.asarray(shards.sizes, np.int64)
    qs = [(np.ascontiguousarray(d, dtype=np.uint8).reshape(-1, 64), ex) for d, ex in queries]
    per = _knn_all(index, qs, allowed, p, scheduler)
    out = np.empty((len(qs), len(index)))
    for r, ((d, _), parts) in enumerate(zip(qs, per, strict=True)):
        j = jaccard_from(merge_scores(parts, offsets, stats, p), len(d), sizes)
        out[r] = np.log(j + keypoint_background(len(d), sizes))
    return out


def vector_terms(
    vm: VectorMatrix, queries: npt.NDArray[np.float32], exclude: npt.NDArray[np.int64] | None
) -> FloatArray:
    """(Q, N) log p(v | subject j) (eqs. 8–9); ``-inf`` for subjects without a vector."""
    from keyfuse.fusion import vector_log_likelihoods

    ex = None
    if exclude is not None:
        ex = np.where(exclude >= 0, vm.row_of[np.maximum(exclude, 0)], -1)
    ll = vector_log_likelihoods(
        np.atleast_2d(queries).astype(np.float64),
        vm.matrix64,
        np.arange(len(vm), dtype=np.int64),
        len(vm),
        exclude=ex,
        metric="euclidean",
    )
    out = np.full((ll.shape[0], vm.n_subjects), -np.inf)
    out[:, vm.rows] = ll
    return out
