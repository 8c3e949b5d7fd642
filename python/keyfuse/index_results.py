"""What :meth:`keyfuse.Index.search` returns (ranked hits that convert to pandas) and
the warnings an index gives instead of a silently empty or meaningless answer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from keyfuse.errors import (
    CPUFallbackWarning,
    EmptyKeypointsWarning,
    EmptyRestrictionWarning,
)

__all__ = [
    "CPUFallbackWarning",
    "EmptyKeypointsWarning",
    "EmptyRestrictionWarning",
    "Hit",
    "SearchResult",
]


def _value_counts(values: Iterable[Any]) -> str:
    """``"F (20), M (18), missing (2)"``."""
    counts: dict[str, int] = {}
    for v in values:
        key = "missing" if v is None else str(v)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in sorted(counts.items()))


class Hit(NamedTuple):
    """One search result: ``subject_id, score = hit``."""

    subject_id: str
    score: float


class SearchResult(list[Hit]):
    """Ranked hits (best first), a list of :class:`Hit` ``(subject_id, score)`` tuples."""

    @property
    def ids(self) -> list[str]:
        return [h.subject_id for h in self]

    @property
    def scores(self) -> npt.NDArray[np.float64]:
        return np.array([h.score for h in self], dtype=np.float64)

    #: the hits' labels (``{subject_id: {label: value}}``), set by :meth:`Index.search`
    labels: dict[str, dict[str, Any]]
    #: ``restrict``'s predicted classes (``{label: value}``; empty when none was predicted)
    predicted: dict[str, Any]
    #: the α of a fused search (``None`` for the other searches)
    alpha: float | None

    def __init__(self, hits: Iterable[Hit] = (), labels: Mapping[str, Any] | None = None):
        super().__init__(hits)
        self.labels = {h.subject_id: dict((labels or {}).get(h.subject_id, {})) for h in self}
        self.predicted = {}
        self.alpha = None

    def to_frame(self) -> Any:
        """The hits as a pandas ``DataFrame`` indexed by ``subject_id``: ``rank`` (1 =
        best), ``score`` and one column per label."""
        import pandas as pd

        names = sorted({k for lab in self.labels.values() for k in lab})
        frame = pd.DataFrame(
            {
                "rank": np.arange(1, len(self) + 1),
                "score": self.scores,
                **{n: [self.labels[h.subject_id].get(n) for h in self] for n in names},
            },
            index=pd.Index(self.ids, name="subject_id"),
        )
        return frame

    def __repr__(self) -> str:
        body = ", ".join(f"{h.subject_id!r}: {h.score:.4f}" for h in self[:5])
        more = ", …" if len(self) > 5 else ""
        return f"SearchResult([{body}{more}])"
