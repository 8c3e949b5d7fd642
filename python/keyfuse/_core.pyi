# Type stubs for the compiled extension `keyfuse._core` (rust/keyfuse-py).
# One section per binding file; keep each in step with its .rs file. Parameters are
# keyword-only and have no defaults here: the public modules of keyfuse pass every one.
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from typing_extensions import TypedDict, Unpack, final

__version__: str

# Keyword-argument groups (`**name` in a binding): convert.rs `SjArgs`, `VotesArgs`,
# `GpuSjArgs`; every key required.
class _SoftJaccard(TypedDict):
    k: int
    exact: bool
    checks: int
    alpha2_floor: float
    alpha2_cap_fraction: float
    posterior: bool

class _Votes(TypedDict):
    k: int
    exact: bool
    checks: int

class _GpuSoftJaccard(TypedDict):
    k: int
    alpha2_floor: float
    alpha2_cap_fraction: float

# --- extract.rs ---
def extract3d(
    volume: npt.NDArray[np.float32],
    spacing: tuple[float, float, float],
    **params: float,
) -> dict[str, npt.NDArray[np.generic]]: ...
def reslice_volume(
    *,
    volume: npt.NDArray[np.float32],
    matrix: list[list[float]],
    shape: tuple[int, int, int],
    max_voxels: float,
) -> npt.NDArray[np.float32]: ...
def extract2d(
    image: npt.NDArray[np.float32],
    spacing: tuple[float, float],
    **params: float,
) -> dict[str, npt.NDArray[np.generic]]: ...
def default_extract_params() -> dict[str, float | int]: ...

# --- gpu.rs ---
def request_stop() -> None: ...
def clear_stop() -> None: ...
def cuda_available() -> bool: ...
def cuda_info() -> dict[str, object]: ...
def cuda_compile_check() -> dict[str, object]: ...
def gpu_knn(
    data: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8], *, k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def gpu_cohort_search(
    data: npt.NDArray[np.uint8],
    sizes: npt.NDArray[np.int64],
    desc: npt.NDArray[np.uint8],
    *,
    exclude: int | None,
    allowed: list[bool] | None,
    **sj: Unpack[_GpuSoftJaccard],
) -> npt.NDArray[np.float64]: ...

@final
class GpuCohort:
    def __new__(cls, data: npt.NDArray[np.uint8], sizes: npt.NDArray[np.int64]) -> GpuCohort: ...
    def __len__(self) -> int: ...
    @property
    def n_points(self) -> int: ...
    def search(
        self,
        desc: npt.NDArray[np.uint8],
        *,
        exclude: int | None,
        allowed: list[bool] | None,
        **sj: Unpack[_GpuSoftJaccard],
    ) -> npt.NDArray[np.float64]: ...
    def pairwise(
        self, *, symmetric: bool, **sj: Unpack[_GpuSoftJaccard]
    ) -> npt.NDArray[np.float64]: ...

def gpu_cohort_pairwise(
    data: npt.NDArray[np.uint8],
    sizes: npt.NDArray[np.int64],
    *,
    symmetric: bool,
    **sj: Unpack[_GpuSoftJaccard],
) -> npt.NDArray[np.float64]: ...
def gpu_kde_class_sums(
    queries: npt.NDArray[np.uint8],
    data: npt.NDArray[np.uint8],
    classes: npt.NDArray[np.int64],
    n_classes: int,
    denom: npt.NDArray[np.float64],
    *,
    cutoff: float,
) -> npt.NDArray[np.float64]: ...
def gpu_keypoint_log_likelihood(
    query: npt.NDArray[np.uint8],
    train: npt.NDArray[np.uint8],
    train_sample: npt.NDArray[np.int64],
    sample_class: npt.NDArray[np.int64],
    n_classes: int,
    *,
    exclude_sample: int | None,
    k: int | None,
    background: float,
) -> npt.NDArray[np.float64]: ...
def gpu_scale_space(
    volume: npt.NDArray[np.float32],
    *,
    keep_images: bool,
    **params: float,
) -> list[dict[str, object]]: ...

# --- segment.rs ---
@final
class TransferAtlases:
    def __new__(
        cls,
        label_maps: list[npt.NDArray[np.int32]],
        intensities: list[npt.NDArray[np.float32]],
    ) -> TransferAtlases: ...
    @property
    def labels(self) -> list[int]: ...
    def __len__(self) -> int: ...
    def organ_size(self, atlas: int, label: int) -> int: ...
    def transfer(
        self,
        image: npt.NDArray[np.float32],
        atlas: npt.NDArray[np.uint32],
        label: npt.NDArray[np.int32],
        shift: npt.NDArray[np.int32],
        weight: npt.NDArray[np.float64],
        nu: npt.NDArray[np.float32],
        background_fraction: float,
        max_vote: bool = False,
        posterior: bool = False,
    ) -> tuple[
        npt.NDArray[np.int32],
        npt.NDArray[np.float32],
        npt.NDArray[np.float64],
        int,
    ]: ...

@final
class AtlasKeypoints:
    def __new__(
        cls,
        descriptors: list[npt.NDArray[np.uint8]],
        xyz: list[npt.NDArray[np.float64]],
        scale: list[npt.NDArray[np.float64]],
        labels: list[npt.NDArray[np.int32]],
    ) -> AtlasKeypoints: ...
    def __len__(self) -> int: ...
    def n_keypoints(self, atlas: int) -> int: ...
    def match_all(
        self,
        descriptors: npt.NDArray[np.uint8],
        xyz: npt.NDArray[np.float64],
        scale: npt.NDArray[np.float64],
        *,
        ratio: float,
        scale_factor: float,
        hough: bool,
        hough_queries: int,
    ) -> tuple[
        npt.NDArray[np.uint32],
        npt.NDArray[np.uint32],
        npt.NDArray[np.uint32],
        npt.NDArray[np.int32],
        npt.NDArray[np.float32],
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
    ]: ...

def vote_labels(
    n_query: int,
    query: npt.NDArray[np.uint32],
    label: npt.NDArray[np.int32],
    dist2: npt.NDArray[np.float32],
    pm: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]: ...

# --- kde.rs ---
def keypoint_log_likelihood(
    query: npt.NDArray[np.uint8],
    train: npt.NDArray[np.uint8],
    train_sample: npt.NDArray[np.int64],
    sample_class: npt.NDArray[np.int64],
    n_classes: int,
    *,
    exclude_sample: int | None,
    k: int | None,
    background: float,
    checks: int | None,
) -> npt.NDArray[np.float64]: ...
def vector_log_likelihood(
    query: npt.NDArray[np.float64],
    train: npt.NDArray[np.float64],
    train_class: npt.NDArray[np.int64],
    n_classes: int,
    *,
    exclude: npt.NDArray[np.int64] | None,
    background: float,
) -> npt.NDArray[np.float64]: ...
def vector_dots_i8(
    codes: npt.NDArray[np.int8],
    scale: npt.NDArray[np.float32],
    query: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]: ...
def binary_log_likelihood(
    query: npt.NDArray[np.uint8],
    train: npt.NDArray[np.uint8],
    train_class: npt.NDArray[np.int64],
    n_classes: int,
    *,
    exclude: npt.NDArray[np.int64] | None,
    background: float,
) -> npt.NDArray[np.float64]: ...

# --- matching.rs ---
def knn_exact(
    data: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8], *, k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def knn_exact_kernel() -> str: ...
def knn_forest(
    data: npt.NDArray[np.uint8],
    queries: npt.NDArray[np.uint8],
    *,
    k: int,
    checks: int,
    trees: int,
    leaf_size: int,
    seed: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def match_sets(
    desc_a: npt.NDArray[np.uint8],
    xyz_a: npt.NDArray[np.float64],
    scale_a: npt.NDArray[np.float64],
    desc_b: npt.NDArray[np.uint8],
    xyz_b: npt.NDArray[np.float64],
    scale_b: npt.NDArray[np.float64],
    *,
    ratio: float,
    scale_factor: float,
    hough: bool,
    hough_sigma: float,
    keep_fraction: float,
    kde_bandwidth: float,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    tuple[float, float, float] | None,
]: ...
def ransac_similarity(
    src: npt.NDArray[np.float64],
    dst: npt.NDArray[np.float64],
    *,
    iterations: int,
    inlier_mm: float,
    max_scale: float,
    with_scale: bool,
    seed: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], float, float]: ...
def soft_intersections(
    desc_a: npt.NDArray[np.uint8],
    desc_b: npt.NDArray[np.uint8],
    *,
    xyz_a: npt.NDArray[np.float64] | None,
    scale_a: npt.NDArray[np.float64] | None,
    xyz_b: npt.NDArray[np.float64] | None,
    scale_b: npt.NDArray[np.float64] | None,
    **sj: Unpack[_SoftJaccard],
) -> tuple[float, float]: ...
def reference_votes(
    sets: list[npt.NDArray[np.uint8]], **votes: Unpack[_Votes]
) -> npt.NDArray[np.float64]: ...

@final
class SearchEngine:
    def __new__(cls, *, trees: int) -> SearchEngine: ...
    def add(self, desc: npt.NDArray[np.uint8]) -> int: ...
    def __len__(self) -> int: ...
    @property
    def n_points(self) -> int: ...
    @property
    def has_forest(self) -> bool: ...
    def sizes(self) -> npt.NDArray[np.int64]: ...
    def descriptors(self) -> npt.NDArray[np.uint8]: ...
    def memory_bytes(self) -> int: ...
    def build_forest(self) -> None: ...
    def search(
        self,
        desc: npt.NDArray[np.uint8],
        *,
        exclude: int | None,
        allowed: npt.NDArray[np.bool_] | None,
        **sj: Unpack[_SoftJaccard],
    ) -> npt.NDArray[np.float64]: ...
    def pairwise(
        self, *, symmetric: bool, **sj: Unpack[_SoftJaccard]
    ) -> npt.NDArray[np.float64]: ...
    def reference_votes(self, **votes: Unpack[_Votes]) -> npt.NDArray[np.float64]: ...

@final
class Shard:
    def __new__(
        cls,
        desc: npt.NDArray[np.uint8],
        sizes: Sequence[int],
        *,
        first_subject: int,
        base: int,
        trees: int,
    ) -> Shard: ...
    @staticmethod
    def open(
        path: str | os.PathLike[str],
        sizes: Sequence[int],
        *,
        first_subject: int,
        base: int,
        trees: int,
    ) -> Shard: ...
    @staticmethod
    def open_files(
        files: Sequence[tuple[str | os.PathLike[str], int]],
        joined: str | os.PathLike[str] | None,
        sizes: Sequence[int],
        *,
        first_subject: int,
        base: int,
        trees: int,
    ) -> Shard: ...
    @property
    def n_points(self) -> int: ...
    @property
    def is_mapped(self) -> bool: ...
    @property
    def has_forest(self) -> bool: ...
    def release_pages(self) -> None: ...
    def resident_bytes(self) -> int: ...
    def memory_bytes(self) -> int: ...
    def stats(self) -> npt.NDArray[np.uint64]: ...
    def descriptors(self, start: int, stop: int | None) -> npt.NDArray[np.uint8]: ...
    def verify(self) -> None: ...
    def build_forest(self) -> None: ...
    def save_forest(self, path: str | os.PathLike[str]) -> None: ...
    def load_forest(self, path: str | os.PathLike[str]) -> None: ...
    def knn(
        self,
        queries: npt.NDArray[np.uint8],
        *,
        exclude: int | None,
        allowed: npt.NDArray[np.bool_] | None,
        k: int,
        exact: bool,
        checks: int,
    ) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]: ...
    def knn_all_pairs(self, k: int) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]: ...

def write_shard(path: str | os.PathLike[str], desc: npt.NDArray[np.uint8]) -> None: ...
def merge_score(
    parts: Sequence[tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]],
    *,
    subject_offsets: npt.NDArray[np.int64],
    stats: npt.NDArray[np.uint64],
    k: int,
    alpha2_floor: float,
    alpha2_cap_fraction: float,
    posterior: bool,
) -> npt.NDArray[np.float64]: ...
