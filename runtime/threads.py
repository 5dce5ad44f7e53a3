"""The process's threads: one pool for onnxgrad's kernels, and the BLAS's count.

Every costly CPU kernel that splits its work calls :func:`parallel` with a
list of independent chunks (along batch, channel or tile).  How a kernel
chunks depends on the shapes only, never on the thread count, so a result
does not change with the number of threads beyond the rounding of BLAS
products.  Chunks run on one pool per process; a chunk that itself calls
:func:`parallel` runs its parts in its own thread, and while chunks run in
parallel the BLAS runs single-threaded in each of them, so the cores are
never oversubscribed.

The count is the cores this process may use, as PyTorch's default is; the
environment variable ``ONNXGRAD_NUM_THREADS`` or :func:`set_num_threads`
changes it, for onnxgrad's pool and for the BLAS that NumPy uses alike.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from onnxgrad.errors import OnnxgradError

_lock = threading.Lock()
_local = threading.local()
_num_threads: int | None = None
_pool: ThreadPoolExecutor | None = None
_blas: Any = None  # threadpoolctl's controller of the loaded BLAS libraries, made on first use


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def _from_environment() -> int:
    text = os.environ.get("ONNXGRAD_NUM_THREADS", "").strip()
    if not text:
        return available_cores()
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise OnnxgradError(f"ONNXGRAD_NUM_THREADS={text!r}: expected a whole number of threads, 1 or more")
    return count


def get_num_threads() -> int:
    """The number of threads onnxgrad's CPU kernels use."""
    global _num_threads
    if _num_threads is None:
        set_num_threads(_from_environment())
    return _num_threads  # type: ignore[return-value]


def set_num_threads(count: int) -> None:
    """Use ``count`` threads in every costly CPU kernel, the BLAS products included."""
    global _num_threads, _pool
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise OnnxgradError(f"set_num_threads: expected a whole number of threads, 1 or more, "
                            f"got {count!r}")
    with _lock:
        if _pool is not None and count != _num_threads:
            _pool.shutdown(wait=True)
            _pool = None
        _num_threads = count
        _set_blas_threads(count)


def _blas_controllers() -> list:
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415
            _blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        except Exception:  # threadpoolctl missing or unable to inspect the process
            _blas = []
    return _blas


def _set_blas_threads(count: int) -> None:
    # More BLAS threads than cores only make its threads wait on each other.
    count = min(count, available_cores())
    for controller in _blas_controllers():
        controller.set_num_threads(count)


def parallel(tasks: Sequence[Callable[[], Any]], blas: bool = False) -> list:
    """Run ``tasks`` (independent callables) and return their results in order.

    The calling thread and the pool's threads take tasks in turn when there is
    more than one task and more than one thread; otherwise, and inside a task
    (nested calls never wait on the pool), they run in the calling thread.  An
    exception in a task is raised here, after every task has finished.

    ``blas=True`` says that the tasks run BLAS products: the BLAS then runs
    single-threaded in each task while they run (switching costs a fraction
    of a millisecond, so only chunks of products worth more than that ask).
    """
    count = get_num_threads()
    if count == 1 or len(tasks) < 2 or getattr(_local, "inside", False):
        return [task() for task in tasks]
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(count - 1, thread_name_prefix="onnxgrad")
        pool = _pool
    results: list = [None] * len(tasks)
    errors: list[tuple[int, BaseException]] = []
    order = iter(range(len(tasks)))
    take = threading.Lock()

    def work() -> None:
        _local.inside = True
        try:
            while True:
                with take:
                    i = next(order, None)
                if i is None:
                    return
                try:
                    results[i] = tasks[i]()
                except BaseException as exc:  # re-raised in the caller below
                    errors.append((i, exc))
        finally:
            _local.inside = False

    if blas:
        _set_blas_threads(1)
    try:
        helpers = [pool.submit(work) for _ in range(min(count, len(tasks)) - 1)]
        work()
        for helper in helpers:
            helper.result()
    finally:
        if blas:
            _set_blas_threads(count)
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    return results


def split(total: int, parts: int) -> list[slice]:
    """``range(total)`` as at most ``parts`` contiguous slices of near-equal length.

    For a kernel whose chunks sum (a reduction), ``parts`` must come from the
    shapes, not from :func:`get_num_threads`, so that its result does not
    depend on the thread count."""
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]
