"""Second-order gradients over every op sample: exact, or refused by name.

For each op_db sample whose op has a gradient rule, the model computes
``dX = Gradient(sum(Y * U) wrt X)`` with ONNX's ``Gradient`` operator and the loss
``sum(dX * C)``; its gradient with respect to X is the Hessian-vector product
``H · C``.  onnxgrad must give it exactly (against central differences of the loss,
which the model computes itself; the loss adds ``sum(X)`` so that X reaches it
even where dX does not depend on X), or raise UnsupportedOpError naming the gradient
kernel it cannot differentiate again (one that has neither a rule nor a standard-op
form): never a silent zero or a dropped term.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import gradcheck as gc
import onnxgrad

PREVIEW = "ai.onnx.preview.training"
#: Opsets from 7: the loss's Mul and Add broadcast there (earlier ones take attributes).
SAMPLES = [(s, gc.differentiable_inputs(s)[0]) for s in gc.all_samples()
           if gc.differentiable_inputs(s) and gc.definition(s).rule is not None and not s.tol
           and s.opset >= 7]


def _attention_samples():
    """Attention's one-output samples of tests/op_db_transformer.py in op_db's format
    (an absent input, (None, None) there, is (None, (kind, value))): AttentionGrad is
    differentiated again through its standard form, for Q, K and V."""
    import op_db_transformer
    from op_db import Sample

    found = [Sample(s.op, [(n, spec or ("float", 0.0)) for n, spec in s.inputs], s.attrs,
                    s.opset, tol=s.tol)
             for s in op_db_transformer.SAMPLES
             if s.op == "Attention" and s.outputs == 1 and s.grad]
    return [(s, n) for s in found for n in gc.differentiable_inputs(s)[:3]]


SAMPLES += _attention_samples()


def _grid_sample_samples():
    """GridSample's samples of tests/test_vision_gradients.py (those of op_db's input kinds):
    GridSampleGrad is differentiated again through its standard form, for X and grid."""
    import test_vision_gradients
    from op_db import Sample

    found = [Sample(s.op, s.inputs, s.attrs, s.opset, tol=s.tol)
             for s in test_vision_gradients.SAMPLES
             if s.op == "GridSample" and all(spec[0] == "real" for _, spec in s.inputs)]
    return [(s, n) for s in found for n in ("X", "grid")]


SAMPLES += _grid_sample_samples()


def _signal_samples():
    """DFT's and STFT's samples of tests/test_signal_attention_gradients.py in op_db's
    format: DFTGrad and STFTGrad are differentiated again through their standard forms
    (STFT's window gradient reads the signal)."""
    import test_signal_attention_gradients as signal
    from op_db import Sample

    found = [Sample(s.op, [(n, spec or ("float", 0.0)) for n, spec in s.inputs], s.attrs,
                    s.opset, tol=s.tol)
             for s in signal.SIGNAL_SAMPLES if s.outputs == 1 and s.grad]
    return [(s, n) for s in found for n in gc.differentiable_inputs(s)]


SAMPLES += _signal_samples()

#: Samples whose second derivative is exact, at least: 817 of 833 when this was written
#: (the others need the opset-1 softmax gradients again).
EXACT_FLOOR = 800


def _second_order_model(sample, arrays, name, u, c, as_input: bool) -> onnx.ModelProto:
    """loss = sum(Gradient(sum(Y * U) wrt name) * C) + sum(name); ``name`` a graph input
    or an initializer."""
    model = gc.build_model(sample, {k: v for k, v in arrays.items()},
                           {name} if as_input else set(), loss_input=u)
    graph = model.graph
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out == "loss":
                node.output[i] = "first"
    del graph.output[:]
    graph.initializer.append(numpy_helper.from_array(c, "second_order_C"))
    graph.node.extend([
        helper.make_node("Gradient", [name], ["dX"], domain=PREVIEW, xs=[name], y="first"),
        helper.make_node("Mul", ["dX", "second_order_C"], ["dXC"]),
        helper.make_node("ReduceSum", ["dXC"], ["second"], keepdims=0),
        # + sum(X): a path to X even where dX does not depend on X (linear ops)
        helper.make_node("ReduceSum", [name], ["plain"], keepdims=0),
        helper.make_node("Add", ["second", "plain"], ["loss"])])
    graph.output.append(helper.make_tensor_value_info("loss", onnx.TensorProto.DOUBLE, []))
    model.opset_import.append(helper.make_opsetid(PREVIEW, 1))
    return model


def second_order(sample, name):
    """(analytic ⟨H·C, v⟩, numeric, magnitude), or the UnsupportedOpError (once per
    sample: the floor test reuses the results)."""
    key = (sample.id, name)
    if key not in _RESULTS:
        _RESULTS[key] = _second_order(sample, name)
    return _RESULTS[key]


_RESULTS: dict = {}


def _second_order(sample, name):
    arrays = gc.materialize(sample, np.float64)
    _, y = gc.run_forward(sample, arrays)
    u = gc.projection_u(sample, y)
    rng = np.random.default_rng(zlib.crc32(sample.id.encode()) + 3)
    x = arrays[name]
    c, v = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    feeds = {"U": u.reshape(-1, 1)}
    try:
        trainer = onnxgrad.Trainer(
            onnxgrad.load(_second_order_model(sample, arrays, name, u, c, as_input=False)),
            loss=None, output="loss", optimizer=onnxgrad.SGD(lr=0.0), trainable=[name])
    except onnxgrad.UnsupportedOpError as error:
        return error
    hc = trainer.gradients(feeds, None)[name]
    plain = onnxgrad.load(_second_order_model(sample, arrays, name, u, c, as_input=True))
    eps = 1e-5
    run = _as_training_run(plain) if sample.op in _BY_KIND_OF_RUN else plain.run

    def f(shift):
        return float(run({**feeds, name: x + shift * v})["loss"])

    return float(np.sum(hc * v)), (f(eps) - f(-eps)) / (2 * eps), float(np.sum(np.abs(hc * v)))


#: Ops that compute another function in a training run than outside one (normalising
#: with batch statistics): central differences of the loss then run as the trainer's
#: steps do.
_BY_KIND_OF_RUN = {"BatchNormalization"}


def _as_training_run(model):
    """``model.run``, but as a training step runs the graph (RunState.training)."""
    from onnxgrad.backend import get_backend
    from onnxgrad.executor import RunState

    def run(feeds):
        state = RunState()
        state.training = True
        plan = onnxgrad.Model.make_plan(model.graph, get_backend("cpu"), ["loss"], state=state)
        return {k: np.asarray(v) for k, v in plan.run({**model._weights(), **feeds}).items()}

    return run


@pytest.mark.parametrize("sample,name", SAMPLES, ids=[f"{s.id}-d{n}" for s, n in SAMPLES])
def test_second_order_gradient_is_exact_or_refused(sample, name):
    result = second_order(sample, name)
    if isinstance(result, onnxgrad.UnsupportedOpError):
        assert "Grad" in str(result) or "gradient" in str(result), result
        return
    analytic, numeric, magnitude = result
    assert abs(analytic - numeric) <= 1e-6 + 1e-4 * (magnitude + abs(numeric)), \
        f"{sample.id} second order d/d{name}: analytic {analytic!r} vs numeric {numeric!r}"


def test_most_second_order_gradients_are_exact():
    exact = [s.id for s, n in SAMPLES if not isinstance(second_order(s, n), Exception)]
    assert len(exact) >= EXACT_FLOOR, f"{len(exact)} of {len(SAMPLES)} exact"
