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


__all__ = [
    "CorruptDataError",
    "DeviceUnavailableError",
    "IndexCorruptError",
    "InvalidArgumentError",
    "InvalidImageError",
    "KeyfuseError",
    "KeyfuseIOError",
    "MissingDependencyError",
]
