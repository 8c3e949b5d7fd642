"""GPU results equal the CPU path's (the parity harness), in the shape of kornia-rs's
``kornia-py/tests/test_cuda.py``: the whole module is skipped on a machine without a usable
GPU, and each test runs one computation on both devices and compares. The probe, the
fallback and the argument checks, which run everywhere, are in ``test_device.py``."""

from __future__ import annotations

import numpy as np
import pytest

from keyfuse import _core
from keyfuse.device import cuda_available

if not cuda_available():
    pytest.skip("no usable CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu

#: The published soft-Jaccard settings both backends are compared with.
SJ = {"k": 30, "alpha2_floor": 1.0, "alpha2_cap_fraction": 0.1}


def _ranks(n: int, seed: int) -> np.ndarray:
    """n random SIFT-Rank descriptors (each row a permutation of 0..63)."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n, 64)), axis=1).astype(np.uint8)


def _cohort(n_subjects: int, per: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Subjects that share a base set, each perturbed by more rank swaps than the last."""
    rng = np.random.default_rng(seed)
    base = _ranks(per, seed + 1)
    rows = []
    for s in range(n_subjects):
        d = base.copy()
        for _ in range(2 * s):
            a, b = rng.integers(0, 64, size=(2, per))
            tmp = d[np.arange(per), a].copy()
            d[np.arange(per), a] = d[np.arange(per), b]
            d[np.arange(per), b] = tmp
        rows.append(d)
    return np.ascontiguousarray(np.concatenate(rows)), np.full(n_subjects, per, dtype=np.int64)


@pytest.mark.parametrize("kernel", ["dp4a", "mma"])
@pytest.mark.parametrize("k", [1, 2, 5, 30])
def test_gpu_knn_equals_cpu_exact(k: int, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYFUSE_CUDA_KNN", kernel)
    data = _ranks(3001, 2)
    queries = _ranks(500, 3)
    queries[:10] = data[100:110]  # exact duplicates: distance 0, ties by index
    i_cpu, d_cpu = _core.knn_exact(data, queries, k=k)
    i_gpu, d_gpu = _core.gpu_knn(data, queries, k=k)
    np.testing.assert_array_equal(d_gpu, d_cpu)
    np.testing.assert_array_equal(i_gpu, i_cpu)


@pytest.mark.parametrize("kernel", ["dp4a", "mma"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gpu_pairwise_equals_cpu_cohort(
    symmetric: bool, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYFUSE_CUDA_KNN", kernel)
    data, sizes = _cohort(8, 150)
    cohort = _core.SearchEngine(trees=8)
    start = 0
    for n in sizes:
        cohort.add(data[start : start + n])
        start += n
    cpu = cohort.pairwise(symmetric=symmetric, checks=128, posterior=False, exact=True, **SJ)
    gpu = _core.gpu_cohort_pairwise(data, sizes, symmetric=symmetric, **SJ)
    # GPU sums are exact 32.32 fixed point; the CPU sums f64 in order
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(
        gpu, _core.gpu_cohort_pairwise(data, sizes, symmetric=symmetric, **SJ)
    )
    q = data[:150]
    allowed = [True] * 8
    allowed[3] = False
    cpu_s = cohort.search(
        q, exclude=0, allowed=np.array(allowed), checks=128, posterior=False, exact=True, **SJ
    )
    gpu_s = _core.gpu_cohort_search(data, sizes, q, exclude=0, allowed=allowed, **SJ)
    np.testing.assert_allclose(gpu_s, cpu_s, rtol=0, atol=1e-9)
    resident = _core.GpuCohort(data, sizes)  # uploaded once, same answers
    assert len(resident) == 8 and resident.n_points == len(data)
    np.testing.assert_array_equal(resident.search(q, exclude=0, allowed=allowed, **SJ), gpu_s)
    np.testing.assert_array_equal(resident.pairwise(symmetric=symmetric, **SJ), gpu)


def test_gpu_kde_class_sums_match_numpy() -> None:
    q = _ranks(16, 5)
    data = _ranks(400, 6)
    classes = np.arange(400) % 5
    d2 = ((q[:, None, :].astype(np.float64) - data[None, :, :]) ** 2).sum(-1)
    denom = 1.0 + d2.min(axis=1)
    want = np.stack([np.exp(-d2 / denom[:, None])[:, classes == c].sum(1) for c in range(5)], 1)
    got = _core.gpu_kde_class_sums(q, data, classes, 5, denom, cutoff=np.inf)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_gpu_scale_space_is_deterministic() -> None:
    rng = np.random.default_rng(7)
    vol = rng.random((48, 44, 40)).astype(np.float32)
    a = _core.gpu_scale_space(vol, keep_images=True)
    b = _core.gpu_scale_space(vol, keep_images=True)
    assert len(a) >= 2
    for oa, ob in zip(a, b, strict=True):
        np.testing.assert_array_equal(oa["extrema"], ob["extrema"])
        for ga, gb in zip(oa["gaussians"], ob["gaussians"], strict=True):
            np.testing.assert_array_equal(ga, gb)
        for lvl, dog in enumerate(oa["dogs"]):
            np.testing.assert_array_equal(dog, oa["gaussians"][lvl + 1] - oa["gaussians"][lvl])


def test_gpu_extract_equals_cpu_extract() -> None:
    import keyfuse as kf

    if not hasattr(_core, "gpu_extract3d"):
        pytest.skip("gpu_extract3d is not built yet (needs the core's describe hook)")
    rng = np.random.default_rng(3)
    vol = rng.random((64, 60, 56)).astype(np.float32)
    img = kf.Image(vol, np.eye(4))
    cpu = kf.extract(img, device="cpu")
    gpu = kf.extract(img, device="cuda")
    assert len(gpu) == len(cpu) > 0
    np.testing.assert_allclose(gpu.ijk, cpu.ijk, atol=0.01)
    np.testing.assert_array_equal(gpu.descriptors, cpu.descriptors)


def test_index_on_the_gpu_equals_exact_cpu_search() -> None:
    """The published kernel's index runs on the GPU when asked (last_backends says
    which backend ran each call) and agrees with the exact CPU search."""
    import keyfuse as kf
    from keyfuse.device import last_backends

    data, sizes = _cohort(6, 120, seed=4)
    index = kf.Index(kernel="published")
    start = 0
    for s, n in enumerate(sizes):
        desc = data[start : start + n]
        start += n
        ijk = np.zeros((n, 3))
        kps = kf.KeypointSet(ijk, np.ones(n, np.float32), np.tile(np.eye(3), (n, 1, 1)), desc)
        index.add(f"s{s}", kps)
    for symmetric in (False, True):
        cpu = index.pairwise(symmetric, exact=True, device="cpu")
        assert last_backends()["index.pairwise"] == "cpu"
        gpu = index.pairwise(symmetric, device="cuda")
        assert last_backends()["index.pairwise"] == "cuda"
        np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-9)
        assert np.ptp(cpu[~np.eye(len(cpu), dtype=bool)]) > 0  # not a constant matrix
    cpu_s = index.scores("s2", exact=True, device="cpu")
    gpu_s = index.scores("s2", device="cuda")
    assert last_backends()["index.search"] == "cuda"
    np.testing.assert_allclose(gpu_s, cpu_s, rtol=0, atol=1e-9)
    with pytest.raises(kf.DeviceUnavailableError, match="posterior"):
        kf.Index().scores(kf.KeypointSet(np.zeros((3, 3)), np.ones(3)), device="cuda")


@pytest.mark.parametrize("k", [None, 5])
@pytest.mark.parametrize("exclude", [None, 2])
def test_gpu_keypoint_log_likelihood_matches_cpu(k: int | None, exclude: int | None) -> None:
    train, sizes = _cohort(5, 80, seed=9)
    train_sample = np.repeat(np.arange(5), sizes)
    sample_class = np.array([0, 1, 0, 1, 2])
    query = _ranks(30, 10)
    args = (query, train, train_sample, sample_class, 3)
    cpu = _core.keypoint_log_likelihood(
        *args, exclude_sample=exclude, k=k, background=1.0, checks=None
    )
    gpu = _core.gpu_keypoint_log_likelihood(*args, exclude_sample=exclude, k=k, background=1.0)
    # both round each kernel term to 2^-32 (the GPU's fixed point): the same sums, bar a
    # one-ulp difference between the two exp implementations flipping a rounding (2^-32)
    if k is None:
        np.testing.assert_allclose(gpu, cpu, rtol=1e-12)
    else:
        np.testing.assert_array_equal(gpu, cpu)
