"""Array backends: NumPy on the CPU, CuPy on a CUDA device.

This is the only module that imports CuPy.  Everything else receives the
array module ``xp`` from a :class:`Backend` and stays device-agnostic.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from onnxgrad.errors import OnnxgradError
from onnxgrad.memory import keep_freed_memory
from onnxgrad.threads import get_num_threads, prepare_polling


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

    def describe(self) -> list[str]:
        """Lines on what runs this device's kernels, for ``inspect`` and profiles."""
        from onnxgrad.ops import compiled  # noqa: PLC0415 - ops import the runtime

        return [f"device: cpu, {get_num_threads()} thread(s); kernels {compiled.status()}"]


class CudaBackend(Backend):
    """CuPy on the current CUDA device.

    Besides transfers it is the device that :class:`~onnxgrad.capture.StepGraphs`
    records training steps on: one stream for a trainer's work, memory pools of
    their own for recorded steps, and copies into their static input buffers.
    """

    name = "cuda"

    def __init__(self, cupy: Any):
        from onnxgrad import cudnn_conv  # noqa: PLC0415 - needs CuPy loaded
        from onnxgrad.cublas import array_module  # noqa: PLC0415

        #: CuPy, with its matrix products done through cuBLAS by onnxgrad (see
        #: :mod:`onnxgrad.cublas`), so that they can be recorded in a CUDA graph,
        #: and host arrays uploaded as :meth:`recording` says.
        self.xp = array_module(cupy)
        #: What runs convolutions: cuDNN (a :class:`~onnxgrad.cudnn_conv.Convolutions`,
        #: which Conv's kernels find as ``xp.cudnn_convolutions``) or, as a phrase, why not.
        self.convolutions = cudnn_conv.start(cupy)
        self.xp.cudnn_convolutions = (None if isinstance(self.convolutions, str)
                                      else self.convolutions)
        self._cupy = cupy
        self._stream = None
        self._side = None
        self._uploads: list | None = None
        self.xp.asarray = self._asarray
        self.xp.array = self._array

    @property
    def stream(self) -> Any:
        """The stream trainers run and record their steps on.  A blocking stream:
        work on the default stream (a user's own CuPy code) stays ordered with it."""
        if self._stream is None:
            self._stream = self.xp.cuda.Stream()
        return self._stream

    def graph_memory(self) -> Any:
        """A memory pool of its own, for the intermediates of one recorded step."""
        return self.xp.cuda.MemoryPool()

    def allocating_from(self, pool: Any) -> Any:
        """A context in which this thread's CuPy allocations come from ``pool``."""
        return self.xp.cuda.using_allocator(pool.malloc)

    @contextlib.contextmanager
    def recording(self):
        """A context for recording a step: host arrays that kernels turn into device
        arrays (index tables, constants made from shapes) are uploaded at once, on a
        stream of their own, instead of as a copy that a recording cannot hold; the
        list it yields keeps them for as long as the recorded step lives."""
        if self._side is None:
            self._side = self._cupy.cuda.Stream(non_blocking=True)
        self._uploads = []
        try:
            yield self._uploads
        finally:
            self._uploads = None

    def _upload(self, host: Any, dtype: Any) -> Any:
        host = np.array(host, dtype=dtype)  # a copy: the upload outlives the caller's array
        with self._side:
            device = self._cupy.asarray(host)
        self._side.synchronize()
        self._uploads.append(device)
        return device

    def _asarray(self, a: Any, dtype: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self._uploads is None or isinstance(a, self._cupy.ndarray) or args or kwargs:
            return self._cupy.asarray(a, dtype, *args, **kwargs)
        return self._upload(a, dtype)

    def _array(self, obj: Any, dtype: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self._uploads is None or isinstance(obj, self._cupy.ndarray) or args or kwargs:
            return self._cupy.array(obj, dtype, *args, **kwargs)
        return self._upload(obj, dtype)

    def empty_like(self, host: np.ndarray) -> Any:
        return self.xp.empty(host.shape, host.dtype)

    def copy_in(self, buffer: Any, host: np.ndarray) -> None:
        """Copy the host array ``host`` into the device array ``buffer``, in stream order."""
        buffer.set(np.ascontiguousarray(host), stream=self.stream)

    def asarray(self, array: Any) -> Any:
        return self.xp.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return array
        return self.xp.asnumpy(array)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    def describe(self) -> list[str]:
        """Lines on what runs this device's kernels, for ``inspect`` and profiles."""
        from onnxgrad import cudnn_conv  # noqa: PLC0415

        device = self._cupy.cuda.Device()
        name = self._cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        return [f"device: cuda {device.id} ({name})"] + cudnn_conv.describe(self.convolutions)


_CPU = Backend()


_CUDA: CudaBackend | None = None


def get_backend(device: str) -> Backend:
    """The backend for ``device``: ``"cpu"`` or ``"cuda"``."""
    global _CUDA
    if device == "cpu":
        get_num_threads()  # the thread count (ONNXGRAD_NUM_THREADS) is checked and set here first
        keep_freed_memory()
        from onnxgrad.ops import compiled  # noqa: PLC0415 - ops import the runtime
        compiled.prepare()
        prepare_polling()
        return _CPU
    if device in ("cuda", "gpu"):
        if _CUDA is not None:
            return _CUDA
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
        _CUDA = CudaBackend(cupy)
        return _CUDA
    raise OnnxgradError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")


def nccl_modules() -> tuple[Any, Any]:
    """CuPy and its NCCL bindings (``cupy.cuda.nccl``), for data-parallel training on
    GPUs (see :class:`onnxgrad.distributed.NCCLComm`)."""
    try:
        import cupy  # noqa: PLC0415 - CuPy is imported in this module only
        from cupy.cuda import nccl  # noqa: PLC0415
    except ImportError as exc:
        raise OnnxgradError(f"NCCLComm needs CuPy with its NCCL bindings (cupy.cuda.nccl), "
                            f"which do not import: {exc}; install them with: "
                            f"pip install 'onnxgrad[gpu]' nvidia-nccl-cu12") from None
    return cupy, nccl


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        get_backend("cuda")
    except OnnxgradError:
        return False
    return True
