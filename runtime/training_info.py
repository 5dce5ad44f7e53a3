"""Running a model's own training algorithm (ONNX ``TrainingInfoProto``).

A model may carry ``training_info``: an *initialization* graph that computes
starting values, an *algorithm* graph that computes one training step (often
with ``Gradient`` and the ``ai.onnx.preview.training`` optimizer ops), and
bindings that say which initializer each output updates.  :class:`TrainingInfo`
runs both and writes the bound outputs into the model's weights, so that
``Model.save`` stores the trained model.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from onnxgrad.autodiff import expand_gradient_ops
from onnxgrad.backend import get_backend
from onnxgrad.errors import ModelError
from onnxgrad.executor import Plan
from onnxgrad.loader import build_graph
from onnxgrad.model import Model, prepare_feeds


class TrainingInfo:
    """The ``index``-th TrainingInfoProto of ``model``, ready to run."""

    def __init__(self, model: Model, index: int = 0):
        infos = model._proto.training_info
        if not infos:
            raise ModelError(f"{model.where}: the model carries no training_info")
        if not 0 <= index < len(infos):
            raise ModelError(f"{model.where}: training_info[{index}] does not exist; the model "
                             f"has {len(infos)}")
        self.model = model
        self.index = index
        self._info = infos[index]
        where = f"{model.where}: training_info[{index}]"
        self._where = where
        #: The algorithm graph's own initializers: optimizer state that persists
        #: between steps (e.g. an iteration count) and is saved with the model.
        self.state = {t.name: np.array(numpy_helper.to_array(t), copy=True)
                      for t in self._info.algorithm.initializer}
        self.algorithm = self._graph(self._info.algorithm, f"{where}.algorithm")
        self.inputs = list(self.algorithm.inputs)
        self.outputs = list(self.algorithm.outputs)
        self.update_binding = {e.key: e.value for e in self._info.update_binding}
        self.initialization_binding = {e.key: e.value for e in self._info.initialization_binding}
        self._check_bindings(self.update_binding, self.outputs, "update_binding")
        self._plan = self._plan_for(self.algorithm)

    # -- set-up ------------------------------------------------------------------------
    def _graph(self, gp: onnx.GraphProto, where: str):
        """The IR of a training graph: the inference graph's weights it reads become
        initializers; shape inference runs over the whole."""
        proto = onnx.ModelProto()
        proto.ir_version = self.model._proto.ir_version
        proto.opset_import.extend(self.model._proto.opset_import)
        proto.graph.CopyFrom(gp)
        defined = {t.name for t in gp.initializer} | {i.name for i in gp.input}
        defined |= {o for n in gp.node for o in n.output}
        weights = self.model._weights()
        used = {x for n in gp.node for x in n.input} | {o.name for o in gp.output}
        for name in sorted(used - defined):
            if name not in weights:
                raise ModelError(f"{where}: value {name!r} is neither computed in the graph, "
                                 "one of its inputs, nor an initializer of the model")
            proto.graph.initializer.append(numpy_helper.from_array(weights[name], name))
        try:
            proto = onnx.shape_inference.infer_shapes(proto)
        except Exception:
            pass  # shape inference helps the gradient builder but is not required
        graph = build_graph(proto, where)
        expand_gradient_ops(graph)
        return graph

    def _check_bindings(self, binding: dict[str, str], outputs: list[str], what: str) -> None:
        targets = set(self.model.graph.initializers) | set(self.state)
        for key, value in binding.items():
            if key not in targets:
                raise ModelError(f"{self._where}.{what}: {key!r} is not an initializer of the "
                                 "model or of the algorithm graph")
            if value not in outputs:
                raise ModelError(f"{self._where}.{what}: {value!r} (bound to {key!r}) is not an "
                                 f"output of the graph; outputs are {outputs}")

    @staticmethod
    def _plan_for(graph) -> Plan:
        return Plan(graph, get_backend("cpu"), constants={}, fetch=graph.outputs)

    def _env(self, graph) -> dict[str, Any]:
        weights = self.model._weights()
        return {name: self.state[name] if name in self.state else weights.get(name, value)
                for name, value in graph.initializers.items()}

    def _apply(self, binding: dict[str, str], values: dict[str, np.ndarray]) -> None:
        weights = self.model._weights()
        for key, name in binding.items():
            value = np.asarray(values[name])
            store = self.state if key in self.state else weights
            current = store[key]
            if current.shape != value.shape:
                raise ModelError(f"{self._where}: output {name!r} has shape {list(value.shape)}, "
                                 f"but the initializer {key!r} it updates has {list(current.shape)}")
            current[...] = value.astype(current.dtype, copy=False)
        algorithm = self.model._proto.training_info[self.index].algorithm
        for tensor in algorithm.initializer:  # keep the saved state current
            tensor.CopyFrom(numpy_helper.from_array(self.state[tensor.name], tensor.name))

    # -- running -----------------------------------------------------------------------
    def initialize(self) -> dict[str, np.ndarray]:
        """Run the initialization graph and apply its bindings; returns its outputs."""
        if not self._info.HasField("initialization") or not self.initialization_binding:
            return {}
        graph = self._graph(self._info.initialization, f"{self._where}.initialization")
        self._check_bindings(self.initialization_binding, graph.outputs, "initialization_binding")
        values = self._plan_for(graph).run(self._env(graph))
        self._apply(self.initialization_binding, values)
        return {k: np.asarray(v) for k, v in values.items()}

    def step(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """One run of the algorithm graph; the update bindings are applied after it.

        Returns the algorithm graph's outputs (computed before the update).
        """
        env = self._env(self.algorithm)
        env.update(prepare_feeds(self.algorithm, feeds, get_backend("cpu"), self._where))
        values = self._plan.run(env)
        result = {k: np.array(v, copy=True) for k, v in values.items()}
        self._apply(self.update_binding, values)
        return result
