"""Convolutions on a CUDA device through cuDNN.

The ``gpu`` extra installs NVIDIA's cuDNN frontend (the ``cudnn`` package) and
the cuDNN runtime.  With them, Conv's forward pass and both of its gradients
run as cuDNN graphs: one graph per kind (forward, input gradient, weight
gradient), shapes, pads, strides, dilations and element type, built the first
time that convolution runs (cuDNN's heuristics pick the engine; nothing is
timed) and kept.  Each plan has a workspace of its own, allocated when it is
built, so that a recorded step (a CUDA graph) replays every convolution on
memory that lives as long as the plan.  Operands travel as device addresses,
and the handle runs on the stream current at each call.

Where the package or the library is missing, where ``ONNXGRAD_CUDNN=0``, or
where cuDNN declines a layer, the convolution runs as it does without cuDNN
(im2col and cuBLAS products).  :func:`start` returns the reason in the first
cases, :attr:`Convolutions.declined` lists the layers of the last; ``onnxgrad
inspect --device cuda`` and a trainer's profile show both.

float32 convolutions may run on TF32 tensor cores where cuDNN's heuristics
pick such an engine, as PyTorch and ONNX Runtime allow by default; float64
ones compute in float64, and float16 and bfloat16 ones accumulate in float32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

#: Set to 0 to run convolutions without cuDNN.
ENVIRONMENT = "ONNXGRAD_CUDNN"

#: element type -> (cuDNN type of the operands, cuDNN type of the arithmetic)
_TYPES = {"float16": ("HALF", "FLOAT"), "bfloat16": ("BFLOAT16", "FLOAT"),
          "float32": ("FLOAT", "FLOAT"), "float64": ("DOUBLE", "DOUBLE")}

#: kind -> the roles of the two operands, then of the result
_ROLES = {"forward": ("X", "W", "Y"), "input_grad": ("dY", "W", "dX"),
          "weight_grad": ("X", "dY", "dW")}


@dataclass
class _Plan:
    graph: Any
    tensors: tuple  # the graph's tensors for the two operands and the result
    workspace: Any  # a device buffer of the plan's own, or None


class Convolutions:
    """cuDNN's convolutions on one device (see the module's docstring).

    ``frontend`` is the ``cudnn`` module, ``handle`` one of its handles;
    ``address(array)`` gives a device array's address, ``stream()`` the current
    stream's, and ``buffer(nbytes)`` makes a device buffer.
    """

    def __init__(self, frontend: Any, handle: Any, *, address: Callable[[Any], int],
                 stream: Callable[[], int], buffer: Callable[[int], Any], description: str):
        self._fe = frontend
        self._handle = handle
        self._address = address
        self._stream = stream
        self._buffer = buffer
        self._bound: int | None = None
        self._plans: dict[tuple, _Plan | str] = {}
        #: What runs the convolutions, e.g. "cuDNN 9.10.0".
        self.description = description
        #: Convolutions that cuDNN declined (they run without it), as a description of
        #: each one's kind and shapes -> cuDNN's reason.
        self.declined: dict[str, str] = {}

    def forward(self, X, W, Y, begin, end, strides, dilations) -> bool:
        """``Y = Conv(X, W)`` (no bias); False where cuDNN declines it (``Y`` untouched)."""
        return self._run("forward", X, W, Y, begin, end, strides, dilations)

    def input_grad(self, dY, W, dX, begin, end, strides, dilations) -> bool:
        """The gradient of a Conv's input into ``dX``; False where cuDNN declines it."""
        return self._run("input_grad", dY, W, dX, begin, end, strides, dilations)

    def weight_grad(self, X, dY, dW, begin, end, strides, dilations) -> bool:
        """The gradient of a Conv's weight into ``dW``; False where cuDNN declines it."""
        return self._run("weight_grad", X, dY, dW, begin, end, strides, dilations)

    def built(self) -> int:
        """How many convolutions (kinds and shapes) run on cuDNN plans so far."""
        return sum(isinstance(plan, _Plan) for plan in self._plans.values())

    def plan(self, kind, a_shape, b_shape, out_shape, dtype, begin, end, strides,
             dilations) -> _Plan | None:
        """The plan that runs this convolution (``kind``: forward, input_grad or
        weight_grad), built on first asking; None where cuDNN does not run it."""
        plan = self._plan(kind, a_shape, b_shape, out_shape, dtype,
                          (begin, end, strides, dilations))
        return plan if isinstance(plan, _Plan) else None

    def _plan(self, kind, a_shape, b_shape, out_shape, dtype, geometry) -> _Plan | str:
        geometry = tuple(tuple(int(v) for v in values) for values in geometry)
        if len(geometry[0]) == 1:  # a 1-D convolution as a 2-D one over rows of one
            a_shape, b_shape, out_shape = (tuple(s[:2]) + (1,) + tuple(s[2:])
                                           for s in (a_shape, b_shape, out_shape))
            geometry = tuple((fill,) + values for fill, values in zip((0, 0, 1, 1), geometry))
        key = (kind, np.dtype(dtype).name, tuple(a_shape), tuple(b_shape), tuple(out_shape),
               geometry)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._build(key)
        return plan

    def _run(self, kind, a, b, out, begin, end, strides, dilations) -> bool:
        plan = self.plan(kind, a.shape, b.shape, out.shape, out.dtype, begin, end, strides,
                         dilations)
        if plan is None:
            return False
        self.execute(plan, a, b, out)
        return True

    def execute(self, plan: _Plan, a, b, out) -> None:
        """Run ``plan`` on its two operands, into ``out`` (C-contiguous arrays of the
        plan's shapes)."""
        if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
            raise ValueError("cuDNN convolutions take C-contiguous operands")
        stream = self._stream()
        if stream != self._bound:
            self._fe.set_stream(handle=self._handle, stream=stream)
            self._bound = stream
        # by address: the plan of a 1-D convolution describes its arrays as 4-D, in place
        pack = {tensor: self._address(x) for tensor, x in zip(plan.tensors, (a, b, out))}
        plan.graph.execute(pack, None if plan.workspace is None else self._address(plan.workspace),
                           handle=self._handle)

    def _build(self, key: tuple) -> _Plan | str:
        """The plan of one convolution, or (recorded in :attr:`declined`) why cuDNN
        does not run it."""
        kind, dtype, a_shape, b_shape, out_shape, (begin, end, strides, dilations) = key
        fe = self._fe
        shapes = " ".join(f"{role} {'x'.join(map(str, shape))}" for role, shape in
                          zip(_ROLES[kind], (a_shape, b_shape, out_shape)))
        what = f"{kind.replace('_', ' ')} {dtype} {shapes}"
        if dtype not in _TYPES:
            self.declined[what] = f"cuDNN has no {dtype} convolutions"
            return self.declined[what]
        io, compute = (getattr(fe.data_type, name) for name in _TYPES[dtype])
        try:
            graph = fe.pygraph(io_data_type=io, intermediate_data_type=compute,
                               compute_data_type=compute, handle=self._handle)
            a, b = (graph.tensor(name=role, dim=list(shape), stride=_strides(shape), data_type=io)
                    for role, shape in zip(_ROLES[kind], (a_shape, b_shape)))
            geometry = dict(pre_padding=list(begin), post_padding=list(end), stride=list(strides),
                            dilation=list(dilations), compute_data_type=compute)
            if kind == "forward":
                result = graph.conv_fprop(image=a, weight=b, **geometry)
            elif kind == "input_grad":
                result = graph.conv_dgrad(loss=a, filter=b, **geometry)
            else:
                result = graph.conv_wgrad(image=a, loss=b, **geometry)
            result.set_output(True).set_dim(list(out_shape)).set_stride(
                _strides(out_shape)).set_data_type(io)
            graph.build([fe.heur_mode.A, fe.heur_mode.FALLBACK])
            size = int(graph.get_workspace_size())
        except Exception as exc:  # noqa: BLE001 - cudnnGraphNotSupportedError and its kin
            self.declined[what] = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
            return self.declined[what]
        return _Plan(graph, (a, b, result), self._buffer(size) if size else None)


def _strides(shape) -> list[int]:
    """The element strides of a C-contiguous array of ``shape``."""
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= int(extent)
    return strides[::-1]


def start(cupy: Any) -> Convolutions | str:
    """cuDNN's convolutions on CuPy's current device, or why they do not run (a phrase
    that follows "convolutions without cuDNN: ")."""
    if os.environ.get(ENVIRONMENT, "").strip() == "0":
        return f"turned off by {ENVIRONMENT}=0"
    try:
        import cudnn  # noqa: PLC0415 - the gpu extra's NVIDIA cuDNN frontend
    except ImportError:
        return "the cuDNN frontend is not installed (pip install 'onnxgrad[gpu]')"
    try:
        handle = cudnn.create_handle()
        version = cudnn.backend_version_string()
    except Exception as exc:  # noqa: BLE001 - the cuDNN library missing or unusable
        return f"cuDNN did not start ({type(exc).__name__}: {exc})"
    return Convolutions(cudnn, handle, address=lambda array: array.data.ptr,
                        stream=lambda: cupy.cuda.get_current_stream().ptr,
                        buffer=lambda nbytes: cupy.empty(nbytes, dtype=cupy.uint8),
                        description=f"cuDNN {version}")


def describe(engine: Convolutions | str | None) -> list[str]:
    """Lines that say what runs a CUDA backend's convolutions, for ``inspect`` and
    profiles."""
    if engine is None:
        return []
    if isinstance(engine, str):
        return [f"convolutions without cuDNN (im2col and cuBLAS products): {engine}"]
    built = engine.built()
    lines = [f"convolutions: {engine.description}"
             + (f", {built} plan(s) built" if built else "")]
    if engine.declined:
        lines.append(f"  {len(engine.declined)} declined by cuDNN, run as im2col and cuBLAS "
                     "products:")
        lines += [f"    {what}: {why}" for what, why in engine.declined.items()]
    return lines
