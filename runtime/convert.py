"""A training step as a standard ONNX model (``onnxgrad convert``).

The step model computes one training step of a model in standard ONNX ops:
forward pass, loss, gradients and the optimizer's update, from the same
training program that the :class:`~onnxgrad.trainer.Trainer` runs
(:func:`onnxgrad.program.build_program`).  Any ONNX runtime can then train the
model: run the step, copy each state output to the input it replaces (the
``onnxgrad.state`` metadata says which), repeat.

Inputs: the model's own, the loss's target, then the training state: each
trained parameter under its own name, the optimizer's state (``<param>.<name>``),
the BatchNormalization running statistics the step updates, the learning rate
``lr`` and, for optimizers that read it, the number of steps taken ``step``.
Every state input has an initializer of the same name holding its first
value, so a first step needs only data and target.  Outputs: ``loss``, then
one output per state input, ``<input>.next``.  Metadata: ``onnxgrad.state``
maps each state output to its input, ``onnxgrad.trained`` lists the trained
parameters.

onnxgrad's private gradient ops are written out in standard ops (their
``in_standard_ops`` forms, :mod:`onnxgrad.ops.standard`); training-mode
BatchNormalization is written out too, so that its batch statistics and
running-statistics update are PyTorch's (the ONNX op's training mode
updates the running variance with the biased batch variance).
"""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxgrad.autodiff import (PRIVATE_DOMAIN, GradBuilder, expand_in_standard_ops, prune,
                               replace_node)
from onnxgrad.errors import ModelError
from onnxgrad.ir import Graph, Node, ValueInfo
from onnxgrad.losses import Loss, resolve_loss
from onnxgrad.model import Model, load
from onnxgrad.ops import standard as std
from onnxgrad.optimizers import Optimizer
from onnxgrad.program import build_program

#: The default domain's opset of step models (at least): reductions take axes as inputs.
TARGET_OPSET = 18
#: The metadata key holding ``{state output: the input it replaces}``.
STATE_KEY = "onnxgrad.state"
#: The metadata key holding the list of trained parameters.
TRAINED_KEY = "onnxgrad.trained"


def step_model(model: Model, optimizer: Optimizer, loss: str | Loss | None = "cross_entropy",
               output: str | None = None, trainable: str | Iterable[str] | None = None,
               frozen_batchnorm: str = "train") -> onnx.ModelProto:
    """The training step of ``model`` as a standard ONNX model (see the module's doc)."""
    built = _StepGraph(model, optimizer, loss, output, trainable, frozen_batchnorm)
    graph, program = built.graph, built.program
    proto = _to_proto(graph, built.model._proto, f"{built.model._proto.graph.name or 'model'}_step")
    proto.metadata_props.add(key=STATE_KEY, value=json.dumps(built.mapping))
    proto.metadata_props.add(key=TRAINED_KEY, value=json.dumps(program.trainable))
    _check(proto, built.where, "the step model")
    return proto


def training_info_model(model: Model, optimizer: Optimizer,
                        loss: str | Loss | None = "cross_entropy", output: str | None = None,
                        trainable: str | Iterable[str] | None = None,
                        frozen_batchnorm: str = "train") -> onnx.ModelProto:
    """``model`` carrying its training step as an ONNX ``TrainingInfoProto``: the
    algorithm graph is the step, reading the model's own weights and keeping the
    optimizer's state and the learning rate as initializers of its own; its update
    bindings write each new value back (the model's inputs and ``target`` are the
    algorithm's inputs).  ``onnxgrad train --training-info`` runs it."""
    built = _StepGraph(model, optimizer, loss, output, trainable, frozen_batchnorm)
    graph, main = built.graph, built.model.to_proto()
    own = {name for name in graph.initializers if name not in built.model.graph.initializers}
    graph.inputs = [name for name in graph.inputs if name not in graph.initializers]
    algorithm = _to_proto(graph, main, "training_step", keep=own).graph
    proto = onnx.ModelProto()
    proto.CopyFrom(main)
    info = proto.training_info.add()
    info.algorithm.CopyFrom(algorithm)
    for out, name in built.mapping.items():
        if out != built.lr_output:
            info.update_binding.add(key=name, value=out)
    _check(proto, built.where, "the model with its training algorithm")
    return proto


class _StepGraph:
    """The step's graph: the training program, written out BatchNormalization and
    Dropout, the optimizer's nodes, standard forms of private ops, and state outputs."""

    def __init__(self, model: Model, optimizer: Optimizer, loss, output, trainable,
                 frozen_batchnorm):
        self.where = where = model.where
        self.model = model = load(_upgraded(model.to_proto(), where))
        self.program = program = build_program(model, resolve_loss(loss), output, trainable,
                                               frozen_batchnorm)
        self.graph = graph = program.graph
        g = GradBuilder(graph)
        g.training_run = True  # a step model's every run is a training step
        taken = g.taken
        states: dict[str, str] = {}  # state input -> its value after the step

        statistics = _write_batchnorms(g, program.inference_nodes)
        _train_dropouts(g)
        g.prefix = "optimizer"
        lr = _state_input(graph, taken, "lr", np.array(optimizer.lr, dtype=np.float32))
        step = None
        if optimizer.uses_step():
            step = _state_input(graph, taken, "step", np.array(0, dtype=np.int64))
        for param in program.trainable:
            value = graph.initializers[param]
            state = {key: _state_input(graph, taken, f"{param}.{key}", array)
                     for key, array in optimizer.state_arrays(value).items()}
            g.prefix = f"optimizer/{param}"
            new_param, new_state = optimizer.update_nodes(g, param, program.grads[param], state,
                                                          lr, step)
            states[param] = new_param
            for key, name in state.items():
                states[name] = new_state[key]
        states.update(statistics)
        if step is not None:
            g.prefix = "optimizer"
            states[step] = g.Add(step, g.const(1, dtype="int64"), dtype="int64")
        states[lr] = lr
        graph.inputs.extend(p for p in program.trainable if p not in graph.inputs)
        _expand_private_ops(g, where)

        outputs = [_named(graph, taken, program.loss_value, "loss", ())]
        self.mapping: dict[str, str] = {}  # state output -> its input
        for name, value in states.items():
            out = _named(graph, taken, value, f"{name}.next", graph.shape(name))
            outputs.append(out)
            self.mapping[out] = name
            if name == lr:
                self.lr_output = out
        if program.target_input:
            graph.info[program.target_input] = ValueInfo(
                graph.dtype(program.target_input), _target_shape(graph, program, loss))
        graph.outputs = outputs
        graph.inputs.extend(name for name in statistics if name not in graph.inputs)
        prune(graph, outputs)


def _check(proto: onnx.ModelProto, where: str, what: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001 - a model the checker refuses is a bug here
        raise ModelError(f"{where}: {what} fails onnx.checker: {exc}") from exc


def split_initial_state(step: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A step model whose state inputs are plain (required) inputs, and an *initial
    state model*: no inputs, one output per state input (same name) holding its first
    value.  For runtimes that cannot feed an input that has an initializer
    (onnxruntime-web, and onnxruntime-node, which ignores such feeds): run the initial
    state model once, then feed its outputs."""
    states = set(state_mapping(step).values())
    plain = onnx.ModelProto()
    plain.CopyFrom(step)
    kept = [t for t in plain.graph.initializer if t.name not in states]
    first = [t for t in step.graph.initializer if t.name in states]
    del plain.graph.initializer[:]
    plain.graph.initializer.extend(kept)
    nodes, outputs, initializers = [], [], []
    by_name = {i.name: i for i in step.graph.input}
    for tensor in first:
        initial = onnx.TensorProto()
        initial.CopyFrom(tensor)
        initial.name = f"{tensor.name}.initial"
        initializers.append(initial)
        nodes.append(helper.make_node("Identity", [initial.name], [tensor.name],
                                      name=f"{tensor.name}/Identity"))
        outputs.append(by_name[tensor.name])
    graph = helper.make_graph(nodes, f"{step.graph.name}_initial_state", [], outputs, initializers)
    initial_model = helper.make_model(graph, opset_imports=list(step.opset_import),
                                      producer_name="onnxgrad convert")
    initial_model.ir_version = step.ir_version
    _check(plain, step.graph.name, "the step model with plain state inputs")
    _check(initial_model, step.graph.name, "the initial state model")
    return plain, initial_model


def state_mapping(step: onnx.ModelProto) -> dict[str, str]:
    """``{state output: the input it replaces}`` of a step model."""
    return _metadata(step, STATE_KEY)


def trained_parameters(step: onnx.ModelProto) -> list[str]:
    """The parameters a step model trains."""
    return _metadata(step, TRAINED_KEY)


def _metadata(step: onnx.ModelProto, key: str):
    for prop in step.metadata_props:
        if prop.key == key:
            return json.loads(prop.value)
    raise ModelError(f"the model carries no {key!r} metadata: not an onnxgrad step model")


def eval_model(model: Model, trainable: Iterable[str], defaults: bool = True) -> onnx.ModelProto:
    """The model itself, with each of ``trainable`` also a graph input, so that a training
    loop can evaluate with its current weights.  With ``defaults`` the initializers stay
    as the inputs' defaults; without, the inputs are plain (required) ones, for runtimes
    that cannot feed an input that has an initializer (onnxruntime-web and -node)."""
    proto = model.to_proto()
    trainable = set(trainable)
    existing = {i.name for i in proto.graph.input}
    for tensor in proto.graph.initializer:
        if tensor.name in trainable and tensor.name not in existing:
            proto.graph.input.append(helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    if not defaults:
        kept = [t for t in proto.graph.initializer if t.name not in trainable]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    return proto


# -- building ---------------------------------------------------------------------------


def _upgraded(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None or version >= TARGET_OPSET:
        return proto
    legacy = _legacy_resizes(proto, version, where)
    try:
        upgraded = onnx.version_converter.convert_version(proto, TARGET_OPSET)
    except Exception as exc:  # noqa: BLE001 - the converter raises several kinds
        raise ModelError(f"{where}: cannot bring the model from opset {version} to "
                         f"{TARGET_OPSET}, which step models use: {exc}") from exc
    # Every Resize of the upgraded graph is one of the old nodes, in their order (the
    # converter may rename values and drop node names).
    resizes = [node for node in upgraded.graph.node if node.op_type == "Resize"] \
        if version <= 10 else []
    if len(resizes) != len(legacy):
        raise ModelError(f"{where}: converting to opset {TARGET_OPSET} made {len(resizes)} "
                         f"Resize nodes of {len(legacy)} Resize-10 and Upsample nodes")
    for node, fixed in zip(resizes, legacy):
        kept = [a for a in node.attribute
                if a.name not in ("coordinate_transformation_mode", "nearest_mode")]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in fixed.items()])
    return upgraded


def _legacy_resizes(proto: onnx.ModelProto, version: int, where: str) -> list[dict]:
    """The coordinate attributes that keep the graph's Resize-10 and Upsample nodes (in
    their order) computing the same function as Resize-11 and later: onnx's version converter
    leaves the new op's defaults (half-pixel coordinates, nearest rounding to the
    nearer pixel), where the old ops map ``x_out / scale`` (asymmetric) and take
    the pixel below when upsampling, above when downsampling."""
    if version > 10:
        return []
    values = {t.name: t for t in proto.graph.initializer}
    values.update({n.output[0]: a.t for n in proto.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    found = []
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Resize", "Upsample"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        fixed = {"coordinate_transformation_mode": "asymmetric"}
        if mode == "nearest":
            if "scales" in attrs:
                scales = np.asarray(attrs["scales"], dtype=np.float64)
            elif len(node.input) > 1 and node.input[1] in values:
                scales = numpy_helper.to_array(values[node.input[1]])
            else:
                raise ModelError(f"{where}: node {node.name or node.output[0]!r} ({node.op_type}, "
                                 f"opset {version}, nearest) takes its scales at run time; "
                                 f"opset {TARGET_OPSET}'s Resize can express its rounding only "
                                 "for scales known when converting")
            if np.all(scales >= 1):
                fixed["nearest_mode"] = "floor"
            elif np.all(scales <= 1):
                fixed["nearest_mode"] = "ceil"
            else:
                raise ModelError(f"{where}: node {node.name or node.output[0]!r} ({node.op_type}, "
                                 f"opset {version}, nearest) upsamples some axes and "
                                 f"downsamples others (scales {scales.tolist()}); opset "
                                 f"{TARGET_OPSET}'s Resize has one rounding for all axes")
        found.append(fixed)
    return found


def _state_input(graph: Graph, taken: set[str], name: str, value: np.ndarray) -> str:
    name = graph.unique_name(name, taken)
    graph.inputs.append(name)
    graph.initializers[name] = value
    graph.info[name] = ValueInfo(value.dtype, tuple(value.shape))
    return name


def _named(graph: Graph, taken: set[str], value: str, name: str, shape) -> str:
    """An output called ``name`` (made unique) holding ``value``, of ``shape``."""
    name = graph.unique_name(name, taken)
    graph.nodes.append(Node("Identity", [value], [name], {}, f"{name}/Identity", "",
                            TARGET_OPSET))
    graph.info[name] = ValueInfo(graph.dtype(value), shape)
    return name


def _target_shape(graph: Graph, program, loss) -> tuple:
    """The target's shape: the output's, without the class axis for class targets."""
    shape = graph.shape(program.output)
    loss = resolve_loss(loss)
    if shape is None:
        return ()
    if loss.target == "class":
        axis = loss.class_axis_of(len(shape))
        shape = tuple(d for i, d in enumerate(shape) if i != axis)
    return tuple(d if isinstance(d, (int, str)) else f"target_{i}" for i, d in enumerate(shape))


def _write_batchnorms(g: GradBuilder, inference_nodes: frozenset[str]) -> dict[str, str]:
    """Training-mode BatchNormalization nodes written out: batch statistics, the
    normalisation, PyTorch's running-statistics update.  Returns {running statistic:
    its value after the step}."""
    graph = g.graph
    updates: dict[str, str] = {}
    for node in [n for n in graph.nodes if n.op_type == "BatchNormalization" and n.domain == ""]:
        X, scale, B, mean, var = node.inputs[:5]
        epsilon = node.attrs.get("epsilon", 1e-5)
        momentum = node.attrs.get("momentum", 0.9)
        g.prefix = node.name
        if node.name in inference_nodes:
            Y = g.BatchNormalization(X, scale, B, mean, var, epsilon=epsilon, momentum=momentum)
            replace_node(g, node, [Y, mean, var, mean, var])
            continue
        axes = std.axes_from(g, X, 2, skip_channel=True)
        batch_mean = g.ReduceMean(X, axes, keepdims=1)
        centred = g.Sub(X, batch_mean)
        batch_var = g.ReduceMean(g.Mul(centred, centred), axes, keepdims=1)
        stat_shape = g.Shape(batch_mean, dtype="int64")
        a = g.Div(g.Reshape(scale, stat_shape),
                  g.Sqrt(g.Add(batch_var, std.like(g, epsilon, X))))
        Y = g.Add(g.Mul(centred, a), g.Reshape(B, stat_shape))
        flat = g.Shape(mean, dtype="int64")
        bmean, bvar = g.Reshape(batch_mean, flat), g.Reshape(batch_var, flat)
        keep, take = std.like(g, momentum, mean), std.like(g, 1 - momentum, mean)
        new_mean = g.Add(g.Mul(mean, keep), g.Mul(bmean, take))
        count = std.cast_like(g, g.Div(g.Size(X, dtype="int64"), g.Size(mean, dtype="int64"),
                                       dtype="int64"), mean)
        unbiased = g.Mul(bvar, g.Div(count, g.Sub(count, std.like(g, 1, mean))))
        biased_new = g.Add(g.Mul(var, keep), g.Mul(bvar, take))
        replace_node(g, node, [Y, new_mean, biased_new, bmean, bvar])
        if mean in graph.initializers and var in graph.initializers:
            updates[mean] = new_mean
            updates[var] = g.Add(g.Mul(var, keep), g.Mul(unbiased, take))
    return updates


def _train_dropouts(g: GradBuilder) -> None:
    """Dropout nodes get ``training_mode`` true: they drop in a training step, as in the
    Trainer (onnxruntime draws its own masks)."""
    for node in g.graph.nodes:
        if node.op_type == "Dropout" and node.domain == "":
            inputs = list(node.inputs) + [""] * (3 - len(node.inputs))
            g.prefix = node.name
            inputs[2] = g.const(True, dtype=bool, name="training_mode")
            node.inputs = inputs


def _expand_private_ops(g: GradBuilder, where: str) -> None:
    """Replace every node of onnxgrad's private domain by its standard form (which may
    hold private nodes of its own, expanded in turn)."""
    graph = g.graph
    for _ in range(100):
        private = [n for n in graph.nodes if n.domain == PRIVATE_DOMAIN]
        if not private:
            return
        for node in private:
            if not expand_in_standard_ops(g, node):
                raise ModelError(
                    f"{where}: node {node.name!r} ({PRIVATE_DOMAIN}::{node.op_type}, with "
                    f"attributes {node.attrs}) cannot be written in standard ONNX ops yet, so "
                    "this model cannot be converted into a step model")
    raise ModelError(f"{where}: private ops keep expanding into private ops")  # pragma: no cover


# -- writing ----------------------------------------------------------------------------


def _to_proto(graph: Graph, original: onnx.ModelProto, name: str,
              keep: set[str] | None = None) -> onnx.ModelProto:
    """``graph`` as a model with ``original``'s opset imports; ``keep`` limits the
    initializers written (default: every one used)."""
    opset = max(TARGET_OPSET, graph.opsets.get("", TARGET_OPSET))
    nodes = [_node_proto(n, opset) for n in graph.toposort()]
    used = {x for n in graph.nodes for x in n.inputs if x} | set(graph.inputs)
    initializers = [numpy_helper.from_array(np.asarray(v), k)
                    for k, v in graph.initializers.items()
                    if k in used and (keep is None or k in keep)]
    inputs = [_value_info(graph, name) for name in graph.inputs]
    outputs = [_value_info(graph, name) for name in graph.outputs]
    gp = helper.make_graph(nodes, name, inputs, outputs, initializers)
    imports = [helper.make_opsetid("", opset)] + [
        helper.make_opsetid(o.domain, o.version) for o in original.opset_import
        if o.domain not in ("", "ai.onnx")]
    proto = helper.make_model(gp, opset_imports=imports, producer_name="onnxgrad convert")
    proto.ir_version = max(original.ir_version, 8)
    return proto


def _node_proto(node: Node, opset: int) -> onnx.NodeProto:
    attrs = {}
    schema = None
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except Exception:  # noqa: BLE001 - an op outside onnx's schemas keeps plain attributes
        pass
    for key, value in node.attrs.items():
        if value is None:
            continue
        if isinstance(value, np.ndarray):
            value = numpy_helper.from_array(value)
        if isinstance(value, np.generic):
            value = value.item()
        kind = schema.attributes[key].type if schema is not None and key in schema.attributes \
            else None
        attrs[key] = helper.make_attribute(key, value, attr_type=kind) if kind else \
            helper.make_attribute(key, value)
    proto = helper.make_node(node.op_type, node.inputs, node.outputs, name=node.name,
                             domain=node.domain)
    proto.attribute.extend(attrs.values())
    return proto


def _value_info(graph: Graph, name: str) -> onnx.ValueInfoProto:
    dtype = graph.dtype(name)
    if dtype is None:
        raise ModelError(f"the element type of {name!r} is unknown; cannot declare it")
    shape = graph.shape(name)
    dims = None if shape is None else [d if isinstance(d, (int, str)) else None for d in shape]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), dims)

