"""Exact nearest neighbours of SIFT-Rank descriptors, on the CPU or the GPU.

The search under every match and score in keyfuse, for tools that need the neighbours
themselves (and for ``benches/gpu.py``). Both backends give bit-identical results: the
same neighbours, the same integer squared distances, ties broken by the lower row.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from keyfuse import _core
from keyfuse.device import resolve_device
from keyfuse.errors import InvalidArgumentError

__all__ = ["knn"]


def _descriptors(name: str, value: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        raise InvalidArgumentError(f"{name}: descriptors must be uint8, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def knn(
    data: npt.ArrayLike, queries: npt.ArrayLike, k: int, *, device: str = "auto"
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The ``k`` nearest rows of ``data`` for every row of ``queries`` (exact search).

    Parameters
    ----------
    data : (N, 64) uint8 array
        The descriptors searched (e.g. ``KeypointSet.descriptors``).
    queries : (M, 64) uint8 array
        The descriptors whose neighbours are wanted.
    k : int
        Neighbours per query, at least 1 (at most 32 on the GPU).
    device : {"auto", "cpu", "cuda"}, default "auto"
        Backend (see :func:`keyfuse.device.resolve_device`).

    Returns
    -------
    indices : (M, k) int64 array
        Rows of ``data``, nearest first; -1 where ``data`` has fewer than ``k`` rows.
    sq_distances : (M, k) int64 array
        Squared Euclidean distances between the descriptors; -1 where missing.

    Raises
    ------
    InvalidArgumentError
        Descriptors that are not uint8 with 64 columns, or ``k`` out of range.
    DeviceUnavailableError
        ``device="cuda"`` without a usable GPU.

    Examples
    --------
    >>> idx, d2 = knn(reference.descriptors, moving.descriptors, 2)
    >>> ratio_ok = np.sqrt(d2[:, 0]) <= 0.8 * np.sqrt(d2[:, 1])
    """
    d = _descriptors("data", data)
    q = _descriptors("queries", queries)
    if resolve_device(device) == "cuda":
        return _core.gpu_knn(d, q, k=int(k))
    return _core.knn_exact(d, q, k=int(k))
