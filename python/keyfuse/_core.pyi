# Type stubs for the compiled extension `keyfuse._core` (rust/keyfuse-py).
# One section per binding file; keep each in step with its .rs file.
import numpy as np
import numpy.typing as npt

__version__: str

# --- gpu.rs ---
def cuda_available() -> bool: ...
