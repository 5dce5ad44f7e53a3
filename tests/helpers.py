"""Small builders for ONNX test models."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tensor_type(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def make_model(nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    """A checked ModelProto.

    ``inputs``/``outputs`` are (name, dtype, shape) triples; ``initializers`` a
    dict name -> array.
    """
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(n, tensor_type(d), s) for n, d, s in inputs],
        [helper.make_tensor_value_info(n, tensor_type(d), s) for n, d, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in domains]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxgrad-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def mlp_model(sizes=(4, 5, 3), seed=0, dtype=np.float32, opset=17):
    """Gemm/Relu layers with a dynamic batch: input "x", output "logits"."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], {}, "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits[f"W{i}"] = (rng.standard_normal((b, a)) / np.sqrt(a)).astype(dtype)
        inits[f"b{i}"] = (0.1 * rng.standard_normal(b)).astype(dtype)
        out = "logits" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [out if out == "logits" else f"z{i}"],
                                      name=f"fc{i}", transB=1))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out], name=f"relu{i}"))
        prev = out
    return make_model(nodes, [("x", dtype, ["N", sizes[0]])], [("logits", dtype, ["N", sizes[-1]])],
                      inits, opset=opset)


def vi(name, elem, shape):
    """A value info of ONNX element type ``elem`` (a TensorProto constant)."""
    return helper.make_tensor_value_info(name, elem, shape)


def model_of(nodes, inputs, outputs, inits=(), opset=21):
    """An unchecked ModelProto from value infos (for graphs the checker refuses,
    or that carry sequences and optionals)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


__all__ = ["make_model", "mlp_model", "model_of", "tensor_type", "vi", "TensorProto", "helper",
           "numpy_helper"]


def finite_projection_loss(outputs) -> list:
    """Nodes of ``loss = Σ_y sum(where(isinf(y), 0, y) · U_y)`` over the value names
    ``outputs``, each projected on ``U_<y>`` (an input or initializer the caller adds),
    with ``zero`` a scalar the caller adds too: infinite entries (masked scores) are
    constants and left out."""
    nodes, terms = [], []
    for y in outputs:
        nodes += [helper.make_node("IsInf", [y], [f"{y}_inf"]),
                  helper.make_node("Where", [f"{y}_inf", "zero", y], [f"{y}_fin"]),
                  helper.make_node("Mul", [f"{y}_fin", f"U_{y}"], [f"{y}_u"]),
                  helper.make_node("ReduceSum", [f"{y}_u"], [f"{y}_t"], keepdims=0)]
        terms.append(f"{y}_t")
    return nodes + [helper.make_node("Sum", terms, ["loss"])]


def central_differences(model, feeds, name: str, value, eps: float):
    """d loss / d ``name`` by central differences of ``model.run(feeds)["loss"]``, one
    element of the parameter ``value`` at a time (``name`` is set back to ``value``)."""
    numeric = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        losses = []
        for step in (eps, -eps):
            moved = value.copy()
            moved[index] += step
            model.set_parameters({name: moved})
            losses.append(float(model.run(dict(feeds))["loss"]))
        numeric[index] = (losses[0] - losses[1]) / (2 * eps)
    model.set_parameters({name: value})
    return numeric


def count_calls(monkeypatch, functions) -> dict[str, int]:
    """Wrap each function ``(module, name)`` (which its callers look up in the module
    when they call it) so that its calls are counted; the counts, by ``name``."""
    counts = {}
    for module, name in functions:
        counts[name] = 0

        def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


def uniform(*shape, seed=0):
    """Float64 values uniform in [-1, 1) from a generator seeded with ``seed``."""
    return np.random.default_rng(seed).uniform(-1, 1, size=shape)


def check_against_central_differences(proto, feeds, params, eps, model=None):
    """``Trainer.gradients`` of every parameter of ``params`` in ``proto`` (a model whose
    output ``loss`` is a scalar), each of the parameter's shape and type, against
    central differences of that loss (rtol 1e-6, atol 1e-7; ``model``: ``proto``
    loaded, where the caller has it); returns the analytic gradients."""
    import onnxgrad  # noqa: PLC0415

    trainer = onnxgrad.Trainer(onnxgrad.load(proto), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=list(params))
    analytic = trainer.gradients(dict(feeds), None)
    model = model if model is not None else onnxgrad.load(proto)
    for name, value in params.items():
        assert analytic[name].shape == value.shape and analytic[name].dtype == value.dtype, name
        numeric = central_differences(model, feeds, name, value, eps)
        np.testing.assert_allclose(analytic[name], numeric, rtol=1e-6, atol=1e-7, err_msg=name)
    return analytic
