"""keyfuse: 3D keypoint signatures and CNN vectors for indexing, retrieving, classifying
and segmenting medical image cohorts, with a Rust core.

>>> import keyfuse as kf
>>> img = kf.datasets.mni152()
>>> kps = kf.extract(img)

Heavy modules (the CNN, scikit-learn estimators, the index) load on first use, so
``import keyfuse`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keyfuse import errors

# every error and warning class (errors.__all__, added to __all__ below)
from keyfuse.errors import *  # noqa: F403


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keyfuse")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


#: the installed keyfuse version (as ``keyfuse --version`` prints it)
__version__: str = _version()

# public name -> module that defines it (loaded on first attribute access)
_LAZY: dict[str, str] = {
    "Image": "keyfuse.image",
    "load_image": "keyfuse.image",
    "KeypointSet": "keyfuse.keypoints",
    "read_key": "keyfuse.keypoints",
    "write_key": "keyfuse.keypoints",
    "extract": "keyfuse.extraction",
    "cuda_available": "keyfuse.device",
    "Matches": "keyfuse.matching",
    "match": "keyfuse.matching",
    "Alignment": "keyfuse.matching",
    "align": "keyfuse.matching",
    "soft_jaccard": "keyfuse.matching",
    "Index": "keyfuse.index",
    "CNNFeatures": "keyfuse.cnn",
    "MIBinarizer": "keyfuse.fusion",
    "FusionClassifier": "keyfuse.fusion",
    "KeypointTransferSegmenter": "keyfuse.segment",
    "Segmentation": "keyfuse.segment",
    "report": "keyfuse.reports",
}
_SUBMODULES = {
    "active",
    "datasets",
    "evaluate",
    "batch",
    "bids",
    "cli",
    "device",
    "neighbors",
    "gpu",
    "experiments",
    "matching",
    "plotting",
    "reports",
}

if TYPE_CHECKING:
    from keyfuse import (
        active,
        batch,
        bids,
        datasets,
        evaluate,
        experiments,
        gpu,
        matching,
        neighbors,
        plotting,
        reports,
    )
    from keyfuse.cnn import CNNFeatures
    from keyfuse.device import cuda_available
    from keyfuse.extraction import extract
    from keyfuse.fusion import FusionClassifier, MIBinarizer
    from keyfuse.image import Image, load_image
    from keyfuse.index import Index
    from keyfuse.keypoints import KeypointSet, read_key, write_key
    from keyfuse.matching import Alignment, Matches, align, match, soft_jaccard
    from keyfuse.reports import report
    from keyfuse.segment import KeypointTransferSegmenter, Segmentation


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"keyfuse.{name}")
    else:
        raise AttributeError(f"module 'keyfuse' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_SUBMODULES])


__all__ = [
    "Alignment",
    "CNNFeatures",
    "FusionClassifier",
    "Image",
    "Index",
    "KeypointSet",
    "KeypointTransferSegmenter",
    "MIBinarizer",
    "Matches",
    "Segmentation",
    "active",
    "align",
    "batch",
    "bids",
    "cuda_available",
    "datasets",
    "evaluate",
    "experiments",
    "extract",
    "gpu",
    "load_image",
    "match",
    "matching",
    "neighbors",
    "plotting",
    "read_key",
    "report",
    "reports",
    "soft_jaccard",
    "write_key",
]
# and every error and warning class
__all__ += errors.__all__
