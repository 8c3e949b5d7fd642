# Type stubs for the compiled extension `keyfuse._core` (rust/keyfuse-py).
# One section per binding file; keep each in step with its .rs file.
import numpy as np
import numpy.typing as npt

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
