"""The compiled CPU kernels (``ops/compiled.py``) against the NumPy forms they replace.

Each case (``tests/compiled_cases*.py``, one file per op family) is one node at a realistic size whose forward pass or gradient runs
compiled kernels (``kernels``, looked up in their modules).  For each:

* the forward output and the gradients of every differentiable input, through
  the public API, agree in float64 (rtol 1e-10) between compiled kernels
  switched on and off, and the kernels run only when on;
* the float32 forward equals onnx's reference evaluator's (or onnxruntime's
  where the sample names it);
* with the kernels split into parts of one channel or row on 3 threads, the
  results are bit-identical to one thread;
* float64 central differences check the gradients at a small size, on the
  compiled path (the node-suite check, ``tests/test_node_gradients.py``, runs
  them too, as compiled kernels are on by default).

Where numba cannot be imported, ops run their NumPy forms.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

import gradcheck as gc
from helpers import count_calls
from onnxgrad import threads
from onnxgrad.ops import activation, compiled, normalization
import compiled_cases
import compiled_cases_depthwise
import compiled_cases_winograd

pytestmark = pytest.mark.skipif(not compiled.available(), reason="numba is not installed")


CASES = compiled_cases.CASES + compiled_cases_winograd.CASES + compiled_cases_depthwise.CASES


def _outputs(sample, arrays) -> dict[str, np.ndarray]:
    """Y and the gradients of ``sum(Y * u)`` for each differentiable input."""
    _, y = gc.run_forward(sample, arrays)
    u = gc.projection_u(sample, y)
    names = gc.differentiable_inputs(sample)
    return {"Y": y, **gc.analytic_gradients(sample, arrays, names, u)}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compiled_equals_numpy_in_float64(case, monkeypatch):
    arrays = gc.materialize(case.sample, np.float64)
    counts = count_calls(monkeypatch, case.kernels)
    monkeypatch.setattr(compiled, "ENABLED", False)
    want = _outputs(case.sample, arrays)
    assert not any(counts.values()), f"switched off, yet called: {counts}"
    monkeypatch.setattr(compiled, "ENABLED", True)
    got = _outputs(case.sample, arrays)
    assert all(counts.values()), f"switched on, yet not called: {counts}"
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12, err_msg=key)


def _reference(sample, arrays) -> np.ndarray:
    """The forward output of onnx's reference evaluator, or onnxruntime's where the
    sample names it."""
    model = gc.build_model(sample, arrays, set(arrays))
    if sample.ref == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        return session.run([gc.OUT], arrays)[0]
    return ReferenceEvaluator(model).run([gc.OUT], arrays)[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float32_forward_matches_the_reference(case):
    arrays = gc.materialize(case.sample, np.float32)
    _, got = gc.run_forward(case.sample, arrays)
    want = _reference(case.sample, arrays)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parts_on_threads_are_bit_identical(case, monkeypatch):
    """Kernels in parts as small as they go, on 3 threads, give the bits of one thread."""
    arrays = gc.materialize(case.sample, np.float32)
    monkeypatch.setattr(compiled, "PART", 1)
    before = threads.get_num_threads()
    try:
        threads.set_num_threads(1)
        one = _outputs(case.sample, arrays)
        threads.set_num_threads(3)
        three = _outputs(case.sample, arrays)
    finally:
        threads.set_num_threads(before)
    for key in one:
        np.testing.assert_array_equal(three[key], one[key], err_msg=key)


@pytest.mark.parametrize("case", [c for c in CASES if c.small], ids=lambda c: c.id)
def test_gradients_by_central_differences(case, monkeypatch):
    monkeypatch.setattr(compiled, "PART", 1)
    counts = count_calls(monkeypatch, case.kernels)
    for name in gc.differentiable_inputs(case.small):
        gc.check_gradient(case.small, name)
    assert all(counts.values()), f"not called: {counts}"


@pytest.mark.parametrize("shape", [(32, 96, 4, 4), (8, 24, 16, 16)], ids=["P16", "P256"])
def test_batchnorm_row_and_channel_kernels_agree(shape, monkeypatch):
    """BatchNormalization's row kernels (channels of few positions) and per-channel
    kernels, each forced at both sizes, agree in float64 with Clip applied in the
    pass and its mask gating the gradient; the row kernels give the same bits
    whatever number of channels they take at once."""
    rng = np.random.default_rng(0)
    X = (rng.standard_normal(shape) * 3 + 1).reshape(shape[0], shape[1], -1)
    C = shape[1]
    gain, bias = rng.standard_normal(C), rng.standard_normal(C)
    dY = rng.standard_normal(X.shape)
    kernels = [(normalization, k) for k in ("_bn_kernel", "_bn_grad_kernel", "_bn_rows_kernel",
                                             "_bn_grad_rows_kernel")]
    counts = count_calls(monkeypatch, kernels)

    def run(rows: bool, block: int = normalization.ROWS_BLOCK):
        monkeypatch.setattr(normalization, "ROWS_BELOW", 1 << 30 if rows else 0)
        monkeypatch.setattr(normalization, "GRAD_ROWS_BELOW", 1 << 30 if rows else 0)
        monkeypatch.setattr(normalization, "ROWS_BLOCK", block)
        clip = normalization.Activation("Clip", 0.0, 6.0, keep_mask=True)
        Y, mean, var = normalization._bn_compiled(X, gain, bias, 1e-5, activation=clip)
        gate = normalization.Gate(1, clip.mask)
        return (Y, mean, var, clip.mask) + normalization._bn_grad_compiled(
            dY, X, mean, var, gain, 1e-5, gate)

    by_channel = run(False)
    assert counts["_bn_kernel"] and counts["_bn_grad_kernel"] and not counts["_bn_rows_kernel"]
    by_rows = run(True)
    assert counts["_bn_rows_kernel"] and counts["_bn_grad_rows_kernel"]
    assert 0 < by_rows[3].mean() < 1, "the clip should bind somewhere, not everywhere"
    for got, want in zip(by_rows, by_channel):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(run(True, block=1), by_rows):
        np.testing.assert_array_equal(got, want)


def test_float32_erf_equals_the_array_form_bit_for_bit(monkeypatch):
    """The compiled float32 erf does the array form's float32 operations in its order,
    over values from -6 to 6 (past the clamp at ±4), NaN and infinities included."""
    from onnxgrad.ops import nonlinear

    x = np.concatenate([np.linspace(-6, 6, 300001, dtype=np.float32),
                        np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)])
    counts = count_calls(monkeypatch, [(nonlinear, "_erf32_kernel")])
    got = nonlinear.erf(np, x)
    assert counts["_erf32_kernel"] > 0
    monkeypatch.setattr(compiled, "ENABLED", False)
    want = nonlinear.erf(np, x)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_rows_with_nan_and_infinities_as_numpy(dtype, monkeypatch):
    """A fully masked row (all -inf) and a row holding a NaN give NaN softmax rows;
    the gradient is zero in such a row when its dY is zero and NaN where the loss read
    it; +inf and finite rows as NumPy's forms."""
    x = np.random.default_rng(4).standard_normal((6, 9)).astype(dtype)
    x[1] = -np.inf
    x[2, 3] = np.nan
    x[3, 4] = np.inf
    x[4, :4] = -np.inf
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(dtype)
    dy[1] = 0
    counts = count_calls(monkeypatch, [(activation, "_shift_kernel"),
                                       (activation, "_softmax_grad_kernel")])
    with np.errstate(invalid="ignore"):
        y = activation.Softmax13(np, x)[0]
        dx = activation.SoftmaxGrad(np, dy, y)[0]
        assert all(counts.values())
        monkeypatch.setattr(compiled, "ENABLED", False)
        want_y = activation.Softmax13(np, x)[0]
        want_dx = activation.SoftmaxGrad(np, dy, want_y)[0]
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all() and not np.isnan(y[[0, 4, 5]]).any()
    assert (dx[1] == 0).all() and np.isnan(dx[2]).all()
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=0)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-6)


def test_float32_statistics_are_accurate():
    """The compiled BatchNormalization sums in float64: a channel whose values sit far
    from zero and close together gets its float64 mean and variance to float32's
    precision."""
    rng = np.random.default_rng(0)
    X = (1000 + rng.standard_normal((16, 8, 32, 32))).astype(np.float32)
    _, mean, var = normalization._bn_compiled(X.reshape(16, 8, -1), None, None, 1e-5,
                                              normalize=False)
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(mean, X64.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(var, X64.var(axis=(0, 2, 3)), rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_kernels_equal_numpy(dtype, monkeypatch):
    """Relu and ReluGrad writing over their input (the executor hands them its
    buffer) run their in-place kernels and equal the NumPy forms."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 16, 40, 40)).astype(dtype)
    dY = rng.standard_normal(X.shape).astype(dtype)
    monkeypatch.setattr(compiled, "ENABLED", False)
    (want_y,) = activation.Relu(np, X)
    (want_dx,) = activation.ReluGrad(np, dY, want_y)
    monkeypatch.setattr(compiled, "ENABLED", True)
    counts = count_calls(monkeypatch, [(activation, "_relu_in_place_kernel"),
                                (activation, "_relu_grad_in_place_kernel")])
    buffer = X.copy()
    (y,) = activation.Relu(np, buffer, out=buffer)
    assert y is buffer
    buffer = dY.copy()
    (dx,) = activation.ReluGrad(np, buffer, want_y, out=buffer)
    assert dx is buffer
    assert all(counts.values()), counts
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(dx, want_dx)


def _total(a):
    t = 0.0
    for i in range(a.size):
        t += a[i]
    return t


def test_a_kernel_runs_where_no_cache_can_be_written(monkeypatch):
    """With nowhere to keep compiled code (a read-only install and home directory),
    a kernel is compiled for the process alone."""
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    assert compiled.kernel(_total)(np.arange(5.0)) == 10.0


def test_a_numba_that_cannot_compile_switches_the_kernels_off(monkeypatch):
    """A numba that imports but fails to compile: a warning, then the NumPy forms."""
    class Broken:
        @staticmethod
        def njit(*args, **kwargs):
            raise OSError("no code generator")

    monkeypatch.setattr(compiled, "_numba", Broken)
    monkeypatch.setattr(compiled, "_prepared", False)
    monkeypatch.setattr(compiled, "ENABLED", True)
    monkeypatch.setattr(compiled._ready, "_compiled", None)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernels are off: numba cannot compile"):
        compiled.prepare()
    assert not compiled.available()


def test_without_numba_ops_run_their_numpy_forms(monkeypatch):
    case = compiled_cases.CASES[0]
    arrays = gc.materialize(case.sample, np.float64)
    want = _outputs(case.sample, arrays)
    monkeypatch.setattr(compiled, "_numba", False)
    assert not compiled.available()
    compiled.prepare()  # nothing to load
    counts = count_calls(monkeypatch, case.kernels)
    got = _outputs(case.sample, arrays)
    assert not any(counts.values())
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("value,enabled", [("0", False), ("1", True), ("", True)])
def test_environment_switch(value, enabled):
    code = "from onnxgrad.ops import compiled; compiled.available(); print(compiled.ENABLED)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ONNXGRAD_COMPILED": value}, check=True)
    assert out.stdout.strip() == str(enabled)


def test_environment_switch_refuses_other_values():
    """A bad value is refused by name when the CPU backend is first used, as the CLI
    reports errors: one line, no traceback."""
    data = Path(__file__).resolve().parents[1] / "models"
    out = subprocess.run([sys.executable, "-m", "onnxgrad.tools.cli", "eval",
                          str(data / "digits_mlp.onnx"), "--data", str(data / "digits_test.npz")],
                         capture_output=True, text=True,
                         env={**os.environ, "ONNXGRAD_COMPILED": "yes"})
    assert out.returncode != 0
    assert "ONNXGRAD_COMPILED='yes': expected 1 (the default) or 0" in out.stderr
    assert "Traceback" not in out.stderr