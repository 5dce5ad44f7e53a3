"""Trigonometric and hyperbolic functions, variadic Min/Max/Mean, and Einsum's gradient.

Sin and Cos carry rotary position embeddings; Min and Max clamp (exporters
write ``torch.clamp`` with tensor bounds as Max/Min).  Where several inputs
of Min/Max hold the extreme value, the gradient is shared equally between
them, as ``torch.maximum`` does for two.  Einsum's gradient in standard ops (step
models, higher order) is again an Einsum, which needs the operands' ranks.
"""

from __future__ import annotations

from onnxgrad.ops import standard as std
from onnxgrad.ops.elementwise import SumToShape
from onnxgrad.ops.registry import op
from onnxgrad.ops.tensor import Einsum, on

# -- trigonometric and hyperbolic functions ------------------------------------------------


def _unary(name, since, fn, rule):
    def kernel(xp, input):
        return (xp.asarray(fn(xp, input)),)
    kernel.__name__ = name
    definition = op(name, since=since, differentiable=("input",))(kernel)

    @definition.gradient
    def _(g, node, dY):
        return (rule(g, node.inputs[0], node.outputs[0], dY),)
    return definition


def _one(g, x):
    return g.scalar(1.0, like=x)


Sin = _unary("Sin", 7, lambda xp, x: xp.sin(x), lambda g, x, y, d: g.Mul(d, g.Cos(x)))
Cos = _unary("Cos", 7, lambda xp, x: xp.cos(x), lambda g, x, y, d: g.Neg(g.Mul(d, g.Sin(x))))
Tan = _unary("Tan", 7, lambda xp, x: xp.tan(x),                    # 1 + tan^2
             lambda g, x, y, d: g.Mul(d, g.Add(_one(g, y), g.Mul(y, y))))
Asin = _unary("Asin", 7, lambda xp, x: xp.arcsin(x),               # 1 / sqrt(1 - x^2)
              lambda g, x, y, d: g.Div(d, g.Sqrt(g.Sub(_one(g, x), g.Mul(x, x)))))
Acos = _unary("Acos", 7, lambda xp, x: xp.arccos(x),
              lambda g, x, y, d: g.Neg(g.Div(d, g.Sqrt(g.Sub(_one(g, x), g.Mul(x, x))))))
Atan = _unary("Atan", 7, lambda xp, x: xp.arctan(x),               # 1 / (1 + x^2)
              lambda g, x, y, d: g.Div(d, g.Add(_one(g, x), g.Mul(x, x))))
Sinh = _unary("Sinh", 9, lambda xp, x: xp.sinh(x), lambda g, x, y, d: g.Mul(d, g.Cosh(x)))
Cosh = _unary("Cosh", 9, lambda xp, x: xp.cosh(x), lambda g, x, y, d: g.Mul(d, g.Sinh(x)))
Asinh = _unary("Asinh", 9, lambda xp, x: xp.arcsinh(x),            # 1 / sqrt(x^2 + 1)
               lambda g, x, y, d: g.Div(d, g.Sqrt(g.Add(g.Mul(x, x), _one(g, x)))))
Acosh = _unary("Acosh", 9, lambda xp, x: xp.arccosh(x),            # 1 / sqrt(x^2 - 1)
               lambda g, x, y, d: g.Div(d, g.Sqrt(g.Sub(g.Mul(x, x), _one(g, x)))))
Atanh = _unary("Atanh", 9, lambda xp, x: xp.arctanh(x),            # 1 / (1 - x^2)
               lambda g, x, y, d: g.Div(d, g.Sub(_one(g, x), g.Mul(x, x))))


# -- Min, Max, Mean ------------------------------------------------------------------------------

def _extreme(xp, arrays, greater):
    mod, arrays = on(xp, *arrays)
    out = arrays[0]
    for b in arrays[1:]:  # NaN propagates, as with numpy.maximum
        out = mod.maximum(out, b) if greater else mod.minimum(out, b)
    return mod.asarray(out)


@op("Max", since=6, differentiable=("data_0",))
def Max(xp, *data_0):
    return (_extreme(xp, data_0, True),)


@op("Min", since=6, differentiable=("data_0",))
def Min(xp, *data_0):
    return (_extreme(xp, data_0, False),)


@op("Mean", since=6, differentiable=("data_0",))
def Mean(xp, *data_0):
    mod, arrays = on(xp, *data_0)
    out = arrays[0]
    for b in arrays[1:]:
        out = out + b
    return (mod.asarray(out / len(arrays)).astype(arrays[0].dtype),)


def _select_rule(g, node, dY):
    Y = node.outputs[0]
    return tuple(g.private("ExtremeGrad", dY, Y, *node.inputs, wrt=i)
                 for i in range(len(node.inputs)))


Max.gradient(_select_rule)
Min.gradient(_select_rule)


@Mean.gradient
def _(g, node, dY):
    scaled = g.Mul(dY, g.scalar(1.0 / len(node.inputs), like=dY))
    return tuple(g.private("SumToShape", scaled, g.shape_of(x)) for x in node.inputs)


@op("ExtremeGrad", domain="onnxgrad")
def ExtremeGrad(xp, dY, Y, *inputs, wrt=0):
    """The gradient of Max/Min for input ``wrt``: ``dY`` where that input holds the
    result, shared equally between the inputs that tie for it."""
    hits = [(x == Y) for x in inputs]
    count = hits[0].astype(dY.dtype)
    for h in hits[1:]:
        count = count + h
    mine = hits[wrt]
    grad = xp.where(mine, dY / xp.maximum(count, 1), 0).astype(dY.dtype)
    return SumToShape(xp, grad, inputs[wrt].shape)


@ExtremeGrad.in_standard_ops
def _(g, node):
    dY, Y, *inputs = node.inputs
    wrt = node.attrs.get("wrt", 0)
    dtype = std.tensor_type(g.dtype(dY))
    hits = [g.Equal(x, Y) for x in inputs]
    count = None
    for hit in hits:
        one = g.Cast(hit, to=dtype, dtype=g.dtype(dY))
        count = one if count is None else g.Add(count, one)
    share = g.Div(dY, g.Max(count, std.like(g, 1, dY)))
    grad = g.Where(hits[wrt], share, std.like(g, 0, dY))
    return (_sum_to(g, grad, inputs[wrt], like_output=Y),)


def _sum_to(g, grad, x, like_output):
    """``grad`` (of the shape of ``like_output``) summed down to ``x``'s shape: nothing
    where both shapes are static and equal."""
    shape, target = g.shape(like_output), g.shape(x)
    if shape is not None and shape == target and all(isinstance(d, int) for d in shape):
        return grad
    return g.private("SumToShape", grad, g.Shape(x, dtype="int64"))


# -- Einsum's gradient ----------------------------------------------------------------------------

def parse_einsum(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Explicit subscripts for each operand and the output, ellipses spelled out as
    upper-case letters (which ONNX equations do not use)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise ValueError(f"Einsum: {len(terms)} operands in {equation!r}, got {len(ranks)}")
    ell = 0
    for t, r in zip(terms, ranks):
        if "..." in t:
            ell = max(ell, r - (len(t) - 3))
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:ell]

    def expand(t, r=None):
        if "..." not in t:
            return t
        n = ell if r is None else r - (len(t) - 3)
        return t.replace("...", letters[ell - n:])

    terms = [expand(t, r) for t, r in zip(terms, ranks)]
    if arrow:
        out = expand(rhs)
    else:  # implicit output: the ellipsis, then the letters used once, in order
        counts: dict[str, int] = {}
        for t in terms:
            for c in t:
                counts[c] = counts.get(c, 0) + 1
        out = letters + "".join(sorted(c for c, n in counts.items() if n == 1 and c.islower()))
    return terms, out


@Einsum.gradient
def _(g, node, dY):
    eq = node.attrs["equation"]
    return tuple(g.private("EinsumGrad", dY, *node.inputs, equation=eq, wrt=i)
                 for i in range(len(node.inputs)))


@op("EinsumGrad", domain="onnxgrad")
def EinsumGrad(xp, dY, *Inputs, equation, wrt=0):
    """The gradient of Einsum for operand ``wrt``.

    The einsum of ``dY`` with the other operands onto the operand's distinct
    letters; letters only that operand uses are broadcast back, a repeated
    letter (a diagonal) is written onto the diagonal, and dimensions the
    operand broadcast (size 1 in it) are summed.
    """
    terms, out = parse_einsum(equation, [x.ndim for x in Inputs])
    mine, x = terms[wrt], Inputs[wrt]
    sizes: dict[str, int] = {}
    for t, a in list(zip(terms, Inputs)) + [(out, dY)]:
        for c, n in zip(t, a.shape):
            if n != 1 or c not in sizes:
                sizes[c] = n
    others = [(t, a) for i, (t, a) in enumerate(zip(terms, Inputs)) if i != wrt]
    present = set(out).union(*[set(t) for t, _ in others]) if others else set(out)
    distinct = "".join(dict.fromkeys(mine))
    kept = "".join(c for c in distinct if c in present)
    spec = ",".join([out] + [t for t, _ in others]) + "->" + kept
    operands = [dY] + [a for _, a in others]
    if dY.dtype.kind not in "biufc":  # e.g. bfloat16, which einsum does not take (as Einsum)
        operands = [a.astype("float32") for a in operands]
    grad = xp.einsum(spec, *operands).astype(dY.dtype, copy=False)
    # Letters only this operand has: the gradient does not vary along them.
    full_shape = tuple(sizes[c] for c in distinct)
    grad = grad.reshape(tuple(sizes[c] if c in kept else 1 for c in distinct))
    grad = xp.broadcast_to(grad, full_shape)
    if len(distinct) != len(mine):  # repeated letters: place onto the diagonal
        target = xp.zeros(tuple(sizes[c] for c in mine), dtype=dY.dtype)
        grids = {c: xp.arange(sizes[c]).reshape([-1 if j == i else 1
                                                 for j in range(len(distinct))])
                 for i, c in enumerate(distinct)}
        target[tuple(grids[c] for c in mine)] = grad
        grad = target
    return SumToShape(xp, xp.asarray(grad, dtype=x.dtype), x.shape)


@EinsumGrad.in_standard_ops
def _(g, node):
    # The kernel's steps: one Einsum onto the operand's distinct letters kept by the
    # others, its other letters put back (Unsqueeze, Expand), repeated letters placed on
    # the diagonal (a product with 0/1 masks), broadcast axes summed.  Needs the ranks.
    dY, *inputs = node.inputs
    wrt = node.attrs.get("wrt", 0)
    ranks = [g.rank(x) for x in inputs]
    if any(r is None for r in ranks):
        return None
    terms, out = parse_einsum(node.attrs["equation"], ranks)
    used = dict.fromkeys("".join(terms) + out)
    if len(used) > 26:
        return None
    # ONNX equations spell subscripts with lower-case letters only
    rename = {c: chr(ord("a") + i) for i, c in enumerate(used)}
    terms = ["".join(rename[c] for c in t) for t in terms]
    out = "".join(rename[c] for c in out)
    mine, x = terms[wrt], inputs[wrt]
    others = [(t, a) for i, (t, a) in enumerate(zip(terms, inputs)) if i != wrt]
    present = set(out).union(*[set(t) for t, _ in others])
    distinct = "".join(dict.fromkeys(mine))
    kept = "".join(c for c in distinct if c in present)
    if not others and out == kept:
        grad = dY
    else:
        spec = ",".join([out] + [t for t, _ in others]) + "->" + kept
        grad = g.Einsum(dY, *[a for _, a in others], equation=spec)
    first = {c: mine.index(c) for c in distinct}
    put_back = [j for j, c in enumerate(mine) if first[c] != j or c not in kept]
    if put_back:  # one axis per position of ``mine``: size 1 where the letter is not kept
        grad = g.Unsqueeze(grad, g.ints(put_back))
    x_shape = g.Shape(x, dtype="int64")

    def dim(j):
        return g.Slice(x_shape, g.ints([j]), g.ints([j + 1]))

    for c in distinct:  # repeated letters: the diagonal of their axes
        for j in (j for j, d in enumerate(mine) if d == c and j != first[c]):
            axes = []
            for p in (first[c], j):
                n = g.Reshape(dim(p), g.ints([]))
                index = g.Range(std.i64(g, 0), n, std.i64(g, 1), dtype="int64")
                axes.append(g.Unsqueeze(index, g.ints([k for k in range(len(mine)) if k != p])))
            mask = g.Cast(g.Equal(axes[0], axes[1]), to=std.tensor_type(g.dtype(dY)),
                          dtype=g.dtype(dY))
            grad = g.Mul(grad, mask)
    alone = [j for j, c in enumerate(mine) if first[c] == j and c not in kept
             and mine.count(c) == 1]
    if alone:  # letters only this operand has: the gradient is constant along them
        target = g.Concat(*[dim(j) if j in alone else g.ints([1]) for j in range(len(mine))],
                          axis=0, dtype="int64")
        grad = g.Expand(grad, target)
    if _broadcasts(g, terms, inputs, out, dY):
        grad = g.private("SumToShape", grad, x_shape)
    return (grad,)


def _broadcasts(g, terms, inputs, out, dY):
    """Whether a letter of the equation may have different sizes in different operands
    (one of them 1): unknown where a shape is not static."""
    sizes: dict[str, set] = {}
    for t, a in list(zip(terms, inputs)) + [(out, dY)]:
        shape = g.shape(a)
        if shape is None or len(shape) != len(t):
            return True
        for c, n in zip(t, shape):
            sizes.setdefault(c, set()).add(n)
    return any(len(v) > 1 or not all(isinstance(n, int) for n in v) for v in sizes.values())
