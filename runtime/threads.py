"""The process's threads: one pool that runs onnxgrad's CPU kernels on every core.

Every costly CPU kernel that splits its work calls :func:`parallel` with a
list of independent chunks (along batch, channel or tile), and matrix
products go through :func:`matmul`, which splits a large product into parts
on the same pool.  How work is split depends on the shapes only, never on
the thread count, so results do not change with the number of threads.  (Work
whose results cannot depend on where it is cut, a kernel that computes each
output element by the same loop whichever call holds it, may be cut into one
part per thread instead.)  A chunk that itself calls :func:`parallel` runs its
parts in its own thread.

The BLAS that NumPy loaded runs single-threaded once onnxgrad has set its
count: the pool owns the cores.  A multi-threaded BLAS keeps its threads
waiting actively between calls, and those take the cores from the pool's
threads (measured: a chunked copy that runs twice as fast on two threads
gains nothing right after a two-threaded product).

Handing chunks to the pool costs a wake-up of each helper thread, which
varies by machine (15 to 60 microseconds measured; more in virtual machines
whose idle cores sleep).  Where compiled code runs, a helper therefore polls
for its next work for :data:`SPIN_SECONDS` after each job, as OpenMP runtimes
do, before it sleeps on its lock (:mod:`onnxgrad.ops.spin`), and the thread
that handed out work polls for its end.  Having seen its work, a helper polls on
until the thread that handed it over lets go of the interpreter lock for a
kernel (:func:`releasing`, :data:`GATE_SECONDS`): asked for while held, the
lock would put it to sleep, and waking it costs the same wake-up.

A call that names what it runs (a ``key``: the kernel and its shapes) is timed
both ways, on the pool and in the calling thread, on its first runs, and from
then on runs in the calling thread if that was clearly faster
(:data:`ALONE_BELOW`), else on the pool; it is timed again after a while
(:data:`RETIME_AFTER`), lest a choice made while the machine was busy hold
for good.  Only where the chunks run is chosen so: the chunks themselves
depend on the shapes alone, so results stay the same.

A plan also runs whole steps on the pool's first helper thread while it goes
on (:func:`begin`; the weight gradients of a backward pass, see
``onnxgrad.executor``); the other helpers keep taking the parts of
:func:`parallel` meanwhile.

The count is the cores this process may use, as PyTorch's default is; the
environment variable ``ONNXGRAD_NUM_THREADS`` or :func:`set_num_threads`
changes it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from onnxgrad.errors import OnnxgradError

_lock = threading.Lock()
_local = threading.local()
_num_threads: int | None = None
_pool: "_Pool | None" = None
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
    """Use ``count`` threads in every costly CPU kernel, the matrix products included.

    NumPy's BLAS is set to one thread (onnxgrad splits its products over its
    own pool; see the module's notes), which also applies to products an
    application computes with NumPy itself."""
    global _num_threads, _pool
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise OnnxgradError(f"set_num_threads: expected a whole number of threads, 1 or more, "
                            f"got {count!r}")
    with _lock:
        if _pool is not None and count != _num_threads:
            _pool.close()
            _pool = None
        _num_threads = count
        single_threaded_blas()  # every BLAS loaded by now, SciPy's included


def _blas_controllers() -> list:
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415
            _blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        except Exception:  # threadpoolctl missing or unable to inspect the process
            _blas = []
    return _blas


def single_threaded_blas() -> None:
    """Set every BLAS loaded so far to one thread, those loaded since the last call
    included (SciPy's, which numba imports where SciPy is installed, starts with
    its own count)."""
    global _blas
    _blas = None
    _set_blas_threads(1)


def _set_blas_threads(count: int) -> None:
    for controller in _blas_controllers():
        controller.set_num_threads(count)


#: Runs of a keyed call timed each way (on the pool, in the calling thread)
#: before it settles, after one untimed run each way (the first runs pay for
#: compiling, first touches of memory and a cold pool).
TRIALS = 3

#: A keyed call leaves the pool when its best time in the calling thread is at
#: most this fraction of its best time on the pool: a split whose gain is
#: within the machine's noise stays on the pool.
ALONE_BELOW = 0.8

#: Keyed calls remembered, at most (then forgotten, and timed again).
CHOICES_KEPT = 4096

#: Runs of a keyed call after which its settled choice is timed again, then after
#: twice as many, and so on up to :data:`RETIME_MOST`: a choice made while the
#: machine was busy elsewhere (another process, another framework's threads)
#: does not hold for the rest of the process.  Measured on LeNet-5 at 2 threads
#: with another process busy during its first 40 steps: every large kernel had
#: settled in the calling thread, and the step took 2.7-2.9 ms instead of 2.3-2.5
#: for as long as the process ran.
RETIME_AFTER = 256
RETIME_MOST = 1 << 16

_choices: dict[tuple, "_Choice"] = {}


class _Choice:
    """Timings of one keyed call each way, until it has settled; then its runs, until
    it is timed again (:data:`RETIME_AFTER`)."""

    __slots__ = ("pool", "alone", "on_pool", "runs", "retime_at")

    def __init__(self):
        self.pool: list[float] = []
        self.alone: list[float] = []
        self.on_pool: bool | None = None  # None: still being timed
        self.runs = 0
        self.retime_at = RETIME_AFTER

    def settled(self) -> bool | None:
        """Where this run goes, once settled (True: the pool); None where it is timed,
        which a settled choice is again after :attr:`retime_at` runs."""
        if self.on_pool is not None:
            self.runs += 1
            if self.runs >= self.retime_at:
                self.pool.clear()
                self.alone.clear()
                self.on_pool, self.runs = None, 0
                self.retime_at = min(2 * self.retime_at, RETIME_MOST)
        return self.on_pool

    def run(self, tasks, count) -> list:
        on_pool = len(self.pool) <= len(self.alone)
        start = time.perf_counter()
        results = _on_pool(tasks, count) if on_pool else [task() for task in tasks]
        (self.pool if on_pool else self.alone).append(time.perf_counter() - start)
        if len(self.alone) > TRIALS and len(self.pool) > TRIALS:  # the first of each untimed
            self.on_pool = min(self.alone[1:]) > ALONE_BELOW * min(self.pool[1:])
        return results


def in_task() -> bool:
    """Whether the calling thread runs a task of :func:`parallel` (whose own parallel
    calls run in that thread: work split only to spread it need not be split there)."""
    return getattr(_local, "inside", False)


def place_key(*sizes: int) -> tuple:
    """A :func:`parallel` key for the caller's caller: the place in the code that
    called it (function and line) and ``sizes``, the sizes of the work there."""
    caller = sys._getframe(2)
    return (caller.f_code, caller.f_lineno) + sizes


def parallel(tasks: Sequence[Callable[[], Any]], key: Hashable = None) -> list:
    """Run ``tasks`` (independent callables) and return their results in order.

    The calling thread and the pool's threads take tasks in turn when there is
    more than one task and more than one thread; otherwise, and inside a task
    (nested calls never wait on the pool), they run in the calling thread.  A
    call with a ``key`` (what it runs: a kernel and its shapes) runs on the
    pool only where that has been measured to pay (see the module's docstring).
    An exception in a task is raised here, after every task has finished.
    """
    count = get_num_threads()
    if count == 1 or len(tasks) < 2 or getattr(_local, "inside", False):
        return [task() for task in tasks]
    if _pool is not None and _pool.busy.locked():  # another thread of the application has it
        return [task() for task in tasks]
    if key is not None:
        choice = _choices.get((key, count))
        if choice is None:
            if len(_choices) >= CHOICES_KEPT:
                _choices.clear()
            choice = _choices[(key, count)] = _Choice()
        on_pool = choice.settled()
        if on_pool is None:
            if _pool is not None and _pool.side.locked():  # no fair trial while begin() runs
                return _on_pool(tasks, count)
            return choice.run(tasks, count)
        if not on_pool:
            return [task() for task in tasks]
    return _on_pool(tasks, count)


#: Seconds a pool thread polls for its next work, and the thread that handed work
#: out for its end, before sleeping on a lock (see :mod:`onnxgrad.ops.spin`); no
#: polling where the pool has more threads than the process has cores.  A step
#: of a small network has stretches of a few tenths of a millisecond without
#: parallel work (LeNet-5's classifier): polling 1 ms instead of 0.2 made its
#: training step at 2 threads 4 % faster, the MLP's 1 %, and left the
#: transformer's and MobileNetV2's as they were (3 ms: no faster than 1).
SPIN_SECONDS = 1e-3

#: Seconds a pool thread that has seen its next work polls on, at most, for the
#: thread that handed it over to let go of the interpreter lock (:func:`releasing`),
#: then :data:`SETTLE_SECONDS` more (the call that lets go of it converts its
#: arguments first): it then takes the lock without sleeping on it.  A thread that
#: asks for the lock while another holds it sleeps until it is free, and waking it
#: costs the operating system's wake-up; measured on LeNet-5 at 2 threads: a helper
#: starts its part 7 instead of 22 microseconds after the caller, and the training
#: step is 2.5-3 % faster (15 or 100 microseconds: slower than 40).
GATE_SECONDS = 40e-6
SETTLE_SECONDS = 3e-6

_gate = np.zeros(1, dtype=np.int64)  # counts the calls of releasing()


def releasing() -> None:
    """Note that the calling thread is about to run long work without the interpreter
    lock (a compiled kernel, a part of a matrix product): a pool thread handed work
    just before waits for this (see :data:`GATE_SECONDS`)."""
    _gate[0] += 1


def prepare_polling() -> None:
    """Compile the poll of the pool's threads (once per process) where they will poll
    (more than one thread, no more than the cores, :data:`SPIN_SECONDS`), so that a
    training step's first parallel call does not: the code generator's work (some
    0.2 s and 5.6 MiB) is paid on setting up, as loading numba is."""
    count = get_num_threads()
    if 1 < count <= available_cores() and SPIN_SECONDS > 0:
        from onnxgrad.ops import spin  # noqa: PLC0415 - compiled code, loaded on use
        spin.waiter()


def _the_pool(count: int) -> "_Pool":
    global _pool
    with _lock:
        if _pool is None:
            wait = None
            if count <= available_cores() and SPIN_SECONDS > 0:
                from onnxgrad.ops import spin  # noqa: PLC0415 - compiled code, loaded on use
                wait = spin.waiter()
            _pool = _Pool(count - 1, wait)
        return _pool


def _on_pool(tasks: Sequence[Callable[[], Any]], count: int) -> list:
    """Run ``tasks`` in the calling thread and the pool's helper threads.  While the
    first helper runs a task of :func:`begin`, the others take part, and it joins
    in when that task is done."""
    pool = _the_pool(count)
    if not pool.busy.acquire(blocking=False):  # another thread of the application has it
        return [task() for task in tasks]
    side = pool.side.locked()
    first = 1 if side else 0
    helpers = range(first, min(pool.size, first + len(tasks) - 1))
    results: list = [None] * len(tasks)
    errors: list[tuple[int, BaseException]] = []
    order = iter(range(len(tasks)))
    take = threading.Lock()
    idle = threading.Condition(take)
    running = [0]  # tasks being run
    floating = np.geterr()  # the caller's handling of floating-point errors, per thread

    def work() -> None:
        _local.inside = True
        try:
            with np.errstate(**floating):
                while True:
                    with take:
                        i = next(order, None)
                        if i is None:
                            return
                        running[0] += 1
                    try:
                        results[i] = tasks[i]()
                    except BaseException as exc:  # re-raised in the caller below
                        errors.append((i, exc))
                    finally:
                        with take:
                            running[0] -= 1
                            if not running[0]:
                                idle.notify_all()
        finally:
            _local.inside = False

    if side:
        pool.offer(work)
    try:
        pool.run(work, helpers)
    finally:
        if side:
            pool.offer(None)
            with take:  # the first helper may have joined in late
                while running[0]:
                    idle.wait()
        pool.busy.release()
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    return results


class Running:
    """A task that :func:`begin` started on the pool's first helper thread, or ran
    at once where the pool was not free (one thread, inside a task, or in use)."""

    __slots__ = ("_pool", "_value", "_error")

    def __init__(self, task: Callable[[], Any]):
        self._pool: _Pool | None = None
        self._value: Any = None
        self._error: BaseException | None = None
        count = get_num_threads()
        pool = None if count == 1 or getattr(_local, "inside", False) else _the_pool(count)
        if pool is None or not pool.side.acquire(blocking=False):
            self._run(task)
            return
        if not pool.busy.acquire(blocking=False):  # a parallel() of another thread runs
            pool.side.release()
            self._run(task)
            return
        self._pool = pool
        floating = np.geterr()

        def job() -> None:
            _local.inside = True
            try:
                with np.errstate(**floating):
                    self._run(task)
            finally:
                _local.inside = False
            pool.join_in()

        try:
            pool.start(job)
        finally:
            pool.busy.release()

    def _run(self, task: Callable[[], Any]) -> None:
        try:
            self._value = task()
        except BaseException as exc:  # re-raised by result()
            self._error = exc

    def result(self) -> Any:
        """Wait for the task and free the pool; its result, or its exception raised."""
        if self._pool is not None:
            self._pool.finish()
            self._pool.side.release()
            self._pool = None
        if self._error is not None:
            raise self._error
        return self._value


def begin(task: Callable[[], Any]) -> Running:
    """Start ``task`` on the pool's first helper thread and return at once, so that
    the caller goes on while it runs; :meth:`Running.result` waits for it.  The
    other helpers take the parts of :func:`parallel` meanwhile (with two threads,
    there are none: the caller runs them), and the first joins in once ``task``
    is done.  With one thread, inside a pool task, or while the pool or its
    first helper is in use, ``task`` runs here, before this returns."""
    return Running(task)


_STRIDE = 8  # counters a cache line apart: each thread polls a line of its own


class _Pool:
    """Helper threads that each run the job they are handed, woken by a lock.

    A lock handed from one thread to another is the cheapest wake-up Python
    has (about a quarter of a ``concurrent.futures`` submission), and kernels
    hand over work hundreds of times a training step.  With a ``wait`` (see
    :func:`onnxgrad.ops.spin.waiter`), each helper polls a counter of the jobs
    handed to it before it sleeps on its lock, then the count of
    :func:`releasing` calls until it moves past its value at the hand-over, and
    sets a counter of the jobs it has run once the interpreter lock is free,
    which the caller polls; the locks still hand over every job, so polling
    that ends early or late costs only time.
    """

    def __init__(self, size: int, wait: Callable[..., bool] | None = None):
        self.size = size
        self._wait = wait  # polls a counter without the interpreter lock, or None
        self._posted = np.zeros(size * _STRIDE, dtype=np.int64)  # jobs handed to each helper
        self._ended = np.zeros(size * _STRIDE, dtype=np.int64)   # jobs each helper has run
        self._since = np.zeros(size * _STRIDE, dtype=np.int64)   # releasing()s before a job
        self.busy = threading.Lock()  # one parallel() or start() at a time hands out jobs
        self.side = threading.Lock()  # held while the first helper runs a job of start()
        self._offered: Callable[[], None] | None = None
        self._jobs: list[Callable[[], None] | None] = [None] * size
        self._go = [threading.Lock() for _ in range(size)]
        self._done = [threading.Lock() for _ in range(size)]
        for lock in self._go + self._done:
            lock.acquire()
        self._threads = [threading.Thread(target=self._serve, args=(i,), daemon=True,
                                          name=f"onnxgrad-{i}") for i in range(size)]
        for thread in self._threads:
            thread.start()

    def offer(self, work: Callable[[], None] | None) -> None:
        """The work of a parallel() in flight that the first helper joins in once its
        task of :func:`begin` is done (None: none now)."""
        self._offered = work

    def join_in(self) -> None:
        """Take part in the work offered now, if any (in the first helper)."""
        work = self._offered
        if work is not None:
            work()

    def _serve(self, i: int) -> None:
        seen = 0
        while True:
            if self._wait is not None:  # tells its end (see _join), then polls for the next
                self._wait(self._posted, i * _STRIDE, seen, SPIN_SECONDS,
                           self._ended, i * _STRIDE, seen,
                           _gate, self._since, GATE_SECONDS, SETTLE_SECONDS)
            self._go[i].acquire()
            seen += 1
            job = self._jobs[i]
            if job is None:  # closed
                return
            try:
                job()
            finally:
                job = self._jobs[i] = None  # nor hold the arrays its tasks read
                self._done[i].release()

    def _post(self, i: int, job: Callable[[], None]) -> None:
        self._jobs[i] = job
        self._since[i * _STRIDE] = _gate[0]
        self._posted[i * _STRIDE] += 1
        self._go[i].release()

    def _join(self, i: int) -> None:
        """Wait for helper ``i``'s job to end."""
        if self._wait is not None:
            self._wait(self._ended, i * _STRIDE, int(self._posted[i * _STRIDE]) - 1, SPIN_SECONDS)
        self._done[i].acquire()

    def run(self, job: Callable[[], None], helpers: Sequence[int]) -> None:
        """Run ``job`` in the calling thread and in the ``helpers`` (indices), and
        return when every copy has returned (``job`` catches its own errors)."""
        for i in helpers:
            self._post(i, job)
        try:
            job()
        finally:
            for i in helpers:
                self._join(i)

    def start(self, job: Callable[[], None]) -> None:
        """Hand ``job`` to the first helper thread and return (the caller holds
        :attr:`side` until :meth:`finish`)."""
        self._post(0, job)

    def finish(self) -> None:
        """Wait for the job of :meth:`start` to return."""
        self._join(0)

    def close(self) -> None:
        with self.side, self.busy:
            self._jobs = [None] * self.size
            for lock in self._go:
                lock.release()
            for thread in self._threads:
                thread.join()


def each(xp, parts: Sequence[Any], work: Callable[[Any], Any], key: Hashable = None) -> list:
    """``[work(part) for part in parts]``: on the pool for NumPy arrays (where that
    pays, for a call with a ``key``: see :func:`parallel`), one after another in
    the calling thread for any other array module."""
    if xp.__name__ != "numpy":
        return [work(part) for part in parts]
    return parallel([lambda part=part: work(part) for part in parts], key)


def sum_in_order(partials: Sequence[Any]) -> Any:
    """The sum of the partial results of chunks, in chunk order (the first partial,
    a fresh array, receives the others), so that it depends on the chunking alone."""
    total = partials[0]
    for partial in partials[1:]:
        total += partial
    return total


def split(total: int, parts: int) -> list[slice]:
    """``range(total)`` as at most ``parts`` contiguous slices of near-equal length.

    For a kernel whose chunks sum (a reduction), ``parts`` must come from the
    shapes, not from :func:`get_num_threads`, so that its result does not
    depend on the thread count."""
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


#: Multiply-adds per part of a split product: a product of
#: :data:`MATMUL_SPLIT_FROM` multiply-adds or more is cut into the nearest whole
#: number of parts of this size (a quarter of a millisecond on one core), two at
#: least.  A product of two parts costs 3-6% more on one thread than one BLAS
#: call and runs 1.35-1.6× faster on two; more parts of smaller products cost
#: more than they gain (measured).
MATMUL_PART = 1 << 25

#: Multiply-adds from which a product is split (in two parts up to 1.5 ×
#: :data:`MATMUL_PART`): with the pool's threads polling for work, a product of
#: 15 Mi multiply-adds (LeNet-5's second layer) runs in 214 instead of 318
#: microseconds on two threads, and 3% slower on one (measured).
MATMUL_SPLIT_FROM = 1 << 23

#: A product is split into this many parts at most.
MATMUL_MAX_PARTS = 8


def product_parts(macs: int) -> int:
    """The parts a product of ``macs`` multiply-adds is split into: one below
    :data:`MATMUL_SPLIT_FROM`, else the nearest whole number of parts of
    :data:`MATMUL_PART` (two at least, :data:`MATMUL_MAX_PARTS` at most)."""
    if macs < MATMUL_SPLIT_FROM:
        return 1
    return max(2, min(MATMUL_MAX_PARTS, (macs + MATMUL_PART // 2) // MATMUL_PART))


def matmul(xp, a, b, out=None):
    """``xp.matmul(a, b, out=out)``, split into parts on the pool when large.

    A product of NumPy arrays (both at least 2-D) of :data:`MATMUL_SPLIT_FROM`
    multiply-adds or more is cut into the nearest whole number of parts of
    :data:`MATMUL_PART` (two at least), along the leading batch axis, the rows of
    ``a`` or the columns of ``b``, whichever has room; each part is one BLAS
    call writing its share of the result.  The parts depend on the shapes
    only, so the result does not depend on the thread count (it may differ
    from one unsplit product in the last bits: the BLAS blocks each part's
    sums its own way)."""
    if (xp.__name__ != "numpy" or a.ndim < 2 or b.ndim < 2 or a.dtype != b.dtype
            or a.dtype.kind != "f" or a.dtype.itemsize < 4):  # BLAS products only
        return xp.matmul(a, b, out=out)
    lead = _broadcast(a.shape[:-2], b.shape[:-2])
    M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
    if lead is None or b.shape[-2] != K:
        return xp.matmul(a, b, out=out)  # NumPy's own error
    batch = 1
    for d in lead:
        batch *= d
    parts = product_parts(batch * M * N * K)
    if parts == 1:
        return xp.matmul(a, b, out=out)
    if out is None:
        out = xp.empty(lead + (M, N), dtype=xp.result_type(a, b))
    if lead and lead[0] >= parts:
        def cut(part):
            return (a[part] if a.ndim == out.ndim and a.shape[0] > 1 else a,
                    b[part] if b.ndim == out.ndim and b.shape[0] > 1 else b, out[part])
        total = lead[0]
    elif M >= N:
        def cut(part):
            return a[..., part, :], b, out[..., part, :]
        total = M
    else:
        def cut(part):
            return a, b[..., part], out[..., part]
        total = N
    def product(part):
        x, y, z = cut(part)
        releasing()
        xp.matmul(x, y, out=z)

    parallel([lambda part=part: product(part) for part in split(total, parts)],
             ("matmul", a.shape, a.strides, b.shape, b.strides, a.dtype.char))
    return out


def _broadcast(x: tuple, y: tuple):
    """The broadcast of two batch shapes, or None when they do not broadcast."""
    n = max(len(x), len(y))
    x, y = (1,) * (n - len(x)) + tuple(x), (1,) * (n - len(y)) + tuple(y)
    shape = []
    for p, q in zip(x, y):
        if p != q and 1 not in (p, q):
            return None
        shape.append(max(p, q))
    return tuple(shape)


#: Elements per part of an elementwise pass split on the pool, at least (a
#: part of a smaller pass costs more to hand over, some 15 microseconds, than
#: it saves).
ELEMENTWISE_PART = 1 << 18

#: An elementwise pass is split into this many parts at most.
ELEMENTWISE_MAX_PARTS = 16


def sized_parts(count: int, size: int, least: int, most: int) -> list[slice]:
    """``range(count)`` (the leading axis of a pass over ``size`` elements in all) as
    slices of ``least`` elements or more, ``most`` slices at most."""
    return split(count, min(most, size // least, count))


def by_rows(xp, count: int, size: int, work: Callable[[slice], Any], key: Hashable = None) -> None:
    """Run ``work(part)`` for slices ``part`` of ``range(count)`` (the leading axis
    of the arrays ``work`` reads and writes, ``size`` elements in all): in parts
    of :data:`ELEMENTWISE_PART` elements or more for NumPy arrays, on the pool
    where that pays (:func:`parallel`; the ``key`` is the place of the call and
    the sizes unless given), else once over everything."""
    parts = (sized_parts(count, size, ELEMENTWISE_PART, ELEMENTWISE_MAX_PARTS)
             if xp.__name__ == "numpy" else [slice(None)])
    if key is None and len(parts) > 1:
        key = place_key(count, size)
    each(xp, parts, work, key)
