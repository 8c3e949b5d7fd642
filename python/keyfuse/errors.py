"""The exceptions keyfuse raises.

Every error is a :class:`KeyfuseError`; each subclass also derives from the builtin
that fits, so ``except ValueError`` keeps working for callers who do not know keyfuse.
"""

from __future__ import annotations


class KeyfuseError(Exception):
    """Base class of every keyfuse error."""


class InvalidImageError(KeyfuseError, ValueError):
    """The image cannot be processed: wrong dimensions or dtype, NaN/Inf, too small, ..."""


class InvalidArgumentError(KeyfuseError, ValueError):
    """An argument is out of range, or arrays disagree in shape."""


class CorruptDataError(KeyfuseError, ValueError):
    """Stored data (a .key/.kfk file, a model, a table) is malformed or fails its checksum."""


class IndexCorruptError(CorruptDataError):
    """An on-disk index is torn or corrupt; nothing of it was loaded."""


class KeyfuseIOError(KeyfuseError, OSError):
    """A file is missing or cannot be read or written."""


class DeviceUnavailableError(KeyfuseError, RuntimeError):
    """``device="cuda"`` was asked for but no usable GPU, driver or NVRTC library exists."""


class MissingDependencyError(KeyfuseError, ImportError):
    """An optional dependency (an extra such as ``keyfuse[cnn]``) is not installed."""


class KeyfuseWarning(UserWarning):
    """Base class of keyfuse's warnings: filter them all with
    ``warnings.filterwarnings("ignore", category=kf.KeyfuseWarning)``."""


class VoxelSizeWarning(KeyfuseWarning):
    """An array was given without an affine or voxel size, so 1 mm voxels were assumed."""


class NotDicomWarning(KeyfuseWarning):
    """Files in a DICOM directory were skipped because they are not DICOM images (not
    DICOM at all, or DICOM objects without an image beside the one image series)."""


class CPUFallbackWarning(KeyfuseWarning):
    """``device="cuda"`` was asked for work that has no GPU version; it ran on the CPU."""


class EmptyKeypointsWarning(KeyfuseWarning):
    """A keypoint set without keypoints was indexed or used as a query."""


class EmptyRestrictionWarning(KeyfuseWarning):
    """A search's ``restrict`` matched no subject, so its result is empty."""


class AlignmentWarning(KeyfuseWarning):
    """A scan that should be in atlas space is not: CNN features of an unaligned scan,
    or a keypoint alignment to the atlas that failed."""


class UnlabelledSubjectsWarning(KeyfuseWarning):
    """Some subjects added to an index have no row in the label table (e.g. a BIDS
    ``participants.tsv``): they are indexed without labels."""


def warn_caller(message: str, category: type[Warning]) -> None:
    """Warn at the first stack frame outside the keyfuse package (the user's call),
    however deep inside keyfuse the warning arises."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)


# the error and warning classes, public at the top level too (``keyfuse.__all__`` adds
# this list); warn_caller is the package's own helper
__all__ = [
    "AlignmentWarning",
    "CPUFallbackWarning",
    "CorruptDataError",
    "DeviceUnavailableError",
    "EmptyKeypointsWarning",
    "EmptyRestrictionWarning",
    "IndexCorruptError",
    "InvalidArgumentError",
    "InvalidImageError",
    "KeyfuseError",
    "KeyfuseIOError",
    "KeyfuseWarning",
    "MissingDependencyError",
    "NotDicomWarning",
    "UnlabelledSubjectsWarning",
    "VoxelSizeWarning",
]
