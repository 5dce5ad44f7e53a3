"""Forward kernels against the ONNX reference evaluator (every op_db sample, in
float64 and float32).  The ONNX backend node suite runs in test_conformance.py."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

import gradcheck as gc
from op_db import SAMPLES


def _assert_same(got, want, rtol, atol, what=""):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if want.dtype.kind in "fc":
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
    elif want.dtype.kind == "V":  # ml_dtypes' narrow types: exact, through float32 (NaN == NaN)
        np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32), err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


# -- op_db against the reference evaluator ------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("sample", SAMPLES, ids=[s.id for s in SAMPLES])
def test_forward_matches_reference(sample, dtype):
    arrays = gc.materialize(sample, dtype)
    model, got = gc.run_forward(sample, arrays)
    if sample.ref == "onnxruntime":
        import onnxruntime

        session = onnxruntime.InferenceSession(model.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        (want,) = session.run(None, arrays)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            (want,) = ReferenceEvaluator(model).run(None, arrays)
    # float64: 1e-7, as the spec's float attribute defaults (LeakyRelu's alpha=0.01)
    # are float32 numbers in the reference and Python floats in onnxgrad.
    tol = (1e-7, 1e-12) if dtype == np.float64 else (1e-5, 1e-6)
    _assert_same(np.asarray(got), np.asarray(want), *tol, what=sample.id)
