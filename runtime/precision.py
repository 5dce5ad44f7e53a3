"""Mixed-precision training: the autocast graph transform and dynamic loss scaling.

``Trainer(..., precision="bf16" | "fp16")`` trains float32 weights (the master
copy the optimizer updates, and the one the model saves) while the products
run in the low type:

* :func:`autocast` rewrites the training graph (a copy of the model's graph;
  the model itself is never changed) before the loss and the gradients are
  built, as ``torch.autocast`` does: each float32 input of a MatMul, Gemm,
  Conv, ConvTranspose, Einsum or Attention node goes through a Cast to the low
  type (one Cast per value, shared by every product that reads it), and each
  of the node's float32 outputs comes back to float32 through a Cast, under
  its original name; an Attention node without ``softmax_precision`` gets
  ``softmax_precision=FLOAT``, so that its softmax runs in float32.  Everything
  else (normalisation and its statistics, Softmax, activations, the loss) runs
  in float32 as before.  The backward
  pass goes through the Casts by Cast's own gradient rule: a product's
  gradients are computed in the low type, and each weight's gradient arrives
  in float32, summed over its uses in float32.  Nodes whose floating-point
  inputs are not all float32 (a model already in float16, or float64) are left
  as they are.
* :class:`LossScaler` is the dynamic loss scaling of ``torch.amp.GradScaler``
  for float16, whose narrow range lets small gradients underflow: the
  backward pass starts from the loss's gradient times the scale (the seed of
  the gradient builder is a scalar graph input that the trainer feeds), the
  gradients are divided by the scale before clipping and the update, and a
  step whose gradients are not all finite is skipped and the scale lowered
  (``backoff_factor``); after ``growth_interval`` good steps in a row the scale
  grows (``growth_factor``).

bfloat16 has float32's range and needs no scaling.  On the CPU the low types
are NumPy's float16 and ``ml_dtypes``' bfloat16 (whose products NumPy runs
element by element, slowly: the CPU path is there for correctness, not speed);
on a GPU they are CuPy arrays of the same types, through the same array-module
code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from onnxgrad.errors import OnnxgradError
from onnxgrad.ir import Graph, Node, ValueInfo
from onnxgrad.ops.shape import is_float

#: The ``precision`` values a Trainer (and ``onnxgrad train --precision``) accepts.
PRECISIONS = ("fp32", "bf16", "fp16")
#: Low element type of each mixed precision, by NumPy/ml_dtypes name.
LOW_TYPES = {"bf16": "bfloat16", "fp16": "float16"}
#: ONNX element type codes of the low types (TensorProto.BFLOAT16, FLOAT16) and float32.
_ONNX_CODES = {"bfloat16": 16, "float16": 10, "float32": 1}
#: Standard ops whose float32 inputs autocast runs in the low type.
AUTOCAST_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention"})


def check_precision(precision: Any) -> str:
    """``precision`` checked: one of :data:`PRECISIONS` (None means "fp32")."""
    if precision is None:
        return "fp32"
    if precision not in PRECISIONS:
        raise OnnxgradError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; "
                            f"got {precision!r}")
    return precision


def low_dtype(precision: str) -> np.dtype:
    """The NumPy dtype of ``precision``'s low type (bfloat16 from ``ml_dtypes``)."""
    name = LOW_TYPES[precision]
    if name == "bfloat16":
        try:
            import ml_dtypes  # noqa: PLC0415 - only bf16 needs it
        except ImportError as exc:  # pragma: no cover - ml_dtypes comes with onnx
            raise OnnxgradError("precision='bf16' needs the ml_dtypes package "
                                "(pip install ml_dtypes)") from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_device_support(precision: str, xp) -> None:
    """Raise :class:`OnnxgradError` if array module ``xp`` cannot hold ``precision``'s
    low type (CuPy builds without bfloat16, say)."""
    if precision == "fp32":
        return
    dtype = low_dtype(precision)
    try:
        x = xp.ones((2, 2), dtype=xp.float32).astype(dtype)
        y = (x @ x).astype(xp.float32)
        ok = float(y[0, 0]) == 2.0
    except Exception as exc:  # noqa: BLE001 - any failure means: not supported here
        raise OnnxgradError(
            f"precision={precision!r} computes in {dtype.name}, which this array module "
            f"({xp.__name__}) cannot hold or multiply ({type(exc).__name__}: {exc}); use "
            "precision='fp16' or 'fp32' on this device") from exc
    if not ok:
        raise OnnxgradError(f"precision={precision!r}: a {dtype.name} product on "
                            f"{xp.__name__} gave a wrong result; use 'fp32' on this device")


def autocast_ops(precision: str, xp) -> frozenset[str]:
    """The ops of :data:`AUTOCAST_OPS` that run in ``precision``'s low type on array
    module ``xp``: all of them, except Einsum where ``xp.einsum`` does not take the low
    type (NumPy's does not take bfloat16), which then stays in float32."""
    if precision == "fp32":
        return frozenset()
    dtype = low_dtype(precision)
    try:
        x = xp.ones((2, 2), dtype=xp.float32).astype(dtype)
        xp.einsum("ij,jk->ik", x, x)
    except Exception:  # noqa: BLE001 - any failure means: not supported here
        return AUTOCAST_OPS - {"Einsum"}
    return AUTOCAST_OPS


def autocast(graph: Graph, precision: str, ops: frozenset[str] = AUTOCAST_OPS) -> list[str]:
    """Run the products of ``graph`` (in place) in ``precision``'s low type; returns the
    names of the Cast nodes added.  ``ops`` limits the op types changed (see
    :func:`autocast_ops`).  See the module docstring for what changes."""
    if precision == "fp32":
        return []
    low = low_dtype(precision)
    to_low, to_float = _ONNX_CODES[low.name], _ONNX_CODES["float32"]
    opset = graph.opsets.get("", graph.opsets.get("ai.onnx", 13))
    taken = graph.all_names()
    cast_of: dict[str, str] = {}  # float32 value -> its low-type copy
    added: list[str] = []
    nodes: list[Node] = []

    def cast(source: str, target: str, to: int, label: str) -> Node:
        name = graph.unique_name(f"autocast/{label}", taken)
        added.append(name)
        return Node("Cast", [source], [target], {"to": to}, name, "", opset)

    for node in graph.nodes:
        if node.op_type not in ops or not _autocast_node(graph, node):
            nodes.append(node)
            continue
        inputs = list(node.inputs)
        for i, x in enumerate(inputs):
            if not x or graph.dtype(x) != np.float32:
                continue
            if x not in cast_of:
                cast_of[x] = graph.unique_name(f"{x}/{low.name}", taken)
                graph.info[cast_of[x]] = ValueInfo(low, graph.shape(x))
                nodes.append(cast(x, cast_of[x], to_low, f"{x}/to_{low.name}"))
            inputs[i] = cast_of[x]
        node.inputs = inputs
        if node.op_type == "Attention" and node.attrs.get("softmax_precision") is None:
            node.attrs = {**node.attrs, "softmax_precision": to_float}  # softmax in float32
        back = []
        outputs = list(node.outputs)
        for i, y in enumerate(outputs):
            if not y:
                continue
            if graph.dtype(y) is None:  # these ops' outputs have their inputs' type
                graph.info[y] = ValueInfo(np.dtype(np.float32), graph.shape(y))
            outputs[i] = graph.unique_name(f"{y}/{low.name}", taken)
            graph.info[outputs[i]] = ValueInfo(low, graph.shape(y))
            back.append(cast(outputs[i], y, to_float, f"{y}/to_float32"))
        node.outputs = outputs
        nodes.append(node)
        nodes.extend(back)
    graph.nodes = nodes
    return added


def _autocast_node(graph: Graph, node: Node) -> bool:
    """Whether ``node`` is a product whose floating-point inputs are all float32."""
    if node.op_type not in AUTOCAST_OPS or node.domain not in ("", "ai.onnx"):
        return False
    types = [graph.dtype(x) for x in node.inputs if x]
    if any(t is None for t in types):  # an element type shape inference did not find
        return False
    floats = [t for t in types if is_float(t)]
    return bool(floats) and all(t == np.float32 for t in floats)


@dataclass
class LossScaler:
    """Dynamic loss scaling for float16 training, as ``torch.amp.GradScaler``.

    The backward pass starts from ``scale`` times the loss's gradient.  A step whose
    unscaled gradients are all finite is taken, and after ``growth_interval`` such steps
    in a row the scale is multiplied by ``growth_factor``; a step with an infinite or
    NaN gradient is skipped (see :class:`~onnxgrad.trainer.Trainer`) and the scale is
    multiplied by ``backoff_factor``.
    """

    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        for key in ("init_scale", "growth_factor"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise OnnxgradError(f"LossScaler {key} must be a positive number, got {value!r}")
        if self.growth_factor < 1:
            raise OnnxgradError(f"LossScaler growth_factor must be at least 1, "
                                f"got {self.growth_factor!r}")
        if not (isinstance(self.backoff_factor, (int, float)) and 0 < self.backoff_factor < 1):
            raise OnnxgradError(f"LossScaler backoff_factor must lie in (0, 1), "
                                f"got {self.backoff_factor!r}")
        if not (isinstance(self.growth_interval, int) and self.growth_interval >= 1):
            raise OnnxgradError(f"LossScaler growth_interval must be a whole number of steps, "
                                f"at least 1; got {self.growth_interval!r}")
        #: The current scale.
        self.scale = float(self.init_scale)
        #: Good steps in a row since the scale last changed.
        self.growth_tracker = 0

    def update(self, found_inf: bool) -> None:
        """The scale after a step whose gradients were (``found_inf``) or were not finite."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def inverse(self) -> np.float32:
        """1 / scale in float32 (computed in float64 first, as GradScaler does)."""
        return np.float32(1.0 / self.scale)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "init_scale": self.init_scale, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the scale and the count of good steps.  The settings
        (factors, interval) stay this scaler's own: they are options of the run."""
        self.scale = float(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])
