"""The optimizer's update as one pass per parameter on the CPU, and as one kernel
launch for all parameters on a GPU, against ``Optimizer.update`` on whole arrays.

* On the CPU, ``Optimizer.update`` runs the rule as a numba loop over each
  parameter, split in parts on the thread pool (``loop_source``); with compiled
  kernels switched off it runs the rule as NumPy operations on whole arrays.
  The two agree bit for bit, at any thread count.
* On a GPU, ``DeviceUpdate.apply`` launches one multi-tensor kernel per element
  type (``multi_tensor_source``): each block updates a chunk of one tensor.
  Here that kernel's C++ is compiled by the host's compiler (no fused
  multiply-adds, as nvcc is told) and its blocks and threads are run one after
  another over the tables ``DeviceUpdate`` uploads, on tensors of sizes that
  are and are not multiples of the chunk, and with a momentum or beta1 that a
  schedule changes at every step, replayed from tables "recorded" once as a
  CUDA graph replays them.  The real kernel is compared on a device at the end
  (marked ``gpu``).
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess

import numpy as np
import pytest

import onnxgrad
from onnxgrad import optimizers
from onnxgrad.ops import compiled
from onnxgrad.optimizers import DeviceUpdate, loop_source, multi_tensor_name, multi_tensor_source
from test_fused_optimizer import CYCLED, OPTIMIZERS, _cycling

DTYPES = [np.float32, np.float64]


def _arrays(rng, shapes, dtype):
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def _assert_same(a, b, optimizer_a, optimizer_b):
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    assert optimizer_a.state.keys() == optimizer_b.state.keys()
    for k, state in optimizer_a.state.items():
        for key, value in state.items():
            np.testing.assert_array_equal(optimizer_b.state[k][key], value, err_msg=f"{k} {key}")


# -- the compiled loop on the CPU ---------------------------------------------------------

needs_compiled = pytest.mark.skipif(not compiled.available(), reason="numba is not installed")


@pytest.fixture(autouse=True)
def _threads():
    """Tests that change the thread count leave it as they found it."""
    count = onnxgrad.get_num_threads()
    yield
    onnxgrad.set_num_threads(count)

#: A parameter large enough to be split in parts on the pool, and small ones.
CPU_SHAPES = {"big": (3 * compiled.PART + 17,), "w": (7, 5), "b": (5,), "one": (1,)}


def _on_whole_arrays(monkeypatch, optimizer, params, grads):
    with monkeypatch.context() as m:
        m.setattr(compiled, "ENABLED", False)
        optimizer.update(np, params, grads)


@needs_compiled
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_compiled_loop_equals_the_rule_on_whole_arrays(name, dtype, monkeypatch):
    rng = np.random.default_rng(0)
    plain, looped = OPTIMIZERS[name](), OPTIMIZERS[name]()
    a = _arrays(rng, CPU_SHAPES, dtype)
    b = {k: v.copy() for k, v in a.items()}
    ran = []
    run = optimizers._run_loop
    monkeypatch.setattr(optimizers, "_run_loop", lambda *args: ran.append(1) or run(*args))
    for step in range(7):
        if step == 4:
            plain.lr = looped.lr = plain.lr / 3
        onnxgrad.set_num_threads(1 + step % 2)
        grads = _arrays(rng, CPU_SHAPES, dtype)
        _on_whole_arrays(monkeypatch, plain, a, grads)
        looped.update(np, b, grads)
    assert len(ran) == 7 * len(CPU_SHAPES)
    _assert_same(a, b, plain, looped)


@needs_compiled
@pytest.mark.parametrize("threads", [1, 2])
def test_the_compiled_loop_does_not_depend_on_the_thread_count(threads):
    rng = np.random.default_rng(1)
    params = _arrays(rng, CPU_SHAPES, np.float32)
    grads = _arrays(rng, CPU_SHAPES, np.float32)
    onnxgrad.set_num_threads(threads)
    optimizer = onnxgrad.AdamW(lr=0.01)
    for _ in range(3):
        optimizer.update(np, params, grads)
    onnxgrad.set_num_threads(1 if threads == 2 else 2)
    other, again = onnxgrad.AdamW(lr=0.01), _arrays(np.random.default_rng(1), CPU_SHAPES, np.float32)
    for _ in range(3):
        other.update(np, again, grads)
    _assert_same(params, again, optimizer, other)


@needs_compiled
def test_arrays_the_loop_cannot_take_run_the_rule_on_whole_arrays(monkeypatch):
    """A strided gradient, a gradient of another type or a float16 parameter."""
    rng = np.random.default_rng(2)
    cases = {
        "strided": (np.float32, rng.standard_normal((6, 8)).astype(np.float32)[:, ::2]),
        "float64-grad": (np.float32, rng.standard_normal((6, 4))),
        "half": (np.float16, rng.standard_normal((6, 4)).astype(np.float16)),
    }
    ran = []
    run = optimizers._run_loop
    monkeypatch.setattr(optimizers, "_run_loop", lambda *args: ran.append(1) or run(*args))
    for key, (dtype, grad) in cases.items():
        param = rng.standard_normal((6, 4)).astype(dtype)
        plain, looped = onnxgrad.SGD(lr=0.1, momentum=0.9), onnxgrad.SGD(lr=0.1, momentum=0.9)
        a, b = {key: param.copy()}, {key: param.copy()}
        _on_whole_arrays(monkeypatch, plain, a, {key: grad})
        looped.update(np, b, {key: grad})
        _assert_same(a, b, plain, looped)
    assert not ran


@pytest.mark.parametrize("source", [loop_source, multi_tensor_source])
def test_hyper_parameters_are_arguments_of_the_update_not_part_of_its_source(source):
    """A schedule that changes momentum at every step (OneCycleLR) runs one loop on
    the CPU and one multi-tensor kernel on a GPU."""
    a, _, ca = source(onnxgrad.SGD(lr=0.1, momentum=0.9))
    b, _, cb = source(onnxgrad.SGD(lr=0.2, momentum=0.85))
    assert a == b and ca == (0.9,) and cb == (0.85,)
    decayed, _, _ = source(onnxgrad.SGD(lr=0.1, momentum=0.9, weight_decay=0.1))
    assert decayed != a  # which terms the rule has is part of the source


@needs_compiled
def test_a_changed_momentum_takes_effect(monkeypatch):
    rng = np.random.default_rng(3)
    params = _arrays(rng, {"w": (40,)}, np.float32)
    plain, looped = onnxgrad.Adam(lr=0.01), onnxgrad.Adam(lr=0.01)
    a, b = params, {k: v.copy() for k, v in params.items()}
    for step in range(4):
        plain.betas = looped.betas = (0.9 - 0.1 * step, 0.999)
        grads = _arrays(rng, {"w": (40,)}, np.float32)
        _on_whole_arrays(monkeypatch, plain, a, grads)
        looped.update(np, b, grads)
    _assert_same(a, b, plain, looped)


# -- the multi-tensor kernel, its C++ run on the CPU --------------------------------------

_PRELUDE = """
#include <cmath>
using std::sqrt;
#define __global__
#define __device__
struct Index { unsigned x; };
static Index blockIdx, threadIdx, blockDim;
"""

_LAUNCH = """
extern "C" void launch_DTYPE(long blocks, long threads, const long long* b,
                             const long long* m, const double* h, long long chunk) {
    blockDim.x = threads;
    for (long k = blocks - 1; k >= 0; --k) {  // blocks in any order: here, the last first
        blockIdx.x = k;
        for (long t = 0; t < threads; ++t) {
            threadIdx.x = t;
            NAME(b, m, h, chunk);
        }
    }
}
"""

_LIBRARIES: dict[str, ctypes.CDLL] = {}


def _compiled_kernels(optimizer, where) -> ctypes.CDLL:
    """The multi-tensor kernels of ``optimizer``'s present settings, compiled for the host."""
    source = multi_tensor_source(optimizer)[0]
    if source in _LIBRARIES:
        return _LIBRARIES[source]
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine to run the kernel's C++ on the CPU")
    text = _PRELUDE + source
    for dtype in DTYPES:
        name = np.dtype(dtype).name
        text += _LAUNCH.replace("DTYPE", name).replace("NAME", multi_tensor_name(optimizer, dtype))
    # one file per source: a library loaded again from the same path is the one loaded first
    stem = "kernel_" + hashlib.sha1(source.encode()).hexdigest()[:12]
    (where / f"{stem}.cpp").write_text(text)
    subprocess.run([compiler, "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
                    str(where / f"{stem}.cpp"), "-o", str(where / f"{stem}.so")],
                   check=True, capture_output=True, text=True)
    _LIBRARIES[source] = library = ctypes.CDLL(str(where / f"{stem}.so"))
    return library


#: Sizes below, equal to and above the chunk (64 elements here), and not multiples of it.
GPU_SHAPES = {"w": (7, 5), "one": (1,), "chunk": (64,), "more": (65,), "b": (3, 67), "c": (1000,)}


def _launch(library, update, grads, threads=32):
    tables, alone = update.multi_tensor_tables(grads)
    assert not alone
    _launch_tables(library, update, tables, threads)


def _launch_tables(library, update, tables, threads=32):
    for dtype, (blocks, meta) in tables.items():
        launch = getattr(library, f"launch_{np.dtype(dtype).name}")
        pointer = ctypes.c_void_p
        launch(ctypes.c_long(len(blocks)), ctypes.c_long(threads),
               pointer(blocks.ctypes.data), pointer(meta.ctypes.data),
               pointer(update.device.ctypes.data), ctypes.c_longlong(update.chunk))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_multi_tensor_kernel_compiled_for_the_cpu_equals_update(name, dtype, tmp_path,
                                                                     monkeypatch):
    rng = np.random.default_rng(0)
    plain, fused = OPTIMIZERS[name](), OPTIMIZERS[name]()
    a = _arrays(rng, GPU_SHAPES, dtype)
    b = {k: v.copy() for k, v in a.items()}
    update = DeviceUpdate(fused, np, b)
    update.chunk = 64
    library = _compiled_kernels(fused, tmp_path)
    for step in range(7):
        if step == 4:
            plain.lr = fused.lr = plain.lr / 3
        grads = _arrays(rng, GPU_SHAPES, dtype)
        if step < 2:  # some parameters start later: their scalars (bias corrections) differ
            grads = {k: v for k, v in grads.items() if k in ("w", "more", "c")}
        _on_whole_arrays(monkeypatch, plain, a, grads)
        update.begin_step(grads)
        _launch(library, update, grads)
    _assert_same(a, b, plain, fused)


@pytest.mark.parametrize("name", CYCLED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_momentum_that_changes_every_step_is_honoured_by_a_replayed_launch(name, dtype, tmp_path,
                                                                              monkeypatch):
    """OneCycleLR sets a new momentum or beta1 at every step.  The launch is recorded
    once (its tables, over static gradient buffers) and replayed after each
    begin_step, as a CUDA graph replays it: the same kernel reads each step's
    values from the rows."""
    rng = np.random.default_rng(6)
    (plain, plain_schedule), (fused, fused_schedule) = _cycling(name), _cycling(name)
    a = _arrays(rng, GPU_SHAPES, dtype)
    b = {k: v.copy() for k, v in a.items()}
    buffers = {k: np.empty_like(v) for k, v in a.items()}
    update = DeviceUpdate(fused, np, b)
    update.chunk = 64
    source, device, recorded = update.multi_source[0], update.device, None
    library = _compiled_kernels(fused, tmp_path)
    for step in range(9):
        grads = _arrays(rng, GPU_SHAPES, dtype)
        _on_whole_arrays(monkeypatch, plain, a, grads)
        update.begin_step()
        assert update.multi_source[0] == source and update.device is device
        for k, grad in grads.items():
            buffers[k][...] = grad
        if recorded is None:
            recorded, alone = update.multi_tensor_tables(buffers)
            assert not alone
        _launch_tables(library, update, recorded)
        plain_schedule.step()
        fused_schedule.step()
    _assert_same(a, b, plain, fused)


def test_the_tables_cover_each_tensor_in_chunks():
    params = {"a": np.zeros(130, np.float32), "b": np.zeros(64, np.float32),
              "c": np.zeros(3), "empty": np.zeros(0, np.float32),
              "strided": np.zeros(10, np.float32)}
    update = DeviceUpdate(onnxgrad.Adam(lr=0.1), np, params)
    update.chunk = 64
    update.begin_step()
    grads = {k: np.ones_like(v) for k, v in params.items()}
    grads["strided"] = np.ones(20, np.float32)[::2]
    tables, alone = update.multi_tensor_tables(grads)
    assert alone == ["strided"]  # its own kernel updates it
    blocks, meta = tables[np.dtype(np.float32)]
    assert blocks.tolist() == [[0, 0], [0, 64], [0, 128], [1, 0]]
    state = update.optimizer.state
    assert meta.tolist() == [
        [130, 0, params["a"].ctypes.data, grads["a"].ctypes.data,
         state["a"]["exp_avg"].ctypes.data, state["a"]["exp_avg_sq"].ctypes.data],
        [64, 1, params["b"].ctypes.data, grads["b"].ctypes.data,
         state["b"]["exp_avg"].ctypes.data, state["b"]["exp_avg_sq"].ctypes.data]]
    blocks, meta = tables[np.dtype(np.float64)]
    assert blocks.tolist() == [[0, 0]] and meta[0, :2].tolist() == [3, 2]


def test_the_multi_tensor_kernel_runs_the_per_parameter_body():
    optimizer = onnxgrad.SGD(lr=0.1, momentum=0.9, dampening=0.2)
    body = DeviceUpdate(optimizer, np, {"w": np.zeros(2)}).source[2]
    source, names, constants = multi_tensor_source(optimizer)
    assert names == ("momentum_buffer",) and constants == (0.9, 0.8)
    assert all(line.strip() in source for line in body.splitlines())
    assert f"{multi_tensor_name(optimizer, np.float32)}(" in source
    assert f"{multi_tensor_name(optimizer, np.float64)}(" in source


def test_multi_tensor_is_the_default_and_can_be_switched_off():
    params = {"w": np.zeros(3, np.float32)}
    assert DeviceUpdate(onnxgrad.SGD(lr=0.1), np, params).multi_tensor
    assert not DeviceUpdate(onnxgrad.SGD(lr=0.1), np, params, multi_tensor=False).multi_tensor


# -- the real kernel on a device ----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_multi_tensor_kernel_on_a_device_equals_update(name, dtype, monkeypatch):
    from onnxgrad.backend import get_backend  # noqa: PLC0415

    cp = get_backend("cuda").xp
    rng = np.random.default_rng(0)
    shapes = dict(GPU_SHAPES, big=(5 * DeviceUpdate.CHUNK + 3,), strided=(6, 4))
    cpu = _arrays(rng, shapes, dtype)
    multi = {k: cp.asarray(v) for k, v in cpu.items()}
    single = {k: cp.asarray(v) for k, v in cpu.items()}
    reference = OPTIMIZERS[name]()
    fused, alone = OPTIMIZERS[name](), OPTIMIZERS[name]()
    update = DeviceUpdate(fused, cp, multi)
    one_by_one = DeviceUpdate(alone, cp, single, multi_tensor=False)
    for step in range(6):
        if step == 3:
            reference.lr = fused.lr = alone.lr = reference.lr / 2
        grads = _arrays(rng, shapes, dtype)
        _on_whole_arrays(monkeypatch, reference, cpu, grads)
        on_device = {k: cp.asarray(v) for k, v in grads.items()}
        on_device["strided"] = cp.asarray(np.repeat(grads["strided"], 2, axis=1))[:, ::2]
        _apply_both(update, one_by_one, on_device)
    _assert_same_on_device(cp, multi, single, cpu, dtype)


def _apply_both(update, one_by_one, grads):
    """One step of the multi-tensor and of the per-parameter device updates."""
    for each in (update, one_by_one):
        each.begin_step()
        each.apply(grads)


def _assert_same_on_device(cp, multi, single, cpu, dtype):
    """The multi-tensor kernel's parameters equal the per-parameter kernels' bit for bit
    (the same body, compiled alike), and the CPU's within the device's rounding."""
    for k in cpu:
        np.testing.assert_array_equal(cp.asnumpy(multi[k]), cp.asnumpy(single[k]), err_msg=k)
        np.testing.assert_allclose(cp.asnumpy(multi[k]), cpu[k], rtol=2e-7 if dtype == np.float32
                                   else 1e-15, atol=0, err_msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CYCLED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_scheduled_momentum_on_a_device_equals_update(name, dtype, monkeypatch):
    """OneCycleLR's momentum or beta1, new at every step, with one kernel per rule
    structure (a multi-tensor kernel and a per-parameter one) for all the steps."""
    from onnxgrad.backend import get_backend  # noqa: PLC0415

    cp = get_backend("cuda").xp
    rng = np.random.default_rng(8)
    cpu = _arrays(rng, GPU_SHAPES, dtype)
    multi = {k: cp.asarray(v) for k, v in cpu.items()}
    single = {k: cp.asarray(v) for k, v in cpu.items()}
    (reference, a), (fused, b), (alone, c) = _cycling(name), _cycling(name), _cycling(name)
    update = DeviceUpdate(fused, cp, multi)
    one_by_one = DeviceUpdate(alone, cp, single, multi_tensor=False)
    kernels = set(optimizers._KERNELS)
    for step in range(9):
        grads = _arrays(rng, GPU_SHAPES, dtype)
        _on_whole_arrays(monkeypatch, reference, cpu, grads)
        _apply_both(update, one_by_one, {k: cp.asarray(v) for k, v in grads.items()})
        for schedule in (a, b, c):
            schedule.step()
    assert len(set(optimizers._KERNELS) - kernels) <= 2  # compiled once, not once per momentum
    _assert_same_on_device(cp, multi, single, cpu, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CYCLED)
def test_a_recorded_step_replays_with_each_steps_momentum(name, monkeypatch):
    """The update recorded as a CUDA graph (as the trainer records a step) and
    replayed: each replay reads the momentum or beta1 that begin_step wrote."""
    from onnxgrad.backend import get_backend  # noqa: PLC0415
    from onnxgrad.capture import StepGraphs  # noqa: PLC0415

    backend = get_backend("cuda")
    cp = backend.xp
    rng = np.random.default_rng(9)
    cpu = _arrays(rng, GPU_SHAPES, np.float32)
    params = {k: cp.asarray(v) for k, v in cpu.items()}
    (reference, a), (fused, b) = _cycling(name), _cycling(name)
    update = DeviceUpdate(fused, cp, params)
    graphs = StepGraphs(backend)
    for step in range(9):
        grads = _arrays(rng, GPU_SHAPES, np.float32)
        _on_whole_arrays(monkeypatch, reference, cpu, grads)
        with backend.stream:
            update.begin_step()
            graphs.run(grads, update.apply, [*params.values(), *update.arrays()])
        a.step()
        b.step()
    backend.stream.synchronize()
    assert not graphs.refused and graphs.recorded == 1 and graphs.replayed == 6
    for k in GPU_SHAPES:
        np.testing.assert_allclose(cp.asnumpy(params[k]), cpu[k], rtol=2e-7, atol=0, err_msg=k)
