"""The planner: shape subgraphs folded per input shape, liveness, constants."""

import numpy as np
import pytest

import onnxgrad
from onnxgrad.backend import get_backend
from helpers import helper, make_model, numpy_helper


def _flatten_by_shape_arithmetic():
    """y = Reshape(x, Concat(Shape(x)[0:1], [-1])) * W: what exporters write for a flatten."""
    i64 = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        i64("zero", 0), i64("minus_one", [-1]), i64("axes", [0]),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus_one"], ["new_shape"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "W"], ["y"], name="mm"),
    ]
    w = np.random.default_rng(0).standard_normal((6, 2)).astype(np.float32)
    return make_model(nodes, [("x", np.float32, ["N", 2, 3])], [("y", np.float32, ["N", 2])],
                      {"W": w}, opset=17), w


def test_shape_arithmetic_is_folded_once_input_shapes_are_known():
    proto, w = _flatten_by_shape_arithmetic()
    model = onnxgrad.load(proto)
    rng = np.random.default_rng(1)
    for n in (4, 4, 3, 4):  # new shapes, repeats, and a return to an earlier shape
        x = rng.standard_normal((n, 2, 3)).astype(np.float32)
        np.testing.assert_allclose(model.run({"x": x})["y"], x.reshape(n, 6) @ w, rtol=1e-5)
    runner = model._runners[("y",)]
    assert runner.generic.recordable == {"s"}
    specialised = runner._plans[((4, 2, 3),)]
    assert [s.node.op_type for s in specialised.steps] == ["Reshape", "MatMul"]


def test_training_folds_shape_arithmetic_in_both_passes():
    proto, w = _flatten_by_shape_arithmetic()
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss="mse", optimizer=onnxgrad.SGD(lr=0.0))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    t = rng.standard_normal((5, 2)).astype(np.float32)
    first = trainer.gradients({"x": x}, t)["W"]
    second = trainer.gradients({"x": x}, t)["W"]  # through the specialised plan
    expected = x.reshape(5, 6).T @ (2 * (x.reshape(5, 6) @ w - t) / t.size)
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(first, second)
    plan = trainer._runner._plans[((5, 2, 3), (5, 2))]
    ops = [s.node.op_type for s in plan.steps]
    assert "Shape" not in ops and "Gather" not in ops and "Concat" not in ops


def test_intermediates_are_freed_after_their_last_use():
    proto, _ = _flatten_by_shape_arithmetic()
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss="mse")
    plan = trainer._runner.generic
    freed = [name for step in plan.steps for name in step.free]
    assert len(freed) == len(set(freed))
    produced = {o for step in plan.steps for o in step.outputs if o}
    kept = set(plan.fetch)
    assert produced - kept <= set(freed)  # every intermediate is freed


def _handoff_plan(alias, shape):
    """w's only direct reader is ``alias``; g (handed over for w) is ready before
    y reads the alias."""
    nodes = [helper.make_node(alias, ["w"], ["v"]),
             helper.make_node("Neg", ["x"], ["g"]),
             helper.make_node("Add", ["v", "x"], ["y"])]
    proto = make_model(nodes, [("x", np.float32, shape), ("w", np.float32, shape)],
                       [("y", np.float32, shape), ("g", np.float32, shape)])
    graph = onnxgrad.load(proto).graph
    return onnxgrad.Model.make_plan(graph, get_backend("cpu"), ["y", "g"], weights=["w"],
                                    handoff={"g": "w"})


@pytest.mark.parametrize("alias", ["Identity", "Transpose", "Relu"])
def test_handoff_waits_for_the_weight_and_its_aliases(alias):
    """A handed-over value reaches ``on_ready`` after the last read of its weight
    and of any live alias of it (Identity returns the weight itself, Transpose a
    view; Relu's output is a new array), so that the receiver may change the
    weight in place; it is left out of the result."""
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    w = np.ones((3, 3), np.float32)
    w[0, 1] = 2  # so that w and its transpose differ
    v = {"Identity": w, "Transpose": w.T, "Relu": w}[alias].copy()
    plan = _handoff_plan(alias, [3, 3])
    seen = []

    def on_ready(weight, value):
        seen.append((weight, value.copy()))
        w[...] += 100  # an optimizer's in-place update

    result = plan.run({"x": x, "w": w}, on_ready=on_ready)
    assert [name for name, _ in seen] == ["w"]
    np.testing.assert_array_equal(seen[0][1], -x)
    np.testing.assert_array_equal(result["y"], v + x)  # read w before its update
    assert set(result) == {"y"}
    assert w[0, 1] == 102


def _spy_on_out(plan, op_type):
    """Record the ``out`` argument that the steps of ``op_type`` receive."""
    received = []
    for step in plan.steps:
        if step.node.op_type == op_type:
            kernel = step.kernel

            def spy(xp, *args, _kernel=kernel, **kw):
                received.append(kw.get("out"))
                return _kernel(xp, *args, **kw)

            step.kernel = spy
    return received


def _plan(nodes, fetch, shape=(2, 3)):
    proto = make_model(nodes, [("x", np.float32, list(shape))],
                       [(f, np.float32, list(shape)) for f in fetch])
    graph = onnxgrad.load(proto).graph
    return onnxgrad.Model.make_plan(graph, get_backend("cpu"), fetch)


def test_a_dying_intermediate_is_reused_for_the_output():
    plan = _plan([helper.make_node("Neg", ["x"], ["a"]),
                  helper.make_node("Relu", ["a"], ["b"])], ["b"])
    relu = next(s for s in plan.steps if s.node.op_type == "Relu")
    neg = next(s for s in plan.steps if s.node.op_type == "Neg")
    assert relu.donors == (0,) and neg.donors == ()  # a graph input is never a donor
    received = _spy_on_out(plan, "Relu")
    x = np.array([[1, -2, 3], [-4, 5, -6]], np.float32)
    result = plan.run({"x": x})
    assert received[0] is not None and result["b"] is received[0]
    np.testing.assert_array_equal(result["b"], np.maximum(-x, 0))
    np.testing.assert_array_equal(x, [[1, -2, 3], [-4, 5, -6]])  # the feed is untouched


@pytest.mark.parametrize("alias", ["Identity", "Transpose"])
def test_an_aliased_intermediate_is_not_reused(alias):
    """``a`` dies at Relu, but Identity's output is ``a`` itself and Transpose's
    a view of it; both are read after Relu, so Relu must not overwrite ``a``."""
    plan = _plan([helper.make_node("Neg", ["x"], ["a"]),
                  helper.make_node(alias, ["a"], ["c"]),
                  helper.make_node("Relu", ["a"], ["b"]),
                  helper.make_node("Neg", ["c"], ["d"])], ["b", "d"], shape=(3, 3))
    received = _spy_on_out(plan, "Relu")
    x = np.arange(-4, 5, dtype=np.float32).reshape(3, 3)
    result = plan.run({"x": x})
    assert received == [None]
    want_c = -x if alias == "Identity" else (-x).T
    np.testing.assert_array_equal(result["d"], -want_c)
    np.testing.assert_array_equal(result["b"], np.maximum(-x, 0))


def test_a_value_read_twice_by_a_step_or_fetched_is_not_a_donor():
    plan = _plan([helper.make_node("Neg", ["x"], ["a"]),
                  helper.make_node("Mul", ["a", "a"], ["b"]),
                  helper.make_node("Neg", ["x"], ["e"]),
                  helper.make_node("Add", ["e", "b"], ["f"])], ["f", "e"])
    assert all(s.donors == () for s in plan.steps if s.node.op_type == "Mul")
    add = next(s for s in plan.steps if s.node.op_type == "Add")
    assert add.donors == (1,)  # e is fetched: only b may be reused
    x = np.array([[1, -2, 3], [-4, 5, -6]], np.float32)
    result = plan.run({"x": x})
    np.testing.assert_array_equal(result["f"], -x + x * x)
    np.testing.assert_array_equal(result["e"], -x)


def test_reuse_is_off_where_reference_counts_cannot_tell(monkeypatch):
    from onnxgrad import executor

    assert executor._unshared_references() is not None  # this interpreter counts exactly
    monkeypatch.setattr(executor, "_UNSHARED_REFS", None)
    plan = _plan([helper.make_node("Neg", ["x"], ["a"]),
                  helper.make_node("Relu", ["a"], ["b"])], ["b"])
    received = _spy_on_out(plan, "Relu")
    x = np.array([[1, -2, 3], [-4, 5, -6]], np.float32)
    np.testing.assert_array_equal(plan.run({"x": x})["b"], np.maximum(-x, 0))
    assert received == [None]
