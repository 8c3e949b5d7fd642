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
  keypoint term by eqs. 5–7 over the index's descriptors (the same k nearest neighbours
  per query keypoint as the soft-Jaccard search), the vector term by eqs. 8–9.
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

__all__ = ["BY", "METRICS", "VectorMatrix", "balanced_alpha", "check_vector"]

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
        self.sq = np.einsum("ij,ij->i", self.matrix, self.matrix, dtype=np.float32)
        norms = np.sqrt(self.sq)
        self.inv_norm = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0).astype(
            np.float32
        )

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
    def _fast(self, q: npt.NDArray[np.float32], metric: str) -> npt.NDArray[np.float32]:
        """float32 scores of every row (higher = better), for candidate selection."""
        if metric == "cosine":
            n = np.float32(np.linalg.norm(q))
            unit = (q / n if n > 0 else q).astype(np.float32, copy=False)
            return np.asarray((self.matrix @ unit) * self.inv_norm, dtype=np.float32)
        # −‖v − q‖² up to the constant ‖q‖²: 2 q·v − ‖v‖²
        return np.asarray(np.float32(2.0) * (self.matrix @ q) - self.sq, dtype=np.float32)

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
        first, ties by subject order; ``allowed`` (per subject) limits the candidates."""
        ok_rows = (
            np.arange(len(self.rows)) if allowed is None else np.flatnonzero(allowed[self.rows])
        )
        if len(ok_rows) == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        fast = self._fast(q, metric)
        if allowed is not None:
            fast = fast[ok_rows]
        if k is not None and k < len(ok_rows):
            # the k-th best float32 score, then every candidate within rounding of it
            kth = np.partition(-fast, k - 1)[k - 1]
            tol = 1e-4 * (abs(float(kth)) + float(np.abs(fast).max()) * 1e-2 + 1e-12)
            cand = np.flatnonzero(-fast <= kth + tol)
        else:
            cand = np.arange(len(ok_rows))
        rows = ok_rows[cand]
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


class FusedTerms:
    """The per-subject log-likelihood terms of eq. 4 over one index (cached descriptors,
    one class per subject)."""

    def __init__(self, index: Index) -> None:
        engine = index._engine
        self.n = len(index)
        self.descriptors = np.ascontiguousarray(engine.descriptors(), dtype=np.uint8)
        sizes = np.asarray(engine.sizes(), dtype=np.int64)
        self.sample = np.repeat(np.arange(self.n, dtype=np.int64), sizes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.classes = np.arange(self.n, dtype=np.int64)
        self.k = int(index.k)
        # exact k-NN always: the engine's kd-forest is not reachable from here, and a
        # forest rebuilt per query costs ~15× an exact search (docs/decisions.md)
        self.checks: int | None = None

    def subject(self, i: int) -> npt.NDArray[np.uint8]:
        """Subject ``i``'s descriptors."""
        return self.descriptors[self.offsets[i] : self.offsets[i + 1]]

    def keypoint(self, desc: npt.NDArray[np.uint8], exclude: int | None) -> FloatArray:
        """log p({f_i} | subject j) for every subject j (eqs. 5–7)."""
        from keyfuse import _core

        if len(self.descriptors) == 0:
            return np.zeros(self.n)
        return np.asarray(
            _core.keypoint_log_likelihood(
                np.ascontiguousarray(desc, dtype=np.uint8),
                self.descriptors,
                self.sample,
                self.classes,
                self.n,
                exclude_sample=exclude,
                k=self.k,
                background=1.0,
                checks=self.checks,
            )
        )


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
