"""Backend choice: ``device="auto" | "cpu" | "cuda"`` everywhere, and ``KEYFUSE_DEVICE``.

The CUDA backend (rust/keyfuse-cuda) needs only the NVIDIA driver and the NVRTC library at
run time — ``pip install nvidia-cuda-nvrtc`` provides the latter and is found automatically.
The probe runs once per process, never raises and never prints: ``device="auto"`` quietly
uses the CPU when anything is missing, and :func:`cuda_info` says why.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Literal

from keyfuse import _core
from keyfuse.errors import DeviceUnavailableError, InvalidArgumentError

Device = Literal["auto", "cpu", "cuda"]

#: Environment variable that overrides ``device="auto"`` (``cpu``, ``cuda`` or ``auto``).
DEVICE_ENV = "KEYFUSE_DEVICE"

#: Most neighbours per query the GPU's k-NN kernels keep (rust/keyfuse-cuda).
GPU_MAX_K = 32

_BACKENDS: dict[str, str] = {}
_BACKENDS_LOCK = threading.Lock()


def cuda_available() -> bool:
    """True when the CUDA driver and NVRTC libraries load, a GPU answers and the kernels
    compile for it (probed once per process; never raises)."""
    return bool(_core.cuda_available())


def cuda_info() -> dict[str, Any]:
    """What the CUDA probe found.

    Returns
    -------
    dict
        ``available`` (bool), ``driver_found``, ``nvrtc_found`` (bool), ``nvrtc_path``
        (the NVRTC library loaded from the pip wheel, or None), ``device_name``,
        ``compute_capability`` ((major, minor)), ``sm_count``, ``total_memory`` (bytes), and
        ``reason``: why the GPU is unavailable (None when it is available).
    """
    return dict(_core.cuda_info())


def cpu_knn_kernel() -> str:
    """The CPU kernel of exact nearest-neighbour search on this machine.

    ``"amx"`` (Intel AMX tiles, Sapphire Rapids and later, Linux), ``"avx2"`` or
    ``"portable"``; chosen at run time, all give bit-identical results. The variable
    ``KEYFUSE_NO_AMX`` (set before keyfuse first searches) disables the AMX kernel.
    """
    return str(_core.knn_exact_kernel())


def _requested(device: str | None) -> str:
    """The request as ``"auto"``, ``"cpu"`` or ``"cuda"`` (``KEYFUSE_DEVICE`` applied to
    ``"auto"``)."""
    requested = (device or "auto").lower()
    if requested == "auto":
        requested = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
        if requested not in ("auto", "cpu", "cuda"):
            raise InvalidArgumentError(
                f"{DEVICE_ENV} must be 'auto', 'cpu' or 'cuda', not {requested!r}"
            )
    if requested not in ("auto", "cpu", "cuda"):
        raise InvalidArgumentError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    return requested


def last_backends() -> dict[str, str]:
    """Which backend each operation ran on the last time it was called in this process.

    Returns
    -------
    dict
        Operation name (``"extract"``, ``"match"``, ``"index.search"``,
        ``"index.pairwise"``, ``"keypoint_kde"``) → ``"cpu"`` or ``"cuda"``; operations
        not yet run are absent.
    """
    with _BACKENDS_LOCK:
        return dict(_BACKENDS)


def choose_backend(
    device: str | None, operation: str, *, no_gpu_path: str | None = None
) -> Literal["cpu", "cuda"]:
    """The backend one operation runs on, recorded for :func:`last_backends`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or None
        The user's request, as for :func:`resolve_device`.
    operation : str
        The operation's name (reported by :func:`last_backends` and in errors).
    no_gpu_path : str or None, default None
        Why this request has no GPU implementation (``None``: it has one). ``"auto"``
        then runs on the CPU; ``"cuda"`` raises rather than using the CPU silently.

    Raises
    ------
    DeviceUnavailableError
        ``"cuda"`` was asked for and the operation has no GPU path, or no usable GPU
        exists.
    InvalidArgumentError
        An unknown device.
    """
    requested = _requested(device)
    if requested == "cuda" and no_gpu_path is not None:
        raise DeviceUnavailableError(
            f"device='cuda': {operation} has no GPU path ({no_gpu_path}); "
            "use device='auto' or 'cpu'"
        )
    backend: Literal["cpu", "cuda"] = (
        "cpu" if no_gpu_path is not None else resolve_device(requested)
    )
    with _BACKENDS_LOCK:
        _BACKENDS[operation] = backend
    return backend


def resolve_device(device: str | None = "auto") -> Literal["cpu", "cuda"]:
    """Turn a user's device request into the backend that will run.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or None, default "auto"
        ``"auto"`` (or None) picks CUDA when :func:`cuda_available`, else the CPU, silently;
        ``KEYFUSE_DEVICE`` (``cpu``/``cuda``/``auto``) overrides ``"auto"`` only.

    Raises
    ------
    DeviceUnavailableError
        ``"cuda"`` was asked for (directly or through ``KEYFUSE_DEVICE``) and no usable GPU
        exists; the message carries the probe's reason.
    InvalidArgumentError
        Any other value.
    """
    requested = _requested(device)
    if requested == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if requested == "cuda":
        reason = cuda_info().get("reason") or "unknown reason"
        raise DeviceUnavailableError(
            f"device='cuda' was requested but no usable GPU was found ({reason}); "
            "use device='auto' or 'cpu'"
        )
    return "cpu"


def runs_on_gpu(
    device: str | None,
    *,
    k: int | None = None,
    posterior: bool = False,
    exact: bool = True,
    operation: str = "k-NN scoring",
) -> bool:
    """Whether a k-NN based computation runs on the GPU for this request.

    The GPU is used when its kernels cover the request: exact search, at most
    :data:`GPU_MAX_K` neighbours (``k=None``: every training point, no neighbour list)
    and the published soft-Jaccard kernel (the posterior one runs on the CPU only).
    ``device="cuda"`` for a request they do not cover, or without a GPU, raises (see
    :func:`choose_backend`, which also records the backend).

    Parameters
    ----------
    device : {"auto", "cpu", "cuda"} or None
        As for :func:`resolve_device`.
    k : int or None, default None
        Neighbours per query.
    posterior : bool, default False
        Whether the posterior soft-Jaccard kernel is asked for.
    exact : bool, default True
        False for an approximate (kd-forest) search, which only the CPU has.
    operation : str, default "k-NN scoring"
        The operation's name, for :func:`last_backends` and errors.

    Raises
    ------
    DeviceUnavailableError, InvalidArgumentError
        As :func:`choose_backend`.
    """
    why = None
    if posterior:
        why = "the posterior soft-Jaccard kernel is CPU-only; kernel='published' has one"
    elif not exact:
        why = "the approximate kd-forest search is CPU-only; exact search has one"
    elif k is not None and k > GPU_MAX_K:
        why = f"the GPU keeps at most {GPU_MAX_K} neighbours, {k} were asked for"
    return choose_backend(device, operation, no_gpu_path=why) == "cuda"
