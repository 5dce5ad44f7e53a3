"""The op registry: one declaration per op.

An op is declared once, with its forward kernel, the inputs that carry a
gradient and (optionally) its gradient rule::

    @op("Mul", since=7, differentiable=("A", "B"))
    def Mul(xp, A, B):
        return (A * B,)

    @Mul.gradient
    def _(g, node, dY):
        A, B = node.inputs
        return (g.unbroadcast(g.Mul(dY, B), like=A),
                g.unbroadcast(g.Mul(dY, A), like=B))

The kernel's signature is the op's interface: positional parameters after
``xp`` are the ONNX inputs (``*name`` for a variadic input, ``=None`` for an
optional one), keyword-only parameters are the attributes with the spec's
defaults (no default: the attribute is required).  A kernel that needs the run
state (training mode, random numbers, how many outputs the node asks for)
declares a keyword-only ``ctx``.  A kernel that can write its first output
into the storage of an input the graph no longer needs declares those inputs
in ``reuse`` and a keyword-only ``out``: the planner passes such an input as
``out`` when nothing else holds it, and the kernel uses it only when it has
the output's shape and type (see :func:`reusable`).

Each input of an op has one of three outcomes for differentiation: it is in
``differentiable`` and the rule returns its gradient; it is not in
``differentiable`` (indices, shapes, masks) and no gradient flows through it;
or it is differentiable but no rule is registered, and asking for its gradient
raises :class:`UnsupportedOpError`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from onnxgrad.errors import ModelError, UnsupportedOpError

#: Marks an attribute that has no default: the node must carry it.
REQUIRED = inspect.Parameter.empty

#: Domains whose names mean the same thing.
_DOMAIN_ALIASES = {"ai.onnx": ""}


def canonical_domain(domain: str | None) -> str:
    domain = domain or ""
    return _DOMAIN_ALIASES.get(domain, domain)


@dataclass
class OpDef:
    """Everything onnxgrad knows about one version of one op."""

    name: str
    domain: str
    since: int
    kernel: Callable[..., tuple]
    inputs: tuple[str, ...]
    optional: frozenset[str]
    variadic: bool
    attrs: dict[str, Any]
    differentiable: tuple[str, ...]
    host_inputs: tuple[str, ...]
    wants_ctx: bool
    train_outputs: int = 0
    reuse: tuple[str, ...] = ()
    rule: Callable | None = field(default=None)
    #: ``fn(g, node) -> output names``: the op written in standard ONNX ops (opset 18
    #: or later), for models that stock runtimes run (see :mod:`onnxgrad.convert`).
    standard: Callable | None = field(default=None)

    # -- declaration helpers -------------------------------------------------
    def gradient(self, fn: Callable) -> Callable:
        """Register ``fn(g, node, *output_grads)`` as this op's gradient rule."""
        self.rule = fn
        return fn

    def in_standard_ops(self, fn: Callable) -> Callable:
        """Register ``fn(g, node)``, which appends standard ONNX nodes (through the
        gradient builder ``g``) that compute the node's outputs and returns their
        names, one per output.  Private ops need one to be written into models
        that other runtimes run."""
        self.standard = fn
        return fn

    def __call__(self, xp, *args, **kwargs):
        return self.kernel(xp, *args, **kwargs)

    # -- queries ---------------------------------------------------------------
    def input_name(self, index: int) -> str:
        if index < len(self.inputs):
            return self.inputs[index]
        if self.variadic:
            return self.inputs[-1]
        raise IndexError(index)

    def is_differentiable(self, index: int) -> bool:
        """Whether input ``index`` carries a gradient (False past the declared inputs)."""
        if index >= len(self.inputs) and not self.variadic:
            return False
        return self.input_name(index) in self.differentiable

    def is_reusable(self, index: int) -> bool:
        """Whether the kernel may write its output into input ``index``'s storage."""
        if index >= len(self.inputs) and not self.variadic:
            return False
        return self.input_name(index) in self.reuse

    def is_host_input(self, index: int) -> bool:
        if index >= len(self.inputs) and not self.variadic:
            return False
        return self.input_name(index) in self.host_inputs

    def resolve_attrs(self, attrs: dict[str, Any], node: str) -> dict[str, Any]:
        """The node's attributes merged with the spec's defaults.

        Attributes the kernel does not declare are ignored only when they are
        documentation-like (none are); an unknown attribute is a model error.
        """
        out = {}
        for key, default in self.attrs.items():
            if key in attrs:
                out[key] = attrs[key]
            elif default is REQUIRED:
                raise ModelError(f"node {node!r} ({self.name}) lacks required attribute {key!r}")
            else:
                out[key] = default
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise ModelError(
                f"node {node!r} ({self.name}, opset {self.since}+) has unknown attribute(s) "
                f"{sorted(unknown)}; expected some of {sorted(self.attrs)}"
            )
        for key, low in _WINDOW_ATTRS.items():
            values = out.get(key) if self.name != "Pad" else None  # Pad-2's pads may crop
            if isinstance(values, (list, tuple)) and any(
                    not isinstance(v, int) or not low <= v <= _LARGEST for v in values):
                raise ModelError(f"node {node!r} ({self.name}): {key} must be whole numbers from "
                                 f"{low} to {_LARGEST}, got {list(values)}")
        return out


_REGISTRY: dict[tuple[str, str], list[OpDef]] = {}

#: Window attributes of convolutions and pooling, checked when a node is planned: the
#: smallest value each may take (a zero stride or a pad of 2^40 is a broken model).
_WINDOW_ATTRS = {"strides": 1, "dilations": 1, "kernel_shape": 1, "pads": 0,
                 "output_padding": 0}
_LARGEST = 1 << 20


def op(
    name: str,
    *,
    since: int = 1,
    domain: str = "",
    differentiable: tuple[str, ...] | None = None,
    host_inputs: tuple[str, ...] = (),
    train_outputs: int = 0,
    reuse: tuple[str, ...] = (),
) -> Callable[[Callable], OpDef]:
    """Declare the kernel of op ``name`` for opsets from ``since`` on.

    ``differentiable`` names the inputs a gradient flows through (default: none for
    ONNX ops; for onnxgrad's private ops, every input but the host inputs, so that
    differentiating a gradient again through an op without a rule raises
    :class:`UnsupportedOpError` rather than giving zero).

    ``host_inputs`` are inputs the kernel reads as host NumPy arrays (shapes,
    axes) whatever the device.  ``train_outputs`` is the number of outputs a
    node of this op gets in a training graph, where its gradient rule needs an
    optional output the model may omit (e.g. Dropout's mask).  ``reuse`` names
    inputs whose storage the kernel's ``out`` parameter may receive.

    A later declaration of the same op with a higher ``since`` takes over from
    that opset (e.g. Softmax's axis semantics change at opset 13).
    """
    domain = canonical_domain(domain)

    def register(kernel: Callable) -> OpDef:
        sig = inspect.signature(kernel)
        params = list(sig.parameters.values())
        if not params or params[0].name != "xp":
            raise TypeError(f"kernel of {name} must take xp first")
        inputs, optional, variadic, attrs, wants_ctx, wants_out = [], set(), False, {}, False, False
        for p in params[1:]:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                inputs.append(p.name)
                if p.default is not p.empty:
                    optional.add(p.name)
            elif p.kind is p.VAR_POSITIONAL:
                inputs.append(p.name)
                variadic = True
            elif p.kind is p.KEYWORD_ONLY:
                if p.name == "ctx":
                    wants_ctx = True
                elif p.name == "out":
                    wants_out = True
                else:
                    attrs[p.name] = p.default
        if differentiable is None:
            flows = tuple(i for i in inputs if i not in host_inputs) if domain == "onnxgrad" else ()
        else:
            flows = tuple(differentiable)
        unknown = set(flows) - set(inputs)
        if unknown:
            raise TypeError(f"{name}: differentiable names unknown inputs {sorted(unknown)}")
        if set(reuse) - set(inputs) or bool(reuse) != wants_out:
            raise TypeError(f"{name}: reuse must name inputs, and comes with a keyword-only out")
        definition = OpDef(
            name=name, domain=domain, since=since, kernel=kernel, inputs=tuple(inputs),
            optional=frozenset(optional), variadic=variadic, attrs=attrs,
            differentiable=flows, host_inputs=tuple(host_inputs),
            wants_ctx=wants_ctx, train_outputs=train_outputs, reuse=tuple(reuse),
        )
        versions = _REGISTRY.setdefault((domain, name), [])
        if any(v.since == since for v in versions):
            raise TypeError(f"{name} (domain {domain!r}) declared twice for opset {since}")
        versions.append(definition)
        versions.sort(key=lambda v: v.since)
        return definition

    return register


def reusable(out, shape, dtype):
    """``out`` when it is an array of ``shape`` and ``dtype`` a kernel may write its
    result into, else None (the kernel allocates)."""
    if out is not None and tuple(out.shape) == tuple(shape) and out.dtype == dtype:
        return out
    return None


def lookup(name: str, domain: str, opset: int, node: str = "?") -> OpDef:
    """The declaration of ``name`` that covers ``opset``; UnsupportedOpError if none."""
    domain = canonical_domain(domain)
    found = None
    for version in _REGISTRY.get((domain, name), ()):
        if version.since <= opset:
            found = version
    if found is None:
        raise UnsupportedOpError(name, domain, opset, node)
    return found


def is_registered(name: str, domain: str, opset: int) -> bool:
    try:
        lookup(name, domain, opset)
    except UnsupportedOpError:
        return False
    return True


def registered_ops() -> dict[tuple[str, str], list[OpDef]]:
    """All declarations, keyed by (domain, op name); a copy."""
    return {k: list(v) for k, v in _REGISTRY.items()}
