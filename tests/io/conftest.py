"""Fixtures of the image-format tests."""

from __future__ import annotations

import pytest

import keyfuse as kf


@pytest.fixture(scope="session")
def mni4() -> kf.Image:
    """The real MNI152 template at 4 mm (49×59×48): small and fast."""
    return kf.datasets.mni152(resolution_mm=4.0)
