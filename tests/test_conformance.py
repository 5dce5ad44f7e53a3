"""The ONNX backend node suite through the public API (``onnxgrad.load(model).run(feeds)``).

Each case is a test of its own: every case whose ops onnxgrad registers must
pass, except the cases listed (with their reasons) in
``onnxgrad.tools.conformance.EXCLUSIONS``; and the pass rate over all cases,
unsupported ones included, must stay at or above ``PASS_RATE_FLOOR``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnx.backend.test.case.test_case import TestCase

from onnxgrad.tools import conformance as C
from onnxgrad.tools.cli import main


@pytest.fixture(scope="module")
def report():
    return C.run_suite()


CASES = C.load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_backend_node_case(case):
    """Every case whose ops onnxgrad registers passes, unless excluded with a reason."""
    if case.name in C.EXCLUSIONS:
        pytest.skip(C.EXCLUSIONS[case.name])
    result = C.run_case(case)
    if result.status == "unsupported":
        pytest.skip(result.message)
    assert result.status == "pass", f"{result.status}: {result.message}"


def test_pass_rate_stays_above_the_floor(report):
    totals = report.totals()
    assert len(report.results) == len(C.load_cases())
    assert report.pass_rate >= C.PASS_RATE_FLOOR, (
        f"pass rate {report.pass_rate:.3f} < {C.PASS_RATE_FLOOR}: {dict(totals)}")


def test_onnx_training_optimizer_cases_pass(report):
    wanted = ("test_momentum", "test_momentum_multiple", "test_nesterov_momentum", "test_adagrad",
              "test_adagrad_multiple", "test_adam", "test_adam_multiple")
    status = {r.name: r.status for r in report.results}
    assert {n: status[n] for n in wanted} == {n: "pass" for n in wanted}


def test_exclusions_name_real_cases_with_reasons(report):
    names = {r.name for r in report.results}
    assert set(C.EXCLUSIONS) <= names, sorted(set(C.EXCLUSIONS) - names)
    assert all(reason.strip() for reason in C.EXCLUSIONS.values())
    stale = [r.name for r in report.results if r.name in C.EXCLUSIONS and r.status == "pass"]
    if stale:  # someone fixed them: the entries should go
        warnings.warn(f"excluded cases now pass; remove them from EXCLUSIONS: {stale}",
                      stacklevel=1)


def test_unsupported_cases_name_their_ops(report):
    for r in report.results:
        if r.status == "unsupported":
            assert r.missing, r
    assert report.missing_ops() == C.Counter(m for r in report.results for m in r.missing)


# -- the runner itself, on hand-made cases ------------------------------------------------------
def _case(name, node, inputs, outputs, opset=17):
    graph = helper.make_graph(
        [node], name,
        [helper.make_tensor_value_info(f"x{i}", helper.np_dtype_to_tensor_dtype(x.dtype), x.shape)
         for i, x in enumerate(inputs)],
        [helper.make_tensor_value_info(f"y{i}", helper.np_dtype_to_tensor_dtype(y.dtype), y.shape)
         for i, y in enumerate(outputs)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(node.domain, opset)])
    return TestCase(name=name, model_name=name, url=None, model_dir=None, model=model,
                    data_sets=[(inputs, outputs)], kind="node", rtol=1e-3, atol=1e-7)


def test_runner_classifies_pass_fail_unsupported_and_error():
    x = np.array([1.0, -2.0], dtype=np.float32)
    cases = [
        _case("ok", helper.make_node("Neg", ["x0"], ["y0"]), [x], [-x]),
        _case("wrong", helper.make_node("Neg", ["x0"], ["y0"]), [x], [x]),
        _case("dtype", helper.make_node("Identity", ["x0"], ["y0"]), [x], [x.astype(np.float64)]),
        _case("nope", helper.make_node("NoSuchOp", ["x0"], ["y0"], domain="example.org"), [x], [x]),
        _case("broken", helper.make_node("Reshape", ["x0", "x1"], ["y0"]),
              [x, np.array([3], dtype=np.int64)], [x]),
    ]
    report = C.run_suite(cases=cases)
    got = {r.name: r.status for r in report.results}
    assert got == {"ok": "pass", "wrong": "fail", "dtype": "fail", "nope": "unsupported",
                   "broken": "error"}
    by_name = {r.name: r for r in report.results}
    assert by_name["nope"].missing == ("example.org::NoSuchOp",)
    assert "dtype" in by_name["dtype"].message
    text = report.format(verbose=True)
    assert "5 cases: 1 pass, 2 fail, 1 unsupported, 1 error" in text


def test_compare_follows_the_suite():
    f = np.array([1.0, np.nan], dtype=np.float32)
    assert C.compare(f, f.copy(), 1e-3, 1e-7, "y") is None  # NaN equals NaN
    assert C.compare(f, f[:1], 1e-3, 1e-7, "y") is not None  # shapes
    strings = np.array(["a", "b"], dtype=object)
    assert C.compare(strings, strings.copy(), 1e-3, 1e-7, "y") is None
    assert C.compare(strings, np.array(["a", "c"], dtype=object), 1e-3, 1e-7, "y") is not None
    seq = [np.zeros(2, np.float32), np.ones(3, np.float32)]
    assert C.compare(seq, [s.copy() for s in seq], 1e-3, 1e-7, "y") is None
    assert C.compare(seq, seq[:1], 1e-3, 1e-7, "y") is not None
    assert C.compare(seq, np.zeros(2, np.float32), 1e-3, 1e-7, "y") is not None
    assert C.compare(None, None, 1e-3, 1e-7, "y") is None


def test_cli_conformance_filters_by_op():
    result = CliRunner().invoke(main, ["conformance", "--op", "test_momentum*", "--verbose"])
    assert result.exit_code == 0, result.output
    assert "pass        test_momentum\n" in result.output
    assert "2 cases: 2 pass, 0 fail, 0 unsupported, 0 error" in result.output
    result = CliRunner().invoke(main, ["conformance", "--op", "NoSuchOp*"])
    assert result.exit_code != 0 and "Error: no case" in result.output


def test_tensor_proto_and_scalar_feeds_are_normalized():
    proto = helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0])
    assert C._as_value(proto).tolist() == [1.0, 2.0]
    assert C._as_value(np.float32(3.0)).shape == ()
