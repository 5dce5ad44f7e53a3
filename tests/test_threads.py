"""The thread pool (``runtime/threads.py``) and its contract: a result does not
change with the number of threads beyond float rounding.

* ``set_num_threads`` / ``get_num_threads`` and their validation, the BLAS's
  count following them, and ``ONNXGRAD_NUM_THREADS`` read in a fresh process;
* ``parallel``: results in order, exceptions raised after every task is done,
  nested calls, the caller's thread with one thread; ``split``;
* a few SGD-momentum training steps of a small CNN (Conv, BatchNormalization,
  Relu, MaxPool, depthwise Conv, Gemm) and of a small transformer block
  (MatMul attention, Softmax, LayerNormalization, Erf GELU) give the same
  losses and weights at 1 thread and at 4.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from onnx import helper

import onnxgrad
from helpers import make_model
from onnxgrad import threads
from onnxgrad.threads import parallel, split


@pytest.fixture(autouse=True)
def restore_thread_count():
    """Each test leaves the process's thread count as it found it."""
    before = onnxgrad.get_num_threads()
    yield
    onnxgrad.set_num_threads(before)


# -- the count -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_set_num_threads_rejects_what_is_not_a_positive_int(bad):
    """Non-integers, bools and counts below 1 raise OnnxgradError and change nothing."""
    onnxgrad.set_num_threads(3)
    with pytest.raises(onnxgrad.OnnxgradError, match="set_num_threads"):
        onnxgrad.set_num_threads(bad)
    assert onnxgrad.get_num_threads() == 3


@pytest.mark.parametrize("count", [1, 2, 5])
def test_get_num_threads_returns_what_was_set(count):
    onnxgrad.set_num_threads(count)
    assert onnxgrad.get_num_threads() == count


def test_set_num_threads_makes_the_blas_single_threaded():
    """The BLAS that NumPy loaded runs single-threaded at any count: onnxgrad's pool
    splits the products (threadpoolctl's view)."""
    from threadpoolctl import threadpool_info

    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    if not blas:
        pytest.skip("threadpoolctl finds no BLAS in this process")
    for count in (3, 1):
        onnxgrad.set_num_threads(count)
        assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] \
            == [1] * len(blas)


def _python(code: str, value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ONNXGRAD_NUM_THREADS=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)


def test_environment_variable_sets_the_count():
    """A fresh process with ONNXGRAD_NUM_THREADS=3 uses 3 threads, its BLAS one."""
    r = _python("import numpy, onnxgrad, threadpoolctl\n"
                "print(onnxgrad.get_num_threads())\n"
                "print(onnxgrad.threads.available_cores())\n"
                "print(sorted({i['num_threads'] for i in threadpoolctl.threadpool_info()"
                " if i['user_api'] == 'blas'}))", " 3 ")
    assert r.returncode == 0, r.stderr
    count, cores, blas = r.stdout.split("\n")[:3]
    assert count == "3"
    assert blas in ("[1]", "[]")


@pytest.mark.parametrize("bad", ["0", "two"])
def test_bad_environment_variable_is_a_clear_error(bad):
    """A value that is not a count of 1 or more fails with an OnnxgradError naming the
    variable and the value, when the count is first needed."""
    r = _python("import onnxgrad\nonnxgrad.get_num_threads()", bad)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "OnnxgradError" in last and f"ONNXGRAD_NUM_THREADS={bad!r}" in last, r.stderr


# -- parallel and split --------------------------------------------------------------------


def test_parallel_returns_results_in_task_order():
    """Tasks finishing in reverse order still give their results in task order, and
    with 4 threads more than one thread runs them."""
    onnxgrad.set_num_threads(4)
    ran_on = set()

    def task(i):
        time.sleep(0.01 * (8 - i))
        ran_on.add(threading.get_ident())
        return i * i

    assert parallel([lambda i=i: task(i) for i in range(8)]) == [i * i for i in range(8)]
    assert len(ran_on) > 1


@pytest.mark.parametrize("where", ["caller", "pool"])
def test_parallel_raises_after_every_task_finished(where):
    """The first task to run on the calling thread (or on a pool thread) fails: its
    exception reaches the caller only once every other task is done."""
    onnxgrad.set_num_threads(4)
    caller = threading.get_ident()
    failed, done = [], []
    lock = threading.Lock()

    def task(i):
        with lock:
            fail = not failed and (threading.get_ident() == caller) == (where == "caller")
            if fail:
                failed.append(i)
        if fail:
            raise ValueError(f"task {i} failed")
        time.sleep(0.05)
        done.append(i)

    with pytest.raises(ValueError, match="task . failed"):
        parallel([lambda i=i: task(i) for i in range(8)])
    assert len(failed) == 1 and sorted(done + failed) == list(range(8))


def _nested_parallel():
    """8 tasks on 4 threads, each calling parallel on 4 tasks of its own."""
    onnxgrad.set_num_threads(4)

    def outer(i):
        me = threading.get_ident()
        return parallel([lambda j=j: (i, j, threading.get_ident() == me) for j in range(4)])

    assert parallel([lambda i=i: outer(i) for i in range(8)]) == \
        [[(i, j, True) for j in range(4)] for i in range(8)]
    print("nested ok")


def _fresh_pool(count: int) -> None:
    """The next parallel() call starts a pool of ``count`` threads."""
    onnxgrad.set_num_threads(1)  # closes the pool there was
    onnxgrad.set_num_threads(count)


def test_pool_threads_poll_where_there_are_no_more_threads_than_cores(monkeypatch):
    """With compiled code, the pool's threads poll for work (and the caller for their
    end) where the count fits the cores; past the cores, or with no time to poll,
    they sleep on their locks at once."""
    from onnxgrad.ops import compiled, spin

    if not compiled.available() or spin.waiter() is None:
        pytest.skip("compiled code does not run here (numba missing or switched off)")
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    for count, seconds, polls in ((2, 1e-4, True), (3, 1e-4, False), (2, 0.0, False)):
        monkeypatch.setattr(threads, "SPIN_SECONDS", seconds)
        _fresh_pool(count)
        assert parallel([lambda: 1, lambda: 2]) == [1, 2]
        assert (threads._pool._wait is not None) is polls, (count, seconds)


def test_the_poll_is_compiled_when_the_backend_is_set_up_where_threads_will_poll(monkeypatch):
    """Setting up the CPU backend builds the pool's poll (compiled code) where its
    threads will poll, so that no training step pays for compiling it; not at one
    thread, nor with more threads than cores."""
    from onnxgrad import backend, threads
    from onnxgrad.ops import spin
    built = []
    monkeypatch.setattr(spin, "waiter", lambda: built.append(threads.get_num_threads()))
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    for count in (1, 2, 4, 8):
        onnxgrad.set_num_threads(count)
        backend.get_backend("cpu")
    assert built == [2, 4]


def test_a_wait_sees_a_change_made_by_another_thread_and_ends_when_its_time_is_up():
    """The compiled poll returns True once another thread changes the counter, False
    after its time, and sets its signal before it polls."""
    from onnxgrad.ops import spin

    wait = spin.waiter()
    if wait is None:
        pytest.skip("compiled code does not run here (numba missing or switched off)")
    counts, signals = np.zeros(16, dtype=np.int64), np.zeros(1, dtype=np.int64)
    start = time.perf_counter()
    assert not wait(counts, 8, 0, 0.02, signals, 0, 7)
    assert time.perf_counter() - start >= 0.005
    assert signals[0] == 7
    changer = threading.Timer(0.01, lambda: counts.__setitem__(8, 1))
    changer.start()
    try:
        assert wait(counts, 8, 0, 30.0)  # returns at the change, not after 30 s
    finally:
        changer.join()


def test_a_wait_with_a_gate_returns_once_the_gate_moves_or_its_time_is_up():
    """Having seen its counter change, a wait with a gate polls on until the gate moves
    past its value at ``since`` (or ``gate_seconds`` pass), then returns True."""
    from onnxgrad.ops import spin

    wait = spin.waiter()
    if wait is None:
        pytest.skip("compiled code does not run here (numba missing or switched off)")
    counts, since = np.zeros(16, dtype=np.int64), np.zeros(16, dtype=np.int64)
    gate = np.full(1, 5, dtype=np.int64)
    since[8], counts[8] = 5, 1  # the counter has changed; the gate has not moved
    start = time.perf_counter()
    assert wait(counts, 8, 0, 30.0, gate=gate, since=since, gate_seconds=0.02)
    assert time.perf_counter() - start >= 0.01  # waited for the gate, in vain
    mover = threading.Timer(0.01, lambda: gate.__setitem__(0, 6))
    mover.start()
    try:
        start = time.perf_counter()
        assert wait(counts, 8, 0, 30.0, gate=gate, since=since, gate_seconds=30.0)
        assert 0.005 <= time.perf_counter() - start < 10  # at the move, not after 30 s
    finally:
        mover.join()
    start = time.perf_counter()
    assert not wait(counts, 8, 1, 0.01, gate=gate, since=since, gate_seconds=30.0)
    assert time.perf_counter() - start < 10  # no change of the counter: no gate to wait for


def test_compiled_kernels_and_product_parts_tell_the_helpers_they_let_go_of_the_lock(
        monkeypatch):
    """Each call of a compiled kernel and each part of a split product counts in the
    gate that helpers handed work wait for (``releasing``)."""
    from onnxgrad import threads
    from onnxgrad.ops import compiled, conv
    if not compiled.available():
        pytest.skip("compiled code does not run here (numba missing or switched off)")
    onnxgrad.set_num_threads(1)
    conv.BiasGrad(np, np.ones((2, 3, 4), np.float32))  # compiled on this first call
    before = int(threads._gate[0])
    conv.BiasGrad(np, np.ones((2, 3, 4), np.float32))
    assert threads._gate[0] == before + 1
    monkeypatch.setattr(threads, "MATMUL_SPLIT_FROM", 1)
    monkeypatch.setattr(threads, "MATMUL_PART", 8 * 8 * 8)
    threads.matmul(np, np.ones((32, 8)), np.ones((8, 8)))
    assert threads._gate[0] == before + 1 + threads.product_parts(32 * 8 * 8)


@pytest.mark.parametrize("seconds", [0.0, 1e-6, 2e-4], ids=["sleep", "poll-briefly", "poll"])
def test_many_parallel_calls_lose_no_hand_over(seconds, monkeypatch):
    """Thousands of parallel() calls and begin() tasks, with parts of uneven length,
    each get every result: hand-overs that polling finds, that it gives up on and
    that go to a sleeping thread (the locks) all reach the helpers."""
    monkeypatch.setattr(threads, "SPIN_SECONDS", seconds)
    monkeypatch.setattr(threads, "available_cores", lambda: 64)  # polling at 4 threads
    _fresh_pool(4)
    parallel([lambda: None] * 4)
    from onnxgrad.ops import spin
    assert (threads._pool._wait is not None) is (seconds > 0 and spin.waiter() is not None)
    data = np.arange(4096, dtype=np.float64)
    for i in range(1500):
        size = 64 << (i % 7)
        tasks = [lambda k=k: float(data[: size + k].sum()) for k in range(3)]
        assert parallel(tasks) == [float(data[: size + k].sum()) for k in range(3)]
        if i % 50 == 0:
            running = threads.begin(lambda i=i: i * 2)
            assert parallel(tasks[:2]) == [float(data[: size + k].sum()) for k in range(2)]
            assert running.result() == i * 2


def test_nested_parallel_does_not_deadlock():
    """Tasks that call parallel themselves (more of them than threads) finish, each
    inner call in its task's own thread, with every result in order.  In a fresh
    process: a deadlocked pool would hang this one at its next thread count change."""
    code = "import test_threads; test_threads._nested_parallel()"
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__),
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("nested parallel calls deadlocked")
    assert r.returncode == 0 and r.stdout.strip() == "nested ok", r.stderr


def test_in_task_is_true_in_the_tasks_of_a_parallel_call_only():
    """Every task of a parallel call, in the caller's thread and in the pool's, runs
    ``in_task``; outside them, before and after, nothing does."""
    from onnxgrad.threads import in_task
    onnxgrad.set_num_threads(2)
    assert not in_task()
    seen = parallel([lambda: (threading.get_ident(), in_task()) for _ in range(8)])
    assert all(inside for _, inside in seen)
    assert not in_task()


def test_one_thread_runs_every_task_in_the_caller():
    onnxgrad.set_num_threads(1)
    caller = threading.get_ident()
    assert parallel([threading.get_ident for _ in range(5)]) == [caller] * 5


@pytest.mark.parametrize("total,parts", [(10, 3), (7, 7), (2, 5), (5, 0), (1000, 16)])
def test_split_covers_the_range_in_near_equal_contiguous_slices(total, parts):
    slices = split(total, parts)
    assert len(slices) == max(1, min(parts, total))
    assert slices[0].start == 0 and slices[-1].stop == total
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("a_shape,b_shape,how", [
    ((16, 64, 80), (16, 80, 96), "leading batch axis"),
    ((1, 64, 80), (6, 80, 96), "a broadcast over the batch"),
    ((600, 300), (300, 40), "rows of a"),
    ((40, 300), (300, 600), "columns of b"),
    ((3, 200, 100), (100, 300), "rows under a 2-D b"),
])
def test_split_products_equal_numpy_and_each_other(a_shape, b_shape, how, monkeypatch):
    """threads.matmul cuts large products into parts on the pool (along ``how``): the result has
    NumPy's shape and values (float32 rounding), and is the same at 1 and 4 threads."""
    from onnxgrad import threads
    from onnxgrad.threads import matmul
    monkeypatch.setattr(threads, "MATMUL_PART", 1 << 16)
    monkeypatch.setattr(threads, "MATMUL_SPLIT_FROM", 1 << 16)
    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    want = np.matmul(a, b)
    assert want.size * a_shape[-1] >= 8 * threads.MATMUL_PART, "the case must split in parts"
    results = []
    for count in (1, 4):
        onnxgrad.set_num_threads(count)
        got = matmul(np, a, b)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        results.append(got)
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("rows,parts", [(31, 1), (32, 2), (159, 2), (160, 3)])
def test_products_split_into_the_nearest_number_of_parts(rows, parts, monkeypatch):
    """A product of ``rows × 64 × 256`` multiply-adds, split from 32·64·256 of them,
    with parts of 64·64·256: one part below the split (31 rows), two from there (32
    rows) up to two and a half parts' worth, three from there (160)."""
    from onnxgrad import threads

    monkeypatch.setattr(threads, "MATMUL_PART", 64 * 64 * 256)
    monkeypatch.setattr(threads, "MATMUL_SPLIT_FROM", 32 * 64 * 256)
    handed: list[int] = []
    real = threads.parallel
    monkeypatch.setattr(threads, "parallel",
                        lambda tasks, key=None: handed.append(len(tasks)) or real(tasks, key))
    onnxgrad.set_num_threads(2)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((rows, 64)), rng.standard_normal((64, 256))
    np.testing.assert_allclose(threads.matmul(np, a, b), a @ b, rtol=1e-12, atol=1e-12)
    assert handed == ([parts] if parts > 1 else [])


def _sleepers(seconds, done):
    """Two tasks that each sleep (releasing the interpreter) and record their thread."""
    def task(i):
        time.sleep(seconds)
        done.append(threading.get_ident())
        return i
    return [lambda i=i: task(i) for i in range(2)]


def test_a_keyed_call_settles_on_the_pool_where_it_pays(monkeypatch):
    """Two 20 ms tasks that sleep run side by side on the pool: after an untimed run
    and TRIALS timed runs each way the call stays on the pool."""
    from onnxgrad import threads

    monkeypatch.setattr(threads, "_choices", {})
    onnxgrad.set_num_threads(2)
    done: list[int] = []
    for _ in range(2 * threads.TRIALS + 4):
        assert threads.parallel(_sleepers(0.02, done), key="sleepers") == [0, 1]
    choice = threads._choices[("sleepers", 2)]
    assert choice.on_pool is True
    assert len(choice.pool) == len(choice.alone) == threads.TRIALS + 1
    assert len(set(done[-4:])) == 2, "the last calls ran on two threads"


def test_a_keyed_call_settles_in_the_calling_thread_where_the_pool_costs(monkeypatch):
    """A pool that takes 20 ms to hand over loses to running the tasks in the calling
    thread: after an untimed run and TRIALS timed runs each way the call no longer
    goes to the pool; calls without a key still do, and each thread count is timed
    on its own."""
    from onnxgrad import threads

    monkeypatch.setattr(threads, "_choices", {})
    handed: list[int] = []
    real = threads._on_pool

    def slow_pool(tasks, count):
        handed.append(count)
        time.sleep(0.02)
        return real(tasks, count)

    monkeypatch.setattr(threads, "_on_pool", slow_pool)
    onnxgrad.set_num_threads(2)
    done: list[int] = []
    for _ in range(2 * threads.TRIALS + 2):
        assert threads.parallel(_sleepers(0, done), key="quick") == [0, 1]
    assert threads._choices[("quick", 2)].on_pool is False
    assert len(handed) == threads.TRIALS + 1
    threads.parallel(_sleepers(0, done), key="quick")
    assert len(handed) == threads.TRIALS + 1, "settled: the pool is not asked again"
    threads.parallel(_sleepers(0, done))
    assert len(handed) == threads.TRIALS + 2, "a call without a key runs on the pool"
    onnxgrad.set_num_threads(3)
    threads.parallel(_sleepers(0, done), key="quick")
    assert ("quick", 3) in threads._choices and threads._choices[("quick", 3)].on_pool is None


def test_a_settled_keyed_call_is_timed_again_after_a_while(monkeypatch):
    """A call settled in the calling thread while the pool was slow (the machine busy
    elsewhere) is timed both ways again after RETIME_AFTER runs, settles on the pool
    once it pays, and is timed again after twice as many runs."""
    from onnxgrad import threads

    monkeypatch.setattr(threads, "_choices", {})
    monkeypatch.setattr(threads, "RETIME_AFTER", 10)
    real = threads._on_pool
    slow = [True]
    handed: list[int] = []

    def pool(tasks, count):
        handed.append(count)
        if slow[0]:
            time.sleep(0.02)
        return real(tasks, count)

    monkeypatch.setattr(threads, "_on_pool", pool)
    onnxgrad.set_num_threads(2)
    done: list[int] = []
    trials = 2 * threads.TRIALS + 2

    def run(times):
        for _ in range(times):
            assert threads.parallel(_sleepers(0.002, done), key="busy") == [0, 1]

    run(trials)
    choice = threads._choices[("busy", 2)]
    assert choice.on_pool is False
    slow[0] = False  # the machine is quiet again
    run(9)
    assert choice.on_pool is False and len(handed) == threads.TRIALS + 1
    run(trials)  # the tenth settled run is the first timed one again
    assert choice.on_pool is True and choice.retime_at == 20
    run(19)
    assert choice.on_pool is True
    run(1)
    assert choice.on_pool is None  # timed again after twice as many runs


def test_split_product_writes_into_out(monkeypatch):
    from onnxgrad import threads
    from onnxgrad.threads import matmul
    monkeypatch.setattr(threads, "MATMUL_PART", 1 << 16)
    monkeypatch.setattr(threads, "MATMUL_SPLIT_FROM", 1 << 16)
    onnxgrad.set_num_threads(2)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((512, 256)), rng.standard_normal((256, 512))
    out = np.empty((512, 512))
    assert matmul(np, a, b, out=out) is out
    np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)


# -- the same training at 1 and 4 threads ---------------------------------------------------


def _cnn(seed=0):
    """Conv 3->32 (32x32) + BN + Relu + MaxPool, Conv 32->32 (16x16) + BN + Relu,
    depthwise Conv stride 2 + Relu, Gemm to 10 classes."""
    rng = np.random.default_rng(seed)

    def he(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)

    def bn(c, name):
        return {f"{name}_scale": (1 + 0.1 * rng.standard_normal(c)).astype(np.float32),
                f"{name}_bias": (0.1 * rng.standard_normal(c)).astype(np.float32),
                f"{name}_mean": np.zeros(c, np.float32), f"{name}_var": np.ones(c, np.float32)}

    inits = {"w1": he(32, 3, 3, 3), "b1": np.zeros(32, np.float32), **bn(32, "bn1"),
             "w2": he(32, 32, 3, 3), **bn(32, "bn2"), "wd": he(32, 1, 3, 3),
             "bd": np.zeros(32, np.float32), "wf": he(10, 32 * 8 * 8),
             "bf": np.zeros(10, np.float32)}
    pad = [1, 1, 1, 1]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], pads=pad),
        n("BatchNormalization", ["c1", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"], ["n1"]),
        n("Relu", ["n1"], ["r1"]),
        n("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["p1", "w2"], ["c2"], pads=pad),
        n("BatchNormalization", ["c2", "bn2_scale", "bn2_bias", "bn2_mean", "bn2_var"], ["n2"]),
        n("Relu", ["n2"], ["r2"]),
        n("Conv", ["r2", "wd", "bd"], ["c3"], pads=pad, group=32, strides=[2, 2]),
        n("Relu", ["c3"], ["r3"]),
        n("Flatten", ["r3"], ["f"]),
        n("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
    ]
    model = make_model(nodes, [("x", np.float32, ["N", 3, 32, 32])],
                       [("logits", np.float32, ["N", 10])], inits)
    batches = [(rng.standard_normal((8, 3, 32, 32)).astype(np.float32),
                rng.integers(0, 10, 8)) for _ in range(3)]
    return model, batches


def _transformer(seed=0):
    """One post-norm encoder block on (8, 16, 32): single-head attention (MatMul,
    Softmax), LayerNormalization, a GELU (Erf) feed-forward 32->64->32, mean over
    the sequence, Gemm to 10 classes."""
    rng = np.random.default_rng(seed)
    d, h = 32, 64

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    inits = {"wq": w(d, d), "wk": w(d, d), "wv": w(d, d), "wo": w(d, d),
             "ln1_g": np.ones(d, np.float32), "ln1_b": np.zeros(d, np.float32),
             "w1": w(d, h), "b1": np.zeros(h, np.float32), "w2": w(h, d),
             "b2": np.zeros(d, np.float32),
             "ln2_g": np.ones(d, np.float32), "ln2_b": np.zeros(d, np.float32),
             "wh": w(10, d), "bh": np.zeros(10, np.float32),
             "scale": np.array(1 / math.sqrt(d), np.float32),
             "inv_sqrt2": np.array(1 / math.sqrt(2), np.float32),
             "one": np.array(1, np.float32), "half": np.array(0.5, np.float32)}
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "wq"], ["q"]), n("MatMul", ["x", "wk"], ["k"]),
        n("MatMul", ["x", "wv"], ["v"]),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["s0"]), n("Mul", ["s0", "scale"], ["s"]),
        n("Softmax", ["s"], ["a"], axis=-1),
        n("MatMul", ["a", "v"], ["av"]), n("MatMul", ["av", "wo"], ["o"]),
        n("Add", ["x", "o"], ["res1"]),
        n("LayerNormalization", ["res1", "ln1_g", "ln1_b"], ["y1"], axis=-1),
        n("MatMul", ["y1", "w1"], ["h0"]), n("Add", ["h0", "b1"], ["h1"]),
        n("Mul", ["h1", "inv_sqrt2"], ["hs"]), n("Erf", ["hs"], ["he"]),
        n("Add", ["he", "one"], ["he1"]), n("Mul", ["h1", "he1"], ["hg"]),
        n("Mul", ["hg", "half"], ["gelu"]),
        n("MatMul", ["gelu", "w2"], ["f0"]), n("Add", ["f0", "b2"], ["f1"]),
        n("Add", ["y1", "f1"], ["res2"]),
        n("LayerNormalization", ["res2", "ln2_g", "ln2_b"], ["y2"], axis=-1),
        n("ReduceMean", ["y2"], ["pooled"], axes=[1], keepdims=0),
        n("Gemm", ["pooled", "wh", "bh"], ["logits"], transB=1),
    ]
    model = make_model(nodes, [("x", np.float32, ["N", 16, d])],
                       [("logits", np.float32, ["N", 10])], inits)
    batches = [(rng.standard_normal((8, 16, d)).astype(np.float32), rng.integers(0, 10, 8))
               for _ in range(3)]
    return model, batches


def _train(make, threads):
    """Losses of 3 SGD-momentum steps at ``threads`` threads, and the weights after."""
    onnxgrad.set_num_threads(threads)
    proto, batches = make()
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss="cross_entropy",
                               optimizer=onnxgrad.SGD(lr=0.01, momentum=0.9))
    losses = [trainer.step({"x": x}, y) for x, y in batches]
    return losses, trainer.model.parameters()


def _pool_threads():
    return [t for t in threading.enumerate() if t.name.startswith("onnxgrad")]


def _split_everything(monkeypatch):
    """Thresholds at which every splitting path runs on these small models: products,
    elementwise passes, per-channel dot products, column copies and scatters, batch-inner
    layers in parts of the batch."""
    from onnxgrad import threads
    from onnxgrad.ops import conv, normalization
    monkeypatch.setattr(threads, "MATMUL_PART", 1 << 10)
    monkeypatch.setattr(threads, "MATMUL_SPLIT_FROM", 1 << 10)
    monkeypatch.setattr(threads, "ELEMENTWISE_PART", 1 << 10)
    monkeypatch.setattr(normalization, "DOT_PART_ITEMS", 1)
    monkeypatch.setattr(conv, "PARALLEL_COPY", 0)
    monkeypatch.setattr(conv, "BATCH_PART_MIN_ITEMS", 1)


def _side_everything(monkeypatch) -> list[int]:
    """Every step that may run on the side does so from the first run on; returns the
    list that records each side step queued."""
    from onnxgrad import executor
    queued: list[int] = []

    def begin(self):
        self.runs += 1
        if onnxgrad.get_num_threads() < 2:
            return frozenset(), None
        return frozenset(self.start), None

    submit = executor._SideRun.submit

    def record(self, j, env):
        queued.append(j)
        submit(self, j, env)

    monkeypatch.setattr(executor._Overlap, "begin", begin)
    monkeypatch.setattr(executor._SideRun, "submit", record)
    return queued


@pytest.mark.parametrize("mode", ["default", "split_everything", "side_everything"])
@pytest.mark.parametrize("make", [_cnn, _transformer], ids=["cnn", "transformer"])
def test_training_at_4_threads_equals_1_thread(make, mode, monkeypatch):
    """Losses and every initializer after 3 steps (weights, momentum-updated, and
    BatchNormalization's running statistics) are the same at 1 and 4 threads: work
    is split by shape, never by thread count, and a step run on the side computes
    what it computes in turn, so not even the rounding differs."""
    split_all = mode == "split_everything"
    if split_all:
        _split_everything(monkeypatch)
    queued = _side_everything(monkeypatch) if mode == "side_everything" else None
    losses1, params1 = _train(make, 1)
    assert not _pool_threads()
    assert not queued  # one thread: no side steps
    losses4, params4 = _train(make, 4)
    if queued is not None:
        assert len(queued) >= 3 * 4, "too few steps ran on the side"
    if make is _cnn or split_all or queued:  # Winograd, conv chunks, splits, side steps: the pool
        assert _pool_threads(), "no task ran on the pool at 4 threads"
    assert all(np.isfinite(losses1)) and losses1[-1] != losses1[0]
    assert losses4 == losses1
    assert set(params4) == set(params1)
    for name in params1:
        np.testing.assert_array_equal(params4[name], params1[name], err_msg=name)


# -- side steps ----------------------------------------------------------------------------


def _steps(*specs):
    """Stand-ins for a plan's steps: (inputs, outputs, takes a context)."""
    from types import SimpleNamespace
    return [SimpleNamespace(args=list(inputs), outputs=list(outputs),
                            attrs={"ctx": object()} if ctx else {})
            for inputs, outputs, ctx in specs]


def test_side_steps_are_those_nothing_reads_and_start_once_their_inputs_are_made():
    from onnxgrad.executor import _Overlap
    steps = _steps((["x"], ["dy"], False),         # 0
                   (["dy", "w"], ["dx"], False),   # 1: read by 4
                   (["dy", "x"], ["dw"], False),   # 2: nothing reads dw: from 1, after dy
                   (["x"], ["m"], True),           # 3: nothing reads m, but takes a context
                   (["dx"], ["h"], False),         # 4: reads 1
                   (["h"], ["dh"], False))         # 5: nothing reads dh: from 5, after h
    overlap = _Overlap(steps)
    assert overlap.start == {2: 1, 5: 5}
    far = _steps(*([(["x"], ["dy"], False)] + [([f"a{k}"], [f"b{k}"], False) for k in range(10)]
                   + [(["dy"], ["dw"], False)] + [([f"b{k}"], [f"c{k}"], False) for k in range(10)]))
    assert _Overlap(far).start[11] == 11 - _Overlap.WINDOW  # at most WINDOW steps early


def _measure(overlap, step_seconds, try_seconds, runs=12):
    """Runs of ``overlap``'s calibration with the given times; the runs that tried side
    steps, and each run's side steps."""
    tried, sides = [], []
    for run in range(1, runs + 1):
        side, timing = overlap.begin()
        phase = overlap._phase()
        sides.append(side)
        if timing is not None:
            timing[:] = [t * (1 + 0.5 * (run % 2)) for t in step_seconds]  # noisy runs
            overlap.end(sum(timing))
        else:
            if phase == "try":
                tried.append(run)
            else:
                assert phase in ("without", "run") and (phase == "run" or not side)
            overlap.end(try_seconds if side else sum(step_seconds))
    return tried, sides


def test_side_steps_are_those_whose_time_the_plan_would_hide():
    """A backward pass: each layer's input gradient (read by the next) and weight
    gradient (read by none).  By the measured times, the helper can hide a weight
    gradient behind the input gradients that follow it, but not the last one,
    after which the plan has nothing left to run, nor a step shorter than
    MIN_SECONDS."""
    from onnxgrad.executor import _Overlap
    steps = _steps((["dy3", "w3"], ["dy2"], False), (["dy3", "x3"], ["dw3"], False),
                   (["dy2", "w2"], ["dy1"], False), (["dy2", "x2"], ["dw2"], False),
                   (["dy1", "x1"], ["dw1"], False), (["dy1"], ["db1"], False))
    overlap = _Overlap(steps)
    assert overlap.start == {1: 0, 3: 1, 4: 3, 5: 3}
    t = [400e-6, 300e-6, 400e-6, 300e-6, 300e-6, 10e-6]
    assert overlap._finish(t, set()) == pytest.approx(sum(t))
    assert overlap._finish(t, {1, 3}) == pytest.approx(400e-6 + 400e-6 + 300e-6 + 10e-6)
    assert overlap._choose(t) == frozenset({1, 3})


def test_side_steps_are_kept_where_the_runs_measured_faster():
    """Timed runs, then trial runs with the side steps chosen by those times in turn
    with runs without them, kept where the best trial run took at most GAIN of the
    best run without."""
    from onnxgrad.executor import _Overlap
    onnxgrad.set_num_threads(2)
    steps = _steps(*[([f"i{k}"], [f"o{k}"], False) for k in range(4)])
    step_seconds = [400e-6, 10e-6, 500e-6, 300e-6]
    fast = _Overlap(steps)
    tried, sides = _measure(fast, step_seconds, 0.9 * sum(step_seconds))
    assert tried == [5, 7, 9]  # timed from run CALIBRATION on, ROUNDS times; then in turn
    # every step may start at once: the helper takes 0 and 3 (700 µs) while the plan
    # runs 1 and 2 (510 µs); 2 as well would leave the plan idle
    assert sides[4] == frozenset({0, 3})
    assert fast.side == frozenset({0, 3}) and sides[-1] == fast.side
    slow = _Overlap(steps)
    _measure(slow, step_seconds, 0.99 * sum(step_seconds))
    assert slow.side == frozenset() and slow.begin() == (frozenset(), None)


def test_one_thread_runs_no_side_steps():
    from onnxgrad.executor import _Overlap
    onnxgrad.set_num_threads(1)
    overlap = _Overlap(_steps((["a"], ["b"], False), (["c"], ["d"], False)))
    for _ in range(12):
        assert overlap.begin() == (frozenset(), None)
        overlap.end(1.0)


def test_begin_runs_a_task_on_a_helper_while_the_caller_goes_on():
    from onnxgrad.threads import begin
    onnxgrad.set_num_threads(2)
    release = threading.Event()

    def task():
        assert release.wait(5), "the caller did not go on"
        return threading.current_thread().name

    running = begin(task)
    # while it runs, parallel() runs its tasks in the calling thread (the pool is taken)
    assert parallel([threading.current_thread for _ in range(3)]) == [threading.current_thread()] * 3
    release.set()
    assert running.result().startswith("onnxgrad")

    def fail():
        raise KeyError("side")

    with pytest.raises(KeyError, match="side"):
        begin(fail).result()
    assert parallel([lambda: 1, lambda: 2]) == [1, 2]  # the pool is free again
    onnxgrad.set_num_threads(1)
    assert begin(lambda: threading.current_thread()).result() is threading.current_thread()


def test_parallel_uses_the_other_helpers_while_a_task_of_begin_runs():
    from onnxgrad.threads import begin
    onnxgrad.set_num_threads(3)
    release = threading.Event()
    running = begin(lambda: (release.wait(5), threading.current_thread().name)[1])
    arrived = threading.Barrier(2, timeout=5)

    def meet():  # two tasks that wait for each other: they must run at the same time
        arrived.wait()
        return threading.current_thread().name

    names = parallel([meet, meet])
    release.set()
    assert running.result() == "onnxgrad-0"
    assert "onnxgrad-0" not in names and len(set(names)) == 2


def test_the_first_helper_joins_a_parallel_call_once_its_task_of_begin_is_done():
    from onnxgrad.threads import begin
    onnxgrad.set_num_threads(2)
    side_may_end = threading.Event()
    running = begin(lambda: side_may_end.wait(5))
    both = threading.Barrier(2, timeout=5)

    def first():  # the calling thread's: ends the task of begin(), then needs a partner
        side_may_end.set()
        both.wait()
        return threading.current_thread().name

    def second():
        both.wait()
        return threading.current_thread().name

    names = parallel([first, second])
    assert running.result() is True
    assert names == [threading.current_thread().name, "onnxgrad-0"]


def test_the_side_hands_its_helper_back_to_the_pool_once_its_queue_is_empty():
    """A plan's side steps hold the pool's first helper (with two threads, its only
    one) while they run; once the helper has found its queue empty and the plan has
    called ``release_if_idle``, split kernels have that helper again."""
    from types import SimpleNamespace

    from onnxgrad.executor import _SideRun
    onnxgrad.set_num_threads(2)
    plan = SimpleNamespace(_overlap=SimpleNamespace(start={0: 0}), steps=[object()],
                           _gather=lambda step, env: [],
                           _alone=lambda step, args, xp: ("done",))
    sides = _SideRun(plan, frozenset({0}), np)
    sides.submit(0, {})
    deadline = time.monotonic() + 5
    while sides.busy and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not sides.busy, "the side step did not run"
    caller = threading.current_thread().name
    held = parallel([lambda: threading.current_thread().name for _ in range(4)])
    assert held == [caller] * 4  # the helper is still the side's
    sides.release_if_idle()
    both = threading.Barrier(2, timeout=5)

    def meet():  # two tasks that wait for each other: they must run at the same time
        both.wait()
        return threading.current_thread().name

    assert sorted(parallel([meet, meet])) == sorted([caller, "onnxgrad-0"])
    assert sides.take() == [(0, (("done",), None))]
    sides.release_if_idle()  # nothing left to release: a no-op


def _side_cnn_trainer(monkeypatch):
    queued = _side_everything(monkeypatch)
    onnxgrad.set_num_threads(2)
    proto, batches = _cnn()
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss="cross_entropy",
                               optimizer=onnxgrad.SGD(lr=0.01, momentum=0.9))
    return trainer, batches, queued


def _on_the_side() -> bool:
    return threading.current_thread().name.startswith("onnxgrad")


def test_a_side_step_that_fails_names_its_node_and_the_next_run_goes_on(monkeypatch):
    from onnxgrad import executor
    trainer, batches, queued = _side_cnn_trainer(monkeypatch)
    call = executor.Plan._call
    failed = []

    def flaky(node, kernel, xp, args, attrs):
        if not failed and _on_the_side():
            failed.append(node)
            raise RuntimeError("side step failed")
        return call(node, kernel, xp, args, attrs)

    monkeypatch.setattr(executor.Plan, "_call", staticmethod(flaky))
    x, y = batches[0]
    with pytest.raises(RuntimeError, match="side step failed") as info:
        trainer.step({"x": x}, y)
    assert queued and failed
    assert info.value.onnxgrad_node is failed[0]
    assert np.isfinite(trainer.step({"x": x}, y))


def test_a_failing_step_waits_for_the_side_step_then_raises(monkeypatch):
    """The run's own error is raised once the side step has finished: no thread is
    left reading the run's arrays, and the pool is free for the next run."""
    from onnxgrad import executor
    trainer, batches, queued = _side_cnn_trainer(monkeypatch)
    call = executor.Plan._call
    running = []
    started = threading.Event()

    def slow_side_then_fail(node, kernel, xp, args, attrs):
        if _on_the_side():
            running.append(node.name)
            started.set()
            time.sleep(0.05)
            result = call(node, kernel, xp, args, attrs)
            running.remove(node.name)
            return result
        if queued:  # the helper may need a moment to take the interpreter lock
            started.wait(5)
        if running:
            raise RuntimeError("main step failed")
        return call(node, kernel, xp, args, attrs)

    monkeypatch.setattr(executor.Plan, "_call", staticmethod(slow_side_then_fail))
    x, y = batches[0]
    with pytest.raises(RuntimeError, match="main step failed"):
        trainer.step({"x": x}, y)
    assert queued and not running  # the side step had finished
    monkeypatch.setattr(executor.Plan, "_call", staticmethod(call))
    assert parallel([lambda: 1, lambda: 2]) == [1, 2]
    assert np.isfinite(trainer.step({"x": x}, y))


def test_hand_overs_wait_while_side_steps_may_read_a_weight(monkeypatch):
    """No weight changes while side steps are queued or running (here slowed down, so
    that the weights' gradients are due meanwhile): the updates come when none is."""
    from onnxgrad import executor
    trainer, batches, queued = _side_cnn_trainer(monkeypatch)
    call = executor.Plan._call

    def slow_side(node, kernel, xp, args, attrs):
        if _on_the_side():
            time.sleep(0.01)
        return call(node, kernel, xp, args, attrs)

    side_runs = []
    start = executor._SideRun.__init__

    def keep(self, *args):
        start(self, *args)
        side_runs.append(self)

    run = executor.Plan.run
    busy_at_update = []

    def watching(self, env, profile=None, record=None, on_ready=None, *args):
        def watched(weight, value):
            busy_at_update.append(any(side.busy for side in side_runs))
            return on_ready(weight, value)
        return run(self, env, profile, record, watched if on_ready else None, *args)

    waiting = []
    busy = executor._SideRun.busy

    def watched_busy(self):
        waiting.append(len(self.handoffs))
        return busy.fget(self)

    monkeypatch.setattr(executor.Plan, "_call", staticmethod(slow_side))
    monkeypatch.setattr(executor._SideRun, "__init__", keep)
    monkeypatch.setattr(executor._SideRun, "busy", property(watched_busy))
    monkeypatch.setattr(executor.Plan, "run", watching)
    x, y = batches[0]
    trainer.step({"x": x}, y)
    assert queued and side_runs
    assert max(waiting) > 0, "no hand-over was due while a side step ran"
    assert busy_at_update and not any(busy_at_update)


def test_view_steps_move_next_to_their_inputs_and_the_order_stays_topological():
    """A product's input gradient, two Reshapes of other values, then its weight gradient:
    the Reshapes move up to just after what they read, so that the two products become
    neighbours; every step still comes after the steps making its inputs."""
    from types import SimpleNamespace
    from onnxgrad.executor import _hoist_views

    def step(op, inputs, outputs):
        return SimpleNamespace(node=SimpleNamespace(op_type=op, domain=""), args=list(inputs),
                               outputs=list(outputs))

    steps = [step("MatMul", ["x", "w"], ["y"]),           # 0
             step("Relu", ["y"], ["a"]),                  # 1
             step("MatMul", ["dy", "wt"], ["dx"]),        # 2
             step("Reshape", ["a", "shape"], ["a2"]),     # 3: reads 1
             step("Transpose", ["a2"], ["at"]),           # 4: reads 3
             step("Reshape", ["dy", "shape"], ["dy2"]),   # 5: reads graph inputs only
             step("Gemm", ["at", "dy2"], ["dw"])]         # 6
    ordered, labels = _hoist_views(steps, list(range(len(steps))))
    assert labels == [5, 0, 1, 3, 4, 2, 6]
    made = {"x", "w", "dy", "wt", "shape"}
    for s in ordered:
        assert all(a in made for a in s.args), s
        made.update(s.outputs)


def test_tasks_on_the_pool_handle_floating_point_errors_as_the_caller_does():
    """np.errstate is per thread: the caller's settings apply in the pool's threads too
    (an overflow the caller ignores warns nowhere; one it raises on raises)."""
    import warnings
    onnxgrad.set_num_threads(2)
    big = np.full(4, np.finfo(np.float32).max, dtype=np.float32)

    def overflow():
        return big * np.float32(2)

    with np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        results = parallel([overflow] * 8)
    assert all(np.isinf(r).all() for r in results)
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        parallel([overflow] * 8)
