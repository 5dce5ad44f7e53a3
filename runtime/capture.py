"""Whole training steps recorded as CUDA graphs and replayed.

For one input signature (the names, shapes and element types of a step's
inputs) a training step launches the same kernels on the same memory every
time: the plan is static, the weights and the optimizer's state are updated in
place, and the step's scalars are read from device memory
(:class:`~onnxgrad.optimizers.DeviceUpdate`).  So after a few eager steps,
:class:`StepGraphs` records one step on a stream as a CUDA graph and replays
it for every later step with that signature: one launch instead of one per
kernel, and no Python between kernels.

A recorded step keeps its own memory: its inputs live in static buffers that
each replay copies the new feeds into, and its intermediates in a memory pool
of its own, which nothing else allocates from.  A step that cannot be recorded
(a kernel reads a device value on the host, say) runs eagerly from then on for
that signature, and :attr:`StepGraphs.refused` says why.

The device is an interface (``stream``, ``graph_memory``, ``allocating_from``,
``recording``, ``asarray``, ``empty_like``, ``copy_in``), which the CUDA backend
implements and tests can fake.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

#: Eager steps per input signature before one is recorded: the first records the
#: shapes that the specialised plan folds, the second runs that plan (compiling
#: its kernels and creating the optimizer's state), the third is recorded.
WARMUP_STEPS = 2
#: Recorded steps kept, the most recently used (each holds its intermediates' memory).
GRAPHS_KEPT = 4


@dataclass
class _Recorded:
    graph: Any
    inputs: dict[str, Any]  # the static input buffers
    result: Any  # what the step returned: device arrays at fixed addresses
    memory: Any  # the pool that holds the step's intermediates
    holds: tuple  # the persistent arrays the step reads and writes, as recorded
    uploads: list  # constants uploaded while recording, which the graph reads


class StepGraphs:
    """Runs training steps, recording one per input signature as a CUDA graph."""

    def __init__(self, device: Any, warmup: int = WARMUP_STEPS, limit: int = GRAPHS_KEPT):
        self.device = device
        self.warmup = warmup
        self.limit = limit
        self._seen: dict[tuple, int] = {}
        self._graphs: OrderedDict[tuple, _Recorded] = OrderedDict()
        #: Input signature -> why its steps run eagerly.
        self.refused: dict[tuple, str] = {}
        #: Steps run eagerly, steps recorded, and steps replayed.
        self.eager = self.recorded = self.replayed = 0

    def run(self, inputs: Mapping[str, Any], step: Callable[[dict[str, Any]], Any],
            holds: Sequence[Any]) -> Any:
        """One step: ``step(device_inputs)`` launches a step's work and returns its
        results (device arrays).  ``inputs`` are host arrays; ``holds`` are the
        persistent device arrays the step reads and writes (weights, optimizer
        state): a recorded step is replayed only while they are the same arrays."""
        reason = _unrecordable(inputs)
        if reason is not None:
            self.refused.setdefault(tuple((name, None, None) for name in inputs), reason)
            return self._eager(inputs, step)
        signature = tuple((name, value.shape, value.dtype.str) for name, value in inputs.items())
        recorded = self._graphs.get(signature)
        if recorded is not None:
            if _same(recorded.holds, holds):
                self._graphs.move_to_end(signature)
                for name, value in inputs.items():
                    self.device.copy_in(recorded.inputs[name], value)
                recorded.graph.launch(self.device.stream)
                self.replayed += 1
                return recorded.result
            del self._graphs[signature]  # weights or optimizer state were replaced
            self._seen[signature] = self.warmup
        seen = self._seen.get(signature, 0)
        if signature not in self.refused and seen >= self.warmup:
            return self._record(signature, inputs, step, holds)
        self._seen[signature] = seen + 1
        return self._eager(inputs, step)

    def _eager(self, inputs: Mapping[str, Any], step: Callable) -> Any:
        self.eager += 1
        return step({name: self._on_device(value) for name, value in inputs.items()})

    def _on_device(self, value: Any) -> Any:
        """A feed on the device: a tensor, a sequence (list) of them, or None."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return [self._on_device(v) for v in value]
        return self.device.asarray(value)

    def _record(self, signature: tuple, inputs: Mapping[str, Any], step: Callable,
                holds: Sequence[Any]) -> Any:
        device = self.device
        stream = device.stream
        memory = device.graph_memory()
        with device.allocating_from(memory):
            buffers = {name: device.empty_like(value) for name, value in inputs.items()}
        for name, value in inputs.items():
            device.copy_in(buffers[name], value)
        with device.allocating_from(memory), device.recording() as uploads:
            stream.begin_capture()
            try:
                result = step(dict(buffers))
            except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
                try:
                    stream.end_capture()
                except Exception:  # noqa: BLE001 - an invalidated capture ends with an error
                    pass
                self.refused[signature] = _explain(exc)
                failed = True
            else:
                graph = stream.end_capture()
                failed = False
        if failed:
            return self._eager(inputs, step)
        graph.launch(stream)  # recording ran nothing: this launch is the step
        self.recorded += 1
        self._graphs[signature] = _Recorded(graph, buffers, result, memory, tuple(holds),
                                            uploads)
        if len(self._graphs) > self.limit:
            self._graphs.popitem(last=False)
        return result

    def clear(self) -> None:
        """Forget every recorded step (its memory is released)."""
        self._graphs.clear()
        self._seen.clear()

    def describe(self) -> list[str]:
        """Lines for a report: how steps ran, and why some could not be recorded."""
        lines = [f"CUDA graphs: {self.recorded} step(s) recorded, {self.replayed} replayed, "
                 f"{self.eager} run eagerly"]
        for signature, reason in self.refused.items():
            shapes = ", ".join(name if shape is None else f"{name} {list(shape)}"
                               for name, shape, _ in signature)
            lines.append(f"  eager for inputs {shapes}: {reason}")
        return lines


def _unrecordable(inputs: Mapping[str, Any]) -> str | None:
    """Why steps with these inputs cannot be recorded (None when they can)."""
    for name, value in inputs.items():
        if not isinstance(value, np.ndarray):
            what = "an empty optional" if value is None else "a sequence"
            return f"input {name!r} is {what}, not a tensor"
    return None


def _same(recorded: tuple, holds: Sequence[Any]) -> bool:
    return len(recorded) == len(holds) and all(a is b for a, b in zip(recorded, holds))


def _explain(exc: BaseException) -> str:
    node = getattr(exc, "onnxgrad_node", None)
    where = f"node {node.name!r} ({node.op_type}): " if node is not None else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{where}{type(exc).__name__}: {message}" if message else f"{where}{type(exc).__name__}"
