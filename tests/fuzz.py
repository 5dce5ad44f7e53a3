"""Mutated models for the fuzz tests: structured mutations (attributes, element types,
ops, wiring, shapes, outputs) and byte-level ones, of small seed models.  Each case
loads the model, runs it, builds a Trainer and takes a step; every failure must be an
OnnxgradError (or the model works), with no crash and no hang."""

from __future__ import annotations

import random
import signal
import traceback
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxgrad
from helpers import mlp_model

#: Seconds a case may take before it counts as a hang.
CASE_SECONDS = 10


def seed_models() -> list[onnx.ModelProto]:
    """Small models to mutate: an MLP, a CNN with BatchNorm and pooling, and a shipped
    one."""
    from pathlib import Path

    rng = np.random.default_rng(0)
    cnn_nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1],
                         strides=[1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c", "g", "beta", "m", "v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("ReduceSum", ["p", "axes"], ["s"], name="sum", keepdims=0),
        helper.make_node("Gemm", ["s", "w2", "b2"], ["logits"], name="fc", transB=1),
    ]
    cnn_inits = [numpy_helper.from_array(a, k) for k, a in {
        "w": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "b": np.zeros(4, np.float32), "g": np.ones(4, np.float32),
        "beta": np.zeros(4, np.float32), "m": np.zeros(4, np.float32),
        "v": np.ones(4, np.float32), "axes": np.array([2, 3], np.int64),
        "w2": rng.standard_normal((3, 4)).astype(np.float32), "b2": np.zeros(3, np.float32),
    }.items()]
    cnn = helper.make_model(helper.make_graph(
        cnn_nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], cnn_inits),
        opset_imports=[helper.make_opsetid("", 17)])
    cnn.ir_version = 8
    root = Path(__file__).resolve().parent.parent / "models"
    return [mlp_model(sizes=(4, 6, 3)), cnn, onnx.load(root / "digits_mlp.onnx")]


@dataclass
class Case:
    seed: int
    kind: str
    what: str
    data: bytes


def _mutate_structure(model: onnx.ModelProto, rng: random.Random) -> str:
    graph = model.graph
    node = rng.choice(list(graph.node)) if graph.node else None
    choice = rng.randrange(9)
    if choice == 0 and node is not None and node.attribute:
        attr = rng.choice(list(node.attribute))
        value = rng.choice([0, -1, 1, 2, 3, 7, 2 ** 40, -(2 ** 40)])
        if attr.type == onnx.AttributeProto.INT:
            attr.i = value
        elif attr.type == onnx.AttributeProto.INTS and attr.ints:
            attr.ints[rng.randrange(len(attr.ints))] = value
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30])
        return f"attribute {attr.name} of {node.name} set to {value}"
    if choice == 1 and graph.initializer:
        tensor = rng.choice(list(graph.initializer))
        kind = rng.choice(["string", "int", "double", "empty", "scalar"])
        dims = list(tensor.dims)
        if kind == "string":
            new = helper.make_tensor(tensor.name, TensorProto.STRING, dims,
                                     [b"x"] * int(np.prod(dims) if dims else 1))
        elif kind == "int":
            new = numpy_helper.from_array(np.ones(dims, np.int32), tensor.name)
        elif kind == "double":
            new = numpy_helper.from_array(np.ones(dims, np.float64), tensor.name)
        elif kind == "empty":
            new = numpy_helper.from_array(np.zeros([0] + dims[1:], np.float32), tensor.name)
        else:
            new = numpy_helper.from_array(np.array(1.5, np.float32), tensor.name)
        tensor.CopyFrom(new)
        return f"initializer {tensor.name} made {kind}"
    if choice == 2 and node is not None:
        old = node.op_type
        node.op_type = rng.choice(["Relu", "Add", "MatMul", "Conv", "Reshape", "Softmax",
                                   "Transpose", "Concat", "Gather", "NoSuchOp", "LSTM"])
        return f"{node.name}: {old} -> {node.op_type}"
    if choice == 3 and node is not None and node.input:
        names = [i.name for i in graph.input] + [t.name for t in graph.initializer] + \
            [o for n in graph.node for o in n.output] + ["", "missing_value"]
        index = rng.randrange(len(node.input))
        node.input[index] = rng.choice(names)
        return f"input {index} of {node.name} rewired to {node.input[index]!r}"
    if choice == 4 and node is not None:
        if node.input and rng.random() < 0.5:
            del node.input[-1]
            return f"last input of {node.name} dropped"
        node.input.append(rng.choice([t.name for t in graph.initializer] or ["x"]))
        return f"an input added to {node.name}"
    if choice == 5 and graph.input:
        dims = graph.input[0].type.tensor_type.shape.dim
        if dims:
            dim = rng.choice(list(dims))
            dim.dim_value = rng.choice([0, 1, 5, 1000])
            return f"a dim of input {graph.input[0].name} fixed"
    if choice == 6:
        del graph.output[:]
        return "outputs removed"
    if choice == 7 and graph.input:
        graph.input[0].type.tensor_type.elem_type = rng.choice(
            [TensorProto.STRING, TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT16])
        return "input element type changed"
    if choice == 8 and node is not None:
        graph.node.remove(node)
        return f"{node.name} removed"
    return "unchanged"


def cases(count: int, seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    models = seed_models()
    found = []
    for i in range(count):
        base = onnx.ModelProto()
        base.CopyFrom(models[i % len(models)])
        if rng.random() < 0.5:
            what = "; ".join(_mutate_structure(base, rng) for _ in range(rng.randint(1, 2)))
            found.append(Case(i, "structure", what, base.SerializeToString()))
        else:
            data = bytearray(base.SerializeToString())
            flips = rng.randint(1, 4)
            for _ in range(flips):
                data[rng.randrange(len(data))] = rng.randrange(256)
            found.append(Case(i, "bytes", f"{flips} byte(s) changed", bytes(data)))
    return found


def _feeds(model: onnxgrad.Model) -> dict[str, np.ndarray]:
    feeds = {}
    for name in model.graph.inputs:
        dtype = model.graph.dtype(name) or np.dtype(np.float32)
        shape = model.graph.shape(name) or (2,)
        dims = [d if isinstance(d, int) and 0 <= d <= 64 else 2 for d in shape]
        if dtype.kind == "f":
            feeds[name] = np.random.default_rng(0).standard_normal(dims).astype(dtype)
        elif dtype.kind in "iub":
            feeds[name] = np.ones(dims, dtype)
        else:
            feeds[name] = np.full(dims, "a", dtype=object)
    return feeds


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def run(case: Case) -> str | None:
    """None when the case ends well (success or an OnnxgradError), else what went wrong."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        model = onnxgrad.load(onnx.load_from_string(case.data)) if case.kind == "structure" \
            else _load_bytes(case.data)
        feeds = _feeds(model)
        model.run(feeds)
        trainer = onnxgrad.Trainer(model, loss="mse", optimizer=onnxgrad.SGD(lr=0.1))
        out = model.run(feeds)
        first = next(iter(out.values()))
        trainer.step(feeds, np.zeros(np.shape(first), np.float32))
    except onnxgrad.OnnxgradError:
        pass
    except Hang:
        return f"hang (over {CASE_SECONDS} s)"
    except Exception as exc:  # noqa: BLE001 - what the fuzz test looks for
        frames = traceback.extract_tb(exc.__traceback__)
        where = next((f"{f.filename.split('/')[-1]}:{f.lineno}" for f in reversed(frames)
                      if "onnxgrad" in f.filename or "/runtime/" in f.filename
                      or "/ops/" in f.filename), "?")
        return f"{type(exc).__name__} at {where}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return None


def _load_bytes(data: bytes) -> onnxgrad.Model:
    """The damaged bytes as a user meets them: a file that onnxgrad.load reads."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return onnxgrad.load(path)
    finally:
        os.unlink(path)
