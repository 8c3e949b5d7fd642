# Type stubs for the compiled extension `keyfuse._core` (rust/keyfuse-py).
# One section per binding file; keep each in step with its .rs file.
import numpy as np
import numpy.typing as npt
from typing_extensions import final

__version__: str

# --- extract.rs ---
def extract3d(
    volume: npt.NDArray[np.float32],
    spacing: tuple[float, float, float],
    **params: float,
) -> dict[str, npt.NDArray[np.generic]]: ...
def extract2d(
    image: npt.NDArray[np.float32],
    spacing: tuple[float, float],
    **params: float,
) -> dict[str, npt.NDArray[np.generic]]: ...
def default_extract_params() -> dict[str, float | int]: ...

# --- gpu.rs ---
def cuda_available() -> bool: ...
def cuda_info() -> dict[str, object]: ...
def cuda_compile_check() -> dict[str, object]: ...
def gpu_knn(
    data: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def gpu_cohort_search(
    data: npt.NDArray[np.uint8],
    sizes: npt.NDArray[np.int64],
    desc: npt.NDArray[np.uint8],
    exclude: int | None = None,
    allowed: list[bool] | None = None,
    k: int = 30,
    alpha2_floor: float = 1.0,
    alpha2_cap_fraction: float = 0.1,
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
        exclude: int | None = None,
        allowed: list[bool] | None = None,
        k: int = 30,
        alpha2_floor: float = 1.0,
        alpha2_cap_fraction: float = 0.1,
    ) -> npt.NDArray[np.float64]: ...
    def pairwise(
        self,
        k: int = 30,
        alpha2_floor: float = 1.0,
        alpha2_cap_fraction: float = 0.1,
        symmetric: bool = False,
    ) -> npt.NDArray[np.float64]: ...

def gpu_cohort_pairwise(
    data: npt.NDArray[np.uint8],
    sizes: npt.NDArray[np.int64],
    k: int = 30,
    alpha2_floor: float = 1.0,
    alpha2_cap_fraction: float = 0.1,
    symmetric: bool = False,
) -> npt.NDArray[np.float64]: ...
def gpu_kde_class_sums(
    queries: npt.NDArray[np.uint8],
    data: npt.NDArray[np.uint8],
    classes: npt.NDArray[np.int64],
    n_classes: int,
    denom: npt.NDArray[np.float64],
    cutoff: float = ...,
) -> npt.NDArray[np.float64]: ...
def gpu_keypoint_log_likelihood(
    query: npt.NDArray[np.uint8],
    train: npt.NDArray[np.uint8],
    train_sample: npt.NDArray[np.int64],
    sample_class: npt.NDArray[np.int64],
    n_classes: int,
    exclude_sample: int | None = None,
    k: int | None = None,
    background: float = 1.0,
) -> npt.NDArray[np.float64]: ...
def gpu_scale_space(
    volume: npt.NDArray[np.float32],
    keep_images: bool = False,
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
        ratio: float = 0.9,
        scale_factor: float = 2.0,
        hough: bool = True,
        hough_sigma: float = 3.0,
        keep_fraction: float = 0.1,
        kde_bandwidth: float = 3.0,
        hough_queries: int = 0,
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
    exclude_sample: int | None = None,
    k: int | None = None,
    background: float = 1.0,
    checks: int | None = None,
) -> npt.NDArray[np.float64]: ...
def vector_log_likelihood(
    query: npt.NDArray[np.float64],
    train: npt.NDArray[np.float64],
    train_class: npt.NDArray[np.int64],
    n_classes: int,
    exclude: npt.NDArray[np.int64] | None = None,
    background: float = 1.0,
) -> npt.NDArray[np.float64]: ...
def binary_log_likelihood(
    query: npt.NDArray[np.uint8],
    train: npt.NDArray[np.uint8],
    train_class: npt.NDArray[np.int64],
    n_classes: int,
    exclude: npt.NDArray[np.int64] | None = None,
    background: float = 1.0,
) -> npt.NDArray[np.float64]: ...

# --- matching.rs ---
def knn_exact(
    data: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8], k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def knn_exact_kernel() -> str: ...
def knn_forest(
    data: npt.NDArray[np.uint8],
    queries: npt.NDArray[np.uint8],
    k: int,
    checks: int = 128,
    trees: int = 8,
    leaf_size: int = 8,
    seed: int = ...,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def match_sets(
    desc_a: npt.NDArray[np.uint8],
    xyz_a: npt.NDArray[np.float64],
    scale_a: npt.NDArray[np.float64],
    desc_b: npt.NDArray[np.uint8],
    xyz_b: npt.NDArray[np.float64],
    scale_b: npt.NDArray[np.float64],
    ratio: float = 0.9,
    scale_factor: float = 2.0,
    hough: bool = False,
    hough_sigma: float = 3.0,
    keep_fraction: float = 0.1,
    kde_bandwidth: float = 3.0,
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
    iterations: int = 4000,
    inlier_mm: float = 5.0,
    max_scale: float = 2.0,
    with_scale: bool = True,
    seed: int = ...,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], float, float]: ...
def soft_intersections(
    desc_a: npt.NDArray[np.uint8],
    desc_b: npt.NDArray[np.uint8],
    k: int = 30,
    exact: bool = False,
    checks: int = 128,
    alpha2_floor: float = 1.0,
    alpha2_cap_fraction: float = 0.1,
    xyz_a: npt.NDArray[np.float64] | None = None,
    scale_a: npt.NDArray[np.float64] | None = None,
    xyz_b: npt.NDArray[np.float64] | None = None,
    scale_b: npt.NDArray[np.float64] | None = None,
    posterior: bool = False,
) -> tuple[float, float]: ...
def reference_votes(
    sets: list[npt.NDArray[np.uint8]], k: int = 5, exact: bool = False, checks: int = 64
) -> npt.NDArray[np.float64]: ...

@final
class Cohort:
    def __new__(cls, trees: int = 8, leaf_size: int = 8, seed: int = ...) -> Cohort: ...
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
        exclude: int | None = None,
        allowed: npt.NDArray[np.bool_] | None = None,
        k: int = 30,
        exact: bool = False,
        checks: int = 128,
        alpha2_floor: float = 1.0,
        alpha2_cap_fraction: float = 0.1,
        posterior: bool = False,
    ) -> npt.NDArray[np.float64]: ...
    def pairwise(
        self,
        k: int = 30,
        exact: bool = False,
        checks: int = 128,
        alpha2_floor: float = 1.0,
        alpha2_cap_fraction: float = 0.1,
        symmetric: bool = False,
        posterior: bool = False,
    ) -> npt.NDArray[np.float64]: ...
    def reference_votes(
        self, k: int = 5, exact: bool = False, checks: int = 64
    ) -> npt.NDArray[np.float64]: ...
