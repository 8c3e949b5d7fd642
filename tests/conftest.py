"""Shared fixtures: small synthetic volumes and the reference key files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


def gaussian_blob(
    shape: tuple[int, ...], centre: tuple[float, ...], sigma: float, amplitude: float = 100.0
) -> np.ndarray:
    """An isotropic Gaussian blob (float32) — a keypoint with a known centre and scale."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    return (amplitude * np.exp(-r2 / (2 * sigma**2))).astype(np.float32)


def textured_volume(shape: tuple[int, int, int] = (48, 48, 48), seed: int = 0) -> np.ndarray:
    """A smooth random volume with many blob-like structures (a stand-in for anatomy)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape)
    vol = ndimage.gaussian_filter(noise, 2.5) + 0.5 * ndimage.gaussian_filter(noise, 1.2)
    vol -= vol.min()
    return (100.0 * vol / vol.max()).astype(np.float32)
