"""Sequences and optionals.

A sequence value is a Python list of arrays; an optional value is its content,
or ``None`` when empty.  The ops copy lists rather than change them, since a
value may feed several nodes.  Kernels that make a sequence or an optional
take ``ctx`` (unused) so that the planner never folds such a value into a
constant: constants are bound into plans as arrays.  Forward only: tensor
inputs are declared differentiable without a rule, so a gradient through them
raises UnsupportedOpError.
"""

from __future__ import annotations

from onnxgrad.errors import ModelError
from onnxgrad.ops.registry import op


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


@op("SplitToSequence", since=11, differentiable=("input",), host_inputs=("split",))
def SplitToSequence(xp, input, split=None, *, axis=0, keepdims=1, ctx):
    axis = axis % input.ndim
    n = input.shape[axis]
    if split is None:
        parts = [xp.take(input, i, axis=axis) for i in range(n)] if not keepdims else \
            [xp.take(input, [i], axis=axis) for i in range(n)]
        return (parts,)
    if split.ndim == 0:  # equal chunks of this length, the last one shorter
        size = int(split)
        if size <= 0:
            raise ModelError(f"SplitToSequence: split must be positive, got {size}")
        lengths = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        lengths = [int(s) for s in split]
        if sum(lengths) != n:
            raise ModelError(f"SplitToSequence: split {lengths} does not add up to the axis "
                             f"length {n}")
    parts, start = [], 0
    index = [slice(None)] * input.ndim
    for length in lengths:
        index[axis] = slice(start, start + length)
        parts.append(input[tuple(index)])
        start += length
    return (parts,)


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
