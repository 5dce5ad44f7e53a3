"""Sequences and optionals, and their gradients.

A sequence value is a Python list of arrays; an optional value is its content,
or ``None`` when empty.  The ops copy lists rather than change them, since a
value may feed several nodes.  Kernels that make a sequence or an optional
take ``ctx`` (unused) so that the planner never folds such a value into a
constant: constants are bound into plans as arrays.

Gradients.  The gradient of a sequence is a list as long as the sequence whose
entry ``i`` is the gradient of element ``i`` (same shape and type), or ``None``
where no gradient reached that element: zero, not yet written out.  Reading one
element of a long sequence (SequenceAt) thus costs one entry, not a copy of the
whole sequence in zeros.  Every kernel that turns a sequence gradient back into
tensors (the gradients of SequenceConstruct, SequenceInsert's tensor,
SplitToSequence, SequenceMap's seeds) writes each ``None`` as zeros of the
element's shape and type, which it knows from the forward value (a shape, or
the element shapes :func:`SequenceShapes` records right after the sequence is
made, so that the sequence itself need not stay alive), so no ``None`` reaches a
tensor.  Two gradients of one sequence add element by element
(:func:`add_gradients`, the ``SequenceGradSum`` node the gradient builder emits).
The gradient of an optional is that of its content.
"""

from __future__ import annotations

import numpy as np  # host-side shape values only
from onnx import TensorProto, helper, numpy_helper

from onnxgrad.errors import ModelError
from onnxgrad.ir import ValueInfo
from onnxgrad.ops.registry import op
from onnxgrad.ops.shape import element_dtype, onnx_type

_PRIVATE = "onnxgrad"


def _position(position, length: int, op_name: str, insert: bool = False) -> int:
    p = int(position.reshape(-1)[0]) if hasattr(position, "reshape") else int(position)
    high = length if insert else length - 1
    if not -length <= p <= high:
        raise ModelError(f"{op_name}: position {p} is outside [{-length}, {high}] for a "
                         f"sequence of {length} tensors")
    return p + length if p < 0 else p


def _sequence(value, op_name: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ModelError(f"{op_name}: expected a sequence, got {type(value).__name__}")
    return list(value)


@op("SequenceEmpty", since=11)
def SequenceEmpty(xp, *, dtype=None, ctx):
    return ([],)


@op("SequenceConstruct", since=11, differentiable=("inputs",))
def SequenceConstruct(xp, *inputs, ctx):
    return (list(inputs),)


@op("SequenceLength", since=11)
def SequenceLength(xp, input_sequence):
    return (xp.asarray(len(_sequence(input_sequence, "SequenceLength")), dtype=xp.int64),)


@op("SequenceAt", since=11, differentiable=("input_sequence",), host_inputs=("position",))
def SequenceAt(xp, input_sequence, position):
    seq = _sequence(input_sequence, "SequenceAt")
    return (seq[_position(position, len(seq), "SequenceAt")],)


@op("SequenceInsert", since=11, differentiable=("input_sequence", "tensor"),
    host_inputs=("position",))
def SequenceInsert(xp, input_sequence, tensor, position=None, *, ctx):
    seq = _sequence(input_sequence, "SequenceInsert")
    if position is None:
        seq.append(tensor)
    else:
        seq.insert(_position(position, len(seq), "SequenceInsert", insert=True), tensor)
    return (seq,)


@op("SequenceErase", since=11, differentiable=("input_sequence",), host_inputs=("position",))
def SequenceErase(xp, input_sequence, position=None, *, ctx):
    seq = _sequence(input_sequence, "SequenceErase")
    if not seq:
        raise ModelError("SequenceErase: the sequence is empty")
    del seq[-1 if position is None else _position(position, len(seq), "SequenceErase")]
    return (seq,)


@op("ConcatFromSequence", since=11, differentiable=("input_sequence",))
def ConcatFromSequence(xp, input_sequence, *, axis, new_axis=0):
    seq = _sequence(input_sequence, "ConcatFromSequence")
    if not seq:
        raise ModelError("ConcatFromSequence: the sequence is empty")
    if new_axis:
        return (xp.stack(seq, axis=axis),)
    return (xp.concatenate(seq, axis=axis),)


def _split_lengths(n: int, split, op_name: str) -> list[int] | None:
    """The lengths of SplitToSequence's parts along an axis of length ``n``; None when
    ``split`` is absent (one part per index)."""
    if split is None:
        return None
    split = np.asarray(split)
    if split.ndim == 0:  # equal chunks of this length, the last one shorter
        size = int(split)
        if size <= 0:
            raise ModelError(f"{op_name}: split must be positive, got {size}")
        return [size] * (n // size) + ([n % size] if n % size else [])
    lengths = [int(s) for s in split]
    if sum(lengths) != n:
        raise ModelError(f"{op_name}: split {lengths} does not add up to the axis length {n}")
    return lengths


def _split_index(ndim: int, axis: int, lengths: list[int] | None, count: int, keepdims: int):
    """The index into the split tensor of each of its ``count`` parts."""
    index = [slice(None)] * ndim
    if lengths is None:
        for i in range(count):
            index[axis] = slice(i, i + 1) if keepdims else i
            yield tuple(index)
        return
    start = 0
    for length in lengths:
        index[axis] = slice(start, start + length)
        yield tuple(index)
        start += length


@op("SplitToSequence", since=11, differentiable=("input",), host_inputs=("split",))
def SplitToSequence(xp, input, split=None, *, axis=0, keepdims=1, ctx):
    axis = axis % input.ndim
    n = input.shape[axis]
    lengths = _split_lengths(n, split, "SplitToSequence")
    if lengths is None:
        parts = [xp.take(input, [i] if keepdims else i, axis=axis) for i in range(n)]
        return (parts,)
    return ([input[index] for index in _split_index(input.ndim, axis, lengths, 0, 1)],)


# -- optionals ------------------------------------------------------------------------------
@op("Optional", since=15, differentiable=("input",))
def Optional(xp, input=None, *, type=None, ctx):
    return (input,)


@op("OptionalHasElement", since=15)
def OptionalHasElement(xp, input=None):
    return (xp.asarray(input is not None),)


@op("OptionalGetElement", since=15, differentiable=("input",))
def OptionalGetElement(xp, input, *, ctx):
    if input is None:
        raise ModelError("OptionalGetElement: the optional is empty")
    return (input,)


# -- gradients: helpers ---------------------------------------------------------------------
def add_gradients(a, b):
    """The sum of two gradients of one value: arrays add; sequence gradients add element
    by element, ``None`` (zero) being the identity."""
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
            raise ModelError(f"gradients of one sequence differ in kind or length "
                             f"({_kind(a)} and {_kind(b)})")
        return [y if x is None else x if y is None else x + y for x, y in zip(a, b)]
    return a + b


def _kind(value) -> str:
    return f"a sequence of {len(value)}" if isinstance(value, list) else "a tensor"


def zero_gradient(xp, value):
    """The zero gradient of ``value``: zeros like an array; for a sequence, ``None`` for
    every element."""
    if isinstance(value, list):
        return [None] * len(value)
    return xp.zeros_like(value)


def _gradient_sequence(value, length: int, op_name: str) -> list:
    if not isinstance(value, list) or len(value) != length:
        raise ModelError(f"{op_name}: the gradient of a sequence of {length} tensors is "
                         f"{_kind(value) if isinstance(value, list) else type(value).__name__}")
    return value


def element_shapes(encoded) -> list[tuple[int, ...]]:
    """The element shapes that :func:`SequenceShapes` encodes."""
    flat = [int(v) for v in encoded.tolist()]
    shapes, i = [], 0
    while i < len(flat):
        rank = flat[i]
        shapes.append(tuple(flat[i + 1:i + 1 + rank]))
        i += 1 + rank
    return shapes


def _filled(xp, grad, i: int, shapes, dtype):
    """Entry ``i`` of a sequence gradient, zeros of element ``i``'s shape where ``None``."""
    return xp.zeros(shapes[i], dtype=dtype) if grad[i] is None else grad[i]


# -- gradients: graph-building helpers ------------------------------------------------------
def sequence_info(graph, like: str) -> ValueInfo:
    """The type of a gradient of sequence ``like``."""
    info = graph.info.get(like)
    if info is not None and info.kind == "optional":
        info = info.element
    return ValueInfo(kind="sequence", element=None if info is None else info.element)


def element_code(g, value: str) -> int:
    """The ONNX element type of tensor ``value``, or of the elements of sequence ``value``."""
    info = g.graph.info.get(value)
    if info is not None and info.kind == "sequence":
        if info.element is None or info.element.dtype is None:
            raise ModelError(f"element type of sequence {value!r} is unknown; run shape "
                             "inference or give the model value_info")
        return onnx_type(info.element.dtype)
    return onnx_type(g.dtype(value))


def _as_sequence(g, value: str, like: str) -> str:
    g.graph.info[value] = sequence_info(g.graph, like)
    return value


def shapes_of(g, sequence: str) -> str:
    """The element shapes of ``sequence`` (:func:`SequenceShapes`), recorded right after it
    is made."""
    return g.early("SequenceShapes", sequence, ValueInfo(np.dtype(np.int64), (None,)),
                   suffix="shapes", domain=_PRIVATE)


@op("SequenceShapes", domain=_PRIVATE, differentiable=())  # constant in the values
def SequenceShapes(xp, input_sequence):
    """The shapes of a sequence's elements as one int64 vector: for each element its rank,
    then its dimensions."""
    flat: list[int] = []
    for x in _sequence(input_sequence, "SequenceShapes"):
        flat += [x.ndim, *x.shape]
    return (xp.asarray(flat, dtype=xp.int64),)


# -- gradients: accumulation ----------------------------------------------------------------
@op("SequenceGradSum", domain=_PRIVATE)
def SequenceGradSum(xp, *parts, ctx):
    """The sum of gradients of one sequence, element by element."""
    total = parts[0]
    for part in parts[1:]:
        total = add_gradients(total, part)
    return (total,)


@SequenceGradSum.gradient
def _(g, node, dS):
    return tuple(dS for _ in node.inputs)


@op("SequenceGradScale", domain=_PRIVATE)
def SequenceGradScale(xp, input_sequence, scale, *, ctx):
    """Each element of a sequence (or sequence gradient) times ``scale``."""
    return ([None if x is None else x * scale for x in input_sequence],)


@op("SequenceZerosLike", domain=_PRIVATE, differentiable=())  # constant in the values
def SequenceZerosLike(xp, input_sequence, *, ctx):
    """The zero gradient of a sequence: ``None`` for each element."""
    return ([None] * len(_sequence(input_sequence, "SequenceZerosLike")),)


# -- gradients: rules -----------------------------------------------------------------------
@SequenceConstruct.gradient
def _(g, node, dS):
    outs = g.private("SequenceConstructGrad", dS, shapes_of(g, node.outputs[0]),
                     num_outputs=len(node.inputs), to=element_code(g, node.inputs[0]))
    outs = [outs] if isinstance(outs, str) else outs
    for out, x in zip(outs, node.inputs):
        g.graph.info[out] = ValueInfo(g.graph.dtype(x), g.graph.shape(x))
    return tuple(outs)


@op("SequenceConstructGrad", domain=_PRIVATE, host_inputs=("shapes",))
def SequenceConstructGrad(xp, dS, shapes, *, to, ctx):
    """The gradients of SequenceConstruct's inputs: the elements of ``dS``."""
    shapes = element_shapes(shapes)
    grad = _gradient_sequence(dS, len(shapes), "SequenceConstructGrad")
    dtype = element_dtype(to)
    return tuple(_filled(xp, grad, i, shapes, dtype) for i in range(len(shapes)))


@SequenceAt.gradient
def _(g, node, dY):
    seq, position = node.inputs
    length = g.early("SequenceLength", seq, ValueInfo(np.dtype(np.int64), ()), suffix="length")
    return (_as_sequence(g, g.private("SequenceAtGrad", length, position, dY), seq), None)


@op("SequenceAtGrad", domain=_PRIVATE, host_inputs=("length", "position"))
def SequenceAtGrad(xp, length, position, dY, *, ctx):
    """The gradient of SequenceAt's sequence (of ``length`` elements): ``dY`` at
    ``position``, zero (``None``) elsewhere."""
    n = int(length)
    grad = [None] * n
    grad[_position(position, n, "SequenceAtGrad")] = dY
    return (grad,)


@SequenceInsert.gradient
def _(g, node, dS):
    seq, tensor, *rest = node.inputs
    position = rest[0] if rest and rest[0] else None
    dseq, dtensor = g.private("SequenceInsertGrad", dS, g.shape_of(tensor), position,
                              num_outputs=2, to=element_code(g, tensor))
    _as_sequence(g, dseq, seq)
    g.graph.info[dtensor] = ValueInfo(g.graph.dtype(tensor), g.graph.shape(tensor))
    return (dseq, dtensor) + (None,) * len(rest)


@op("SequenceInsertGrad", domain=_PRIVATE, host_inputs=("shape", "position"))
def SequenceInsertGrad(xp, dS, shape, position=None, *, to, ctx):
    """The gradients of SequenceInsert's sequence (``dS`` without the inserted element)
    and tensor (the inserted element's gradient; zeros of ``shape`` where there is none)."""
    if not isinstance(dS, list) or not dS:
        raise ModelError("SequenceInsertGrad: the gradient of the longer sequence is "
                         f"{_kind(dS) if isinstance(dS, list) else type(dS).__name__}")
    n = len(dS) - 1  # the length before the insertion
    p = n if position is None else _position(position, n, "SequenceInsertGrad", insert=True)
    dtensor = dS[p]
    if dtensor is None:
        dtensor = xp.zeros(tuple(int(d) for d in shape), dtype=element_dtype(to))
    return dS[:p] + dS[p + 1:], dtensor


@SequenceErase.gradient
def _(g, node, dS):
    seq, *rest = node.inputs
    position = rest[0] if rest and rest[0] else None
    return (_as_sequence(g, g.private("SequenceEraseGrad", dS, position, sequence=seq), seq),) \
        + (None,) * len(rest)


@op("SequenceEraseGrad", domain=_PRIVATE, host_inputs=("position",))
def SequenceEraseGrad(xp, dS, position=None, *, sequence="", ctx):
    """The gradient of SequenceErase's sequence: ``dS`` with a zero (``None``) where the
    erased element was.  ``sequence`` names the forward input sequence, which only the
    standard form reads (for the erased element's shape)."""
    if not isinstance(dS, list):
        raise ModelError(f"SequenceEraseGrad: expected a sequence gradient, got "
                         f"{type(dS).__name__}")
    n = len(dS) + 1  # the length before the erasure
    p = n - 1 if position is None else _position(position, n, "SequenceEraseGrad")
    return (dS[:p] + [None] + dS[p:],)


@SplitToSequence.gradient
def _(g, node, dS):
    X, *rest = node.inputs
    split = rest[0] if rest and rest[0] else None
    a = g.node.attrs
    dX = g.private("SplitToSequenceGrad", dS, g.shape_of(X), split, axis=a["axis"],
                   keepdims=a["keepdims"], to=element_code(g, X))
    g.graph.info[dX] = ValueInfo(g.graph.dtype(X), g.graph.shape(X))
    return (dX,) + (None,) * len(rest)


@op("SplitToSequenceGrad", domain=_PRIVATE, host_inputs=("shape", "split"))
def SplitToSequenceGrad(xp, dS, shape, split=None, *, axis=0, keepdims=1, to):
    """The gradient of SplitToSequence's input (of ``shape``): the parts' gradients written
    back where the parts came from, zeros where a part has none."""
    shape = tuple(int(d) for d in shape)
    axis = axis % len(shape)
    lengths = _split_lengths(shape[axis], split, "SplitToSequenceGrad")
    count = shape[axis] if lengths is None else len(lengths)
    grad = _gradient_sequence(dS, count, "SplitToSequenceGrad")
    dX = xp.zeros(shape, dtype=element_dtype(to))
    for index, part in zip(_split_index(len(shape), axis, lengths, count, keepdims), grad):
        if part is not None:
            dX[index] = part
    return (dX,)


@ConcatFromSequence.gradient
def _(g, node, dY):
    (seq,) = node.inputs
    a = g.node.attrs
    shapes = None if a["new_axis"] else shapes_of(g, seq)
    return (_as_sequence(g, g.private("ConcatFromSequenceGrad", dY, shapes, axis=a["axis"],
                                      new_axis=a["new_axis"]), seq),)


@op("ConcatFromSequenceGrad", domain=_PRIVATE, host_inputs=("shapes",))
def ConcatFromSequenceGrad(xp, dY, shapes=None, *, axis, new_axis=0, ctx):
    """The gradient of ConcatFromSequence's sequence: ``dY`` cut back into the elements
    (views of it), of the element ``shapes`` when they were concatenated."""
    axis = axis % dY.ndim
    index = [slice(None)] * dY.ndim
    parts = []
    if new_axis:
        for i in range(dY.shape[axis]):
            index[axis] = i
            parts.append(dY[tuple(index)])
        return (parts,)
    start = 0
    for shape in element_shapes(shapes):
        index[axis] = slice(start, start + shape[axis])
        parts.append(dY[tuple(index)])
        start += shape[axis]
    if start != dY.shape[axis]:
        raise ModelError(f"ConcatFromSequenceGrad: the elements span {start} along axis "
                         f"{axis}, the gradient {dY.shape[axis]}")
    return (parts,)


@Optional.gradient
def _(g, node, dY):
    return (dY,)


@OptionalGetElement.gradient
def _(g, node, dY):
    return (dY,)


# -- gradients in standard ops --------------------------------------------------------------
# A standard graph has no ``None``: each sequence gradient the forms below read or write
# holds every element, zeros where the kernels above write ``None`` (more memory, the same
# values).  An element-wise pass is a Loop over the sequence's length that carries the
# sequences it reads (so that its body reads no outer value) and builds its result with
# SequenceInsert.
def _producer(g, value: str, op_type: str, domain: str = ""):
    """The node of ``op_type`` that makes ``value``, or None."""
    for node in g.graph.nodes:
        if value in node.outputs and node.op_type == op_type and node.domain == domain:
            return node
    return None


def _seq_type(code: int):
    return helper.make_sequence_type_proto(helper.make_tensor_type_proto(code, None))


def _loop(g, length: str, carried: list[tuple[str, object]], body_nodes, outputs,
          infos: list[ValueInfo]) -> list[str]:
    """A Loop of ``length`` iterations (body iteration ``i``) over the loop-carried values
    ``carried`` (outer name, TypeProto), whose body inputs are ``in<k>`` and outputs (the
    next values) the body names ``outputs``; returns the final values, typed ``infos``."""
    b_inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    b_inputs += [helper.make_value_info(f"in{k}", t) for k, (_, t) in enumerate(carried)]
    b_outputs = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])]
    b_outputs += [helper.make_value_info(o, t) for o, (_, t) in zip(outputs, carried)]
    nodes = [helper.make_node("Identity", ["cond"], ["cond_out"])] + list(body_nodes)
    # A body's names must differ from every name outside it (and in other bodies).
    tag = g.graph.unique_name(f"{g.prefix}/loop", g.taken)

    def scoped(name: str) -> str:
        return f"{tag}/{name}" if name else name

    for n in nodes:
        n.input[:] = [scoped(x) for x in n.input]
        n.output[:] = [scoped(x) for x in n.output]
    for v in b_inputs + b_outputs:
        v.name = scoped(v.name)
    body = helper.make_graph(nodes, tag, b_inputs, b_outputs)
    outs = g.op("Loop", length, "", *[name for name, _ in carried], body=body,
                num_outputs=len(carried))
    outs = [outs] if isinstance(outs, str) else outs
    for out, info in zip(outs, infos):
        g.graph.info[out] = info
    return outs


def _code_of(g, *values: str) -> int | None:
    """The element type of the first of ``values`` (sequences or tensors) whose type is
    known, or None."""
    for value in values:
        try:
            return element_code(g, value)
        except ModelError:
            continue
    return None


def _length(g, sequence: str) -> str:
    return g.SequenceLength(sequence, dtype=np.int64)


def _elementwise(g, sequences: list[str], code: int, element_nodes, like: str,
                 extra: list[tuple[str, object]] = ()) -> str:
    """A sequence whose element ``i`` is made from element ``i`` of each of ``sequences``
    (body values ``x<k>``) and the ``extra`` values (body values ``in<len+1+j>``) by
    ``element_nodes``, which end in value ``y``; typed like a gradient of ``like``."""
    st = _seq_type(code)
    carried = [(s, st) for s in sequences] + list(extra)
    empty = g.SequenceEmpty()
    g.graph.nodes[-1].attrs["dtype"] = code  # ``dtype`` is also g.op's own keyword
    g.graph.info[empty] = sequence_info(g.graph, like)
    carried.append((empty, st))
    acc = len(carried) - 1
    nodes = [helper.make_node("SequenceAt", [f"in{k}", "i"], [f"x{k}"])
             for k in range(len(sequences))]
    nodes += element_nodes
    nodes.append(helper.make_node("SequenceInsert", [f"in{acc}", "y"], [f"out{acc}"]))
    nodes += [helper.make_node("Identity", [f"in{k}"], [f"out{k}"]) for k in range(acc)]
    infos = [sequence_info(g.graph, like)] * len(carried)
    outs = _loop(g, _length(g, sequences[0]), carried, nodes,
                 [f"out{k}" for k in range(len(carried))], infos)
    return outs[-1]


def _zeros_like_elements(g, sequence: str, code: int) -> str:
    """Zeros of each element's shape and type, as a sequence."""
    zero = numpy_helper.from_array(np.zeros(1, dtype=element_dtype(code)), "zero")
    nodes = [helper.make_node("Shape", ["x0"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["y"], value=zero)]
    return _elementwise(g, [sequence], code, nodes, sequence)


def _position_in(g, position: str, n: str) -> str:
    """A position counted from the back (negative) as one from the front, for a sequence
    of ``n`` (0-d int64) tensors."""
    p = g.Reshape(g.Cast(position, to=TensorProto.INT64, dtype=np.int64), g.ints([]),
                  dtype=np.int64)
    return g.Where(g.Less(p, g.const(0, dtype=np.int64)), g.Add(p, n, dtype=np.int64), p,
                   dtype=np.int64)


@SequenceShapes.in_standard_ops
def _(g, node):
    (seq,) = node.inputs
    i64 = helper.make_tensor_type_proto(TensorProto.INT64, None)
    nodes = [helper.make_node("Constant", [], ["axis0"], value_ints=[0]),
             helper.make_node("SequenceAt", ["in0", "i"], ["x"]),
             helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Size", ["shape"], ["rank0"]),
             helper.make_node("Unsqueeze", ["rank0", "axis0"], ["rank"]),
             helper.make_node("Concat", ["in1", "rank", "shape"], ["out1"], axis=0),
             helper.make_node("Identity", ["in0"], ["out0"])]
    code = _code_of(g, seq)
    if code is None:
        return None
    st = _seq_type(code)
    outs = _loop(g, _length(g, seq), [(seq, st), (g.ints([]), i64)], nodes, ["out0", "out1"],
                 [sequence_info(g.graph, seq), ValueInfo(np.dtype(np.int64), (None,))])
    return (outs[1],)


@SequenceZerosLike.in_standard_ops
def _(g, node):
    (seq,) = node.inputs
    code = _code_of(g, seq)
    return None if code is None else (_zeros_like_elements(g, seq, code),)


@SequenceGradSum.in_standard_ops
def _(g, node):
    parts = list(node.inputs)
    code = _code_of(g, *parts)
    if code is None:
        return None
    if len(parts) == 1:
        return (parts[0],)
    nodes = [helper.make_node("Sum", [f"x{k}" for k in range(len(parts))], ["y"])]
    return (_elementwise(g, parts, code, nodes, parts[0]),)


@SequenceGradScale.in_standard_ops
def _(g, node):
    seq, scale = node.inputs
    code = _code_of(g, seq, scale)
    tt = helper.make_tensor_type_proto(onnx_type(g.dtype(scale)), None)
    nodes = [helper.make_node("Mul", ["x0", "in1"], ["y"])]
    return (_elementwise(g, [seq], code, nodes, seq, extra=[(scale, tt)]),)


@SequenceConstructGrad.in_standard_ops
def _(g, node):
    dS = node.inputs[0]
    n = len(node.outputs)
    return tuple(g.SequenceAt(dS, g.const(i, dtype=np.int64), dtype=element_dtype(node.attrs["to"]))
                 for i in range(n))


@SequenceAtGrad.in_standard_ops
def _(g, node):
    length, position, dY = node.inputs
    producer = _producer(g, length, "SequenceLength")
    if producer is None:  # the elements' shapes (for the zeros) are unknown
        return None
    seq = producer.inputs[0]
    p = _position_in(g, position, length)
    code = _code_of(g, seq, dY)
    if code is None:
        return None
    zeros = _zeros_like_elements(g, seq, code)
    rest = g.SequenceErase(zeros, p)
    out = g.SequenceInsert(rest, dY, p)
    g.graph.info[rest] = g.graph.info[out] = sequence_info(g.graph, seq)
    return (out,)


@SequenceInsertGrad.in_standard_ops
def _(g, node):
    dS, _shape, *rest = node.inputs
    position = rest[0] if rest and rest[0] else None
    dtype = element_dtype(node.attrs["to"])
    if position is None:
        dtensor = g.SequenceAt(dS, g.const(-1, dtype=np.int64), dtype=dtype)
        dseq = g.SequenceErase(dS)
    else:
        n = g.Sub(_length(g, dS), g.const(1, dtype=np.int64), dtype=np.int64)
        p = _position_in(g, position, n)
        dtensor = g.SequenceAt(dS, p, dtype=dtype)
        dseq = g.SequenceErase(dS, p)
    g.graph.info[dseq] = g.graph.info[dS]
    return (dseq, dtensor)


@SplitToSequenceGrad.in_standard_ops
def _(g, node):
    dS = node.inputs[0]
    split = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    a = node.attrs
    new_axis = 0 if split is not None or a.get("keepdims", 1) else 1
    return (g.ConcatFromSequence(dS, axis=a.get("axis", 0), new_axis=new_axis,
                                 dtype=element_dtype(a["to"])),)


@ConcatFromSequenceGrad.in_standard_ops
def _(g, node):
    dY = node.inputs[0]
    a = node.attrs
    axis = a["axis"]
    if a.get("new_axis", 0):
        out = g.SplitToSequence(dY, axis=axis, keepdims=0)
    else:
        # Every element has dY's rank r: the encoding is rows of [r, dims…].
        shapes = node.inputs[1]
        r = g.rank(dY)
        if r is None:
            return None
        rows = g.Reshape(shapes, g.ints([-1, 1 + r]), dtype=np.int64)
        lengths = g.Gather(rows, g.const(1 + axis % r, dtype=np.int64), axis=1, dtype=np.int64)
        out = g.SplitToSequence(dY, lengths, axis=axis)
    g.graph.info[out] = ValueInfo(kind="sequence", element=ValueInfo(g.dtype(dY), None))
    return (out,)


@SequenceEraseGrad.in_standard_ops
def _(g, node):
    dS, *rest = node.inputs
    position = rest[0] if rest and rest[0] else None
    # The erased element's zeros take its shape from the forward input sequence.
    seq = node.attrs.get("sequence") or None
    if seq is None:
        return None
    code = _code_of(g, seq, dS)
    if code is None:
        return None
    if position is None:
        p = g.Sub(_length(g, seq), g.const(1, dtype=np.int64), dtype=np.int64)
    else:
        p = _position_in(g, position, _length(g, seq))
    erased = g.SequenceAt(seq, p, dtype=element_dtype(code))
    zeros = g.ConstantOfShape(g.Shape(erased, dtype=np.int64),
                              value=np.zeros(1, dtype=element_dtype(code)),
                              dtype=element_dtype(code))
    out = g.SequenceInsert(dS, zeros, p)
    g.graph.info[out] = sequence_info(g.graph, seq)
    return (out,)
