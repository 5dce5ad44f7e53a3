"""The Model: a loaded ONNX graph with its weights, for inference and export."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx

from onnxgrad.backend import Backend, get_backend
from onnxgrad.errors import DataError, ModelError
from onnxgrad.executor import Plan, ShapeSpecializedRunner
from onnxgrad.exporter import save_atomic, with_weights
from onnxgrad.ir import Graph, ValueInfo
from onnxgrad.loader import load_model


def is_weight(array: np.ndarray) -> bool:
    """Floating-point initializers are weights; the others (shapes, indices) are constants."""
    return np.issubdtype(array.dtype, np.floating)


def trained_by_default(array: np.ndarray) -> bool:
    """Whether a weight is trained when no ``trainable`` names are given.

    Single-element weights are not: exporters store scales, epsilons and the
    constants of GELU (0.5, √2) as one-element initializers, which PyTorch
    never trains.  Name such a weight in ``trainable`` to train it.
    """
    return is_weight(array) and array.size > 1


class Model:
    """An ONNX model loaded by onnxgrad.

    ``graph`` is the IR; its initializers hold the current weights.  The
    original ModelProto (without its weights) is kept so that :meth:`save`
    writes the same graph back, with nodes, names, opsets and metadata intact.
    """

    def __init__(self, proto: onnx.ModelProto, graph: Graph, path: str | None = None):
        self._proto = proto
        self.graph = graph
        self.path = path
        self._runners: dict[tuple[str, ...], ShapeSpecializedRunner] = {}
        #: Called before weights are read, by a trainer that keeps them on a device.
        self._pull_weights: Callable[[], None] | None = None
        #: Called with the names :meth:`set_parameters` changed (a trainer's device copies).
        self._on_set_parameters: Callable[[list[str]], None] | None = None

    def __repr__(self) -> str:
        where = f" from {self.path!r}" if self.path else ""
        return (f"<onnxgrad.Model{where}: {len(self.graph.nodes)} nodes, "
                f"inputs {self.graph.inputs}, outputs {self.graph.outputs}>")

    @property
    def where(self) -> str:
        return self.path or "<ModelProto>"

    # -- weights -------------------------------------------------------------------
    def _weights(self) -> dict[str, np.ndarray]:
        if self._pull_weights is not None:
            self._pull_weights()
        return self.graph.initializers

    def parameters(self) -> dict[str, np.ndarray]:
        """Every initializer by name, as a copy."""
        return {k: v.copy() for k, v in self._weights().items()}

    def set_parameters(self, values: Mapping[str, Any]) -> None:
        """Give initializers new values (e.g. weights trained elsewhere), in place: each
        name must be an initializer of the model and each value have its shape; values
        are cast to the initializer's element type within a kind (float to float, int to
        int).  Nothing changes if any value is refused.  A trainer of this model sees
        the new values."""
        weights = self._weights()
        checked = {}
        for name, value in values.items():
            if name not in weights:
                raise DataError(f"{self.where}: {name!r} is not an initializer of the model; "
                                f"initializers are {_names_preview(weights)}")
            array = np.asarray(value)
            target = weights[name]
            if array.shape != target.shape:
                raise DataError(f"{self.where}: {name!r} has shape {list(target.shape)}, "
                                f"got a value of shape {list(array.shape)}")
            if _kind(array.dtype) != _kind(target.dtype):
                raise DataError(f"{self.where}: {name!r} holds {target.dtype}, got a value of "
                                f"element type {array.dtype}")
            checked[name] = array
        for name, array in checked.items():
            weights[name][...] = array
        if self._on_set_parameters is not None:
            self._on_set_parameters(list(checked))

    def save(self, path: str | os.PathLike) -> None:
        """Write the original graph with the current weights, atomically."""
        save_atomic(with_weights(self._proto, self._weights()), path)

    def to_proto(self) -> onnx.ModelProto:
        """The original ModelProto with the current weights."""
        return with_weights(self._proto, self._weights())

    # -- inference -------------------------------------------------------------------
    def run(self, feeds: Mapping[str, Any], outputs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Inference: ``{input name: array}`` -> ``{output name: array}``.

        ``outputs`` may name any value of the graph (default: the graph outputs).
        Dropout is off and normalisation uses running statistics.  A sequence
        value (fed or returned) is a Python list of arrays; an empty optional is
        ``None``; a map is a dict (int or str keys, scalar values), so ZipMap's
        ``seq(map)`` is a list of dicts, as onnxruntime returns it.
        """
        fetch = tuple(self.graph.outputs if outputs is None else outputs)
        known = self.graph.all_names()
        for name in fetch:
            if name not in known:
                raise ModelError(f"{self.where}: the graph has no value named {name!r}")
        runner = self._runners.get(fetch)
        if runner is None:
            backend = get_backend("cpu")
            runner = self._runners[fetch] = ShapeSpecializedRunner(
                lambda shapes: self.make_plan(self.graph, backend, fetch, shapes=shapes),
                self.graph.inputs)
        env = dict(self._weights())
        env.update(prepare_feeds(self.graph, feeds, runner.backend, self.where))
        result = runner.run(env)
        return {name: host_value(result[name]) for name in fetch}

    @staticmethod
    def make_plan(graph: Graph, backend: Backend, fetch: Iterable[str], state=None,
                  weights: Iterable[str] | None = None, shapes=None, handoff=None) -> Plan:
        """A plan that reads ``weights`` (default: the floating-point initializers) at run
        time and binds every other initializer as a constant; ``shapes`` are recorded
        shape values of a specialisation, ``handoff`` maps fetched values to the
        weights they update (see :class:`~onnxgrad.executor.Plan`)."""
        if weights is None:
            weights = [k for k, v in graph.initializers.items() if is_weight(v)]
        weights = set(weights)
        constants = {k: v for k, v in graph.initializers.items() if k not in weights}
        return Plan(graph, backend, constants=constants, fetch=fetch, state=state, shapes=shapes,
                    handoff=handoff)


def load(source: str | os.PathLike | onnx.ModelProto) -> Model:
    """Load an ONNX model from a path or a ``ModelProto``."""
    proto, graph, path = load_model(source)
    return Model(proto, graph, path)


def prepare_feeds(graph: Graph, feeds: Mapping[str, Any], backend: Backend, where: str,
                  extra: Iterable[str] = ()) -> dict[str, Any]:
    """Check feeds against the graph's inputs; cast within a kind; move to the device.

    ``extra`` names inputs that the caller feeds itself (e.g. a loss target).
    A sequence input takes a list (or tuple) of arrays, an optional input
    ``None`` when empty, a map input a dict.
    """
    if not isinstance(feeds, Mapping):
        raise DataError(f"{where}: feeds must be a dict of input name -> array, "
                        f"got {type(feeds).__name__}")
    extra = set(extra)
    expected = [n for n in graph.inputs if n not in extra]
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise DataError(f"{where}: missing input(s) {missing}; the model's inputs are {expected}")
    unknown = [k for k in feeds if k not in expected]
    if unknown:
        raise DataError(f"{where}: unknown input(s) {unknown}; the model's inputs are {expected}")
    out = {}
    for name in expected:
        info = graph.info.get(name)
        if info is None or info.kind == "tensor":
            out[name] = backend.asarray(check_array(graph, name, feeds[name], where))
        else:
            out[name] = _feed_value(info, name, feeds[name], backend, where)
    return out


def _feed_value(info: ValueInfo | None, label: str, value: Any, backend: Backend,
                where: str) -> Any:
    """A sequence or optional feed (or an element of one), checked against ``info``."""
    kind = "tensor" if info is None else info.kind
    if kind == "optional":
        return None if value is None else _feed_value(info.element, label, value, backend, where)
    if kind == "sequence":
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{where}: input {label!r} is a sequence: expected a list of arrays, "
                            f"got {type(value).__name__}")
        return [_feed_value(info.element, f"{label}[{i}]", v, backend, where)
                for i, v in enumerate(value)]
    if kind == "map":
        return _feed_map(info, label, value, where)
    if value is None:
        raise DataError(f"{where}: input {label!r} expects a tensor, got None")
    dtype, shape = (None, None) if info is None else (info.dtype, info.shape)
    return backend.asarray(_check_tensor(label, value, dtype, shape, where))


def _feed_map(info: ValueInfo, label: str, value: Any, where: str) -> dict:
    """A map feed: a dict whose keys fit the map's key type (int64 or string) and whose
    values are scalars of its value type, held as NumPy scalars of that type (see
    :mod:`onnxgrad.ops.ml_maps`)."""
    if not isinstance(value, Mapping):
        raise DataError(f"{where}: input {label!r} is a map: expected a dict, "
                        f"got {type(value).__name__}")
    strings = info.key is not None and info.key.kind in "OSU"
    element = info.element
    want = element.dtype if element is not None and element.kind == "tensor" else None
    out = {}
    for key, v in value.items():
        if isinstance(key, bytes):
            key = key.decode("utf-8")
        if info.key is not None and (isinstance(key, str) != strings or isinstance(key, bool)
                                     or not isinstance(key, (str, int, np.integer))):
            raise DataError(f"{where}: input {label!r} is a map with "
                            f"{'string' if strings else 'integer'} keys, got key {key!r}")
        key = key if isinstance(key, str) else int(key)
        if np.ndim(v) or want is None:
            v = _check_tensor(f"{label}[{key!r}]", v, want, None, where)
        elif want.kind in "OSU":
            if not isinstance(v, (str, bytes, np.str_, np.bytes_)):
                raise DataError(f"{where}: input {label!r} is a map of strings, got value "
                                f"{v!r} for key {key!r}")
            v = v.decode("utf-8") if isinstance(v, bytes) else str(v)
        else:
            if isinstance(v, (str, bytes)) or (want.kind in "iu" and _kind(np.asarray(v).dtype)
                                               != "integer"):
                raise DataError(f"{where}: input {label!r} is a map of {want}, got value {v!r} "
                                f"for key {key!r}")
            v = want.type(v)
        out[key] = v
    return out


def host_value(value: Any) -> Any:
    """A result of a CPU run as the API returns it: a NumPy array, a list of them for a
    sequence, None for an empty optional, a dict for a map (its values Python scalars, as
    onnxruntime gives them)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [host_value(v) for v in value]
    if isinstance(value, dict):
        return {k: v.item() if isinstance(v, np.generic) else
                v if isinstance(v, (str, int, float)) else host_value(v)
                for k, v in value.items()}
    return np.asarray(value)


def _kind(dtype: np.dtype) -> str:
    if np.issubdtype(dtype, np.floating):
        return "float"
    if np.issubdtype(dtype, np.integer):
        return "integer"
    return dtype.kind


def check_array(graph: Graph, name: str, value: Any, where: str) -> Any:
    """``value`` with the element type and a shape that fit input ``name``."""
    return _check_tensor(name, value, graph.dtype(name), graph.shape(name), where)


def _check_tensor(name: str, value: Any, want: np.dtype | None, shape: tuple | None,
                  where: str) -> Any:
    if not hasattr(value, "dtype"):
        value = np.asarray(value)
    if want is not None and value.dtype != want:
        if _kind(value.dtype) != _kind(want):
            raise DataError(f"{where}: input {name!r} expects element type {want}, "
                            f"got {value.dtype}")
        value = value.astype(want)
    if shape is not None:
        got = tuple(value.shape)
        fits = len(got) == len(shape) and all(
            not isinstance(d, int) or d == g for d, g in zip(shape, got))
        if not fits:
            want_s = "[" + ", ".join("?" if not isinstance(d, int) else str(d) for d in shape) + "]"
            raise DataError(f"{where}: input {name!r} expects shape {want_s}, got {list(got)}")
    return value


def _names_preview(names, limit: int = 8) -> str:
    names = list(names)
    more = f" … ({len(names) - limit} more)" if len(names) > limit else ""
    return "[" + ", ".join(repr(n) for n in names[:limit]) + more + "]"


#: Rows checked at a time for NaN and infinity (memory-mapped arrays stream through).
FINITE_ROWS = 1 << 16


def check_finite(array: Any, what: str) -> None:
    """Refuse NaN or infinite values in ``array`` (``what`` names it), naming the first
    row that holds one."""
    if getattr(array, "dtype", None) is None or array.dtype.kind not in "fc":
        return
    for start in range(0, len(array), FINITE_ROWS):
        block = np.asarray(array[start:start + FINITE_ROWS])
        bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if bad.any():
            row = start + int(np.argmax(bad))
            values = block[row - start].reshape(-1)
            raise DataError(f"{what} holds {values[~np.isfinite(values)][0]} at row {row}; "
                            "training data must be finite")
