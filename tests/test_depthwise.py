"""Direct kernels of depthwise and small-group convolutions (``ops/depthwise.py``).

* Each method (taps, dense) against the column products of ``ops/conv.py`` in
  float64: Conv, ConvGradX and ConvGradW over 1-D, 2-D and 3-D shapes, strides,
  dilations, asymmetric pads, ``auto_pad``, channel multipliers 1, 2 and 4, two and
  four channels per group, and realistic layers; the path is forced with monkeypatch.
* Central differences (``tests/gradcheck.py``) of X, W and B through the public API
  on each method.
* The float32 forward against onnxruntime at realistic sizes, on each method.
* Tiles run as tasks on the thread pool, at 1 and 2 threads, equal one task bit for bit;
  so do the compiled kernels' calls, one per thread, on 1, 2, 3 and 5 threads; their
  ranges and remembered plans.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradcheck as gc
from helpers import count_calls
import onnxgrad
from onnxgrad import threads
from onnxgrad.ops import compiled, conv, depthwise
from op_db import Sample

METHODS = ["taps", "dense"]

#: (x shape, w shape, attributes): shapes the kernels must get right.
SHAPES = [
    # 1-D
    ((2, 4, 11), (4, 1, 3), {"group": 4, "pads": [1, 1]}),
    ((2, 4, 12), (8, 1, 3), {"group": 4, "strides": [2], "dilations": [2], "pads": [2, 1]}),
    ((2, 6, 9), (6, 2, 5), {"group": 3, "pads": [2, 3]}),
    # 2-D
    ((2, 3, 9, 8), (3, 1, 3, 3), {"group": 3, "pads": [1, 1, 1, 1]}),
    ((2, 3, 9, 8), (6, 1, 3, 3), {"group": 3, "strides": [2, 2], "pads": [1, 0, 2, 1]}),
    ((2, 4, 9, 10), (4, 1, 3, 2), {"group": 4, "dilations": [2, 1], "strides": [1, 2],
                                   "pads": [2, 0, 1, 1]}),
    ((2, 4, 8, 7), (4, 1, 3, 3), {"group": 4, "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ((2, 4, 7, 8), (8, 1, 3, 3), {"group": 4, "auto_pad": "SAME_UPPER"}),
    ((2, 6, 8, 8), (6, 2, 3, 3), {"group": 3, "pads": [1, 1, 1, 1]}),
    ((2, 4, 7, 7), (4, 2, 5, 5), {"group": 2, "pads": [2, 1, 0, 2], "strides": [2, 1]}),
    ((2, 3, 10, 9), (3, 1, 4, 4), {"group": 3, "strides": [3, 2], "pads": [1, 1, 2, 0]}),
    ((1, 3, 6, 6), (3, 1, 1, 1), {"group": 3, "strides": [2, 2]}),
    ((2, 8, 9, 9), (8, 4, 3, 3), {"group": 2, "pads": [1, 1, 1, 1], "strides": [1, 2]}),
    ((2, 2, 8, 8), (8, 1, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    # 3-D
    ((2, 2, 5, 6, 5), (2, 1, 3, 3, 3), {"group": 2, "pads": [1] * 6}),
    ((1, 2, 6, 5, 7), (4, 1, 2, 3, 3), {"group": 2, "strides": [2, 1, 2], "dilations": [1, 2, 1],
                                        "pads": [1, 0, 1, 0, 1, 1]}),
    # realistic
    ((8, 32, 32, 32), (32, 1, 3, 3), {"group": 32, "pads": [1, 1, 1, 1]}),
    ((8, 32, 32, 32), (64, 1, 3, 3), {"group": 32, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((8, 64, 8, 8), (64, 1, 3, 3), {"group": 64, "pads": [1, 1, 1, 1]}),
    ((8, 64, 4, 4), (64, 2, 3, 3), {"group": 32, "pads": [1, 1, 1, 1]}),
]

#: The dense method's matrices grow as (input positions × output positions): forced
#: only on planes up to this many pairs.
DENSE_TESTED_PAIRS = 1 << 16


def _id(shape):
    x, w, attrs = shape
    return f"x{list(x)}-w{list(w)}-" + ",".join(f"{k}={v}" for k, v in sorted(attrs.items()))


def _cases(shapes):
    return [pytest.param(m, s, id=f"{m}-{_id(s)}") for s in shapes for m in METHODS
            if m == "taps" or _pairs(s) <= DENSE_TESTED_PAIRS]


def _pairs(shape):
    x, w, attrs = shape
    out = conv._conv_geometry(x, w, attrs.get("auto_pad", "NOTSET"), attrs.get("dilations"),
                              attrs.get("pads"), attrs.get("strides"))[-1]
    return math.prod(x[2:]) * math.prod(out)


def _force(monkeypatch, method):
    """The direct kernels for every Conv, by ``method`` ("taps", "dense"), or none (None)."""
    monkeypatch.setattr(depthwise, "applies", lambda *args: method is not None)
    monkeypatch.setattr(depthwise, "_dense", lambda *args: method == "dense")


def _spy(monkeypatch):
    """Counts calls of the kernels of each method."""
    return count_calls(monkeypatch, [(depthwise, name) for name in (
        "_taps_forward", "_taps_input_grad", "_taps_weight_grad",
        "_dense_forward", "_dense_input_grad", "_dense_weight_grad")])


def _three(x, w, dy, attrs):
    """Conv, ConvGradX and ConvGradW of ``conv.py``'s op functions."""
    return {"Y": conv.Conv(np, x, w, **attrs)[0],
            "dX": conv.ConvGradX(np, dy, w, x.shape, **attrs)[0],
            "dW": conv.ConvGradW(np, dy, x, w.shape, **attrs)[0]}


def _arrays(x_shape, w_shape, attrs, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    y_shape = conv.Conv(np, x, w, **attrs)[0].shape
    return x, w, rng.standard_normal(y_shape).astype(dtype)


# -- against the column products -------------------------------------------------------------


@pytest.mark.parametrize("method,shape", _cases(SHAPES))
def test_direct_kernels_equal_column_products(method, shape, monkeypatch):
    """Forward, input and weight gradients of the method equal the im2col path (float64)."""
    x_shape, w_shape, attrs = shape
    x, w, dy = _arrays(x_shape, w_shape, attrs)
    _force(monkeypatch, None)
    want = _three(x, w, dy, attrs)
    _force(monkeypatch, method)
    counts = _spy(monkeypatch)
    got = _three(x, w, dy, attrs)
    assert {k for k, v in counts.items() if v} == {f"_{method}_forward", f"_{method}_input_grad",
                                                   f"_{method}_weight_grad"}
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-10, err_msg=key)


def test_depthwise_layers_take_the_direct_kernels():
    """The default thresholds send depthwise layers here and dense grouped layers not."""
    assert depthwise.applies((32, 1, 3, 3), 32, [1, 1], [1, 1])
    assert depthwise.applies((64, 1, 3, 3), 32, [0, 0], [1, 1])
    assert not depthwise.applies((64, 16, 3, 3), 4, [1, 1], [1, 1])
    assert not depthwise.applies((32, 1, 3, 3), 32, [-1, 0], [1, 1])


# -- central differences ---------------------------------------------------------------------

GRAD_SAMPLES = [
    Sample("Conv", [("X", ("real", (2, 3, 7))), ("W", ("real", (6, 1, 3))),
                    ("B", ("real", (6,)))], {"group": 3, "pads": [2, 1], "strides": [2]}, 11),
    Sample("Conv", [("X", ("real", (2, 3, 6, 5))), ("W", ("real", (3, 1, 3, 3)))],
           {"group": 3, "pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}, 11),
    Sample("Conv", [("X", ("real", (2, 4, 6, 6))), ("W", ("real", (4, 2, 3, 3))),
                    ("B", ("real", (4,)))], {"group": 2, "auto_pad": "SAME_UPPER"}, 11),
    Sample("Conv", [("X", ("real", (1, 2, 4, 5, 4))), ("W", ("real", (4, 1, 3, 2, 3)))],
           {"group": 2, "pads": [1, 0, 1, 1, 1, 0], "strides": [1, 2, 1]}, 11),
]
GRAD_CASES = [pytest.param(m, s, n, id=f"{m}-{s.id}-d{n}") for s in GRAD_SAMPLES
              for n in gc.differentiable_inputs(s) for m in METHODS]


@pytest.mark.parametrize("method,sample,name", GRAD_CASES)
def test_gradient_by_central_differences(method, sample, name, monkeypatch):
    _force(monkeypatch, method)
    counts = _spy(monkeypatch)
    gc.check_gradient(sample, name)
    kernel = {"X": "input_grad", "W": "weight_grad", "B": "forward"}[name]
    assert counts[f"_{method}_forward"] and counts[f"_{method}_{kernel}"]


# -- onnxruntime -----------------------------------------------------------------------------

ORT_CASES = [
    pytest.param("taps", (8, 32, 32, 32), (32, 1, 3, 3), {"group": 32, "pads": [1, 1, 1, 1]},
                 id="taps-depthwise32x32"),
    pytest.param("taps", (8, 32, 32, 32), (64, 1, 3, 3),
                 {"group": 32, "strides": [2, 2], "pads": [0, 1, 1, 0]}, id="taps-x2-stride2"),
    pytest.param("dense", (8, 64, 8, 8), (64, 1, 3, 3), {"group": 64, "pads": [1, 1, 1, 1]},
                 id="dense-depthwise8x8"),
    pytest.param("dense", (8, 64, 4, 4), (64, 2, 3, 3), {"group": 32, "auto_pad": "SAME_UPPER"},
                 id="dense-group32-4x4"),
]


@pytest.mark.parametrize("method,x_shape,w_shape,attrs", ORT_CASES)
def test_forward_matches_onnxruntime(method, x_shape, w_shape, attrs, monkeypatch):
    import onnxruntime

    sample = Sample("Conv", [("X", ("real", x_shape)), ("W", ("real", w_shape)),
                             ("B", ("real", (w_shape[0],)))], attrs, 11)
    arrays = gc.materialize(sample, np.float32)
    _force(monkeypatch, method)
    _, got = gc.run_forward(sample, arrays)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    model = gc.build_model(sample, arrays, set(arrays))
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    want = session.run([gc.OUT], arrays)[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# -- threads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method,shape", [
    pytest.param("taps", ((4, 12, 16, 16), (12, 1, 3, 3), {"group": 12, "pads": [1, 1, 1, 1]}),
                 id="taps"),
    pytest.param("taps", ((4, 12, 16, 15), (24, 1, 3, 3),
                          {"group": 12, "strides": [2, 2], "pads": [1, 0, 1, 1]}),
                 id="taps-stride2"),
    pytest.param("dense", ((4, 12, 6, 6), (24, 2, 3, 3), {"group": 6, "pads": [1, 1, 1, 1]}),
                 id="dense"),
])
def test_tasks_on_the_pool_equal_one_task(method, shape, monkeypatch):
    """The NumPy forms' tiles of one group in 5 tasks, at 1 and at 2 threads, equal the
    same tiles in one task bit for bit (float32): tiles depend on the shapes only and no
    sum crosses one."""
    x_shape, w_shape, attrs = shape
    x, w, dy = _arrays(x_shape, w_shape, attrs, np.float32)
    _force(monkeypatch, method)
    monkeypatch.setattr(compiled, "ENABLED", False)
    monkeypatch.setattr(depthwise, "TAPS_TILE", 1)
    monkeypatch.setattr(depthwise, "DENSE_TILE", 1)
    monkeypatch.setattr(depthwise, "MAX_TASKS", 5)
    tasks = []
    monkeypatch.setattr(depthwise, "parallel",
                        lambda calls, key=None: tasks.append(len(calls)) or threads.parallel(calls))
    before = onnxgrad.get_num_threads()
    try:
        onnxgrad.set_num_threads(1)
        monkeypatch.setattr(depthwise, "PARALLEL_MIN_WORK", 1 << 62)
        want = _three(x, w, dy, attrs)
        monkeypatch.setattr(depthwise, "PARALLEL_MIN_WORK", 0)
        for count in (1, 2):
            onnxgrad.set_num_threads(count)
            got = _three(x, w, dy, attrs)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key],
                                              err_msg=f"{key}, {count} threads")
    finally:
        onnxgrad.set_num_threads(before)
    assert tasks == [1] * 3 + [5] * 6


#: The compiled kernels, and the arguments of their calls that name the ranges they run.
_RANGES = {"_direct_forward_kernel": 4, "_direct_input_grad_kernel": 4,
           "_direct_weight_grad_kernel": 2}


def _record_calls(monkeypatch):
    """Records the ranges of each compiled kernel's calls, by kernel."""
    calls = {name: [] for name in _RANGES}
    for name, count in _RANGES.items():
        def recorded(*args, _real=getattr(depthwise, name), _name=name, _count=count):
            calls[_name].append(args[-_count:])
            return _real(*args)

        monkeypatch.setattr(depthwise, name, recorded)
    return calls


def _check_calls(ranges, channels, batch, threads_):
    """The calls' ranges ``(start, stop[, n_start, n_stop])`` cover every (channel, item)
    pair once, one call per thread at most; with as many items as threads, one call
    per thread of every channel and near-equal ranges of the items (of the channels
    where there is no batch)."""
    cover = np.zeros((channels, batch or 1), dtype=int)
    for r in ranges:
        cover[r[0]:r[1], (r[2] if batch else 0):(r[3] if batch else 1)] += 1
    assert (cover == 1).all(), ranges
    assert 1 <= len(ranges) <= threads_, ranges
    if batch is None or batch >= threads_:
        axis = slice(0, 2) if batch is None else slice(2, 4)
        sizes = [r[axis][1] - r[axis][0] for r in ranges]
        assert len(ranges) == min(threads_, channels if batch is None else batch), ranges
        assert max(sizes) - min(sizes) <= 1, ranges
        assert batch is None or all(r[:2] == (0, channels) for r in ranges), ranges


@pytest.mark.parametrize("shape", [
    # one input channel, 6 outputs (LeNet's first layer): the batch split
    ((8, 1, 28, 28), (6, 1, 5, 5), {"pads": [2, 2, 2, 2]}),
    # depthwise, stride 2, asymmetric pads, a batch of 2: channels split on 3 threads
    ((2, 12, 17, 16), (12, 1, 3, 3), {"group": 12, "strides": [2, 2], "pads": [1, 0, 1, 1]}),
    # two channels per group, multiplier 2
    ((5, 8, 9, 9), (8, 2, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    # few items and channels (2 and 2 input channels, 6 outputs): grids of both on 5 threads
    ((2, 2, 12, 11), (6, 1, 3, 3), {"group": 2, "pads": [1, 1, 0, 1]}),
], ids=["one-to-6", "depthwise-stride2-batch2", "groups-of-2", "grid"])
def test_compiled_calls_on_threads_equal_one_call(shape, monkeypatch):
    """With every layer's work over the parallel threshold, on 1, 2, 3 and 5 threads, the
    compiled kernels run one call per thread at most, over near-equal ranges of the batch
    (of the channels where the batch has fewer items than threads, and for the weight
    gradient, which sums over the batch), and give the bits of one call (float32): each
    output element comes from the same loop in any call.  The forward pass with a bias,
    added in the kernel, equals the Conv and then the addition."""
    if not compiled.available():
        pytest.skip("compiled kernels do not run here (numba missing or switched off)")
    x_shape, w_shape, attrs = shape
    x, w, dy = _arrays(x_shape, w_shape, attrs, np.float32)
    bias = np.random.default_rng(5).standard_normal(w_shape[0]).astype(np.float32)
    _force(monkeypatch, "taps")
    calls = _record_calls(monkeypatch)
    before = onnxgrad.get_num_threads()
    try:
        monkeypatch.setattr(depthwise, "PARALLEL_MIN_WORK", 1 << 62)
        onnxgrad.set_num_threads(2)
        want = _three(x, w, dy, attrs)
        assert [len(c) for c in calls.values()] == [1, 1, 1]
        # the bias added in the kernel equals the addition after the Conv
        want["Y+B"] = want["Y"] + bias.reshape((1, -1) + (1,) * (x.ndim - 2))
        monkeypatch.setattr(depthwise, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(depthwise, "COMPILED_PART", 1)
        for threads_ in (1, 2, 3, 5):
            onnxgrad.set_num_threads(threads_)
            for c in calls.values():
                c.clear()
            got = _three(x, w, dy, attrs)
            got["Y+B"] = conv.Conv(np, x, w, bias, **attrs)[0]
            forward = calls["_direct_forward_kernel"]
            assert len(forward) % 2 == 0
            for ranges in (forward[:len(forward) // 2], forward[len(forward) // 2:]):
                _check_calls(ranges, w_shape[0], x_shape[0], threads_)
            _check_calls(calls["_direct_input_grad_kernel"], x_shape[1], x_shape[0], threads_)
            _check_calls(calls["_direct_weight_grad_kernel"], w_shape[0], None, threads_)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key],
                                              err_msg=f"{key}, {threads_} threads")
    finally:
        onnxgrad.set_num_threads(before)


def test_compiled_calls_ranges():
    """The ranges of the compiled kernels' calls for a number of tasks: of the batch
    (LeNet-5's first layer at a batch of 64 on 2 threads: 32 items each), of the
    channels where there is no batch or fewer items than tasks, a grid of both where
    there are also fewer channels."""
    assert depthwise._calls(6, 64, 2) == ((0, 6, 0, 32), (0, 6, 32, 64))
    assert depthwise._calls(6, 64, 3) == ((0, 6, 0, 21), (0, 6, 21, 42), (0, 6, 42, 64))
    assert depthwise._calls(6, None, 4) == ((0, 1), (1, 3), (3, 4), (4, 6))
    assert depthwise._calls(12, 2, 3) == ((0, 4, 0, 2), (4, 8, 0, 2), (8, 12, 0, 2))
    assert depthwise._calls(6, 2, 5) == ((0, 3, 0, 1), (3, 6, 0, 1), (0, 3, 1, 2), (3, 6, 1, 2))
    assert depthwise._calls(1, 3, 4) == ((0, 1, 0, 1), (0, 1, 1, 2), (0, 1, 2, 3))


def test_compiled_plans_are_remembered(monkeypatch):
    """A layer's compiled plan is made once per shape, thread count and settings; its
    tables are read-only; a change of the settings or of the thread count makes
    another."""
    if not compiled.available():
        pytest.skip("compiled kernels do not run here (numba missing or switched off)")
    x, w, dy = _arrays((64, 1, 28, 28), (6, 1, 5, 5), {"pads": [2, 2, 2, 2]}, np.float32)
    plans = []
    real = depthwise._compiled_plan

    def spy(*args):
        plans.append(real(*args))
        return plans[-1]

    monkeypatch.setattr(depthwise, "_compiled_plan", spy)
    before = onnxgrad.get_num_threads()
    try:
        onnxgrad.set_num_threads(2)
        for _ in range(2):
            conv.Conv(np, x, w, pads=[2, 2, 2, 2])
        assert plans[0] is plans[1]
        assert plans[0].calls == ((0, 6, 0, 32), (0, 6, 32, 64))
        for table in (plans[0].geometry[0], plans[0].geometry[3]):
            assert not table.flags.writeable
        onnxgrad.set_num_threads(1)
        conv.Conv(np, x, w, pads=[2, 2, 2, 2])
        assert plans[2].calls == ((0, 6, 0, 64),)
        monkeypatch.setattr(depthwise, "COMPILED_PASS", 1)
        conv.Conv(np, x, w, pads=[2, 2, 2, 2])
        assert plans[3].geometry[-1] == 1 != plans[2].geometry[-1]
    finally:
        onnxgrad.set_num_threads(before)


# -- GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("method,shape", _cases(SHAPES[1::3]))
def test_cupy_equals_numpy(method, shape, monkeypatch):
    import cupy

    x_shape, w_shape, attrs = shape
    x, w, dy = _arrays(x_shape, w_shape, attrs)
    _force(monkeypatch, method)
    want = _three(x, w, dy, attrs)
    xg, wg, dyg = (cupy.asarray(a) for a in (x, w, dy))
    got = {"Y": conv.Conv(cupy, xg, wg, **attrs)[0],
           "dX": conv.ConvGradX(cupy, dyg, wg, x.shape, **attrs)[0],
           "dW": conv.ConvGradW(cupy, dyg, xg, w.shape, **attrs)[0]}
    for key in want:
        np.testing.assert_allclose(cupy.asnumpy(got[key]), want[key], rtol=1e-10, atol=1e-10,
                                   err_msg=key)
