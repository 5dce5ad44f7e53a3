"""One-node ONNX models from op_db samples, and gradient checks through the public API.

Analytic gradients come from ``onnxgrad.Trainer.gradients`` on a model whose
differentiable inputs are initializers and whose loss is ``sum(Y * U)``;
numeric ones from central differences of ``onnxgrad.load(model).run``, along
a random direction ``v``:  ⟨∂loss/∂x, v⟩ ≈ (f(x + εv) - f(x - εv)) / 2ε.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxgrad
from onnxgrad.ops import lookup

FLOAT_SPECS = ("real", "pos", "away0", "float")
OUT = "out"  # the node's output (op_db input names are ONNX's, e.g. ArrayFeatureExtractor's "Y")


def ir_version(opset: int) -> int:
    return 10 if opset <= 21 else helper.find_min_ir_version_for([helper.make_opsetid("", opset)])


def opset_imports(sample) -> list:
    imports = [helper.make_opsetid("", sample.opset)]
    if sample.domain:
        imports.append(helper.make_opsetid(sample.domain, 1))
    return imports


def definition(sample):
    return lookup(sample.op, sample.domain, 1 if sample.domain else sample.opset)


def materialize(sample, dtype=np.float64, seed: int = 0) -> dict[str, np.ndarray]:
    """The sample's inputs as arrays (floats in ``dtype``), by name; omitted ones left out."""
    rng = np.random.default_rng(zlib.crc32(sample.id.encode()) + seed)
    out = {}
    for name, (kind, arg) in sample.inputs:
        if name is None:
            continue
        if kind == "real":
            a = rng.uniform(-2, 2, size=arg)
        elif kind == "pos":
            a = rng.uniform(0.5, 2, size=arg)
        elif kind == "away0":
            a = rng.uniform(0.3, 2, size=arg) * rng.choice([-1.0, 1.0], size=arg)
        elif kind == "float":
            a = np.array(arg, dtype=np.float64)
        else:
            a = np.array(arg, dtype=kind)
        if kind in FLOAT_SPECS:
            a = np.asarray(a, dtype=dtype)
        out[name] = np.asarray(a)
    return out


def kernel_attrs(sample) -> dict:
    """The sample's attributes as kernels receive them (tensors as NumPy arrays)."""
    out = {}
    for k, v in sample.attrs.items():
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            v = np.array(v[1], dtype=v[0])
        out[k] = v
    return definition(sample).resolve_attrs(out, sample.id)


def _attr(value):
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return numpy_helper.from_array(np.array(value[1], dtype=value[0]))  # a tensor attribute
    return value


def make_node(sample, output: str = OUT) -> onnx.NodeProto:
    ins = ["" if name is None else name for name, _ in sample.inputs]
    while ins and ins[-1] == "":
        ins.pop()
    attrs = {k: _attr(v) for k, v in sample.attrs.items()}
    return helper.make_node(sample.op, ins, [output], domain=sample.domain or None, **attrs)


def _typed_output(graph: onnx.GraphProto, sample, name: str, arrays) -> onnx.ValueInfoProto:
    """``name``'s type as ONNX shape inference sees it (the output is typed after)."""
    probe = helper.make_model(graph, opset_imports=opset_imports(sample),
                              ir_version=ir_version(sample.opset))
    inferred = onnx.shape_inference.infer_shapes(probe)
    for vi in list(inferred.graph.output) + list(inferred.graph.value_info):
        tt = vi.type.tensor_type
        if vi.name == name and tt.elem_type and tt.HasField("shape"):
            return vi
    # Shape inference cannot tell (e.g. axes fed at run time): ask the reference.
    feeds = {i.name: arrays[i.name] for i in graph.input}
    y = ReferenceEvaluator(probe).run(None, feeds)[0]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(y.dtype), y.shape)


def build_model(sample, arrays: dict[str, np.ndarray], as_inputs, *, loss_input=None,
                ) -> onnx.ModelProto:
    """A model of the sample's node: names in ``as_inputs`` are graph inputs, the
    other arrays initializers.  With ``loss_input`` (an array U) the graph also
    computes ``loss = sum(Y * U)`` and outputs only that."""
    inputs = [helper.make_tensor_value_info(
        n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in arrays.items()
        if n in as_inputs]
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items() if n not in as_inputs]
    nodes = [make_node(sample)]
    graph = helper.make_graph(nodes, "one_node", inputs, [helper.make_value_info(OUT, onnx.TypeProto())],
                              initializer=inits)
    y = _typed_output(graph, sample, OUT, arrays)
    graph.output.pop()
    if loss_input is None:
        graph.output.append(y)
    else:
        # loss = sum(Y * U) as a (1, n) @ (n, 1) product: Flatten, MatMul and ReduceSum
        # exist in every opset (Mul's broadcasting form starts at opset 7).
        elem = helper.np_dtype_to_tensor_dtype(loss_input.dtype)
        graph.input.append(helper.make_tensor_value_info("U", elem, [loss_input.size, 1]))
        graph.node.extend([helper.make_node("Flatten", [OUT], ["Y_row"], axis=0),
                           helper.make_node("MatMul", ["Y_row", "U"], ["YU"]),
                           helper.make_node("ReduceSum", ["YU"], ["loss"], keepdims=0)])
        graph.output.append(helper.make_tensor_value_info("loss", elem, []))
    model = helper.make_model(graph, opset_imports=opset_imports(sample),
                              ir_version=ir_version(sample.opset))
    onnx.checker.check_model(model)
    return model


def run_forward(sample, arrays: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, np.ndarray]:
    """onnxgrad's output of the sample, every input fed at run time."""
    model = build_model(sample, arrays, set(arrays))
    return model, onnxgrad.load(model).run(dict(arrays))[OUT]


def differentiable_inputs(sample) -> list[str]:
    """Floating-point inputs the op declares differentiable."""
    d = definition(sample)
    return [name for i, (name, (kind, _)) in enumerate(sample.inputs)
            if name is not None and kind in ("real", "pos", "away0") and d.is_differentiable(i)]


def analytic_gradients(sample, arrays, wrt, u, device: str = "cpu") -> dict[str, np.ndarray]:
    model = build_model(sample, arrays, set(), loss_input=u)
    trainer = onnxgrad.Trainer(onnxgrad.load(model), loss=None, output="loss",
                               optimizer=onnxgrad.SGD(lr=0.0), trainable=list(wrt), device=device)
    return trainer.gradients({"U": u.reshape(-1, 1)}, None)


def projection_u(sample, y: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(sample.id.encode()) + 1)
    return np.asarray(rng.standard_normal(y.shape), dtype=y.dtype)


def check_gradient(sample, name: str) -> None:
    """Analytic ⟨∂loss/∂name, v⟩ against central differences, in float64."""
    tol = {"eps": 1e-6, "rtol": 1e-5, "atol": 1e-8, **(sample.tol or {})}
    arrays = materialize(sample, np.float64)
    _, y = run_forward(sample, arrays)
    assert y.dtype.kind == "f", f"{sample.id}: output {y.dtype} is not differentiable"
    u = projection_u(sample, y)
    grads = analytic_gradients(sample, arrays, [name], u)
    assert set(grads) == {name}
    grad = grads[name]
    x = arrays[name]
    assert grad.dtype == x.dtype and grad.shape == x.shape, \
        f"gradient of {name}: {grad.dtype}{grad.shape}, input {x.dtype}{x.shape}"

    model = onnxgrad.load(build_model(sample, arrays, set(arrays)))
    v = np.random.default_rng(zlib.crc32(sample.id.encode()) + 2).standard_normal(x.shape)

    def f(shift):
        feeds = dict(arrays)
        feeds[name] = (x + shift * v).astype(x.dtype)
        out = model.run(feeds)[OUT]
        return float(np.sum(u.astype(np.float64) * out.astype(np.float64)))

    numeric = (f(tol["eps"]) - f(-tol["eps"])) / (2 * tol["eps"])
    analytic = float(np.sum(grad * v))
    magnitude = float(np.sum(np.abs(grad * v))) + abs(numeric)
    assert abs(analytic - numeric) <= tol["atol"] + tol["rtol"] * magnitude, \
        f"{sample.id} d/d{name}: analytic {analytic!r} vs numeric {numeric!r}"


def check_float32_gradients(sample, rtol: float, atol: float) -> None:
    """float32 inputs give float32 gradients (no float64 upcast) close to float64's."""
    names = differentiable_inputs(sample)
    a64 = materialize(sample, np.float64)
    _, y64 = run_forward(sample, a64)
    u64 = projection_u(sample, y64)
    g64 = analytic_gradients(sample, a64, names, u64)
    a32 = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in a64.items()}
    g32 = analytic_gradients(sample, a32, names, u64.astype(np.float32))
    for name in names:
        assert g32[name].dtype == np.float32, f"{name}: {g32[name].dtype}"
        np.testing.assert_allclose(g32[name], g64[name], rtol=rtol, atol=atol, err_msg=name)


def all_samples():
    """The samples of every op database that uses op_db's Sample format."""
    import importlib

    from op_db import Sample

    samples = []
    for module in ("op_db", "op_db_cnn", "op_db_transformer"):
        try:
            found = importlib.import_module(module).SAMPLES
        except (ImportError, AttributeError):
            continue
        samples += [s for s in found if isinstance(s, Sample)]
    return samples
