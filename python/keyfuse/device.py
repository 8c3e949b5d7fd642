"""Backend choice: ``device="auto" | "cpu" | "cuda"`` everywhere, and ``KEYFUSE_DEVICE``."""

from __future__ import annotations

import os
from typing import Literal

from keyfuse import _core
from keyfuse.errors import DeviceUnavailableError, InvalidArgumentError

Device = Literal["auto", "cpu", "cuda"]


def cuda_available() -> bool:
    """True when the CUDA driver and NVRTC libraries load and a GPU answers."""
    return bool(_core.cuda_available())


def resolve_device(device: str | None = "auto") -> Literal["cpu", "cuda"]:
    """Turn a user's device request into the backend that will run.

    ``KEYFUSE_DEVICE`` (``cpu``/``cuda``/``auto``) overrides ``"auto"``; an explicit
    ``"cuda"`` with no usable GPU raises :class:`DeviceUnavailableError`.
    """
    requested = (device or "auto").lower()
    if requested == "auto":
        requested = os.environ.get("KEYFUSE_DEVICE", "auto").lower() or "auto"
    if requested not in ("auto", "cpu", "cuda"):
        raise InvalidArgumentError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    if requested == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if requested == "cuda":
        raise DeviceUnavailableError(
            "device='cuda' was requested but no usable GPU was found "
            "(CUDA driver, NVRTC library or device missing); use device='auto' or 'cpu'"
        )
    return "cpu"
