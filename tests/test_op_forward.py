"""Forward kernels against the ONNX reference evaluator (every op_db sample, in
float64 and float32) and against the ONNX backend node test suite."""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import gradcheck as gc
import onnxgrad
from onnxgrad.ops import canonical_domain, is_registered, lookup
from op_db import SAMPLES

FAMILIES = {f"onnxgrad.ops.{m}" for m in ("elementwise", "activation", "linalg", "shape", "reduce", "ml")}


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


# -- the ONNX backend node suite -----------------------------------------------------------

#: Backend cases (by full-name regex) that use only these families' ops but
#: cannot pass, with the reason.
EXCLUDED: dict[str, str] = {}


def _excluded(name: str) -> str | None:
    return next((why for pattern, why in EXCLUDED.items() if re.fullmatch(pattern, name)), None)


def _node_cases():
    """Backend node cases whose every node is an op of these families, registered
    at the model's opset (ops of other families are tested by their own files)."""
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = load_model_tests(kind="node")
    selected = []
    for case in cases:
        opsets = {canonical_domain(o.domain): o.version for o in case.model.opset_import}
        ok = bool(case.model.graph.node)
        for node in case.model.graph.node:
            domain = canonical_domain(node.domain)
            if domain not in opsets or not is_registered(node.op_type, domain, opsets[domain]) \
                    or any(a.HasField("g") or len(a.graphs) for a in node.attribute):
                ok = False
                break
            if lookup(node.op_type, domain, opsets[domain]).kernel.__module__ not in FAMILIES:
                ok = False
                break
        if ok:
            selected.append(case)
    return selected


NODE_CASES = _node_cases()


def _array(value):
    """Some cases store TensorProtos (types NumPy lacks): make them arrays."""
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


@pytest.mark.parametrize("case", NODE_CASES, ids=[c.name for c in NODE_CASES])
def test_backend_node(case):
    why = _excluded(case.name)
    if why:
        pytest.skip(why)
    model = onnxgrad.load(case.model)
    names = [i.name for i in case.model.graph.input
             if i.name not in {t.name for t in case.model.graph.initializer}]
    outputs = [o.name for o in case.model.graph.output]
    for inputs, expected in case.data_sets:
        inputs = [_array(x) for x in inputs]
        expected = [_array(x) for x in expected]
        with np.errstate(all="ignore"):  # e.g. log(0) = -inf is an expected output
            got = model.run(dict(zip(names, inputs)))
        for name, want in zip(outputs, expected):
            _assert_same(np.asarray(got[name]), np.asarray(want), case.rtol, case.atol,
                         what=f"{case.name}:{name}")


def test_exclusions_are_current():
    """Every exclusion still matches a selected case (no stale entries)."""
    for pattern in EXCLUDED:
        assert any(re.fullmatch(pattern, c.name) for c in NODE_CASES), pattern
