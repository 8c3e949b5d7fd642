"""The CUDA backend's probe and fallback, checked on every machine: NVRTC compiles every
kernel (no GPU needed), ``device="auto"`` falls back to the CPU silently, ``device="cuda"``
raises without a GPU, and GPU entry points check their arguments before the device.
GPU-vs-CPU parity is in ``test_gpu.py``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keyfuse import _core
from keyfuse.device import cuda_available, cuda_info, resolve_device
from keyfuse.errors import DeviceUnavailableError, InvalidArgumentError

HAS_GPU = cuda_available()
#: The published soft-Jaccard settings.
SJ = {"k": 30, "alpha2_floor": 1.0, "alpha2_cap_fraction": 0.1}


def _nvrtc_wheel() -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13/lib/libnvrtc.so.13", "cuda_nvrtc/lib/libnvrtc.so.13"):
            if (Path(loc) / sub).is_file():
                return Path(loc) / sub
    return None


def test_nvrtc_compiles_every_kernel() -> None:
    info = cuda_info()
    if not info["nvrtc_found"]:
        assert _nvrtc_wheel() is None, "the nvidia-cuda-nvrtc wheel is installed but not loaded"
        pytest.skip("NVRTC not installed (pip install nvidia-cuda-nvrtc)")
    out = _core.cuda_compile_check()
    assert out["ptx_bytes"] > 10_000
    assert {"kf_blur_axis", "kf_extrema", "kf_knn", "kf_sj_accumulate"} <= set(out["kernels"])
    assert len(out["kernels"]) == len(set(out["kernels"])) >= 11
    if _nvrtc_wheel() is not None and not os.environ.get("KEYFUSE_NVRTC_PATH"):
        assert out["nvrtc_path"] == str(_nvrtc_wheel())


def test_probe_is_consistent_and_explains_itself() -> None:
    info = cuda_info()
    assert info["available"] is HAS_GPU
    if HAS_GPU:
        assert info["reason"] is None and info["device_name"]
        assert info["compute_capability"][0] >= 7
    else:
        assert isinstance(info["reason"], str) and info["reason"]
        assert info["device_name"] is None


def test_auto_falls_back_silently_in_a_fresh_process() -> None:
    env = {k: v for k, v in os.environ.items() if k != "KEYFUSE_DEVICE"}
    code = (
        "import keyfuse as kf\n"
        "from keyfuse.device import resolve_device\n"
        "print(resolve_device('auto'), kf.cuda_available())\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert out.stderr == ""  # no warnings, no library-loading noise
    assert out.stdout.split() == (["cuda", "True"] if HAS_GPU else ["cpu", "False"])


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present")
def test_cuda_request_without_gpu_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYFUSE_DEVICE", raising=False)
    with pytest.raises(DeviceUnavailableError, match="no usable GPU"):
        resolve_device("cuda")
    monkeypatch.setenv("KEYFUSE_DEVICE", "cuda")
    with pytest.raises(DeviceUnavailableError):
        resolve_device("auto")
    # every GPU entry point says so too (after checking its arguments)
    d = np.argsort(np.random.default_rng(1).random((10, 64)), axis=1).astype(np.uint8)
    with pytest.raises(DeviceUnavailableError):
        _core.gpu_knn(d, d, k=2)
    with pytest.raises(DeviceUnavailableError):
        _core.gpu_cohort_pairwise(d, np.array([5, 5]), symmetric=False, **SJ)
    with pytest.raises(DeviceUnavailableError):
        _core.GpuCohort(d, np.array([5, 5]))
    with pytest.raises(DeviceUnavailableError):
        _core.gpu_scale_space(
            np.ones((16, 16, 16), np.float32) + np.eye(16, dtype=np.float32), keep_images=False
        )


def test_device_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYFUSE_DEVICE", "cpu")
    assert resolve_device("auto") == "cpu"
    assert resolve_device(None) == "cpu"
    monkeypatch.setenv("KEYFUSE_DEVICE", "tpu")
    with pytest.raises(InvalidArgumentError, match="KEYFUSE_DEVICE"):
        resolve_device("auto")
    monkeypatch.delenv("KEYFUSE_DEVICE")
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(InvalidArgumentError):
        resolve_device("gpu")


def test_gpu_entry_points_check_arguments_first() -> None:
    with pytest.raises(InvalidArgumentError):
        _core.gpu_knn(np.zeros((3, 32), np.uint8), np.zeros((3, 64), np.uint8), k=2)
    with pytest.raises(InvalidArgumentError, match="sizes"):
        _core.gpu_cohort_pairwise(
            np.zeros((3, 64), np.uint8), np.array([1, 1]), symmetric=False, **SJ
        )
    with pytest.raises(InvalidArgumentError, match="classes"):
        _core.gpu_kde_class_sums(
            np.zeros((1, 64), np.uint8),
            np.zeros((2, 64), np.uint8),
            np.array([0, 5]),
            2,
            np.ones(1),
            cutoff=np.inf,
        )


def test_cuda_on_a_stage_without_gpu_path_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``device="cuda"`` never runs on the CPU silently: a stage with no GPU version
    raises naming itself, on every machine (the check precedes the GPU probe); "auto"
    runs it on the CPU and keyfuse.device.last_backends says so."""
    import keyfuse as kf
    from keyfuse.batch import extract_batch
    from keyfuse.device import last_backends
    from keyfuse.fusion import keypoint_log_likelihoods

    monkeypatch.delenv("KEYFUSE_DEVICE", raising=False)
    rng = np.random.default_rng(4)
    img = kf.Image(rng.random((24, 24, 24)).astype(np.float32), np.eye(4))
    with pytest.raises(DeviceUnavailableError, match=r"extract has no GPU path.*descriptor"):
        kf.extract(img, device="cuda")
    monkeypatch.setenv("KEYFUSE_DEVICE", "cuda")  # the variable is a request too
    with pytest.raises(DeviceUnavailableError, match="extract has no GPU path"):
        kf.extract(img)
    monkeypatch.delenv("KEYFUSE_DEVICE")
    kps = kf.extract(img, device="auto")
    assert last_backends()["extract"] == "cpu"
    with pytest.raises(DeviceUnavailableError, match="match has no GPU path"):
        kf.match(kps, kps, device="cuda")
    kf.match(kps, kps)
    assert last_backends()["match"] == "cpu"
    with pytest.raises(DeviceUnavailableError, match="extract has no GPU path"):
        extract_batch([tmp_path], tmp_path / "out", device="cuda")
    d = np.argsort(rng.random((12, 64)), axis=1).astype(np.uint8)
    sets = [kf.KeypointSet(np.zeros((6, 3)), np.ones(6), descriptors=d[i::2]) for i in (0, 1)]
    with pytest.raises(DeviceUnavailableError, match=r"keypoint_kde.*kd-forest"):
        keypoint_log_likelihoods(sets, sets, [0, 1], n_neighbors=2, checks=8, device="cuda")
    keypoint_log_likelihoods(sets, sets, [0, 1], n_neighbors=2, checks=8, device="auto")
    assert last_backends()["keypoint_kde"] == "cpu"
    if not HAS_GPU:  # a stage that has a GPU path, asked for on a machine without one
        with pytest.raises(DeviceUnavailableError, match="no usable GPU"):
            keypoint_log_likelihoods(sets, sets, [0, 1], device="cuda")
