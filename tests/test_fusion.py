"""BatchNormalization merged with the Relu or Clip after it in CPU plans (``runtime/fusion.py``).

Every case trains the same small CNN with the merge on and off and asserts
that losses and weights are the same bit for bit; it also checks which steps
merged, that the normalised values are no longer kept for the backward pass,
where the merge must not happen, and the merged gradient against central
differences in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

import onnxgrad
from helpers import central_differences, check_against_central_differences, make_model
from onnxgrad import fusion
from onnxgrad.ops import compiled, normalization

pytestmark = pytest.mark.skipif(not compiled.available(), reason="numba is not installed: "
                                "CPU plans merge steps only where compiled kernels run")

ACTIVATIONS = {
    # name: (opset, activation nodes reading "b{i}" and writing "a{i}")
    "relu-8": (8, lambda i: [helper.make_node("Relu", [f"b{i}"], [f"a{i}"])]),
    "clip6-8": (8, lambda i: [helper.make_node("Clip", [f"b{i}"], [f"a{i}"], min=0.0, max=6.0)]),
    "relu-9": (9, lambda i: [helper.make_node("Relu", [f"b{i}"], [f"a{i}"])]),
    "relu-14": (14, lambda i: [helper.make_node("Relu", [f"b{i}"], [f"a{i}"])]),
    "clip6-9": (9, lambda i: [helper.make_node("Clip", [f"b{i}"], [f"a{i}"], min=0.0, max=6.0)]),
    "clip-14": (14, lambda i: [helper.make_node("Clip", [f"b{i}", "lo", "hi"], [f"a{i}"])]),
    "clip-max-only-14": (14, lambda i: [helper.make_node("Clip", [f"b{i}", "", "hi"], [f"a{i}"])]),
}


def _cnn(activation: str, dtype=np.float32, extra_reader: bool = False, **bn_attrs):
    """Conv → BatchNormalization (with ``bn_attrs``) → activation, twice, then a pooled
    linear layer; with ``extra_reader``, the first normalised values also feed the
    output."""
    opset, act = ACTIVATIONS[activation]
    rng = np.random.default_rng(0)
    inits = {"w0": rng.standard_normal((6, 3, 3, 3)) * 0.5, "w1": rng.standard_normal((8, 6, 3, 3)) * 0.3,
             "wl": rng.standard_normal((8, 5)) * 0.5, "lo": np.array(0.0), "hi": np.array(0.6)}
    nodes = []
    channels = {0: 6, 1: 8}
    for i in (0, 1):
        c = channels[i]
        per = (c,) if bn_attrs.get("spatial", 1) else (c, 8, 8)  # per channel, or per element
        inits.update({f"s{i}": 1 + 0.1 * rng.standard_normal(per),
                      f"o{i}": 0.1 * rng.standard_normal(per),
                      f"m{i}": np.zeros(per), f"v{i}": np.ones(per)})
        nodes.append(helper.make_node("Conv", ["x" if i == 0 else "a0", f"w{i}"], [f"c{i}"],
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization",
                                      [f"c{i}", f"s{i}", f"o{i}", f"m{i}", f"v{i}"], [f"b{i}"],
                                      **bn_attrs))
        nodes += act(i)
    nodes += [helper.make_node("GlobalAveragePool", ["a1"], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("MatMul", ["f", "wl"], ["y" if not extra_reader else "y0"])]
    if extra_reader:  # the first BatchNormalization's output read again, past the activation
        nodes += [helper.make_node("ReduceMean", ["b0"], ["r"], axes=[1, 2, 3], keepdims=0),
                  helper.make_node("Unsqueeze", ["r"], ["r1"], axes=[1]) if opset < 13 else
                  helper.make_node("Unsqueeze", ["r", "one"], ["r1"]),
                  helper.make_node("Add", ["y0", "r1"], ["y"])]
        inits["one"] = np.array([1], dtype=np.int64)
    inits = {k: (v if v.dtype == np.int64 else v.astype(dtype)) for k, v in inits.items()}
    model = make_model(nodes, [("x", dtype, ["N", 3, 8, 8])], [("y", dtype, ["N", 5])], inits,
                       opset=opset)
    x = rng.standard_normal((4, 3, 8, 8)).astype(dtype)
    t = rng.integers(0, 5, 4)
    return model, x, t


def _train(model, x, t, merge: bool, steps: int = 3, lr: float = 0.05, **options):
    """Losses of SGD-momentum steps, the weights after, and the trainer."""
    before = fusion.ENABLED
    fusion.ENABLED = merge
    try:
        trainer = onnxgrad.Trainer(onnxgrad.load(model), loss="cross_entropy",
                                   optimizer=onnxgrad.SGD(lr=lr, momentum=0.9), **options)
        losses = [trainer.step({"x": x}, t) for _ in range(steps)]
    finally:
        fusion.ENABLED = before
    return losses, trainer.model.parameters(), trainer


def _assert_same(a, b):
    losses_a, params_a, _ = a
    losses_b, params_b, _ = b
    assert losses_a == losses_b
    assert set(params_a) == set(params_b)
    for name in params_a:
        np.testing.assert_array_equal(params_a[name], params_b[name], err_msg=name)


def _with_projected_loss(model) -> dict:
    """Make ``model`` (float64, output y of 4×5) output ``loss = sum(y * u)`` for a fixed
    random u; its initializers, by name."""
    graph = model.graph
    u = np.random.default_rng(3).standard_normal((4, 5))
    graph.node.append(helper.make_node("Mul", ["y", "u"], ["yu"]))
    graph.node.append(helper.make_node("ReduceSum", ["yu"], ["loss"], keepdims=0))
    graph.initializer.append(numpy_helper.from_array(u, "u"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("loss", 11, []))
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def _steps(trainer) -> list:
    return trainer._runner.generic.steps


def _merged_then_uncompiled(monkeypatch, model, x, t, steps=1, **options) -> list:
    """Trainings with the merge on and off, whose first ``steps`` run with compiled
    kernels and two more without them: (losses, weights, trainer) of each."""
    results = []
    for merge in (True, False):
        monkeypatch.setattr(compiled, "ENABLED", True)
        losses, _, trainer = _train(model, x, t, merge=merge, steps=steps, **options)
        monkeypatch.setattr(compiled, "ENABLED", False)
        losses += [trainer.step({"x": x}, t) for _ in range(2)]
        results.append((losses, trainer.model.parameters(), trainer))
    return results


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_merged_steps_train_as_the_steps_one_by_one(activation, dtype):
    """float16 normalises in float32 and rounds: the activation then runs after, as the
    op's own kernel."""
    model, x, t = _cnn(activation, dtype)
    merged = _train(model, x, t, merge=True)
    _assert_same(merged, _train(model, x, t, merge=False))
    op = "Relu" if activation.startswith("relu") else "Clip"
    kinds = [s.node.op_type for s in _steps(merged[2])]
    assert kinds.count(f"BatchNormalization+{op}") == 2
    assert kinds.count(f"BatchNormalizationGrad+{op}Grad") == 2
    assert op not in kinds and f"{op}Grad" not in kinds
    assert all(np.isfinite(merged[0])) and merged[0][-1] != merged[0][0]


def test_clip_keeps_a_mask_of_one_byte_in_place_of_the_normalised_values(monkeypatch):
    model, x, t = _cnn("clip-14")
    masks = []
    done = normalization.Activation.done
    monkeypatch.setattr(normalization.Activation, "done",
                        lambda self, mask: masks.append(mask) or done(self, mask))
    trainer = _train(model, x, t, merge=True, steps=1)[2]
    produced = {o for s in _steps(trainer) for o in s.outputs}
    assert "b0" not in produced and "b1" not in produced  # not kept for the backward pass
    assert len([o for o in produced if o.endswith("/clip_mask")]) == 2
    assert [(m.dtype, m.shape) for m in masks] == [(np.uint8, (4, 6, 64)), (np.uint8, (4, 8, 64))]


def test_after_the_compiled_kernels_are_switched_off_the_merged_steps_run_the_ops_own_forms(
        monkeypatch):
    """Plans merged while compiled kernels ran, run with them off: each merged step takes
    the NumPy paths, applying the activation and its gradient as the ops do."""
    model, x, t = _cnn("clip-14")
    results = _merged_then_uncompiled(monkeypatch, model, x, t)
    _assert_same(*results)
    assert any("+" in s.node.op_type for s in _steps(results[0][2]))


@pytest.mark.parametrize("activation", ["relu-8", "clip6-8"])
def test_statistics_per_element_take_the_gradient_through_the_activation_first(activation):
    """BatchNormalization with ``spatial=0`` (opsets 7 and 8: statistics per element, not
    per channel) runs a path of its own, not the compiled kernel's: the merged step
    applies the activation's gradient first, as its own op does."""
    model, x, t = _cnn(activation, spatial=0)
    merged = _train(model, x, t, merge=True)
    _assert_same(merged, _train(model, x, t, merge=False))
    assert sum("Grad+" in s.node.op_type for s in _steps(merged[2])) == 2


def test_evaluation_runs_merged_forward_steps():
    model, x, t = _cnn("clip6-9")
    results = []
    for merge in (True, False):
        losses, _, trainer = _train(model, x, t, merge=merge, steps=2)
        fusion.ENABLED = merge
        try:
            results.append(trainer.evaluate([({"x": x}, t)]))
        finally:
            fusion.ENABLED = True
    assert results[0] == results[1]


def test_no_merge_where_the_normalised_values_are_read_elsewhere():
    model, x, t = _cnn("relu-14", extra_reader=True)
    merged = _train(model, x, t, merge=True)
    _assert_same(merged, _train(model, x, t, merge=False))
    kinds = [s.node.op_type for s in _steps(merged[2])]
    assert kinds.count("BatchNormalization+Relu") == 1  # the second one only
    assert "b0" in {o for s in _steps(merged[2]) for o in s.outputs}


def test_no_merge_where_the_plan_returns_the_normalised_values():
    model, x, t = _cnn("clip-14")
    loaded = onnxgrad.load(model)
    result = loaded.run({"x": x}, outputs=["b0", "y"])  # an inference plan fetching b0
    assert result["b0"].shape == (4, 6, 8, 8)
    fusion.ENABLED = False
    try:
        reference = onnxgrad.load(model).run({"x": x}, outputs=["b0", "y"])
    finally:
        fusion.ENABLED = True
    np.testing.assert_array_equal(result["b0"], reference["b0"])
    np.testing.assert_array_equal(result["y"], reference["y"])


@pytest.mark.parametrize("activation", ["relu-14", "clip-14", "clip-max-only-14"])
def test_merged_gradients_by_central_differences(activation, monkeypatch):
    """float64 weight gradients of a loss of the CNN's output, through merged steps
    (BatchNormalization with ``training_mode=1``, so that a plain run of the model, as
    central differences make, normalises with batch statistics as training does)."""
    model, x, _ = _cnn(activation, np.float64, training_mode=1)
    weights = _with_projected_loss(model)
    params = {name: weights[name] for name in ("w0", "w1", "s0", "o0", "s1", "o1")}
    gates = []
    gate = normalization.Gate.__init__
    monkeypatch.setattr(normalization.Gate, "__init__",
                        lambda self, kind, values: gates.append(kind) or gate(self, kind, values))
    grads = check_against_central_differences(model, {"x": x}, params, eps=1e-6)
    assert all(np.abs(g).max() > 0 for g in grads.values())
    assert gates == [2 if activation.startswith("relu") else 1] * 2  # both merged


# -- GELU as torch.onnx writes it ------------------------------------------------------------


def _gelu_mlp(dtype=np.float32, shape=(4, 6, 10), hidden=12, extra_reader=False, c2=1.0, c3=0.5):
    """x @ W1 → Mul(Mul(h, Add(Erf(Div(h, √2)), c2)), c3) → @ W2, then a mean over the
    middle axis; with ``extra_reader``, Erf's output also feeds the result."""
    rng = np.random.default_rng(1)
    n, t, f = shape
    inits = {"w1": rng.standard_normal((f, hidden)) * 0.5, "w2": rng.standard_normal((hidden, 5)) * 0.5,
             "c1": np.array(np.sqrt(2.0)), "c2": np.array(c2), "c3": np.array(c3),
             "axes": np.array([1], dtype=np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Div", ["h", "c1"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "c2"], ["a"]),
             helper.make_node("Mul", ["h", "a"], ["m"]),
             helper.make_node("Mul", ["m", "c3"], ["g"]),
             helper.make_node("MatMul", ["g", "w2"], ["o"]),
             helper.make_node("ReduceMean", ["o", "axes"], ["y0" if extra_reader else "y"],
                              keepdims=0)]
    if extra_reader:
        nodes += [helper.make_node("ReduceMean", ["e", "axes"], ["r"], keepdims=0),
                  helper.make_node("ReduceMean", ["r", "axes"], ["r1"], keepdims=1),
                  helper.make_node("Add", ["y0", "r1"], ["y"])]
    inits = {k: (v if v.dtype == np.int64 else v.astype(dtype)) for k, v in inits.items()}
    model = make_model(nodes, [("x", dtype, ["N", t, f])], [("y", dtype, ["N", 5])], inits,
                       opset=18)
    return model, rng.standard_normal(shape).astype(dtype), rng.integers(0, 5, n)


def _gelu_train(model, x, t, merge):
    return _train(model, x, t, merge, steps=4, lr=0.1)


def _merged_kinds(trainer) -> list[str]:
    return [s.node.op_type for plan in trainer._runner._plans.values() for s in plan.steps
            if "(" in s.node.op_type]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_chain_and_its_gradient_train_as_the_nodes_one_by_one(dtype):
    model, x, t = _gelu_mlp(dtype)
    merged = _gelu_train(model, x, t, merge=True)
    _assert_same(merged, _gelu_train(model, x, t, merge=False))
    # the plan specialised to the input shapes (the first one reads shapes as it runs)
    assert sorted(_merged_kinds(merged[2])) == ["Gelu(Div,Erf,Add,Mul,Mul)",
                                                "GeluGrad(Div,Erf,Add,Mul,Mul)"]
    assert merged[0][-1] != merged[0][0]


def test_gelu_parts_on_threads_give_the_bits_of_the_nodes(monkeypatch):
    """Odd sizes in parts of a few elements, on 3 threads: the merged kernels and the
    split exp give the nodes' bits (with constants whose products round, unlike 0.5
    and 1, so that any other order of the operations shows)."""
    from onnxgrad import threads
    monkeypatch.setattr(compiled, "PART", 7)
    monkeypatch.setattr(threads, "ELEMENTWISE_PART", 13)
    model, x, t = _gelu_mlp(shape=(3, 7, 11), hidden=33, c2=0.9, c3=0.3)
    before = threads.get_num_threads()
    try:
        threads.set_num_threads(3)
        merged = _gelu_train(model, x, t, merge=True)
        _assert_same(merged, _gelu_train(model, x, t, merge=False))
    finally:
        threads.set_num_threads(before)
    assert len(_merged_kinds(merged[2])) == 2


def test_no_gelu_merge_where_a_value_of_the_chain_is_read_elsewhere():
    model, x, t = _gelu_mlp(extra_reader=True)
    merged = _gelu_train(model, x, t, merge=True)
    _assert_same(merged, _gelu_train(model, x, t, merge=False))
    assert _merged_kinds(merged[2]) == []


def test_inference_runs_the_gelu_chain_as_one_step():
    model, x, _ = _gelu_mlp()
    loaded = onnxgrad.load(model)
    got = [loaded.run({"x": x})["y"] for _ in range(2)]  # the second through the specialised plan
    fusion.ENABLED = False
    try:
        want = onnxgrad.load(model).run({"x": x})["y"]
    finally:
        fusion.ENABLED = True
    for value in got:
        np.testing.assert_array_equal(value, want)


def test_gelu_gradients_by_central_differences():
    """float64 weight gradients through the merged chain (the trainer's second run, in
    the plan specialised to the input shapes) against central differences."""
    model, x, _ = _gelu_mlp(np.float64)
    weights = _with_projected_loss(model)
    trainer = onnxgrad.Trainer(onnxgrad.load(model), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=["w1", "w2"])
    first = trainer.gradients({"x": x}, None)
    analytic = trainer.gradients({"x": x}, None)
    assert len(_merged_kinds(trainer)) == 2
    loaded = onnxgrad.load(model)
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(analytic[name], first[name])
        numeric = central_differences(loaded, {"x": x}, name, weights[name], 1e-6)
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_where_compiled_kernels_do_not_run_the_merged_gelu_steps_run_the_nodes_kernels(
        dtype, monkeypatch):
    """float16 (no compiled kernels), or float32 with them switched off after the plans
    were merged: the merged steps run each node's own kernel, with the nodes' results."""
    model, x, t = _gelu_mlp(dtype)
    results = _merged_then_uncompiled(monkeypatch, model, x, t, steps=2, lr=0.1)
    _assert_same(*results)
    assert len(_merged_kinds(results[0][2])) == 2
