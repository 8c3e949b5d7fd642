"""Shared fixtures: small synthetic volumes and the reference key files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"

try:  # hypothesis comes with the test extra; the fuzz tests skip without it
    from hypothesis import settings

    # `make test` (and so CI) runs the fuzz tests on a fixed sequence of examples, so a
    # landing never hangs on a new random draw; plain pytest keeps exploring new ones
    settings.register_profile("ci", derandomize=True, database=None)
except ImportError:
    pass


def pytest_configure(config: pytest.Config) -> None:
    """Under ``make test`` every process (each xdist worker too) must test the installed
    wheel, never the source tree: KEYFUSE_TEST_INSTALLED names the venv it lives in."""
    installed = os.environ.get("KEYFUSE_TEST_INSTALLED")
    if installed:
        import keyfuse

        if not keyfuse.__file__ or not keyfuse.__file__.startswith(installed):
            raise pytest.UsageError(f"keyfuse imported from {keyfuse.__file__}, not {installed}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules holding ``slow`` tests run first, the smallest of them first (their slow
    tests are the longest ones: the README tour, the pinned demo cohort), and each module's
    tests stay together so its fixtures are set up once. On the two xdist workers of
    ``make test`` the long tests then start early instead of forming the run's tail."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(str(item.path), []).append(item)

    def rank(tests: list[pytest.Item]) -> tuple[bool, int]:
        slow = any(t.get_closest_marker("slow") for t in tests)
        return (not slow, len(tests) if slow else 0)

    order = sorted(modules.values(), key=rank)
    items[:] = [item for tests in order for item in tests]


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


def write_tiny_onnx(path: Path, bias: tuple[float, float] = (0.0, 0.0)) -> Path:
    """A tiny ONNX image model: x (N,1,8,8) → 1×1 conv with weights (+1, −1) and ``bias``
    → ReLU "act" → global average pool → flatten "y" (N, 2)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([1.0, -1.0], np.float32).reshape(2, 1, 1, 1), "w")
    b = numpy_helper.from_array(np.array(bias, np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv_out"], name="block1_conv"),
        helper.make_node("Relu", ["conv_out"], ["act"], name="block1_relu"),
        helper.make_node("GlobalAveragePool", ["act"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["y"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
