"""Loading ONNX models into onnxgrad's IR.

:func:`load_model` accepts a path or an ``onnx.ModelProto``, validates it with
onnx's checker, runs shape inference, resolves external data (only inside the
model's folder), inlines model-local functions, and returns the original proto
(weights stripped: they live in the graph) beside the :class:`~onnxgrad.ir.Graph`.

A node with a body (If, Loop, Scan, SequenceMap) receives the outer-scope values
its body reads as extra inputs after its own
(:func:`onnxgrad.ops.control.add_captured_inputs`), so the planner schedules it
after their producers and keeps them alive until it ran.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxgrad.errors import ModelError
from onnxgrad.autodiff import expand_gradient_ops
from onnxgrad.ir import Graph, Node, ValueInfo
from onnxgrad.ops import canonical_domain
from onnxgrad.ops.control import add_captured_inputs


def read_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """The ModelProto of ``source`` with external data loaded, and its path (or None)."""
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        path = None
        base_dir = None
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ModelError(f"{path}: no such file")
        if os.path.isdir(path):
            raise ModelError(f"{path}: is a folder, expected an .onnx file")
        try:
            proto = onnx.load(path, load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
        base_dir = os.path.dirname(os.path.abspath(path))
    _load_external_data(proto, base_dir, path or "<ModelProto>")
    return proto, path


def _external_tensors(proto: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data  # noqa: PLC0415

    return [t for t in _get_all_tensors(proto) if uses_external_data(t)]


def _load_external_data(proto: onnx.ModelProto, base_dir: str | None, where: str) -> None:
    tensors = _external_tensors(proto)
    if not tensors:
        return
    if base_dir is None:
        raise ModelError(f"{where}: tensor {tensors[0].name!r} keeps its data in an external file; "
                         "load the model from its path so the file can be found")
    root = os.path.realpath(base_dir)
    for tensor in tensors:
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if "\0" in location:
            raise ModelError(f"{where}: tensor {tensor.name!r} names external data with a NUL "
                             f"byte in it ({location!r})")
        resolved = os.path.realpath(os.path.join(root, location))
        if not location or os.path.isabs(location) or os.path.commonpath([root, resolved]) != root:
            raise ModelError(
                f"{where}: tensor {tensor.name!r} points to external data {location!r} outside the "
                f"model's folder {root}; refusing to read it")
        if os.path.exists(resolved) and not os.path.isfile(resolved):
            raise ModelError(f"{where}: external data {location!r} of tensor {tensor.name!r} is "
                             "not a regular file (a folder, a FIFO or a device); refusing to "
                             "read it")
        if not os.path.isfile(resolved):
            raise ModelError(f"{where}: external data file {location!r} of tensor {tensor.name!r} "
                             "is missing")
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, root)
    except Exception as exc:
        raise ModelError(f"{where}: cannot read external data ({exc})") from exc


def attribute_value(attr: onnx.AttributeProto) -> Any:
    """An attribute as a Python value: tensors become NumPy arrays, strings str."""
    A = onnx.AttributeProto
    if attr.type == A.TENSOR:
        return numpy_helper.to_array(attr.t).copy()
    if attr.type == A.TENSORS:
        return [numpy_helper.to_array(t).copy() for t in attr.tensors]
    if attr.type == A.STRING:
        return attr.s.decode("utf-8", errors="replace")
    if attr.type == A.STRINGS:
        return [s.decode("utf-8", errors="replace") for s in attr.strings]
    if attr.type == A.FLOATS:
        return [float(x) for x in attr.floats]
    if attr.type == A.INTS:
        return [int(x) for x in attr.ints]
    return onnx.helper.get_attribute_value(attr)


def _np_dtype(elem_type: int) -> np.dtype | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return None


def _value_info(vi: onnx.ValueInfoProto) -> ValueInfo | None:
    return _type_info(vi.type)


def _type_info(t: onnx.TypeProto) -> ValueInfo | None:
    """A tensor's type and shape; a sequence's, an optional's or a map's kind and element
    (and a map's key type); else None."""
    which = t.WhichOneof("value")
    if which == "sequence_type":
        return ValueInfo(kind="sequence", element=_type_info(t.sequence_type.elem_type))
    if which == "optional_type":
        return ValueInfo(kind="optional", element=_type_info(t.optional_type.elem_type))
    if which == "map_type":
        return ValueInfo(kind="map", key=_np_dtype(t.map_type.key_type),
                         element=_type_info(t.map_type.value_type))
    if which != "tensor_type":
        return None  # sparse tensors
    tt = t.tensor_type
    dtype = _np_dtype(tt.elem_type) if tt.elem_type else None
    shape = None
    if tt.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return ValueInfo(dtype, shape)


def build_graph(proto: onnx.ModelProto, where: str) -> Graph:
    """The IR of a checked, shape-inferred ModelProto.

    Nodes with bodies get the outer-scope values those bodies read as extra
    inputs (see the module docstring).
    """
    gp = proto.graph
    opsets = {}
    for imp in proto.opset_import:
        opsets[canonical_domain(imp.domain)] = imp.version

    initializers: dict[str, np.ndarray] = {}
    for t in gp.initializer:
        try:
            # A writable, contiguous copy: optimizers update weights in place.
            initializers[t.name] = np.array(numpy_helper.to_array(t), copy=True, order="C")
        except Exception as exc:
            raise ModelError(f"{where}: cannot read initializer {t.name!r} ({exc})") from exc

    info: dict[str, ValueInfo] = {}
    for vi in list(gp.input) + list(gp.value_info) + list(gp.output):
        parsed = _value_info(vi)
        if parsed is not None:
            info[vi.name] = parsed

    nodes = []
    original_names = {n.name for n in gp.node if n.name}
    used: set[str] = set()
    for index, n in enumerate(gp.node):
        domain = canonical_domain(n.domain)
        if domain not in opsets:
            raise ModelError(f"{where}: node {n.name or index!r} ({n.op_type}) uses domain "
                             f"{n.domain!r}, which the model does not import")
        name = n.name
        if not name or name in used:  # give nameless and repeated nodes a unique name
            name = f"{n.name or n.op_type}_{index}"
            while name in original_names or name in used:
                name += "_"
        used.add(name)
        attrs = {a.name: attribute_value(a) for a in n.attribute}
        nodes.append(Node(n.op_type, list(n.input), list(n.output), attrs, name, domain,
                          opsets[domain]))

    # Old models list their initializers among the graph inputs too.
    inputs = [vi.name for vi in gp.input if vi.name not in initializers]
    outputs = [vi.name for vi in gp.output]
    graph = Graph(nodes=nodes, inputs=inputs, outputs=outputs, initializers=initializers,
                  info=info, opsets=opsets, name=gp.name or "graph")
    add_captured_inputs(graph)
    return graph


def load_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, Graph, str | None]:
    """Read, check and convert a model; returns (weightless proto, graph, path)."""
    proto, path = read_model(source)
    where = path or "<ModelProto>"
    if proto.functions:
        try:
            proto = onnx.inliner.inline_local_functions(proto)
        except Exception as exc:
            raise ModelError(f"{where}: cannot inline the model's local functions ({exc})") from exc
    proto = own_running_statistics(proto)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{where}: not a valid ONNX model: {first}") from exc
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        inferred = proto  # shape inference is a help, not a requirement
    graph = build_graph(inferred, where)
    expand_gradient_ops(graph)
    skeleton = _strip_weights(proto)
    return skeleton, graph, path


def own_running_statistics(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto``, or a copy in which each BatchNormalization of the main graph reads its
    running mean and variance from initializers of its own.

    Exporters store equal initializers once (torch.onnx does: in a freshly initialised
    network every BatchNormalization's scale and running variance are ones, its bias
    and running mean zeros), so that one tensor, directly or through Identity nodes,
    is several nodes' statistics and parameters at once.  A training step overwrites a
    node's running statistics; shared, they would overwrite a parameter or another
    node's statistics, and one read through an Identity could not be written at all.
    A statistic read through an Identity, or an initializer read by any other input,
    gets a copy of its value under a new name (``<node>.running_mean`` or
    ``<node>.running_var``); the model computes the same function, and saved models
    keep the copies."""
    graph = proto.graph
    tensors = {t.name: t for t in graph.initializer}
    identity_of = {n.output[0]: n.input[0] for n in graph.node
                   if n.op_type == "Identity" and canonical_domain(n.domain) == "" and n.input
                   and n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    for name in graph.output:
        readers[name.name] = readers.get(name.name, 0) + 1
    plan = []  # (node index, input index, source initializer)
    for index, n in enumerate(graph.node):
        if n.op_type != "BatchNormalization" or canonical_domain(n.domain) != "":
            continue
        for slot in (3, 4):
            if slot >= len(n.input) or not n.input[slot]:
                continue
            name = source = n.input[slot]
            while source in identity_of and source not in tensors:
                source = identity_of[source]
            if source not in tensors:
                continue  # a graph input or a computed value: not the model's to copy
            if source == name and readers.get(name, 0) == 1:
                continue  # its own already
            plan.append((index, slot, source))
    if not plan:
        return proto
    proto = copy.deepcopy(proto)
    graph = proto.graph
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {
        o for n in graph.node for o in n.output}
    for index, slot, source in plan:
        node = graph.node[index]
        base = f"{node.name or f'BatchNormalization_{index}'}.running_{'mean' if slot == 3 else 'var'}"
        name = base
        while name in taken:
            name += "_"
        taken.add(name)
        tensor = copy.deepcopy(tensors[source])
        tensor.name = name
        graph.initializer.append(tensor)
        node.input[slot] = name
    return proto


def _strip_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose initializers keep name, type and dims only.

    The weights live in the graph; the exporter fills them back in, so the
    model is not held twice in memory.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                      "uint64_data", "string_data", "external_data"):
            t.ClearField(field)
        t.data_location = onnx.TensorProto.DEFAULT
    return out
