"""Waits that spin: a thread that expects its next work within microseconds polls a
counter in compiled code, without the interpreter lock, instead of sleeping on a lock.

Waking a thread that sleeps on a lock costs the operating system's wake-up, some
15-60 microseconds (more in virtual machines, whose idle cores the host may take
back), while the work a training step hands to its thread pool comes in parts of
10-500 microseconds, one every few dozen microseconds.  OpenMP runtimes (PyTorch's
included) keep their threads spinning for a while after each parallel region for
the same reason.  The pool's threads (``onnxgrad.threads``) poll a counter of their
own, which the thread handing over work increments, for up to a fraction of a
millisecond, before they sleep on their lock; the lock remains what hands over the
work, so a spin that ends too early costs only the wake-up it was meant to save.

The poll is a loop of atomic loads (acquire ordering) and, on x86, the ``pause``
instruction, compiled by numba; where compiled code does not run (see
:mod:`onnxgrad.ops.compiled`), :func:`waiter` gives None and threads sleep at once.
"""

from __future__ import annotations

import platform
import time
from typing import Callable

import numpy as np

from onnxgrad.ops import compiled

_wait: Callable | None = None
_polls_per_second = 0.0
_built = False


def _build():
    """The compiled poll ``poll(counters, index, seen, polls, signals, signal, value, gate,
    since, gate_polls, settle_polls)``: ``signals[signal] = value`` first where
    ``signal`` is not negative (a release store), then whether ``counters[index]``
    differed from ``seen`` (an acquire load) within ``polls`` polls; where it did,
    then up to ``gate_polls`` polls for ``gate[0]`` to differ from ``since[index]``,
    and ``settle_polls`` more once it does."""
    numba = compiled._load_numba()
    from llvmlite import ir  # noqa: PLC0415 - numba's own code generator
    from numba import types  # noqa: PLC0415
    from numba.core import cgutils  # noqa: PLC0415
    from numba.extending import intrinsic  # noqa: PLC0415

    @intrinsic
    def load_acquire(typingctx, array, index):
        def codegen(context, builder, signature, args):
            return builder.load_atomic(_pointer(context, builder, signature, args),
                                       ordering="acquire", align=8)
        return types.int64(array, index), codegen

    @intrinsic
    def store_release(typingctx, array, index, value):
        def codegen(context, builder, signature, args):
            builder.store_atomic(args[2], _pointer(context, builder, signature, args),
                                 ordering="release", align=8)
            return context.get_dummy_value()
        return types.void(array, index, value), codegen

    def _pointer(context, builder, signature, args):
        kind = signature.args[0]
        view = context.make_array(kind)(context, builder, args[0])
        return cgutils.get_item_pointer(context, builder, kind, view, [args[1]])

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

    @intrinsic
    def relax(typingctx):
        def codegen(context, builder, signature, args):
            if x86:  # tells the core that this is a spin: less power, the pipeline freed
                hint = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
                builder.call(hint, [])
            return context.get_dummy_value()
        return types.void(), codegen

    def poll(counts, index, seen, polls, signals, signal, value, gate, since, gate_polls,
             settle_polls):
        if signal >= 0:
            store_release(signals, signal, value)
        found = False
        for _ in range(polls):
            if load_acquire(counts, index) != seen:
                found = True
                break
            relax()
        if not found:
            return load_acquire(counts, index) != seen
        if gate_polls > 0:  # then for the gate to open, and a little longer
            opened = load_acquire(since, index)
            for _ in range(gate_polls):
                if load_acquire(gate, 0) != opened:
                    for _ in range(settle_polls):
                        relax()
                    break
                relax()
        return True

    return numba.njit(nogil=True)(poll)


def waiter() -> Callable[..., bool] | None:
    """``wait(counters, index, seen, seconds, signals=None, signal=-1, value=0)``: set
    ``signals[signal]`` to ``value`` (where ``signal`` is not negative), then poll
    ``counters[index]`` until it differs from ``seen`` (True) or ``seconds`` have
    passed (False); both without the interpreter lock, so that a thread that polls
    the signal finds the lock free once it is set.  None where compiled code does not
    run."""
    global _wait, _built, _polls_per_second
    if not _built:
        _built = True
        if compiled.available():
            try:
                poll = _build()
                probe = np.zeros(1, dtype=np.int64)
                poll(probe, 0, 0, 1, probe, -1, 0, probe, probe, 0, 0)  # compiles
                polls = 1 << 14
                best = min(_timed(poll, probe, polls) for _ in range(3))
                _polls_per_second = polls / max(best, 1e-9)
                _wait = poll
            except Exception:  # numba cannot compile here: threads sleep at once
                _wait = None
    if _wait is None:
        return None
    poll, rate = _wait, _polls_per_second

    def wait(counts: np.ndarray, index: int, seen: int, seconds: float,
             signals: np.ndarray | None = None, signal: int = -1, value: int = 0,
             gate: np.ndarray | None = None, since: np.ndarray | None = None,
             gate_seconds: float = 0.0, settle_seconds: float = 0.0) -> bool:
        return poll(counts, index, seen, max(1, int(seconds * rate)),
                    counts if signals is None else signals, signal, value,
                    counts if gate is None else gate, counts if since is None else since,
                    0 if gate is None else int(gate_seconds * rate), int(settle_seconds * rate))

    return wait


def _timed(poll, probe, polls) -> float:
    start = time.perf_counter()
    poll(probe, 0, 0, polls, probe, -1, 0, probe, probe, 0, 0)
    return time.perf_counter() - start
