"""Fused CuPy kernels for ops whose NumPy form takes several passes over the data.

On a GPU every NumPy-style operation is a kernel of its own that reads and
writes the whole tensor; the kernels here do such a sequence in one pass (an
``ElementwiseKernel``) or one reduction (a ``ReductionKernel``).  Each is
compiled on first use and cached.  The NumPy code of the same op is the
reference: the gpu-marked op tests compare the two on every op sample.

Kernels take the array module ``xp`` explicitly, as every kernel does, and use
these only when it is not NumPy.
"""

from __future__ import annotations

from typing import Any

_CACHE: dict[str, Any] = {}


def elementwise(xp: Any, name: str, in_params: str, out_params: str, body: str) -> Any:
    """The ``ElementwiseKernel`` ``name`` (compiled on first use)."""
    kernel = _CACHE.get(name)
    if kernel is None:
        kernel = _CACHE[name] = xp.ElementwiseKernel(in_params, out_params, body,
                                                     f"onnxgrad_{name}")
    return kernel


def reduction(xp: Any, name: str, in_params: str, out_params: str, map_expr: str,
              reduce_expr: str = "a + b", post_map: str = "y = a", identity: str = "0") -> Any:
    """The ``ReductionKernel`` ``name`` (compiled on first use)."""
    kernel = _CACHE.get(name)
    if kernel is None:
        kernel = _CACHE[name] = xp.ReductionKernel(in_params, out_params, map_expr, reduce_expr,
                                                   post_map, identity, f"onnxgrad_{name}")
    return kernel


def on_device(xp: Any) -> bool:
    """Whether ``xp`` is a GPU array module (CuPy), where these kernels apply."""
    return xp.__name__ != "numpy" and hasattr(xp, "ElementwiseKernel")


# -- BatchNormalization with batch statistics, on (N, C, P) arrays ------------------------


# Per-channel sums over (N, P) are taken in two stages: over the contiguous P axis
# first, one reduction per (item, channel), then over N.  A reduction straight to
# the C channels would give the device only C blocks of work.


def _channel_total(partial: Any) -> Any:
    """(N, C) partial sums as (1, C, 1) totals."""
    return partial.sum(axis=0).reshape(1, -1, 1)


def bn_statistics(xp: Any, X3: Any) -> tuple[Any, Any]:
    """Per-channel mean and biased variance of ``X3`` (N, C, P), each (1, C, 1): a sum,
    then a sum of squared deviations from the mean (two passes, as NumPy's)."""
    n = X3.dtype.type(max(X3.shape[0] * X3.shape[2], 1))
    mean = _channel_total(X3.sum(axis=2)) / n
    squares = reduction(xp, "bn_squared_deviations", "T x, T m", "T y",
                        "(x - m) * (x - m)")
    var = _channel_total(squares(X3, xp.broadcast_to(mean, X3.shape), axis=2)) / n
    return mean, var


def bn_normalize(xp: Any, X3: Any, mean: Any, a: Any, b: Any) -> Any:
    """``(X3 - mean) * a + b`` in one pass (the statistics and ``a``, ``b`` as (1, C, 1))."""
    kernel = elementwise(xp, "bn_normalize", "T x, T m, T a, T b", "T y", "y = (x - m) * a + b")
    return kernel(X3, mean, a, b)


def bn_grad(xp: Any, d: Any, X3: Any, mean: Any, inv: Any, scale: Any) -> tuple[Any, Any, Any]:
    """dX, dscale, dB of batch-statistics BatchNormalization on (N, C, P) arrays: two
    reductions (Σd, Σd·(x - mean)) and one elementwise pass."""
    n = X3.dtype.type(max(X3.shape[0] * X3.shape[2], 1))
    dB = _channel_total(d.sum(axis=2))
    centred = reduction(xp, "bn_grad_dot", "T d, T x, T m", "T y", "d * (x - m)")
    dscale = _channel_total(centred(d, X3, xp.broadcast_to(mean, X3.shape), axis=2)) * inv
    kernel = elementwise(
        xp, "bn_grad_input", "T d, T x, T m, T inv, T k, T db, T ds", "T dx",
        "dx = ((x - m) * inv * -ds + d - db) * k")
    dX = kernel(d, X3, mean, inv, scale.reshape(1, -1, 1) * inv, dB / n, dscale / n)
    return dX, dscale, dB


# -- activation gradients -------------------------------------------------------------------


def relu_grad(xp: Any, dY: Any, Y: Any, out: Any = None) -> Any:
    """``dY * (Y > 0)`` in one pass."""
    kernel = elementwise(xp, "relu_grad", "T dy, T y", "T dx", "dx = dy * (T)(y > (T)0)")
    return kernel(dY, Y) if out is None else kernel(dY, Y, out)


def clip_grad(xp: Any, dY: Any, X: Any, lo: Any, hi: Any) -> Any:
    """``dY * (lo <= X <= hi)`` in one pass (a bound that is None is left out; the
    bounds are scalars or 0-d arrays, read on the device)."""
    if lo is not None and hi is not None:
        kernel = elementwise(xp, "clip_grad", "T dy, T x, T lo, T hi", "T dx",
                             "dx = dy * (T)(x >= lo && x <= hi)")
        return kernel(dY, X, xp.asarray(lo, dtype=dY.dtype), xp.asarray(hi, dtype=dY.dtype))
    if lo is not None:
        kernel = elementwise(xp, "clip_grad_lo", "T dy, T x, T lo", "T dx",
                             "dx = dy * (T)(x >= lo)")
        return kernel(dY, X, xp.asarray(lo, dtype=dY.dtype))
    kernel = elementwise(xp, "clip_grad_hi", "T dy, T x, T hi", "T dx", "dx = dy * (T)(x <= hi)")
    return kernel(dY, X, xp.asarray(hi, dtype=dY.dtype))


# -- random numbers that a recorded step draws anew on each replay --------------------------

_MIX = """
__device__ unsigned long long onnxgrad_mix(unsigned long long x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}
"""

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """SplitMix64's finaliser on Python integers (the kernel's ``onnxgrad_mix``)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Draws:
    """Uniform numbers in [0, 1) on a GPU from a counter-based generator.

    Element ``i`` of a draw is a hash of (the key, the draw's number, ``i``); the
    draw's number lives in device memory and each draw advances it in a kernel,
    so that a training step recorded as a CUDA graph draws new numbers on every
    replay, the same numbers as eager steps would.
    """

    def __init__(self, xp: Any, seed: int | None):
        if seed is None:
            import secrets  # noqa: PLC0415

            seed = secrets.randbits(64)
        self.key = _mix(int(seed) & _MASK64)
        self.counter = xp.zeros(1, dtype=xp.uint64)
        self._xp = xp

    def random(self, shape: tuple[int, ...], dtype: Any) -> Any:
        xp = self._xp
        out = xp.empty(shape, dtype=dtype)
        kernel = _CACHE.get("uniform")
        if kernel is None:
            kernel = _CACHE["uniform"] = xp.ElementwiseKernel(
                "raw uint64 counter, uint64 key", "T y",
                """
                unsigned long long x = onnxgrad_mix(key ^ (counter[0] * 0x9E3779B97F4A7C15ULL));
                x = onnxgrad_mix(x + (unsigned long long)i * 0xD1B54A32D192ED03ULL);
                if (sizeof(T) == 4) y = (T)((x >> 40) * (1.0 / 16777216.0));
                else y = (T)((x >> 11) * (1.0 / 9007199254740992.0));
                """, "onnxgrad_uniform", preamble=_MIX)
        kernel(self.counter, xp.uint64(self.key), out)
        elementwise(xp, "advance", "", "uint64 c", "c += 1")(self.counter)
        return out
