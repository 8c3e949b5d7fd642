"""Class prediction for class-restricted retrieval (``restrict={"label": "predicted"}``).

A :class:`~keyfuse.fusion.FusionClassifier` is fitted on the indexed subjects that carry
the label, on the parts the query has: keypoints (α = 1), vectors (α = 0) or both (α by
leave-one-out cross-validation, the expensive part). What the fit chose (α, the classes)
is cached with the index — in memory, and in ``classifiers.json`` beside the manifest of an
on-disk index — under a fingerprint of the subjects and their label values, so adding or
removing subjects (or changing labels) makes the next prediction refit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keyfuse.errors import InvalidArgumentError

if TYPE_CHECKING:
    from keyfuse.index import Index
    from keyfuse.keypoints import KeypointSet

__all__ = ["CLASSIFIERS", "LabelClassifiers"]

CLASSIFIERS = "classifiers.json"
PARTS = ("keypoints", "vector", "fused")


def _fingerprint(index: Index, label: str) -> str:
    h = hashlib.sha256()
    for sid, value in zip(index.subjects, index.label(label), strict=True):
        h.update(json.dumps([sid, value], sort_keys=True, default=str).encode())
    h.update(str(len(index)).encode())
    return h.hexdigest()[:32]


class LabelClassifiers:
    """The fitted class predictors of one index, one per ``(label, parts)``."""

    def __init__(self, state: dict[str, dict[str, Any]] | None = None) -> None:
        #: ``"label/parts"`` → ``{"fingerprint", "alpha", "classes", "n_train"}``
        self.state: dict[str, dict[str, Any]] = dict(state or {})
        self._fitted: dict[str, tuple[str, Any]] = {}

    # -- persistence -----------------------------------------------------------------
    @classmethod
    def read(cls, root: Path) -> LabelClassifiers:
        """The cache saved in an index directory (an unreadable file is ignored: the
        classifiers are refitted on demand)."""
        p = Path(root) / CLASSIFIERS
        try:
            state = json.loads(p.read_text()) if p.exists() else {}
        except (OSError, ValueError):
            state = {}
        return cls(state if isinstance(state, dict) else {})

    def write(self, root: Path) -> None:
        """Write the cache atomically (aside, then renamed)."""
        p = Path(root) / CLASSIFIERS
        tmp = p.with_name(f".{CLASSIFIERS}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True, default=str))
        os.replace(tmp, p)

    # -- prediction ------------------------------------------------------------------
    def classifier(self, index: Index, label: str, parts: str) -> Any:
        """The fitted :class:`~keyfuse.fusion.FusionClassifier` for ``label`` on
        ``parts`` ("keypoints", "vector" or "fused"), fitted now if the subjects changed."""
        from keyfuse.fusion import FusionClassifier

        if parts not in PARTS:
            raise InvalidArgumentError(f"parts must be one of {PARTS}, got {parts!r}")
        key = f"{label}/{parts}"
        fp = _fingerprint(index, label)
        hit = self._fitted.get(key)
        if hit is not None and hit[0] == fp:
            return hit[1]
        values = index.label(label)
        train = [i for i, v in enumerate(values) if v is not None]
        if parts != "keypoints":
            train = [i for i in train if index._vectors[i] is not None]
        y = np.asarray([values[i] for i in train])
        n_classes = len(set(y.tolist()))
        if n_classes < 2:
            raise InvalidArgumentError(
                f"restrict={{{label!r}: 'predicted'}}: predicting {label!r} needs indexed "
                f"subjects of at least 2 classes with that label"
                + (" and a vector" if parts != "keypoints" else "")
                + f"; the index has {len(train)} such subject(s) of {n_classes} class(es)"
            )
        ids = index.subjects
        kps: list[KeypointSet] = (
            [index.keypoints(ids[i]) for i in train] if parts != "vector" else []
        )
        vecs = (
            np.stack([np.asarray(index._vectors[i], dtype=np.float64) for i in train])
            if parts != "keypoints"
            else None
        )
        X: Any = (
            kps
            if vecs is None
            else (vecs if parts == "vector" else list(zip(kps, vecs, strict=True)))
        )
        saved = self.state.get(key)
        alpha: Any = "auto"
        if saved is not None and saved.get("fingerprint") == fp:
            alpha = float(saved["alpha"])
        clf = FusionClassifier(alpha=alpha).fit(X, y)
        self.state[key] = {
            "fingerprint": fp,
            "alpha": float(clf.alpha_),
            "classes": [c.item() if hasattr(c, "item") else c for c in clf.classes_],
            "n_train": len(train),
        }
        self._fitted[key] = (fp, clf)
        if alpha == "auto" and index.path is not None and index.mode != "r":
            self.write(index.path)
        return clf

    def predict(
        self,
        index: Index,
        label: str,
        kps: KeypointSet | None,
        vector: np.ndarray | None,
    ) -> Any:
        """The predicted ``label`` value of a query with these parts."""
        X: Any
        if kps is not None and vector is not None:
            parts, X = "fused", [(kps, vector)]
        elif vector is not None:
            parts, X = "vector", np.asarray(vector, dtype=np.float64)[None, :]
        elif kps is not None:
            parts, X = "keypoints", [kps]
        else:  # pragma: no cover - the callers always pass a part
            raise InvalidArgumentError("nothing to predict the class from")
        clf = self.classifier(index, label, parts)
        value = clf.predict(X)[0]
        return value.item() if hasattr(value, "item") else value
