"""Matrix products on a CUDA device through cuBLAS, callable while a stream is
being recorded as a CUDA graph.

CuPy refuses every cuBLAS call while the current stream captures ("calling
cuBLAS API during stream capture is currently unsupported"), although cuBLAS
itself supports capture when the handle has a workspace of its own.  So the
CUDA backend's array module routes ``matmul``, ``dot``, ``tensordot`` and
two-operand ``einsum`` here: one ``cublasGemmStridedBatchedEx`` call per
product, on a handle of onnxgrad's own, through ctypes.  Everything else
is CuPy's.

The products compute in the operands' precision (float32 without TF32, as
CuPy and PyTorch do by default).  Operands that cuBLAS cannot read in place
(strided views, broadcast batches that do not collapse) are copied first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import types
from typing import Any

import numpy as np

_OP_N, _OP_T = 0, 1
_GEMM_DEFAULT = -1
#: element type -> (cudaDataType, cublasComputeType, ctypes scalar type)
_TYPES = {
    np.dtype(np.float32): (0, 68, ctypes.c_float),   # CUDA_R_32F, CUBLAS_COMPUTE_32F
    np.dtype(np.float64): (1, 70, ctypes.c_double),  # CUDA_R_64F, CUBLAS_COMPUTE_64F
    np.dtype(np.float16): (2, 68, ctypes.c_float),   # CUDA_R_16F, accumulated in float32
}
#: Workspace given to the handle, so that cuBLAS allocates nothing while recording.
WORKSPACE_BYTES = 32 << 20


class _Library:
    """The cuBLAS library that CuPy loaded, a handle of onnxgrad's own and its workspace."""

    def __init__(self, cupy: Any):
        cupy.cuda.device.get_cublas_handle()  # CuPy loads its cuBLAS now
        self.lib = ctypes.CDLL(_library_path())
        handle = ctypes.c_void_p()
        self._check(self.lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
        self._check(self.lib.cublasSetWorkspace_v2(
            handle, ctypes.c_void_p(self.workspace.data.ptr), ctypes.c_size_t(WORKSPACE_BYTES)),
            "cublasSetWorkspace")
        gemm = self.lib.cublasGemmStridedBatchedEx
        gemm.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                         ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                         ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                         ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                         ctypes.c_int, ctypes.c_longlong, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.gemm = gemm
        self.lib.cublasSetStream_v2.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.current_stream = cupy.cuda.get_current_stream
        self._stream = None

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def bind_stream(self) -> None:
        ptr = self.current_stream().ptr
        if ptr != self._stream:
            self._check(self.lib.cublasSetStream_v2(self.handle, ptr), "cublasSetStream")
            self._stream = ptr


def _library_path() -> str:
    """The file of the cuBLAS library loaded in this process (CuPy's), else the system's."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libcublas.so" in path:
                    return path
    except OSError:
        pass
    for name in ("libcublas.so.13", "libcublas.so.12", ctypes.util.find_library("cublas")):
        if name:
            return name
    raise OSError("the cuBLAS library was not found")


def array_module(cupy: Any) -> types.ModuleType:
    """CuPy's namespace with ``matmul``, ``dot``, ``tensordot`` and ``einsum``
    replaced by products through :class:`_Library` (an ordinary module object,
    so that looking a function up costs what it costs on CuPy itself)."""
    module = types.ModuleType("cupy")
    module.__dict__.update(vars(cupy))
    module.__getattr__ = lambda name: getattr(cupy, name)  # CuPy's lazily loaded parts
    library: list[_Library] = []

    def lib() -> _Library:
        if not library:
            library.append(_Library(cupy))
        return library[0]

    def matmul(a, b, out=None, **kwargs):
        if kwargs or not (isinstance(a, cupy.ndarray) and isinstance(b, cupy.ndarray)):
            return cupy.matmul(a, b, out=out, **kwargs)
        return _matmul(cupy, lib, a, b, out)

    def dot(a, b, out=None):
        if isinstance(a, cupy.ndarray) and isinstance(b, cupy.ndarray) and \
                1 <= a.ndim <= 2 and 1 <= b.ndim <= 2:
            return _matmul(cupy, lib, a, b, out)
        return cupy.dot(a, b, out=out)

    def tensordot(a, b, axes=2):
        if isinstance(axes, int):
            axes = (list(range(a.ndim - axes, a.ndim)), list(range(axes)))
        ax_a, ax_b = ([x] if isinstance(x, int) else list(x) for x in axes)
        ax_a = [x % a.ndim for x in ax_a]
        ax_b = [x % b.ndim for x in ax_b]
        free_a = [i for i in range(a.ndim) if i not in ax_a]
        free_b = [i for i in range(b.ndim) if i not in ax_b]
        k = math.prod(a.shape[i] for i in ax_a)
        a2 = a.transpose(free_a + ax_a).reshape(-1, k)
        b2 = b.transpose(ax_b + free_b).reshape(k, -1)
        shape = [a.shape[i] for i in free_a] + [b.shape[i] for i in free_b]
        return _matmul(cupy, lib, a2, b2, None).reshape(shape)

    def einsum(subscripts, *operands, **kwargs):
        out = kwargs.pop("out", None)
        result = None
        if len(operands) == 2 and not kwargs:
            result = _einsum2(cupy, lib, subscripts, *operands)
        if result is None:
            result = cupy.einsum(subscripts, *operands, **kwargs)
        if out is None:
            return result
        out[...] = result
        return out

    module.matmul, module.dot, module.tensordot, module.einsum = matmul, dot, tensordot, einsum
    return module


def _layout(rows: int, cols: int, rs: int, cs: int) -> tuple[bool, int] | None:
    """(row-major?, leading dimension) of a matrix with element strides ``rs``, ``cs``,
    or None when cuBLAS cannot read it in place."""
    if (cs == 1 or cols == 1) and (rows == 1 or rs >= max(cols, 1)):
        return True, max(rs if rows > 1 else cols, cols, 1)
    if (rs == 1 or rows == 1) and (cols == 1 or cs >= max(rows, 1)):
        return False, max(cs if cols > 1 else rows, rows, 1)
    return None


def _batch_stride(x: Any, lead: tuple[int, ...]) -> int | None:
    """The one element stride between the matrices of ``x`` over the batch ``lead``
    (0 when ``x`` is the same matrix for all), or None when there is none."""
    size = x.itemsize
    own = x.shape[:-2]
    if all(d == 1 for d in own):
        return 0
    if len(own) != len(lead) or own != lead:
        return None
    strides = [s // size for s in x.strides[:-2]]
    dims = [(d, s) for d, s in zip(own, strides) if d != 1]
    for (d0, s0), (d1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * d1:
            return None
    return dims[-1][1] if dims else 0


def _operand(cupy: Any, x: Any, lead: tuple[int, ...]):
    """``x`` as cuBLAS reads it: (array, row-major?, leading dimension, batch stride)."""
    if all(s % x.itemsize == 0 and s >= 0 for s in x.strides):
        rows, cols = x.shape[-2:]
        layout = _layout(rows, cols, x.strides[-2] // x.itemsize, x.strides[-1] // x.itemsize)
        stride = _batch_stride(x, lead)
        if layout is not None and stride is not None:
            return (x, *layout, stride)
    if x.shape[:-2] != lead and not all(d == 1 for d in x.shape[:-2]):
        x = cupy.broadcast_to(x, lead + x.shape[-2:])
    x = cupy.ascontiguousarray(x)
    batch = 0 if all(d == 1 for d in x.shape[:-2]) else x.shape[-2] * x.shape[-1]
    return x, True, max(x.shape[-1], 1), batch


def _matmul(cupy: Any, lib, a: Any, b: Any, out: Any) -> Any:
    dtype = a.dtype
    if dtype != b.dtype or dtype not in _TYPES or a.ndim == 0 or b.ndim == 0:
        return cupy.matmul(a, b, out=out)
    vector_a, vector_b = a.ndim == 1, b.ndim == 1
    if vector_a:
        a = a[None, :]
    if vector_b:
        b = b[:, None]
    M, K = a.shape[-2:]
    N = b.shape[-1]
    if b.shape[-2] != K:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not fit (inner sizes "
                         f"{K} and {b.shape[-2]})")
    lead = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    shape = lead + (M, N)
    final = shape[:-2] + (() if vector_a else (M,)) + (() if vector_b else (N,))
    batch = math.prod(lead)
    if out is not None and (out.shape != final or out.dtype != dtype):
        raise ValueError(f"matmul: out has shape {out.shape} {out.dtype}, expected {final} {dtype}")
    target = out if out is not None and out.flags.c_contiguous else cupy.empty(shape, dtype)
    if batch == 0 or M == 0 or N == 0:
        return target.reshape(final) if out is None else out
    if K == 0:
        target.fill(0)
    else:
        A, a_rows, lda, stride_a = _operand(cupy, a, lead)
        B, b_rows, ldb, stride_b = _operand(cupy, b, lead)
        data_type, compute, scalar = _TYPES[dtype]
        one, zero = scalar(1), scalar(0)  # read on the host when the call is made
        library = lib()
        library.bind_stream()
        # Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: cuBLAS gets B first.
        status = library.gemm(
            library.handle, _OP_N if b_rows else _OP_T, _OP_N if a_rows else _OP_T,
            N, M, K, ctypes.addressof(one),
            B.data.ptr, data_type, ldb, stride_b,
            A.data.ptr, data_type, lda, stride_a,
            ctypes.addressof(zero), target.data.ptr, data_type, N, M * N,
            batch, compute, _GEMM_DEFAULT)
        if status != 0:
            raise RuntimeError(f"cublasGemmStridedBatchedEx failed with status {status} "
                               f"on shapes {a.shape} @ {b.shape}")
    result = target.reshape(final)
    if out is None:
        return result
    if target is not out:
        out[...] = result
    return out


def _einsum2(cupy: Any, lib, subscripts: str, a: Any, b: Any) -> Any:
    """A two-operand einsum as one batched product, or None for the forms it does not
    cover (ellipses, an index repeated within an operand, implicit output)."""
    spec = subscripts.replace(" ", "")
    if "->" not in spec or "." in spec:
        return None
    inputs, output = spec.split("->")
    sa, sb = inputs.split(",") if inputs.count(",") == 1 else (None, None)
    if sa is None or len(sa) != a.ndim or len(sb) != b.ndim:
        return None
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or len(set(output)) != len(output):
        return None
    if any(i not in sa and i not in sb for i in output) or a.dtype != b.dtype:
        return None
    sizes: dict[str, int] = {}
    for letters, x in ((sa, a), (sb, b)):
        for i, d in zip(letters, x.shape):
            if sizes.setdefault(i, d) != d:
                return None
    # indices of one operand that the output drops are summed first
    drop_a = tuple(k for k, i in enumerate(sa) if i not in sb and i not in output)
    drop_b = tuple(k for k, i in enumerate(sb) if i not in sa and i not in output)
    if drop_a:
        a, sa = a.sum(axis=drop_a), "".join(i for k, i in enumerate(sa) if k not in drop_a)
    if drop_b:
        b, sb = b.sum(axis=drop_b), "".join(i for k, i in enumerate(sb) if k not in drop_b)
    batch = [i for i in output if i in sa and i in sb]
    contract = [i for i in sa if i in sb and i not in output]
    free_a = [i for i in sa if i not in sb]
    free_b = [i for i in sb if i not in sa]
    n_batch = math.prod(sizes[i] for i in batch)
    k = math.prod(sizes[i] for i in contract)
    a3 = a.transpose([sa.index(i) for i in batch + free_a + contract]).reshape(
        n_batch, math.prod(sizes[i] for i in free_a), k)
    b3 = b.transpose([sb.index(i) for i in batch + contract + free_b]).reshape(
        n_batch, k, math.prod(sizes[i] for i in free_b))
    product = _matmul(cupy, lib, a3, b3, None)
    order = batch + free_a + free_b
    product = product.reshape([sizes[i] for i in order])
    return product.transpose([order.index(i) for i in output])
