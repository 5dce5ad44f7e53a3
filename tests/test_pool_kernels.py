"""2-D pooling's compiled kernels (``ops/pool_compiled.py``) against the NumPy forms they
replace (``ops/pool.py``).

MaxPool (with and without Indices), AveragePool, AveragePoolGrad and
MaxPoolIndicesGrad over a set of window geometries (pads, asymmetric pads,
ceil_mode, overlapping and gapped windows, dilations, auto_pad, windows that lie
wholly in the padding), in float32 and float64:

* the compiled kernels give the NumPy forms' bits, on ordinary values and on
  values with ties (±0 included), infinities and NaN, and run only when
  switched on;
* the forward outputs equal onnx's reference evaluator's;
* float64 central differences check the gradients on the compiled path;
* with the planes split into parts of one plane, two threads give the bits of
  one part on one thread;
* MaxPool's limits (``pool_compiled.INDEXED_MAX_TAPS``, ``pool_compiled.MAX_OFFSET``)
  choose the form both ways; other ranks, dtypes, storage_order=1 and indices
  outside their plane run the NumPy forms.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import gradcheck as gc
import onnxgrad
from helpers import count_calls
from onnxgrad import threads
from onnxgrad.ops import compiled, pool, pool_compiled
from op_db import Sample

pytestmark = pytest.mark.skipif(not compiled.available(), reason="numba is not installed")

_MAX = [(pool_compiled, n) for n in ("_max_pool_pair_kernel", "_max_pool_rows_kernel",
                                     "_max_pool_kernel", "_max_pool_edge_kernel")]
_AVG = [(pool_compiled, n) for n in ("_average_pool_pair_kernel", "_average_pool_rows_kernel",
                                     "_average_pool_kernel", "_average_pool_edge_kernel")]
_AVG_GRAD = [(pool_compiled, n) for n in ("_average_pool_grad_pair_kernel",
                                          "_average_pool_grad_kernel",
                                          "_average_pool_grad_edge_kernel",
                                          "_average_pool_grad_overlapping_kernel")]
_INDICES_GRAD = [(pool_compiled, "_indices_grad_kernel")]

# (input shape, attributes), all of which onnx's reference evaluator and onnxruntime
# run; those of _PADDING_ONLY are for the NumPy forms only.
GEOMETRIES = [
    ((2, 3, 28, 28), {"kernel_shape": [2, 2], "strides": [2, 2]}),             # LeNet
    ((2, 3, 10, 10), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ((2, 2, 9, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((2, 2, 7, 6), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),           # overlapping
    ((2, 2, 7, 6), {"kernel_shape": [2, 2]}),                                 # overlapping
    ((1, 2, 8, 7), {"kernel_shape": [3, 2], "strides": [3, 2], "pads": [1, 0, 0, 1],
                    "ceil_mode": 1}),
    ((2, 2, 7, 7), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    ((1, 3, 9, 9), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                    "ceil_mode": 1}),
    ((1, 2, 11, 10), {"kernel_shape": [2, 3], "strides": [3, 1], "pads": [0, 2, 1, 0]}),
    ((2, 2, 7, 6), {"kernel_shape": [2, 2], "dilations": [2, 2], "strides": [2, 1],
                    "pads": [1, 1, 0, 1]}),
    ((1, 2, 9, 11), {"kernel_shape": [2, 2], "dilations": [1, 2], "strides": [2, 3]}),
    ((2, 2, 7, 7), {"kernel_shape": [2, 3], "dilations": [2, 2], "ceil_mode": 1,
                    "strides": [2, 2]}),
    ((1, 2, 7, 6), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 2, 6, 6), {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 2, 8, 8), {"kernel_shape": [4, 4], "strides": [4, 4]}),
    ((1, 2, 12, 11), {"kernel_shape": [5, 5], "strides": [2, 2], "pads": [2, 2, 2, 2]}),
    ((2, 2, 8, 9), {"kernel_shape": [2, 2], "strides": [3, 3]}),              # gaps
    ((2, 2, 6, 5), {"kernel_shape": [1, 1], "strides": [2, 2]}),
    ((1, 1, 3, 3), {"kernel_shape": [3, 3], "pads": [2, 2, 2, 2]}),
]
# Windows wholly in the padding (before the data, where the NumPy form of
# MaxPoolIndicesGrad takes their indices): MaxPool gives -inf there, with the index of
# the window's first (padding) position, which lies in another row or plane, or before X.
_PADDING_ONLY = [
    ((2, 2, 6, 5), {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [2, 0, 0, 0]}),
    ((2, 3, 5, 6), {"kernel_shape": [1, 2], "strides": [1, 2], "pads": [2, 3, 0, 0]}),
]
ALL = GEOMETRIES + _PADDING_ONLY
FLOATS = [np.float32, np.float64]


def _id(geometry) -> str:
    shape, attrs = geometry
    return "x".join(map(str, shape)) + "-" + ",".join(
        f"{k}={v}" for k, v in sorted(attrs.items()))


def _values(shape, dtype, seed, special=False):
    """Random values; with ``special``, a third of them drawn from a few values that tie
    (±0 among them), infinities and NaN; with ``special="-0"``, -0.0 everywhere (sums of
    -0.0 are -0.0, and +0.0 once a padding zero comes in)."""
    if special == "-0":
        return np.full(shape, -0.0, dtype=dtype)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if special:
        picks = np.array([0.0, -0.0, 1.0, -1.0, 2.0, np.inf, -np.inf, np.nan])
        where = rng.random(shape) < 1 / 3
        x[where] = rng.choice(picks, size=int(where.sum()))
    return x.astype(dtype)


def _overlapping(attrs) -> int:
    n = len(attrs["kernel_shape"])
    strides, dilations = attrs.get("strides", [1] * n), attrs.get("dilations", [1] * n)
    return int(any(s < (k - 1) * d + 1
                   for s, k, d in zip(strides, attrs["kernel_shape"], dilations)))


def _grad_inputs(X, attrs, seed, special, monkeypatch):
    """dY for X's pooled shape, and the Indices of MaxPool of X by the NumPy form (both
    forms of the gradients then take the same inputs)."""
    with monkeypatch.context() as m:
        m.setattr(compiled, "ENABLED", False)
        Y, indices = pool.MaxPool(np, X, ctx=types.SimpleNamespace(num_outputs=2), **attrs)
    return _values(Y.shape, X.dtype, seed, special), indices


def _run_all(X, dY, indices, attrs):
    """Every op's outputs: MaxPool's Y and Indices, its Y alone, AveragePool and
    AveragePoolGrad with count_include_pad 0 and 1, MaxPoolIndicesGrad."""
    Y, I = pool.MaxPool(np, X, ctx=types.SimpleNamespace(num_outputs=2), **attrs)
    (Y_only,) = pool.MaxPool(np, X, ctx=types.SimpleNamespace(num_outputs=1), **attrs)
    shape = np.array(X.shape, dtype=np.int64)
    out = {"MaxPool.Y": Y, "MaxPool.Indices": I, "MaxPool.Y_only": Y_only}
    for cip in (0, 1):
        out[f"AveragePool{cip}"] = pool.AveragePool(np, X, count_include_pad=cip, **attrs)[0]
        out[f"AveragePoolGrad{cip}"] = pool.AveragePoolGrad(np, dY, shape, count_include_pad=cip,
                                                            **attrs)[0]
    out["MaxPoolIndicesGrad"] = pool.MaxPoolIndicesGrad(np, dY, indices, shape,
                                                        overlapping=_overlapping(attrs))[0]
    return out


def _assert_same_bits(got, want, key):
    """Equal dtype, shape and bits; NaN where the other has NaN (of any payload)."""
    assert got.dtype == want.dtype and got.shape == want.shape, key
    if got.dtype.kind != "f":
        np.testing.assert_array_equal(got, want, err_msg=key)
        return
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=key)
    bits = np.dtype(f"u{got.itemsize}")
    np.testing.assert_array_equal(np.where(nan, 0, got).view(bits),
                                  np.where(nan, 0, want).view(bits), err_msg=key)


@pytest.mark.parametrize("special", [False, True, "-0"], ids=["normal", "ties-inf-nan", "-0"])
@pytest.mark.parametrize("dtype", FLOATS, ids=["f32", "f64"])
@pytest.mark.parametrize("geometry", ALL, ids=_id)
def test_compiled_equals_numpy_bit_for_bit(geometry, dtype, special, monkeypatch):
    shape, attrs = geometry
    # compiled wherever they can run
    monkeypatch.setattr(pool_compiled, "INDEXED_MAX_TAPS", 1 << 30)
    X = _values(shape, dtype, 0, special)
    with np.errstate(invalid="ignore"):
        dY, indices = _grad_inputs(X, attrs, 1, special, monkeypatch)
        counts = count_calls(monkeypatch, _MAX + _AVG + _AVG_GRAD + _INDICES_GRAD)
        monkeypatch.setattr(compiled, "ENABLED", False)
        want = _run_all(X, dY, indices, attrs)
        assert not any(counts.values()), f"switched off, yet called: {counts}"
        monkeypatch.setattr(compiled, "ENABLED", True)
        got = _run_all(X, dY, indices, attrs)
    assert any(counts[n] for _, n in _MAX) and any(counts[n] for _, n in _AVG)
    assert any(counts[n] for _, n in _AVG_GRAD) and counts["_indices_grad_kernel"]
    for key in want:
        _assert_same_bits(got[key], want[key], key)


@pytest.mark.parametrize("enabled", [True, False], ids=["compiled", "numpy"])
def test_maxpool_ties_nan_and_infinities(enabled, monkeypatch):
    """Windows of ±0 ties keep the first index and take the later zero's sign (as
    ``xp.maximum`` does); a NaN stays once met and keeps the index of the maximum before
    it; a window of -inf and padding keeps its first (padding) position."""
    monkeypatch.setattr(compiled, "ENABLED", enabled)
    counts = count_calls(monkeypatch, _MAX)
    X = np.array([[[[-0.0, 0.0, 1.0, 1.0, np.nan, 3.0],
                    [0.0, -0.0, 1.0, 2.0, 5.0, np.nan],
                    [-np.inf, -np.inf, 2.0, np.nan, np.inf, np.inf],
                    [-np.inf, -np.inf, 2.0, 7.0, np.inf, 1.0]]]], dtype=np.float32)
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2]}
    ctx = types.SimpleNamespace(num_outputs=2)
    Y, I = pool.MaxPool(np, X, ctx=ctx, **attrs)
    np.testing.assert_array_equal(I[0, 0], [[0, 9, 4], [12, 14, 16]])
    assert np.signbit(Y[0, 0, 0, 0]) and Y[0, 0, 0, 1] == 2 and np.isnan(Y[0, 0, 0, 2])
    assert Y[0, 0, 1, 0] == -np.inf and np.isnan(Y[0, 0, 1, 1]) and Y[0, 0, 1, 2] == np.inf
    Y, I = pool.MaxPool(np, X[..., :2, :2] * 0 - np.inf, ctx=ctx, kernel_shape=[2, 2],
                        pads=[1, 1, 0, 0])
    np.testing.assert_array_equal(I[0, 0], [[-3, -2], [-1, 0]])
    assert all(Y.ravel() == -np.inf)
    assert (counts["_max_pool_pair_kernel"] > 0) == enabled


def _reference_model(op, shape, attrs, outputs):
    node = helper.make_node(op, ["x"], outputs, **attrs)
    graph = helper.make_graph(
        [node], "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "i" else TensorProto.FLOAT,
                                       [None] * 4) for n in outputs])
    opset = 12 if op == "MaxPool" else 19
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=gc.ir_version(opset))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_id)
def test_forward_matches_the_reference_evaluator(geometry, monkeypatch):
    """Y of MaxPool and AveragePool (count_include_pad 0 and 1) as onnx's reference
    evaluator gives it; MaxPool's Indices as onnxruntime gives them (the reference
    evaluator's are wrong where windows overlap), on a permutation (no ties)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    shape, attrs = geometry
    monkeypatch.setattr(pool_compiled, "INDEXED_MAX_TAPS", 1 << 30)
    x = np.random.default_rng(2).permutation(int(np.prod(shape))).reshape(shape).astype(
        np.float32)
    counts = count_calls(monkeypatch, _MAX + _AVG)
    cases = [("MaxPool", attrs, ["y", "i"])] + [
        ("AveragePool", {**attrs, "count_include_pad": cip}, ["y"]) for cip in (0, 1)]
    for op, op_attrs, outputs in cases:
        model = _reference_model(op, shape, op_attrs, outputs)
        got = onnxgrad.load(model).run({"x": x})
        y = ReferenceEvaluator(model).run(["y"], {"x": x})[0]
        assert got["y"].dtype == y.dtype and got["y"].shape == y.shape, op
        np.testing.assert_allclose(got["y"], y, rtol=1e-6, atol=0, err_msg=op)
        if "i" in outputs:
            session = onnxruntime.InferenceSession(model.SerializeToString(),
                                                   providers=["CPUExecutionProvider"])
            np.testing.assert_array_equal(got["i"], session.run(["i"], {"x": x})[0])
    assert any(counts[n] for _, n in _MAX) and any(counts[n] for _, n in _AVG)


_GRADIENT_CASES = [
    (Sample("MaxPool", [("X", ("real", (2, 2, 6, 6)))],
            {"kernel_shape": [2, 2], "strides": [2, 2]}, 12),
     _MAX + _INDICES_GRAD),
    (Sample("MaxPool", [("X", ("real", (1, 2, 6, 5)))],
            {"kernel_shape": [3, 3], "strides": [1, 2], "pads": [1, 1, 1, 0]}, 12),
     _MAX + _INDICES_GRAD),
    (Sample("AveragePool", [("X", ("real", (2, 2, 6, 6)))],
            {"kernel_shape": [2, 2], "strides": [2, 2]}, 11),
     _AVG + _AVG_GRAD),
    (Sample("AveragePool", [("X", ("real", (1, 2, 7, 6)))],
            {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 0, 1], "ceil_mode": 1},
            11),
     _AVG + _AVG_GRAD),
    (Sample("AveragePool", [("X", ("real", (1, 2, 6, 6)))],
            {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, 11),
     _AVG + _AVG_GRAD),
]


@pytest.mark.parametrize("case", _GRADIENT_CASES, ids=lambda c: c[0].id)
def test_gradients_by_central_differences(case, monkeypatch):
    sample, kernels = case
    monkeypatch.setattr(compiled, "PART", 1)
    counts = count_calls(monkeypatch, kernels)
    gc.check_gradient(sample, "X")
    assert any(counts[n] for _, n in kernels if "grad" not in n), counts
    assert any(counts[n] for _, n in kernels if "grad" in n), counts


@pytest.mark.parametrize("dtype", FLOATS, ids=["f32", "f64"])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[3], GEOMETRIES[5],
                                      _PADDING_ONLY[0]], ids=_id)
def test_parts_on_two_threads_are_bit_identical(geometry, dtype, monkeypatch):
    """Kernels in parts of one plane each, on two threads, give the bits of one part on
    one thread."""
    shape, attrs = geometry
    X = _values((4,) + shape[1:], dtype, 3, special=True)
    before = threads.get_num_threads()
    try:
        threads.set_num_threads(1)
        with np.errstate(invalid="ignore"):
            dY, indices = _grad_inputs(X, attrs, 4, True, monkeypatch)
            one = _run_all(X, dY, indices, attrs)
            monkeypatch.setattr(compiled, "PART", 1)
            threads.set_num_threads(2)
            two = [_run_all(X, dY, indices, attrs) for _ in range(4)]  # past the pool's trials
    finally:
        threads.set_num_threads(before)
    for run in two:
        for key in one:
            _assert_same_bits(run[key], one[key], key)


@pytest.mark.parametrize("limit,name", [("INDEXED_MAX_TAPS", "_max_pool_kernel"),
                                        ("MAX_OFFSET", "_max_pool_pair_kernel")])
def test_maxpool_limits_choose_the_form(limit, name, monkeypatch):
    """MaxPool runs its compiled kernels up to the limits (with Indices: windows of up to
    INDEXED_MAX_TAPS taps at column strides above 1; the offset of a window's last tap up
    to MAX_OFFSET), else the NumPy form, with the same results either way."""
    X = _values((2, 3, 12, 12), np.float32, 11, special=True)
    if limit == "INDEXED_MAX_TAPS":
        attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
        at, beyond = 9, 8
    else:
        attrs = {"kernel_shape": [2, 2], "strides": [2, 2]}
        at, beyond = 13, 12
    ctx = types.SimpleNamespace(num_outputs=2)
    counts = count_calls(monkeypatch, _MAX)
    results = []
    for value, runs in [(at, True), (beyond, False)]:
        monkeypatch.setattr(pool_compiled, limit, value)
        counts[name] = 0
        with np.errstate(invalid="ignore"):
            results.append(pool.MaxPool(np, X, ctx=ctx, **attrs))
        assert bool(counts[name]) == runs, (value, counts)
    for got, want in zip(*results):
        _assert_same_bits(got, want, limit)


def test_other_ranks_dtypes_and_storage_order_run_the_numpy_forms(monkeypatch):
    counts = count_calls(monkeypatch, _MAX + _AVG + _AVG_GRAD + _INDICES_GRAD)
    ctx = types.SimpleNamespace(num_outputs=2)
    for shape, kernel in [((2, 3, 9), [2]), ((1, 2, 4, 5, 6), [2, 2, 2])]:
        X = _values(shape, np.float32, 5)
        Y, I = pool.MaxPool(np, X, ctx=ctx, kernel_shape=kernel, strides=kernel)
        pool.AveragePool(np, X, kernel_shape=kernel, strides=kernel)
        pool.AveragePoolGrad(np, Y, np.array(shape), kernel_shape=kernel, strides=kernel)
        pool.MaxPoolIndicesGrad(np, Y, I, np.array(shape), overlapping=0)
    X16 = _values((2, 3, 6, 6), np.float16, 5)
    Y, I = pool.MaxPool(np, X16, ctx=ctx, kernel_shape=[2, 2], strides=[2, 2])
    pool.AveragePool(np, X16, kernel_shape=[2, 2], strides=[2, 2])
    pool.AveragePoolGrad(np, Y, np.array(X16.shape), kernel_shape=[2, 2], strides=[2, 2])
    pool.MaxPoolIndicesGrad(np, Y, I, np.array(X16.shape), overlapping=0)
    assert not any(counts.values()), counts

    X = _values((2, 3, 6, 6), np.float32, 6)
    Y, I = pool.MaxPool(np, X, ctx=ctx, kernel_shape=[2, 2], storage_order=1)
    assert not any(counts.values()), counts
    monkeypatch.setattr(compiled, "ENABLED", False)
    want_y, want_i = pool.MaxPool(np, X, ctx=ctx, kernel_shape=[2, 2], storage_order=1)
    np.testing.assert_array_equal(Y, want_y)
    np.testing.assert_array_equal(I, want_i)


@pytest.mark.parametrize("overlapping", [0, 1])
@pytest.mark.parametrize("dtype", FLOATS, ids=["f32", "f64"])
def test_indices_outside_their_plane_run_the_numpy_form(dtype, overlapping, monkeypatch):
    """MaxPoolIndicesGrad of indices anywhere in X (repeats, other planes, negative ones)
    gives the NumPy form's result."""
    rng = np.random.default_rng(7)
    shape = (2, 3, 6, 6)
    dY = _values((2, 3, 3, 3), dtype, 8)
    indices = rng.integers(-10, np.prod(shape), size=dY.shape)
    if overlapping:
        indices = np.abs(indices)  # bincount takes no negative index
    counts = count_calls(monkeypatch, _INDICES_GRAD)
    (got,) = pool.MaxPoolIndicesGrad(np, dY, indices, np.array(shape), overlapping=overlapping)
    assert counts["_indices_grad_kernel"]
    monkeypatch.setattr(compiled, "ENABLED", False)
    (want,) = pool.MaxPoolIndicesGrad(np, dY, indices, np.array(shape), overlapping=overlapping)
    _assert_same_bits(got, want, "dX")


def test_non_contiguous_inputs_equal_numpy(monkeypatch):
    X = _values((3, 2, 10, 12), np.float32, 9).transpose(1, 0, 3, 2)
    attrs = {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 1, 1]}
    dY, indices = _grad_inputs(X, attrs, 10, False, monkeypatch)
    dY = dY.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)
    counts = count_calls(monkeypatch, _MAX + _AVG + _AVG_GRAD + _INDICES_GRAD)
    got = _run_all(X, dY, indices, attrs)
    assert counts["_max_pool_kernel"] and counts["_average_pool_kernel"]
    assert counts["_average_pool_grad_overlapping_kernel"] and counts["_indices_grad_kernel"]
    monkeypatch.setattr(compiled, "ENABLED", False)
    want = _run_all(X, dY, indices, attrs)
    for key in want:
        _assert_same_bits(got[key], want[key], key)


# -- plans: made once per shape and attributes, one range of planes per thread -------------

_LENET_MAX = ((64, 6, 28, 28), {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0],
                                "dilations": [1, 1]})


def _max_pool_plan(shape, attrs, dtype=np.float32, indices=True):
    """MaxPool's remembered (geometry, plan) for ``shape`` and ``attrs``, keyed as the op
    keys it."""
    k = pool._key
    return pool._max_pool_plan(shape, np.dtype(dtype), k(attrs["kernel_shape"]),
                               attrs.get("auto_pad", "NOTSET"), attrs.get("ceil_mode", 0),
                               k(attrs.get("dilations")), k(attrs.get("pads")),
                               k(attrs.get("strides")), indices, 0, pool_compiled.settings())


def test_plans_are_remembered_per_shape_attributes_and_threads(monkeypatch):
    """The same key gives the same geometry and plan objects (attributes as lists or
    tuples); another shape, dtype, attribute, output count, thread count or setting
    gives another plan."""
    shape, attrs = _LENET_MAX
    before = threads.get_num_threads()
    try:
        threads.set_num_threads(1)
        geo, plan = _max_pool_plan(shape, attrs)
        assert plan is not None and _max_pool_plan(shape, attrs)[1] is plan
        assert _max_pool_plan(shape, {k: tuple(v) for k, v in attrs.items()})[0] is geo
        others = [_max_pool_plan((1,) + shape[1:], attrs)[1],
                  _max_pool_plan(shape, attrs, np.float64)[1],
                  _max_pool_plan(shape, {**attrs, "strides": [1, 1]})[1],
                  _max_pool_plan(shape, attrs, indices=False)[1]]
        threads.set_num_threads(2)
        others.append(_max_pool_plan(shape, attrs)[1])
        with monkeypatch.context() as m:
            m.setattr(compiled, "PART", 1)
            others.append(_max_pool_plan(shape, attrs)[1])
    finally:
        threads.set_num_threads(before)
    assert all(o is not None and o is not plan for o in others)
    assert len({id(o) for o in others}) == len(others)
    # the op reads the plan the key gives, and keeps its key's plans in a bounded cache
    X = _values(shape, np.float32, 12)
    threads.set_num_threads(1)
    try:
        hits = pool._max_pool_plan.cache_info().hits
        pool.MaxPool(np, X, ctx=types.SimpleNamespace(num_outputs=2), **attrs)
        assert pool._max_pool_plan.cache_info().hits == hits + 1
    finally:
        threads.set_num_threads(before)
    for cached in (pool._max_pool_plan, pool._average_pool_plan, pool._average_pool_grad_plan,
                   pool._indices_grad_plan):
        assert cached.cache_info().maxsize == pool.PLANS_KEPT


def test_plans_hand_kernels_read_only_tables_and_new_outputs(monkeypatch):
    """A plan's tables are read-only (the kernels only read them); each call's outputs
    are new arrays, which the caller may write without changing later calls."""
    shape, attrs = (2, 3, 9, 8), {"kernel_shape": [3, 3], "strides": [2, 2],
                                  "pads": [1, 1, 1, 1]}
    monkeypatch.setattr(pool_compiled, "INDEXED_MAX_TAPS", 1 << 30)
    X = _values(shape, np.float32, 13)
    _, plan = _max_pool_plan(shape, attrs)
    assert plan.edges is not None
    tables = [a for a in plan.inner_tail + plan.edges_tail if isinstance(a, np.ndarray)]
    assert tables and not any(a.flags.writeable for a in tables)
    dY, indices = _grad_inputs(X, attrs, 14, False, monkeypatch)
    first = _run_all(X, dY, indices, attrs)
    for value in first.values():
        value[...] = 7
    second = _run_all(X, dY, indices, attrs)
    for key in first:
        assert not np.shares_memory(first[key], second[key]), key
    _, avg_plan = pool._average_pool_plan(shape, np.dtype(np.float32), (3, 3), "NOTSET", 0, 1,
                                         None, (1, 1, 1, 1), (2, 2), pool_compiled.settings())
    assert not avg_plan.table.flags.writeable
    monkeypatch.setattr(compiled, "ENABLED", False)
    want = _run_all(X, dY, indices, attrs)
    for key in want:
        _assert_same_bits(second[key], want[key], key)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_one_range_of_planes_per_thread_gives_the_same_bits(count, monkeypatch):
    """With parts of any size allowed, each op runs in one near-equal range of planes per
    thread (``count`` threads), on the pool, with the bits of the NumPy forms."""
    X = _values((3, 5, 11, 10), np.float32, 15, special=True)
    before = threads.get_num_threads()
    got = []
    with np.errstate(invalid="ignore"):
        for geometry in (GEOMETRIES[0], GEOMETRIES[3], GEOMETRIES[5], _PADDING_ONLY[0]):
            attrs = geometry[1]
            dY, indices = _grad_inputs(X, attrs, 16, True, monkeypatch)
            monkeypatch.setattr(compiled, "ENABLED", False)
            want = _run_all(X, dY, indices, attrs)
            monkeypatch.setattr(compiled, "ENABLED", True)
            try:
                threads.set_num_threads(count)
                with monkeypatch.context() as m:
                    m.setattr(compiled, "PART", 1)
                    _, plan = _max_pool_plan(X.shape, attrs)
                    runs = [_run_all(X, dY, indices, attrs) for _ in range(5)]  # past trials
            finally:
                threads.set_num_threads(before)
            lengths = [stop - start for start, stop in plan.calls]
            assert len(lengths) == count and max(lengths) - min(lengths) <= 1, plan.calls
            assert plan.calls[0][0] == 0 and plan.calls[-1][1] == 15
            got += [(run, want) for run in runs]
    for run, want in got:
        for key in want:
            _assert_same_bits(run[key], want[key], key)


def test_kernels_counted_after_their_plan_is_made(monkeypatch):
    """Plans name their kernels, which are looked up on each call (a kernel replaced
    after its plan was made runs)."""
    shape, attrs = GEOMETRIES[0]
    X = _values(shape, np.float32, 17)
    ctx = types.SimpleNamespace(num_outputs=2)
    pool.MaxPool(np, X, ctx=ctx, **attrs)
    counts = count_calls(monkeypatch, _MAX)
    pool.MaxPool(np, X, ctx=ctx, **attrs)
    assert counts["_max_pool_pair_kernel"] == 1
