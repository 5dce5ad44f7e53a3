"""Compiled CPU kernels: loops that make one pass over memory where NumPy needs several.

A NumPy expression runs as one pass over memory per operation, each with its
own temporary; a normalisation or a 3×3 tile transform is a chain of them, and
on tensors larger than the cache the chain is bound by memory traffic.  The
kernels written with :func:`kernel` are plain Python loops that numba compiles
to machine code on their first call (and caches on disk, so that later
processes load them in milliseconds).  They release the interpreter lock, so
that the thread pool runs their parts on every core (:func:`by_parts`).

Each op that has such a kernel keeps its NumPy form, which runs where numba is
missing, on other array modules (CuPy), and where compiled kernels are switched
off: ``ONNXGRAD_COMPILED=0`` in the environment, or :data:`ENABLED` set to
False (the tests run both forms against each other).  A kernel's parts depend
on the shapes only, so its result does not depend on the thread count.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Any, Callable

import numpy as np

from onnxgrad.errors import OnnxgradError
from onnxgrad.threads import parallel, place_key, releasing, single_threaded_blas, sized_parts


def _from_environment() -> bool:
    text = os.environ.get("ONNXGRAD_COMPILED", "").strip()
    if text not in ("", "0", "1"):
        raise OnnxgradError(f"ONNXGRAD_COMPILED={text!r}: expected 1 (the default) or 0")
    return text != "0"


#: Whether ops run their compiled kernels where numba is installed: None until the
#: first use, which reads ``ONNXGRAD_COMPILED``.
ENABLED: bool | None = None

_numba: Any = None  # the module once imported; False where it cannot be
_prepared = False


def _load_numba():
    global _numba
    if _numba is None:
        try:
            import numba  # noqa: PLC0415
        except Exception:  # not installed, or built for another NumPy
            numba = False
        _numba = numba
    return _numba


def prepare() -> None:
    """Load numba and its code generator (some 110 MiB, once per process) if
    compiled kernels are to run: called when the CPU backend is first used, so
    that this fixed cost is paid on setting up, not inside a training step.
    Where numba imports but cannot compile (a broken installation), compiled
    kernels are switched off with a warning, and the NumPy forms run."""
    global _prepared, ENABLED
    if not _prepared and available():
        try:
            _ready(np.empty(0))
        except Exception as exc:  # numba's own errors: nothing of onnxgrad's is wrong
            ENABLED = False
            warnings.warn(f"onnxgrad's compiled CPU kernels are off: numba cannot compile "
                          f"({type(exc).__name__}: {exc}); the NumPy forms run instead",
                          RuntimeWarning, stacklevel=2)
        _prepared = True


def available(xp=None, *arrays) -> bool:
    """Whether compiled kernels run here: switched on, numba importable, and (when
    given) ``xp`` is NumPy and ``arrays`` are float32 or float64."""
    global ENABLED
    if ENABLED is None:
        ENABLED = _from_environment()
    if not ENABLED or (xp is not None and xp.__name__ != "numpy"):
        return False
    if any(a.dtype not in _FLOATS for a in arrays):
        return False
    return bool(_load_numba())


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def status() -> str:
    """What runs the CPU kernels, as a phrase (for ``inspect`` and the benchmark)."""
    if available():
        return f"compiled by numba {_load_numba().__version__}"
    if ENABLED:
        return "NumPy forms only (numba cannot be imported)"
    return "NumPy forms only (switched off by ONNXGRAD_COMPILED=0 or a numba that cannot compile)"


class Kernel:
    """A Python function compiled by numba on its first call, for each new set of
    argument types.  Compiled without the interpreter lock and cached on disk;
    ``reassociate`` lets sums be vectorised (their order then follows the
    machine's vector width, the same on every call)."""

    def __init__(self, function: Callable, reassociate: bool):
        self.function = function
        self.reassociate = reassociate
        self._compiled: Any = None
        self.__doc__ = function.__doc__
        self.__name__ = function.__name__

    def __call__(self, *args):
        if self._compiled is None:
            numba = _load_numba()
            if not numba:
                raise OnnxgradError(f"compiled kernel {self.__name__}: numba is not installed")
            function = _with_helpers(self.function, numba)
            options = dict(nogil=True, error_model="numpy",
                           fastmath={"reassoc"} if self.reassociate else False)
            try:
                self._compiled = numba.njit(cache=True, **options)(function)
            except RuntimeError:  # no writable cache (a read-only install and home)
                self._compiled = numba.njit(**options)(function)
            result = self._compiled(*args)
            # numba's code generator loads SciPy's BLAS where SciPy is installed; it
            # runs single-threaded too
            single_threaded_blas()
            return result
        releasing()
        return self._compiled(*args)


class Helper:
    """A function that kernels call: compiled into each kernel that calls it (numba
    inlines it there, so that it costs no call and takes that kernel's settings).
    Kernels name it as a module global, as any function."""

    def __init__(self, function: Callable):
        self.function = function
        self.__doc__ = function.__doc__
        self.__name__ = function.__name__
        self._compiled: Any = None

    def compiled(self, numba):
        if self._compiled is None:
            self._compiled = numba.njit(inline="always", error_model="numpy")(
                _with_helpers(self.function, numba))
        return self._compiled


def helper(function: Callable) -> Helper:
    """Decorator: ``function`` becomes a :class:`Helper` of the kernels."""
    return Helper(function)


def _with_helpers(function: Callable, numba) -> Callable:
    """``function``, reading the compiled form of each :class:`Helper` it names where
    it names one (a copy of the function with those globals replaced)."""
    scope = function.__globals__
    helpers = {name: scope[name] for name in function.__code__.co_names
               if isinstance(scope.get(name), Helper)}
    if not helpers:
        return function
    scope = {**scope, **{name: h.compiled(numba) for name, h in helpers.items()}}
    copy = types.FunctionType(function.__code__, scope, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__qualname__, copy.__module__ = function.__qualname__, function.__module__
    copy.__doc__ = function.__doc__
    return copy


def kernel(function: Callable | None = None, *, reassociate: bool = False):
    """Decorator: ``function`` becomes a :class:`Kernel`.  Kernels are written as
    loops over NumPy arrays, in the subset of Python numba compiles; they write
    into arrays they are given and take the range of their outer loop as
    arguments, so that :func:`by_parts` can split them."""
    if function is None:
        return lambda f: Kernel(f, reassociate)
    return Kernel(function, reassociate)


#: Elements per part of a compiled kernel split on the pool, at least: a part
#: of a smaller pass costs more to hand over than it saves.
PART = 1 << 17

#: A compiled kernel is split into this many parts at most.
MAX_PARTS = 16


def same_memory(a, b) -> bool:
    """Whether arrays ``a`` and ``b`` may overlap in memory."""
    return bool(np.may_share_memory(a, b))


def elementwise(kernel: Kernel, out, *arrays_and_scalars) -> Any:
    """``kernel(*flat parts of arrays_and_scalars, flat part of out)`` over parts of
    the flattened arrays (each C-contiguous, all of ``out``'s size) on the pool;
    scalars are passed whole.  Returns ``out``.  Kernels loop over ``range(size)``
    of their parts: indices numba knows to be non-negative, which it vectorises.

    ``out`` must not overlap the arrays (:func:`same_memory`): the loop of a
    kernel whose output may be one of its inputs stays scalar, some 20× slower.
    An in-place kernel takes the array it updates as its ``out``."""
    flat = [a.reshape(-1) if isinstance(a, np.ndarray) else a for a in arrays_and_scalars]
    o = out.reshape(-1)

    def work(start, stop):
        kernel(*[a[start:stop] if isinstance(a, np.ndarray) else a for a in flat],
               o[start:stop])

    by_parts(o.size, o.size, work, key=(kernel.__name__, o.size))
    return out


def by_parts(count: int, size: int, work: Callable[[int, int], Any], scale: int = 1,
             key: Any = None) -> list:
    """``work(start, stop)`` over ranges of ``range(count)`` (the kernel's outer
    loop, ``size`` elements in all), in parts of ``scale`` × :data:`PART`
    elements or more (a larger ``scale`` for kernels that take less time per
    element); the results in order.  The parts run on the pool where that has
    been measured to pay for this call (:func:`onnxgrad.threads.parallel`; its
    ``key`` is the place of the call and the sizes unless given)."""
    parts = sized_parts(count, size, scale * PART, MAX_PARTS)
    if len(parts) < 2:
        return [work(r.start, r.stop) for r in parts]
    if key is None:
        key = place_key(count, size)
    return parallel([lambda r=r: work(r.start, r.stop) for r in parts], key)


@kernel
def _ready(a):
    """The smallest kernel: its first call loads the code generator."""
    return a.size
