"""Bayesian fusion of shallow (keypoint) and deep (CNN) information.

Chauvin et al., "Efficient pairwise neuroimage analysis using the soft Jaccard index and
3D keypoint sets" / "Fusion of shallow and deep features" (seed
``fusion-shallow-deep-indexing.txt``, equations 1–10):

* :class:`MIBinarizer` — eq. (10): each CNN element is binarised at the threshold that
  maximises the mutual information with the class (the entropy when every class has one
  sample).
* :func:`keypoint_log_likelihoods` / :func:`vector_log_likelihoods` — eqs. (5)–(9), the
  adaptive kernel densities, computed in the Rust core (``keyfuse._core``) in log space.
* :class:`FusionClassifier` — eq. (4): ``α log p({f_i}|C) + (1 − α) log p(v|C, T)``,
  a scikit-learn classifier whose samples are ``(KeypointSet, vector)`` pairs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from keyfuse.errors import InvalidArgumentError

if TYPE_CHECKING:
    from keyfuse.keypoints import KeypointSet

__all__ = [
    "FusionClassifier",
    "MIBinarizer",
    "keypoint_log_likelihoods",
    "log_posterior",
    "vector_log_likelihoods",
]

FloatArray = npt.NDArray[np.float64]


# --------------------------------------------------------------------------- eq. (10)


def _binary_entropy(p: FloatArray) -> FloatArray:
    """H(p) in bits, with 0·log 0 = 0."""
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(q > 0, q * np.log2(q), 0.0))
    return np.asarray(h, dtype=np.float64)


def mi_thresholds(
    X: npt.ArrayLike, y: npt.ArrayLike | None = None, *, chunk_bytes: int = 32 << 20
) -> tuple[FloatArray, FloatArray]:
    """Per column of ``X``, the threshold τ maximising H(x > τ) − H(x > τ | y) (eq. 10).

    Candidate thresholds are the midpoints between consecutive distinct values of the
    column; the first maximum wins (deterministic). Without ``y``, or when every class
    has a single sample, the conditional entropy is 0 and τ maximises the entropy (a
    median split). A constant column gets τ = its value (all zeros after ``x > τ``).

    Parameters
    ----------
    X:
        (n_samples, n_features) real values.
    y:
        (n_samples,) class labels, or ``None``.
    chunk_bytes:
        Memory budget of the vectorised per-chunk computation (default 32 MiB).

    Returns
    -------
    (thresholds, mutual_information)
        Both of shape (n_features,); the information is in bits.
    """
    x = np.asarray(X, dtype=np.float64)
    n, d = x.shape
    thresholds = np.empty(d, dtype=np.float64)
    info = np.zeros(d, dtype=np.float64)
    if n < 2 or d == 0:  # nothing to split: everything binarises to 0
        thresholds[:] = x[0] if n == 1 else 0.0
        return thresholds, info
    if y is None:
        codes = np.zeros(0, dtype=np.int64)
        counts = np.zeros(0, dtype=np.int64)
    else:
        _, inv, cnt = np.unique(np.asarray(y), return_inverse=True, return_counts=True)
        # classes with one sample have zero conditional entropy whatever τ: skip them
        multi = np.flatnonzero(cnt >= 2)
        remap = np.full(len(cnt), -1, dtype=np.int64)
        remap[multi] = np.arange(len(multi))
        codes = remap[inv.ravel()]
        counts = cnt[multi].astype(np.int64)
    n_cls = len(counts)
    split = np.arange(1, n, dtype=np.float64)  # split p: p samples at or below τ
    h_total = _binary_entropy((n - split) / n)  # (n-1,)
    per_col = max(1, n * max(n_cls, 1) * 8)
    step = max(1, min(d, chunk_bytes // per_col))
    for start in range(0, d, step):
        cols = x[:, start : start + step]
        order = np.argsort(cols, axis=0, kind="stable")
        xs = np.take_along_axis(cols, order, axis=0)
        gain = np.broadcast_to(h_total[:, None], (n - 1, cols.shape[1])).copy()
        if n_cls:
            ys = codes[order]  # (n, w)
            onehot = (ys[:, :, None] == np.arange(n_cls)[None, None, :]).astype(np.float64)
            below = np.cumsum(onehot, axis=0)[:-1]  # (n-1, w, C): class members ≤ τ
            above = counts[None, None, :] - below
            h_cond = (_binary_entropy(above / counts) * (counts / n)).sum(axis=2)
            gain -= h_cond
        valid = xs[1:] > xs[:-1]
        gain = np.where(valid, gain, -np.inf)
        best = np.argmax(gain, axis=0)
        w = np.arange(cols.shape[1])
        ok = np.isfinite(gain[best, w])
        mid = 0.5 * (xs[best, w] + xs[best + 1, w])
        thresholds[start : start + step] = np.where(ok, mid, xs[0, w])
        info[start : start + step] = np.where(ok, gain[best, w], 0.0)
    return thresholds, info


class MIBinarizer(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Binarise CNN vectors element-wise at mutual-information-optimal thresholds (eq. 10).

    ``fit(V, y)`` picks, for each element i, τ_i = argmax_τ H(v[i] > τ) − H(v[i] > τ | C)
    on the training vectors; ``transform(V)`` returns ``(V > τ)`` as uint8 0/1. With
    ``y=None`` (or one sample per class) τ_i maximises the entropy.

    Attributes
    ----------
    thresholds_ : (n_features,) float64
    mutual_information_ : (n_features,) float64, bits
    n_features_in_ : int
    """

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike | None = None) -> MIBinarizer:
        """Learn the thresholds from ``X`` (n_samples, n_features) and optional labels."""
        if y is None:
            x = validate_data(self, X, dtype=np.float64)
        else:
            x, y = validate_data(self, X, y, dtype=np.float64)
        self.thresholds_, self.mutual_information_ = mi_thresholds(x, y)
        return self

    def transform(self, X: npt.ArrayLike) -> npt.NDArray[np.uint8]:
        """Binary (uint8 0/1) version of ``X``."""
        check_is_fitted(self)
        x = validate_data(self, X, dtype=np.float64, reset=False)
        return (x > self.thresholds_).astype(np.uint8)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []  # the output is always uint8 0/1
        return tags


# ------------------------------------------------------------------- eqs. (5)–(9)


def _core() -> Any:
    from keyfuse import _core

    return _core


def _descriptors(kps: Any) -> npt.NDArray[np.uint8]:
    desc = getattr(kps, "descriptors", None)
    if desc is None:
        raise InvalidArgumentError(
            f"expected a KeypointSet (with .descriptors), got {type(kps).__name__}"
        )
    return np.ascontiguousarray(desc, dtype=np.uint8)


def _progress(it: Any, total: int, desc: str, progress: bool) -> Any:
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="query")


def keypoint_log_likelihoods(
    queries: Sequence[KeypointSet],
    train: Sequence[KeypointSet],
    train_class: npt.ArrayLike,
    n_classes: int | None = None,
    *,
    exclude: npt.ArrayLike | None = None,
    n_neighbors: int | None = None,
    checks: int | None = None,
    background: float = 1.0,
    progress: bool = False,
    device: str = "auto",
) -> FloatArray:
    """log p({f_i} | C_k) (eqs. 5–7) of each query keypoint set for each class.

    p(f_i|C_k) ∝ (1/N_k) Σ_{j∈k} exp(−‖f_i − f_j‖² / (1 + dNN_i²)) + ``background``,
    summed in log space over the query's keypoints (Rust core, rayon, deterministic).

    Parameters
    ----------
    queries, train:
        Keypoint sets (their 64-byte descriptors are used).
    train_class:
        Class index (0..n_classes-1) of each training set.
    n_classes:
        Number of classes (default ``max(train_class) + 1``).
    exclude:
        Per query, the index of a training set to ignore (leave-one-out), −1 = none.
    n_neighbors:
        Sum the kernel over each query keypoint's ``n_neighbors`` nearest training
        keypoints only (as a k-NN index would); ``None`` (default) = exact sum over all.
    checks:
        With ``n_neighbors``: find the neighbours approximately with a randomized
        kd-forest (8 trees, deterministic) examining about this many candidates per
        query keypoint (e.g. 64, FLANN's setting); ``None`` (default) = exact search.
    background:
        The uniform background term (the paper's +1), default 1.
    progress:
        Show a tqdm bar over the queries.
    device:
        ``"auto"`` (default), ``"cpu"`` or ``"cuda"``: on a GPU the exact or k-nearest
        sums run in the CUDA kernels of ``keyfuse-cuda`` (the kd-forest ``checks``
        search is CPU-only).

    Returns
    -------
    (n_queries, n_classes) float64
    """
    cls = np.ascontiguousarray(train_class, dtype=np.int64).ravel()
    if len(cls) != len(train):
        raise InvalidArgumentError(f"{len(cls)} class labels for {len(train)} training sets")
    nc = int(cls.max()) + 1 if n_classes is None and len(cls) else int(n_classes or 1)
    descs = [_descriptors(k) for k in train]
    dim = {d.shape[1] for d in descs if d.ndim == 2} or {64}
    if len(dim) != 1:
        raise InvalidArgumentError(f"training descriptors differ in length: {sorted(dim)}")
    width = dim.pop()
    tdesc = np.ascontiguousarray(
        np.concatenate([d.reshape(-1, width) for d in descs])
        if descs
        else np.zeros((0, width), np.uint8)
    )
    tsample = np.repeat(np.arange(len(descs), dtype=np.int64), [len(d) for d in descs])
    ex = None if exclude is None else np.asarray(exclude, dtype=np.int64).ravel()
    if ex is not None and len(ex) != len(queries):
        raise InvalidArgumentError(f"exclude has {len(ex)} entries for {len(queries)} queries")
    from keyfuse.device import resolve_device

    core = _core()
    gpu = (
        checks is None
        and hasattr(core, "gpu_keypoint_log_likelihood")
        and resolve_device(device) == "cuda"
    )
    out = np.empty((len(queries), nc), dtype=np.float64)
    for qi, q in _progress(enumerate(queries), len(queries), "keypoint KDE", progress):
        e = None if ex is None or ex[qi] < 0 else int(ex[qi])
        args = (_descriptors(q), tdesc, tsample, cls, nc)
        if gpu:
            out[qi] = core.gpu_keypoint_log_likelihood(
                *args, exclude_sample=e, k=n_neighbors, background=float(background)
            )
        else:
            out[qi] = core.keypoint_log_likelihood(
                *args, exclude_sample=e, k=n_neighbors, background=float(background), checks=checks
            )
    return out


def _is_binary(v: npt.NDArray[Any]) -> bool:
    return v.dtype == np.bool_ or (
        v.dtype.kind in "iu" and v.size > 0 and bool(np.all((v == 0) | (v == 1)))
    )


def vector_log_likelihoods(
    queries: npt.ArrayLike,
    train: npt.ArrayLike,
    train_class: npt.ArrayLike,
    n_classes: int | None = None,
    *,
    exclude: npt.ArrayLike | None = None,
    metric: Literal["auto", "euclidean", "hamming"] = "auto",
    background: float = 1.0,
) -> FloatArray:
    """log p(v | C_k, T) (eqs. 8–9) of each query vector for each class.

    p(v|C_k) ∝ (1/N_k) Σ_{j∈k} exp(−d(v, v_j)² / μ²) + ``background``, μ = mean distance
    from v to the training vectors. ``metric="auto"`` uses the Hamming distance for 0/1
    (bool or integer) vectors and the Euclidean distance otherwise.

    Parameters
    ----------
    queries, train:
        (Q, D) and (N, D) vectors.
    train_class:
        (N,) class index of each training vector.
    n_classes:
        Number of classes (default ``max(train_class) + 1``).
    exclude:
        Per query, a training index to ignore (leave-one-out), −1 = none.
    metric, background:
        See above; background default 1 (the paper's +1).

    Returns
    -------
    (Q, n_classes) float64
    """
    q = np.asarray(queries)
    t = np.asarray(train)
    if q.ndim != 2 or t.ndim != 2:
        raise InvalidArgumentError(
            f"vectors must be 2-D arrays, got shapes {q.shape} and {t.shape}"
        )
    cls = np.ascontiguousarray(train_class, dtype=np.int64).ravel()
    nc = int(cls.max()) + 1 if n_classes is None and len(cls) else int(n_classes or 1)
    ex = None if exclude is None else np.ascontiguousarray(exclude, dtype=np.int64).ravel()
    if metric == "auto":
        metric = "hamming" if _is_binary(q) and _is_binary(t) else "euclidean"
    core = _core()
    if metric == "hamming":
        return np.asarray(
            core.binary_log_likelihood(
                np.ascontiguousarray(q, dtype=np.uint8),
                np.ascontiguousarray(t, dtype=np.uint8),
                cls,
                nc,
                exclude=ex,
                background=float(background),
            )
        )
    if metric != "euclidean":
        raise InvalidArgumentError(f"metric must be 'auto', 'euclidean' or 'hamming': {metric!r}")
    return np.asarray(
        core.vector_log_likelihood(
            np.ascontiguousarray(q, dtype=np.float64),
            np.ascontiguousarray(t, dtype=np.float64),
            cls,
            nc,
            exclude=ex,
            background=float(background),
        )
    )


def log_posterior(scores: npt.ArrayLike) -> FloatArray:
    """Row-wise log-softmax: log p(C_k | data) from unnormalised log-likelihoods (uniform
    prior p(C|T), eq. 1)."""
    s = np.asarray(scores, dtype=np.float64)
    m = s.max(axis=1, keepdims=True)
    return np.asarray(s - (m + np.log(np.exp(s - m).sum(axis=1, keepdims=True))))


def _pooled_auc(lp: FloatArray, codes: npt.NDArray[np.int64]) -> float:
    """AUC of (sample, class) log-posteriors: true class = positive; rows whose class has
    no other training member are left out (nothing to find)."""
    from sklearn.metrics import roc_auc_score

    c = lp.shape[1]
    present = np.bincount(codes, minlength=c) >= 2
    rows = np.flatnonzero(present[codes])
    if len(rows) == 0 or c < 2:
        return float("nan")
    lab = np.zeros((len(rows), c), dtype=bool)
    lab[np.arange(len(rows)), codes[rows]] = True
    return float(roc_auc_score(lab.ravel(), lp[rows].ravel()))


def alpha_grid(l_kp: FloatArray, l_vec: FloatArray, n: int = 25) -> FloatArray:
    """Candidate α for eq. (4): 0, 1 and values spread on a log scale around the ratio
    that gives both terms the same spread (their scales differ by orders of magnitude:
    the keypoint term sums over thousands of keypoints)."""
    s_kp = float(np.std(l_kp - l_kp.mean(axis=1, keepdims=True)))
    s_v = float(np.std(l_vec - l_vec.mean(axis=1, keepdims=True)))
    base = s_v / s_kp if s_kp > 0 and s_v > 0 else 1.0
    ratios = base * np.logspace(-2.0, 2.0, max(n - 2, 1))
    return np.concatenate([[0.0], ratios / (1.0 + ratios), [1.0]])


def select_alpha(
    l_kp: FloatArray,
    l_vec: FloatArray,
    codes: npt.ArrayLike,
    alphas: npt.ArrayLike | None = None,
) -> tuple[float, FloatArray, FloatArray]:
    """Pick α by cross-validation from leave-one-out log-likelihood matrices.

    Parameters
    ----------
    l_kp, l_vec:
        (n, C) leave-one-out log-likelihoods of each training sample for each class.
    codes:
        (n,) true class index of each sample.
    alphas:
        Candidates (default :func:`alpha_grid`).

    Returns
    -------
    (best α, candidates, pooled AUC of each candidate)
    """
    y = np.asarray(codes, dtype=np.int64)
    cand = alpha_grid(l_kp, l_vec) if alphas is None else np.asarray(alphas, dtype=np.float64)
    aucs = np.array([_pooled_auc(log_posterior(a * l_kp + (1.0 - a) * l_vec), y) for a in cand])
    if np.all(np.isnan(aucs)):
        return 0.5, cand, aucs
    # several α often tie (e.g. once one term dominates): take the middle of the tied
    # candidates, the choice least sensitive to the grid
    best = np.flatnonzero(aucs >= np.nanmax(aucs) - 1e-12)
    return float(cand[best[len(best) // 2]]), cand, aucs


# ---------------------------------------------------------------------- eq. (4)


def _is_keypoint_set(obj: Any) -> bool:
    return hasattr(obj, "descriptors") and hasattr(obj, "scale")


def _split_samples(X: Any) -> tuple[list[Any] | None, Any]:
    """(keypoint sets or None, vectors or None) from the accepted sample forms."""
    if isinstance(X, np.ndarray) and X.dtype != object:
        return None, X
    if isinstance(X, (str, bytes)):
        raise InvalidArgumentError(
            "samples must be a sequence of (KeypointSet, vector) pairs, of KeypointSets, "
            f"or a 2-D array of vectors; got {type(X).__name__}"
        )
    if not isinstance(X, Sequence):
        return None, X  # array-likes (sparse, dataframes): scikit-learn's checks decide
    items = list(X)
    if not items:
        raise InvalidArgumentError("no samples given (0 samples)")
    if all(_is_keypoint_set(s) for s in items):
        return items, None
    if all(isinstance(s, tuple) and len(s) == 2 for s in items):
        kps = [s[0] for s in items]
        vecs = [s[1] for s in items]
        has_k = [k is not None for k in kps]
        has_v = [v is not None for v in vecs]
        if len(set(has_k)) > 1 or len(set(has_v)) > 1:
            raise InvalidArgumentError("every sample must carry the same parts (kps, vector)")
        if has_k[0] and not all(_is_keypoint_set(k) for k in kps):
            raise InvalidArgumentError("the first element of each pair must be a KeypointSet")
        return (kps if has_k[0] else None), (
            np.stack([np.asarray(v).ravel() for v in vecs]) if has_v[0] else None
        )
    # a list of lists of numbers: vectors
    return None, items


class FusionClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Memory-based classifier fusing keypoint and CNN likelihoods (eq. 4).

    ``log p(C | {f_i}, v, T) ∝ α log p({f_i}|C) + (1 − α) log p(v|C, T)``, with the
    adaptive kernel densities of eqs. (5)–(9) over the training samples and a uniform
    class prior.

    Samples (``X``) are a sequence of ``(KeypointSet, vector)`` pairs; a sequence of
    KeypointSets (keypoints only, α = 1) or a 2-D array of vectors (vectors only, α = 0)
    also work.

    Parameters
    ----------
    alpha:
        Weight of the keypoint term in [0, 1], or ``"auto"`` (default) to pick it by
        leave-one-out cross-validation on the training set (pooled AUC of the posterior).
    binarize:
        Binarise the vectors with :class:`MIBinarizer` fitted on the training set, and
        compare them with the Hamming distance (default False).
    n_neighbors:
        Sum the keypoint kernel (eq. 7) over each query keypoint's k nearest training
        keypoints (default 5, as the paper's kd-tree evaluation does); ``None`` = exact
        sum over all training keypoints, where thousands of unrelated keypoints (each
        contributing ~e^-2 under the adaptive width) drown the few true matches — family
        AUC 0.57 instead of 0.85 on the simulated cohort.
    checks:
        Approximate neighbour search with a kd-forest examining about this many
        candidates per keypoint (``None``, default: exact brute force); see
        :func:`keypoint_log_likelihoods`.
    background:
        The uniform background density of both kernels (the paper's +1), default 1.0.
    progress:
        Show progress bars over queries (default False).
    device:
        Where the keypoint term runs: ``"auto"`` (default), ``"cpu"`` or ``"cuda"``.

    Attributes
    ----------
    classes_, alpha_, binarizer_ (or None), cv_alphas_, cv_scores_, n_features_in_
    (vector length; 0 without vectors), fit_time_.
    """

    def __init__(
        self,
        alpha: float | Literal["auto"] = "auto",
        *,
        binarize: bool = False,
        n_neighbors: int | None = 5,
        checks: int | None = None,
        background: float = 1.0,
        progress: bool = False,
        device: str = "auto",
    ) -> None:
        self.alpha = alpha
        self.binarize = binarize
        self.n_neighbors = n_neighbors
        self.checks = checks
        self.background = background
        self.progress = progress
        self.device = device

    # -- input handling --------------------------------------------------------------

    def _parts(self, X: Any, *, reset: bool) -> tuple[list[Any] | None, Any]:
        kps, vecs = _split_samples(X)
        if vecs is not None:
            vecs = validate_data(self, vecs, reset=reset, dtype=None)
            if vecs.dtype.kind not in "biuf":
                vecs = vecs.astype(np.float64)
        elif reset:
            self.n_features_in_ = 0
        if not reset:
            if (kps is None) != (self._train_kps is None) or (vecs is None) != (
                self._train_vec is None
            ):
                raise InvalidArgumentError(
                    "samples must carry the same parts (keypoints and/or vectors) as the "
                    "training samples"
                )
        return kps, vecs

    def _check_params(self) -> None:
        a = self.alpha
        if not (a == "auto" or (isinstance(a, (int, float)) and 0.0 <= float(a) <= 1.0)):
            raise InvalidArgumentError(f"alpha must be 'auto' or a number in [0, 1], not {a!r}")
        if not (math.isfinite(float(self.background)) and float(self.background) > 0):
            raise InvalidArgumentError(f"background must be > 0, not {self.background!r}")
        if self.checks is not None and int(self.checks) < 1:
            raise InvalidArgumentError(f"checks must be ≥ 1 or None: {self.checks}")
        if self.n_neighbors is not None and int(self.n_neighbors) < 1:
            raise InvalidArgumentError(f"n_neighbors must be ≥ 1 or None: {self.n_neighbors}")

    # -- likelihood terms ------------------------------------------------------------

    def _kp_ll(self, kps: Sequence[Any], exclude: npt.ArrayLike | None = None) -> FloatArray:
        assert self._train_kps is not None
        return keypoint_log_likelihoods(
            kps,
            self._train_kps,
            self._codes,
            len(self.classes_),
            exclude=exclude,
            n_neighbors=self.n_neighbors,
            checks=self.checks,
            background=self.background,
            progress=self.progress,
            device=self.device,
        )

    def _vec_ll(self, vecs: npt.NDArray[Any], exclude: npt.ArrayLike | None = None) -> FloatArray:
        if self.binarizer_ is not None and exclude is None:
            vecs = self.binarizer_.transform(vecs)
        return vector_log_likelihoods(
            vecs,
            self._train_vec,
            self._codes,
            len(self.classes_),
            exclude=exclude,
            background=self.background,
        )

    # -- scikit-learn API ------------------------------------------------------------

    def fit(self, X: Any, y: npt.ArrayLike) -> FusionClassifier:
        """Store the training samples (and fit the binariser / choose α).

        Parameters
        ----------
        X:
            Training samples (see the class docstring).
        y:
            (n_samples,) class labels.
        """
        t0 = time.perf_counter()
        self._check_params()
        kps, vecs = self._parts(X, reset=True)
        n = len(kps) if kps is not None else len(vecs)
        y_arr = column_or_1d(y, warn=True)
        if len(y_arr) != n:
            raise InvalidArgumentError(f"{len(y_arr)} labels for {n} samples")
        check_classification_targets(y_arr)
        self.classes_, codes = np.unique(y_arr, return_inverse=True)
        self._codes = codes.astype(np.int64).ravel()
        self._train_kps = list(kps) if kps is not None else None
        self.binarizer_: MIBinarizer | None = None
        if vecs is not None and self.binarize:
            self.binarizer_ = MIBinarizer().fit(vecs, y_arr)
            vecs = self.binarizer_.transform(vecs)
        self._train_vec = vecs
        self.cv_alphas_ = np.zeros(0)
        self.cv_scores_ = np.zeros(0)
        if kps is None:
            self.alpha_ = 0.0
        elif vecs is None:
            self.alpha_ = 1.0
        elif self.alpha != "auto":
            self.alpha_ = float(self.alpha)
        else:
            loo = np.arange(n)
            l_kp = self._kp_ll(kps, exclude=loo)
            l_v = self._vec_ll(vecs, exclude=loo)
            self.alpha_, self.cv_alphas_, self.cv_scores_ = select_alpha(l_kp, l_v, self._codes)
        self.fit_time_ = time.perf_counter() - t0
        return self

    def joint_log_likelihood(self, X: Any) -> FloatArray:
        """(n, n_classes) α·log p({f_i}|C) + (1−α)·log p(v|C,T) (unnormalised eq. 4)."""
        check_is_fitted(self)
        kps, vecs = self._parts(X, reset=False)
        total: FloatArray | None = None
        if kps is not None and self.alpha_ > 0.0:
            total = self.alpha_ * self._kp_ll(kps)
        if vecs is not None and self.alpha_ < 1.0:
            part = (1.0 - self.alpha_) * self._vec_ll(vecs)
            total = part if total is None else total + part
        if total is None:  # α excludes the only source present: uniform posterior
            n = len(kps) if kps is not None else len(vecs)
            total = np.zeros((n, len(self.classes_)))
        return total

    def predict_log_proba(self, X: Any) -> FloatArray:
        """(n, n_classes) log posterior (eq. 1 with a uniform prior)."""
        return log_posterior(self.joint_log_likelihood(X))

    def predict_proba(self, X: Any) -> FloatArray:
        """(n, n_classes) posterior probabilities, columns in ``classes_`` order."""
        return np.exp(self.predict_log_proba(X))

    def decision_function(self, X: Any) -> FloatArray:
        """Log posteriors (n, n_classes); for two classes the (n,) log-odds of
        ``classes_[1]``."""
        lp = self.predict_log_proba(X)
        if len(self.classes_) == 2:
            return np.asarray(lp[:, 1] - lp[:, 0])
        return lp

    def predict(self, X: Any) -> npt.NDArray[Any]:
        """The class of highest posterior for each sample."""
        check_is_fitted(self)
        return np.asarray(self.classes_[np.argmax(self.joint_log_likelihood(X), axis=1)])

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.non_deterministic = False
        return tags


# ------------------------------------------------------------------ the experiment


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
    timings : seconds per stage (``extract3d``, ``align``, ``resample``, ``extract2d``,
        ``cnn``).
    """

    table: list[dict[str, Any]]
    kps3d: list[Any]
    kps2d: list[Any]
    vectors: npt.NDArray[np.float32]
    transforms: list[FloatArray]
    align_ok: list[bool]
    timings: dict[str, float]


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


def _atlas_ncc(image: Any, matrix: FloatArray, atlas: Any) -> float:
    """Normalised correlation between the atlas and the image resampled through
    ``matrix`` on the atlas's three central orthogonal planes."""
    from keyfuse.cnn import resample_planes

    a_parts, b_parts = [], []
    for axis in range(3):
        mid = (atlas.shape[axis] - 1) // 2
        (plane,) = resample_planes(image, matrix, atlas, axis, [mid])
        a_parts.append(np.take(np.asarray(atlas.data, np.float64), mid, axis=axis).ravel())
        b_parts.append(plane.astype(np.float64).ravel())
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


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
        back to the identity when the result fails a sanity check (scale outside
        [0.75, 1.33], fewer than 4 inliers, or a worse correlation with the atlas on
        the three central planes than the identity gives); ``"truth"``: the simulator's known pose
        (an oracle, for comparison); ``"none"``: no normalisation.
    device, extract_params:
        Passed to ``kf.extract`` (and ``kf.align``).
    progress:
        tqdm progress bars.
    """
    import json

    from tqdm.auto import tqdm

    from keyfuse.cnn import CNNFeatures, _axial_axis, resample_planes
    from keyfuse.datasets import mni152
    from keyfuse.extraction import extract
    from keyfuse.image import Image
    from keyfuse.matching import align

    params = dict(extract_params or {})
    first = cohort.image(0)
    if atlas is None:
        atlas = mni152(resolution_mm=float(np.min(first.spacing)))
    cnn = cnn or CNNFeatures(device=device, atlas=atlas)
    timings = dict.fromkeys(("extract3d", "align", "resample", "extract2d", "cnn"), 0.0)
    atlas_kps = extract(atlas, device=device, **params) if transform_source == "align" else None
    axis = _axial_axis(atlas.affine)
    mid = (atlas.shape[axis] - 1) // 2
    kps3d, kps2d, slices, transforms, ok = [], [], [], [], []
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
                good = 0.75 <= al.scale <= 1.33 and al.n_inliers >= 4
                # a verification step: keep the keypoint transform only when it matches
                # the atlas better than no transform at all (normalised correlation of
                # the three central planes)
                good = good and _atlas_ncc(img, al.matrix, atlas) > _atlas_ncc(
                    img, np.eye(4), atlas
                )
                mat = al.matrix if good else np.eye(4)
            except InvalidArgumentError:
                good = False
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
        kps3d.append(k3)
        kps2d.append(k2)
        slices.append(np.asarray(sl.data))
        transforms.append(np.asarray(mat, dtype=np.float64))
        ok.append(bool(good))
    t0 = time.perf_counter()
    vectors = cnn.batch(slices, progress=progress)
    timings["cnn"] = time.perf_counter() - t0
    return CohortFeatures(
        table=list(cohort.table),
        kps3d=kps3d,
        kps2d=kps2d,
        vectors=vectors,
        transforms=transforms,
        align_ok=ok,
        timings=timings,
    )


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
        best = np.flatnonzero(aucs >= np.nanmax(aucs) - 1e-12) if np.any(np.isfinite(aucs)) else [0]
        a = float(grid[best[len(best) // 2]])
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


def _make_command() -> Any:
    import click

    @click.command(name="fusion")
    @click.option(
        "--cohort",
        "cohort_dir",
        type=click.Path(exists=True, file_okay=False),
        default=None,
        help="An existing cohort directory (else one is simulated).",
    )
    @click.option(
        "--out",
        "out_dir",
        type=click.Path(file_okay=False),
        default="fusion-output",
        show_default=True,
        help="Directory for the ROC and scatter PNGs.",
    )
    @click.option("--families", default=10, show_default=True, help="Simulated families.")
    @click.option("--family-size", default=4, show_default=True, help="Scans per family.")
    @click.option("--resolution", default=1.5, show_default=True, help="Voxel size (mm).")
    @click.option("--seed", default=0, show_default=True)
    @click.option(
        "--transform",
        "transform_source",
        type=click.Choice(["align", "truth", "none"]),
        default="align",
        show_default=True,
        help="Spatial normalisation: keypoint alignment, the simulator's known "
        "pose (oracle), or none.",
    )
    @click.option(
        "--neighbors",
        "n_neighbors",
        type=int,
        default=5,
        show_default=True,
        help="Keypoint kernel over the k nearest training keypoints (0: all, exact eq. 7).",
    )
    @click.option(
        "--checks",
        type=int,
        default=0,
        show_default=True,
        help="Approximate keypoint neighbours with a kd-forest (e.g. 64); 0 = exact.",
    )
    @click.option(
        "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
    )
    @click.option("--quiet", is_flag=True, help="No progress bars.")
    def fusion(
        cohort_dir: str | None,
        out_dir: str,
        families: int,
        family_size: int,
        resolution: float,
        seed: int,
        transform_source: Literal["align", "truth", "none"],
        n_neighbors: int,
        checks: int,
        device: str,
        quiet: bool,
    ) -> None:
        """Fuse 3D/2D keypoints with (binarized) CNN vectors: leave-one-out family
        identification and group classification, printed as the fusion paper's
        Table 1, with ROC curves and the shallow-vs-deep scatter saved as PNGs.

        \b
        Examples:
          keyfuse evaluate fusion                       # 10 families x 4, 1.5 mm
          keyfuse evaluate fusion --cohort small/ --out fig/
        """
        res = run_experiment(
            cohort_dir,
            out_dir=out_dir,
            n_families=families,
            family_size=family_size,
            resolution_mm=resolution,
            seed=seed,
            transform_source=transform_source,
            n_neighbors=n_neighbors or None,
            checks=checks or None,
            device=device,
            progress=not quiet,
        )
        click.echo(report(res))

    return fusion


fusion_command = _make_command()
