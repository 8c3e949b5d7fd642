"""Which scan to label next: active learning over an :class:`~keyfuse.Index`.

The retrieval and active-learning lecture's loop: fit a classifier on the subjects
labelled so far, ask for the labels of the unlabelled subjects that would teach it most,
refit, repeat. :func:`suggest` ranks the unlabelled subjects by

``score = H(p(C | subject)) / log(n_classes) × density(subject)``

* **uncertainty**: the entropy of the current classifier's posterior (the index's
  :class:`~keyfuse.fusion.FusionClassifier` for the label, the one
  ``restrict={label: "predicted"}`` uses, fitted on the labelled subjects). Its
  log-likelihoods are first divided by the temperature that minimises the leave-one-out
  cross-entropy of the labelled subjects (against Laplace-smoothed targets), so the
  posterior is neither near uniform (the kernels' background and the sums over thousands
  of keypoints flatten it) nor one-hot;
* **representativeness**: the subject's mean similarity to every other indexed subject
  (labelled or not), scaled to a maximum of 1: a Gaussian kernel of the vectors'
  Euclidean distances (bandwidth: the median distance), or the symmetric soft-Jaccard of
  the keypoints. An outlier is uncertain too, but labelling it teaches little.

:func:`suggest` takes the ranking's first and then, for a batch, each next subject after
discounting those similar to the ones already chosen. Ties are broken by subject order, so
the ranking is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from keyfuse.errors import InvalidArgumentError

if TYPE_CHECKING:
    from keyfuse.index import Index

__all__ = ["Suggestion", "density", "rank", "similarity", "suggest"]

FloatArray = npt.NDArray[np.float64]
By = Literal["auto", "keypoints", "vector", "fused"]


@dataclass(frozen=True)
class Suggestion:
    """One unlabelled subject's place in the ranking.

    Attributes
    ----------
    subject : str
        The subject id.
    score : float
        ``uncertainty × density`` (higher = label it sooner).
    uncertainty : float
        Posterior entropy divided by ``log(n_classes)``, in [0, 1].
    density : float
        Representativeness in (0, 1] (1 = the most central subject of the index).
    """

    subject: str
    score: float
    uncertainty: float
    density: float


def _parts(index: Index, by: str) -> str:
    if by not in ("auto", "keypoints", "vector", "fused"):
        raise InvalidArgumentError(
            f"by must be 'auto', 'keypoints', 'vector' or 'fused'; got {by!r}"
        )
    have_all = all(v is not None for v in index._vectors)
    if by == "auto":
        return "vector" if have_all and len(index) else "keypoints"
    if by != "keypoints" and not have_all:
        missing = sum(v is None for v in index._vectors)
        raise InvalidArgumentError(
            f"by={by!r} needs a vector for every subject; {missing} of the {len(index)} "
            "have none (add them with vector=..., or use by='keypoints')"
        )
    return by


def similarity(index: Index, by: str = "auto") -> FloatArray:
    """Pairwise similarity of the indexed subjects in [0, 1] (1 on the diagonal), the
    kernel behind :func:`density` and the batch diversity of :func:`suggest`.

    Parameters
    ----------
    index : Index
        The subjects.
    by : {"auto", "keypoints", "vector", "fused"}, default="auto"
        ``"vector"`` and ``"fused"``: Gaussian kernel of the Euclidean distances between
        CNN vectors (bandwidth: the median distance); ``"keypoints"``: symmetric
        soft-Jaccard. ``"auto"``: vectors when every subject has one.

    Returns
    -------
    (n_subjects, n_subjects) float64
    """
    parts = _parts(index, by)
    n = len(index)
    if n < 2:
        return np.ones((n, n))
    if parts == "keypoints":
        sim = np.asarray(index.pairwise(symmetric=True, by="keypoints"), dtype=np.float64)
        return np.clip(sim, 0.0, 1.0)
    d = -np.asarray(index.pairwise(by="vector", metric="euclidean"), dtype=np.float64)
    off = d[~np.eye(n, dtype=bool)]
    h = float(np.median(off))
    h = h if h > 0 else (float(off.max()) if off.max() > 0 else 1.0)
    return np.asarray(np.exp(-0.5 * (d / h) ** 2))


def density(index: Index, by: str = "auto") -> FloatArray:
    """Representativeness of every subject (subject order): its mean :func:`similarity`
    to the other subjects, scaled to a maximum of 1.

    Parameters
    ----------
    index : Index
        The subjects.
    by : {"auto", "keypoints", "vector", "fused"}, default="auto"
        See :func:`similarity`.

    Returns
    -------
    (n_subjects,) float64
    """
    return _density(similarity(index, by))


def _density(sim: FloatArray) -> FloatArray:
    n = len(sim)
    if n < 2:
        return np.ones(n)
    off_diag = ~np.eye(n, dtype=bool)
    dens = (sim * off_diag).sum(axis=1) / (n - 1)
    top = float(dens.max())
    return dens / top if top > 0 else np.ones(n)


def _log_softmax(s: FloatArray) -> FloatArray:
    m = s.max(axis=1, keepdims=True)
    return np.asarray(s - (m + np.log(np.exp(s - m).sum(axis=1, keepdims=True))))


def _temperature(loo: FloatArray, codes: npt.NDArray[np.int64]) -> float:
    """The divisor of the log-likelihoods that minimises the leave-one-out cross-entropy
    of the labelled subjects against Laplace-smoothed targets (the true class
    1 − 1/(n + 2), the rest shared by the other classes), so that a training set the
    classifier separates perfectly does not drive the temperature to 0 (every posterior
    one-hot, every entropy 0). Rows whose class has no other labelled member are left
    out; 1 when nothing is left to fit."""
    n_classes = loo.shape[1]
    present = np.bincount(codes, minlength=n_classes) >= 2
    rows = np.flatnonzero(present[codes])
    if len(rows) == 0:
        return 1.0
    centred = loo[rows] - loo[rows].mean(axis=1, keepdims=True)
    spread = float(np.std(centred))
    if not np.isfinite(spread) or spread <= 0:
        return 1.0
    eps = 1.0 / (len(rows) + 2)
    target = np.full((len(rows), n_classes), eps / (n_classes - 1))
    target[np.arange(len(rows)), codes[rows]] = 1.0 - eps
    grid = spread * np.logspace(-3.0, 2.0, 61)
    loss = [-float((target * _log_softmax(loo[rows] / t)).sum(axis=1).mean()) for t in grid]
    return float(grid[int(np.argmin(loss))])  # the first minimum: deterministic


def _features(index: Index, rows: list[int], parts: str) -> Any:
    ids = index.subjects
    if parts == "keypoints":
        return [index.keypoints(ids[i]) for i in rows]
    vecs = np.stack([np.asarray(index._vectors[i], dtype=np.float64).ravel() for i in rows])
    if parts == "vector":
        return vecs
    return [(index.keypoints(ids[i]), v) for i, v in zip(rows, vecs, strict=True)]


def _loo_log_likelihoods(clf: Any, X: Any, parts: str) -> FloatArray:
    """(n, C) leave-one-out joint log-likelihoods of the classifier's own training set."""
    from keyfuse.fusion import _split_samples

    kps, vecs = _split_samples(X)
    loo = np.arange(len(kps) if kps is not None else len(vecs))
    total = np.zeros((len(loo), len(clf.classes_)))
    if kps is not None and clf.alpha_ > 0.0:
        total += clf.alpha_ * clf._kp_ll(kps, exclude=loo)
    if vecs is not None and clf.alpha_ < 1.0:
        total += (1.0 - clf.alpha_) * clf._vec_ll(np.asarray(vecs, dtype=np.float64), exclude=loo)
    return total


def rank(index: Index, label: str, *, by: By = "auto") -> list[Suggestion]:
    """Every unlabelled subject, most worth labelling first (see the module docstring).

    Parameters
    ----------
    index : Index
        Subjects, some carrying ``label`` (at least two classes among them).
    label : str
        The label to learn.
    by : {"auto", "keypoints", "vector", "fused"}, default="auto"
        What the classifier and the density use: ``"auto"`` = the CNN vectors when every
        subject has one, else the keypoints.

    Returns
    -------
    list of Suggestion
        Unlabelled subjects by decreasing score, ties by subject order.

    Raises
    ------
    InvalidArgumentError
        No subject carries ``label``, fewer than two classes are labelled, or ``by``
        needs vectors that are missing.
    """
    return _ranked(index, label, by)[0]


def _ranked(index: Index, label: str, by: str) -> tuple[list[Suggestion], FloatArray]:
    """(:func:`rank`'s list, the subjects' similarity matrix)."""
    parts = _parts(index, by)
    values = index.label(label)
    labelled = [i for i, v in enumerate(values) if v is not None]
    if not labelled:
        names = sorted({k for lab in index._labels for k in lab})
        raise InvalidArgumentError(
            f"no subject carries the label {label!r}; labels in the index: "
            f"{names or 'none (add them with labels=...)'}"
        )
    classes = sorted({str(values[i]) for i in labelled})
    if len(classes) < 2:
        raise InvalidArgumentError(
            f"suggesting subjects to label needs labelled subjects of at least 2 classes "
            f"of {label!r}; the index has {len(labelled)} labelled subject(s) of class "
            f"{classes[0]!r}"
        )
    pool = [i for i, v in enumerate(values) if v is None]
    if not pool:
        return [], np.ones((len(index), len(index)))
    clf = index._classifiers.classifier(index, label, parts)
    x_train = _features(index, labelled, parts)
    codes = np.searchsorted(clf.classes_, np.asarray([values[i] for i in labelled]))
    t = _temperature(_loo_log_likelihoods(clf, x_train, parts), codes.astype(np.int64))
    lp = _log_softmax(clf.joint_log_likelihood(_features(index, pool, parts)) / t)
    n_classes = lp.shape[1]
    entropy = -(np.exp(lp) * lp).sum(axis=1) / np.log(n_classes)
    entropy = np.clip(entropy, 0.0, 1.0)
    sim = similarity(index, parts)
    dens = _density(sim)[pool]
    score = entropy * dens
    order = np.lexsort((np.asarray(pool), -score))
    ids = index.subjects
    ranking = [
        Suggestion(ids[pool[j]], float(score[j]), float(entropy[j]), float(dens[j])) for j in order
    ]
    return ranking, sim


def suggest(index: Index, label: str, n: int = 1, *, by: By = "auto") -> list[str]:
    """The ``n`` unlabelled subjects to label next (most useful first).

    The first is :func:`rank`'s first; each next one is the best of the rest after every
    score has been multiplied by ``1 − similarity`` to the subjects already suggested
    (:func:`similarity`), so one batch does not spend its labels on near-duplicates (twins,
    rescans) that would teach the classifier the same thing.

    Parameters
    ----------
    index : Index
        Subjects, some carrying ``label`` (at least two classes among them); the others
        are the candidates.
    label : str
        The label to learn.
    n : int, default=1
        How many to suggest (fewer when fewer subjects are unlabelled).
    by : {"auto", "keypoints", "vector", "fused"}, default="auto"
        See :func:`rank`.

    Returns
    -------
    list of str
        Subject ids.

    Examples
    --------
    >>> kf.active.suggest(index, "diagnosis", 5)
    ['sub-017', 'sub-003', ...]
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidArgumentError(f"n must be an integer ≥ 1, got {n!r}")
    ranking, sim = _ranked(index, label, by)
    pos = {sid: i for i, sid in enumerate(index.subjects)}
    cand = np.asarray([pos[s.subject] for s in ranking], dtype=np.int64)
    score = np.asarray([s.score for s in ranking], dtype=np.float64)
    chosen: list[int] = []
    for _ in range(min(int(n), len(cand))):
        j = int(np.argmax(score))  # the first of equal scores: rank's order
        chosen.append(j)
        score = score * (1.0 - sim[cand[j], cand])
        score[chosen] = -np.inf
    return [ranking[j].subject for j in chosen]
