"""Array backends: NumPy on the CPU, CuPy on a CUDA device.

This is the only module that imports CuPy.  Everything else receives the
array module ``xp`` from a :class:`Backend` and stays device-agnostic.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxgrad.errors import OnnxgradError
from onnxgrad.threads import get_num_threads


class Backend:
    """An array module and the transfers between it and the host."""

    name = "cpu"
    xp: Any = np

    def asarray(self, array: Any) -> Any:
        """``array`` on this backend's device (no copy when already there)."""
        return np.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        """``array`` as a host NumPy array (no copy when already there)."""
        return np.asarray(array)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU)."""


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, cupy: Any):
        self.xp = cupy

    def asarray(self, array: Any) -> Any:
        return self.xp.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return array
        return self.xp.asnumpy(array)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()


_CPU = Backend()


def get_backend(device: str) -> Backend:
    """The backend for ``device``: ``"cpu"`` or ``"cuda"``."""
    if device == "cpu":
        get_num_threads()  # the thread count (ONNXGRAD_NUM_THREADS) is checked and set here first
        return _CPU
    if device in ("cuda", "gpu"):
        try:
            import cupy  # noqa: PLC0415 - the one place CuPy is imported
        except ImportError as exc:
            raise OnnxgradError(
                "device='cuda' needs CuPy, which is not installed; "
                "install it with: pip install 'onnxgrad[gpu]'"
            ) from exc
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing or broken
            raise OnnxgradError(f"device='cuda': CuPy cannot reach a CUDA device ({exc})") from exc
        if count < 1:
            raise OnnxgradError("device='cuda': no CUDA device was found")
        return CudaBackend(cupy)
    raise OnnxgradError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        get_backend("cuda")
    except OnnxgradError:
        return False
    return True
