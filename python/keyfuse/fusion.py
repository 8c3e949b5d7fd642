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

import math
import time
from collections.abc import Sequence
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
    "alpha_grid",
    "keypoint_log_likelihoods",
    "log_posterior",
    "mi_thresholds",
    "pick_alpha",
    "select_alpha",
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
    from keyfuse.device import runs_on_gpu

    core = _core()
    gpu = runs_on_gpu(device, k=n_neighbors, exact=checks is None, operation="keypoint_kde")
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
    kernels = {
        "hamming": (core.binary_log_likelihood, np.uint8),
        "euclidean": (core.vector_log_likelihood, np.float64),
    }
    if metric not in kernels:
        raise InvalidArgumentError(f"metric must be 'auto', 'euclidean' or 'hamming': {metric!r}")
    kernel, dtype = kernels[metric]
    return np.asarray(
        kernel(
            np.ascontiguousarray(q, dtype=dtype),
            np.ascontiguousarray(t, dtype=dtype),
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
    return pick_alpha(cand, aucs), cand, aucs


def pick_alpha(alphas: npt.ArrayLike, scores: npt.ArrayLike, *, undecided: float = 0.5) -> float:
    """The candidate α of highest score (the tie rule of :func:`select_alpha`).

    Several α often tie (e.g. once one term dominates): the middle of the tied candidates
    wins, the choice least sensitive to the grid.

    Parameters
    ----------
    alphas : array-like of float
        The candidates.
    scores : array-like of float
        One score per candidate (higher is better; NaN = undefined).
    undecided : float, default=0.5
        Returned when no score is defined.
    """
    cand = np.asarray(alphas, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if np.all(np.isnan(s)):
        return float(undecided)
    best = np.flatnonzero(s >= np.nanmax(s) - 1e-12)
    return float(cand[best[len(best) // 2]])


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
        compare them with the Hamming distance (default False). The ``"auto"`` α search
        refits the binariser inside each leave-one-out fold, without the held-out sample.
    n_neighbors:
        Sum the keypoint kernel (eq. 7) over each query keypoint's k nearest training
        keypoints (default 5, as the paper's kd-tree evaluation does); ``None`` = exact
        sum over all training keypoints, where thousands of unrelated keypoints (each
        contributing ~e^-2 under the adaptive width) drown the few true matches (see
        docs/decisions.md).
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

    def _loo_binary_vec_ll(self, raw: npt.NDArray[Any], y: npt.NDArray[Any]) -> FloatArray:
        """Leave-one-out log p(v|C,T) of each training vector with the binariser refitted
        on the other samples only: thresholds chosen with the held-out sample's own label
        would leak it into the α search."""
        n = len(raw)
        out = np.empty((n, len(self.classes_)), dtype=np.float64)
        keep = np.ones(n, dtype=bool)
        for i in range(n):
            keep[i] = False
            b = MIBinarizer().fit(raw[keep], y[keep])
            out[i] = vector_log_likelihoods(
                b.transform(raw[i : i + 1]),
                b.transform(raw),
                self._codes,
                len(self.classes_),
                exclude=[i],
                background=self.background,
            )[0]
            keep[i] = True
        return out

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
        raw_vecs = vecs
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
            l_v = (
                self._loo_binary_vec_ll(raw_vecs, y_arr)
                if self.binarizer_ is not None
                else self._vec_ll(vecs, exclude=loo)
            )
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
        """(n, n_classes) posteriors of eq. 1 (uniform prior), columns in ``classes_``
        order: a score for ranking and thresholding, not a calibrated probability.

        The kernel densities carry a uniform background (the paper's +1) and the
        α-weighted log-likelihoods are summed over many keypoints, so the posteriors are
        often close to uniform even where every prediction is right: compare them with
        each other (AUC, arg-max) rather than reading them as frequencies. For calibrated
        probabilities wrap the classifier:
        ``sklearn.calibration.CalibratedClassifierCV(FusionClassifier(...), cv=3)``.
        """
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
