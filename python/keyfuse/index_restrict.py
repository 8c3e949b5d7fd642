"""The ``restrict`` argument of :meth:`keyfuse.Index.search`: which subjects a search
may return (labels, ids or a predicate)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from keyfuse.errors import EmptyRestrictionWarning, InvalidArgumentError, warn_caller
from keyfuse.index_results import _value_counts

if TYPE_CHECKING:
    from keyfuse.index import Index

__all__ = ["Restrict", "check_restrict_labels", "restriction_mask"]

Restrict = Mapping[str, Any] | Callable[[dict[str, Any]], bool] | Iterable[str] | None


def restriction_mask(index: Index, restrict: Restrict) -> np.ndarray | None:
    """The subjects a search's ``restrict`` allows (``None``: all)."""
    if restrict is None:
        return None
    if callable(restrict):
        return np.array([bool(restrict(dict(lab))) for lab in index._labels], dtype=bool)
    if isinstance(restrict, Mapping):
        check_restrict_labels(index, restrict)

        def ok(lab: dict[str, Any]) -> bool:
            for key, want in restrict.items():
                have = lab.get(key)
                if isinstance(want, (list, tuple, set, frozenset)):
                    if have not in want:
                        return False
                elif have != want:
                    return False
            return True

        mask = np.array([ok(lab) for lab in index._labels], dtype=bool)
        if len(mask) and not mask.any():
            counts = {key: _value_counts(lab.get(key) for lab in index._labels) for key in restrict}
            warn_caller(
                f"restrict={dict(restrict)!r} matches none of the {len(mask)} subjects; "
                "values in the index: " + "; ".join(f"{key}: {c}" for key, c in counts.items()),
                EmptyRestrictionWarning,
            )
        return mask
    if isinstance(restrict, str):
        raise InvalidArgumentError("restrict: pass a dict of labels, ids or a predicate")
    ids = set(restrict)
    unknown = ids - set(index._pos)
    if unknown:
        raise InvalidArgumentError(f"restrict names unknown subjects: {sorted(unknown)[:5]}")
    return np.array([s in ids for s in index._ids], dtype=bool)


def check_restrict_labels(index: Index, restrict: Mapping[str, Any]) -> None:
    """A label that no subject carries is a mistake (a typo, or labels never added)."""
    names = {k for lab in index._labels for k in lab}
    unknown = [k for k in restrict if k not in names]
    if unknown and len(index):
        raise InvalidArgumentError(
            f"restrict names label(s) {unknown} that no subject in the index has; "
            f"labels in the index: {sorted(names) or 'none (add them with labels=...)'}"
        )
