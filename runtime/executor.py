"""The planner and executor: a static schedule run over an array module.

A :class:`Plan` is made once per graph.  It resolves every node's kernel and
attributes, folds nodes whose inputs are all constants, binds constants
directly into the steps, and records after which step each value dies, so a
run does no lookups beyond its value table and frees each intermediate after
its last use.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from onnxgrad.backend import Backend
from onnxgrad.errors import ModelError, OnnxgradError, ShapeError
from onnxgrad.ir import Graph, Node
from onnxgrad.fusion import fuse_activations
from onnxgrad.ops import compiled, fused, lookup
from onnxgrad.profile import Profile
from onnxgrad.threads import begin, get_num_threads


class RunState:
    """What kernels may read about the current run (shared by a plan's steps)."""

    def __init__(self, seed: int | None = None, xp: Any = np):
        self.training = False
        #: Random numbers for kernels such as Dropout, on the run's device.
        self.rng = xp.random.default_rng(seed)
        #: New values for weights that a kernel computed in a training run
        #: (e.g. BatchNormalization's running statistics): initializer name ->
        #: array.  A training step writes them into the weights; other runs
        #: discard them.
        self.updates: dict[str, Any] = {}
        #: Names of nodes that run as in inference even in training runs.
        self.inference_nodes: frozenset[str] = frozenset()
        #: On a GPU, uniform numbers whose generator's position lives in device
        #: memory, so that a recorded step draws new numbers on each replay.
        self.draws = None if xp is np else fused.Draws(xp, seed)
        #: In data-parallel training, the communicator between the ranks, for kernels
        #: that reduce across them (see :mod:`onnxgrad.distributed`); else None.
        self.comm = None


class KernelContext:
    """The ``ctx`` a kernel receives when its signature asks for it."""

    __slots__ = ("state", "num_outputs", "node")

    def __init__(self, state: RunState, num_outputs: int, node: Node):
        self.state, self.num_outputs, self.node = state, num_outputs, node

    @property
    def training(self) -> bool:
        return self.state.training and self.node.name not in self.state.inference_nodes

    @property
    def rng(self) -> np.random.Generator:
        return self.state.rng

    def uniform(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """Uniform numbers in [0, 1) of ``shape``: from :attr:`rng` on the CPU, on a
        GPU from the run's :class:`~onnxgrad.ops.fused.Draws`."""
        draws = self.state.draws
        if draws is None:
            return self.state.rng.random(shape, dtype=dtype)
        return draws.random(shape, dtype)


class _Bound:
    """A constant bound into a step at plan time."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


@dataclass
class Step:
    node: Node
    kernel: Callable
    attrs: dict
    args: list  # value names, or _Bound constants
    host_args: tuple[int, ...]
    device_args: tuple[int, ...]
    outputs: list[str]
    free: tuple[str, ...]
    #: Inputs whose storage the kernel may take for its output (see :func:`_donated`).
    donors: tuple[int, ...] = ()


def device_args(args: list, host: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The indices of a step's arguments that are values of the run (names) and not
    read on the host."""
    return tuple(i for i, a in enumerate(args) if type(a) is str and i not in host)


class Plan:
    """An executable schedule for ``graph``.

    ``constants`` are values that never change between runs (folded and bound
    at plan time); every other initializer, and every graph input, is given
    to :meth:`run` in its ``env`` argument.  ``fetch`` names the values a run
    returns.
    """

    def __init__(self, graph: Graph, backend: Backend, *, constants: dict[str, np.ndarray],
                 fetch: Iterable[str], state: RunState | None = None,
                 shapes: dict[str, np.ndarray] | None = None,
                 handoff: dict[str, str] | None = None):
        self.graph = graph
        self.backend = backend
        self.fetch = list(fetch)
        self.state = state or RunState()
        consts: dict[str, Any] = dict(constants)
        nodes = graph.live_nodes(self.fetch)
        if shapes is None:
            #: Outputs of Shape nodes that depend on the input shapes alone; a run
            #: records them so that a plan specialised to those shapes can fold them.
            self.recordable = _shape_only_values(graph, nodes, consts)
        else:
            self.recordable = frozenset()
            consts.update(shapes)
        steps: list[Step] = []
        definitions = []
        for node in nodes:
            if node.outputs and all(o in consts or not o for o in node.outputs):
                continue  # computed at plan time (a recorded shape)
            definition = lookup(node.op_type, node.domain, node.opset, node.name)
            attrs = definition.resolve_attrs(node.attrs, node.name)
            if definition.wants_ctx:
                attrs["ctx"] = KernelContext(self.state, len(node.outputs), node)
            if not definition.wants_ctx and all(not x or x in consts for x in node.inputs):
                outs = self._call(node, definition.kernel, np,
                                  [consts[x] if x else None for x in node.inputs], attrs)
                for name, value in zip(node.outputs, outs):
                    if name:
                        consts[name] = value
                continue
            host = tuple(i for i in range(len(node.inputs)) if definition.is_host_input(i))
            args: list[Any] = []
            for i, x in enumerate(node.inputs):
                if not x:
                    args.append(_Bound(None))
                elif x in consts:
                    value = consts[x] if i in host else backend.asarray(consts[x])
                    args.append(_Bound(value))
                else:
                    args.append(x)
            steps.append(Step(node, definition.kernel, attrs, args, host, device_args(args, host),
                              list(node.outputs), ()))
            definitions.append(definition)
        self._fetch_consts = {f: consts[f] for f in self.fetch if f in consts}
        if backend.xp is np and compiled.available():
            scalars = frozenset(k for k, v in graph.initializers.items() if np.ndim(v) == 0)
            steps, definitions = fuse_activations(steps, definitions, set(self.fetch), scalars)
        steps, definitions = _hoist_views(steps, definitions)
        self.steps = self._assign_frees(steps, set(self.fetch))
        self._assign_donors(definitions)
        self._schedule_handoff(handoff or {})
        self._overlap = _Overlap(self.steps)

    def _assign_donors(self, definitions: list) -> None:
        """Mark the inputs each step's kernel may write its output into: inputs it
        declares reusable, computed by an earlier step (never a graph input or a
        weight), read once by the step and dying there."""
        made: set[str] = set()
        for step, definition in zip(self.steps, definitions):
            if definition is not None and definition.reuse:
                names = [a for a in step.args if type(a) is str]
                step.donors = tuple(
                    i for i, a in enumerate(step.args)
                    if type(a) is str and a in made and a in step.free
                    and names.count(a) == 1 and i not in step.host_args
                    and definition.is_reusable(i))
            made.update(o for o in step.outputs if o)

    def _schedule_handoff(self, handoff: dict[str, str]) -> None:
        """Where each fetched value of ``handoff`` (value → the weight it belongs to,
        e.g. a gradient) can be handed over in a run with ``on_ready``: after the
        step that computes it, and after the last step that reads its weight, so
        that the receiver may change the weight in place."""
        self.handoff = dict(handoff)
        self._handoff_at: list[list[tuple[str, str]]] = [[] for _ in self.steps]
        self._handoff_end: list[tuple[str, str]] = []
        made: dict[str, int] = {}
        last_read: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            for o in step.outputs:
                made[o] = index
            for a in step.args:
                if type(a) is str:
                    last_read[a] = index
        for value, weight in self.handoff.items():
            if value not in made:  # folded to a constant: handed over after the run
                self._handoff_end.append((value, weight))
                continue
            index = max(made[value], last_read.get(weight, -1), last_read.get(value, -1))
            self._handoff_at[index].append((value, weight))

    @staticmethod
    def _assign_frees(steps: list[Step], keep: set[str]) -> list[Step]:
        last_use: dict[str, int] = {}
        for index, step in enumerate(steps):
            for a in step.args:
                if isinstance(a, str):
                    last_use[a] = index
            for o in step.outputs:
                last_use.setdefault(o, index)  # an output nobody reads dies at once
        frees: list[list[str]] = [[] for _ in steps]
        for name, index in last_use.items():
            if name not in keep:
                frees[index].append(name)
        for step, free in zip(steps, frees):
            step.free = tuple(free)
        return steps

    # -- running --------------------------------------------------------------------------
    def run(self, env: dict[str, Any], profile: Profile | None = None,
            record: dict[str, np.ndarray] | None = None,
            on_ready: Callable[[str, Any], None] | None = None,
            before_handoff: Callable[[dict[str, Any]], None] | None = None,
            inspect: Callable[[Node, list, tuple], None] | None = None) -> dict[str, Any]:
        """Run the schedule; ``env`` maps graph inputs and weights to device arrays.

        ``env`` is consumed: intermediates are added to it and removed after
        their last use.  Returns the fetched values (device arrays).  With a
        ``profile``, each kernel is timed (on a GPU, synchronously).  With
        ``record``, the values of :attr:`recordable` are stored there.  With
        ``on_ready``, each value of :attr:`handoff` is instead passed to
        ``on_ready(weight, value)`` as soon as no later step reads its weight
        (see :meth:`_schedule_handoff`), and left out of the result; ``before_handoff(env)``
        is called once before the first of those (it may raise to stop the run before
        any weight changes).  ``inspect(node, output names, outputs)`` sees every node's
        results as they are made (anomaly detection).
        """
        deferred: list[tuple[str, Any]] = []
        if on_ready is not None:  # liveness drops weights from env; keep them for _viewed
            weights = {w: env.get(w) for w in self.handoff.values()}
        xp = self.backend.xp
        to_host = self.backend.to_host
        on_device = xp is not np
        if profile is not None:
            sync = self.backend.synchronize
            sync()
        overlap = self._overlap
        side, seconds = (frozenset(), None) if on_device or profile is not None else overlap.begin()
        sides = _SideRun(self, side, xp) if side else None
        handoff_ready = before_handoff

        def settle(step: Step, outs: tuple) -> None:
            """A step's outputs into the value table."""
            if inspect is not None:
                inspect(step.node, step.outputs, outs)
            for name, value in zip(step.outputs, outs):
                if name:
                    env[name] = value
                    if record is not None and name in self.recordable:
                        record[name] = to_host(value)

        def release(index: int, step: Step) -> None:
            """What follows a step: the values it read last are freed, and the values
            due then are handed over (once no side step is queued or running)."""
            for name in step.free:
                env.pop(name, None)
            if on_ready is not None and self._handoff_at[index]:
                if sides is not None and sides.busy:
                    sides.handoffs.append(index)
                else:
                    hand_over(index)

        def hand_over(index: int) -> None:
            nonlocal handoff_ready
            if handoff_ready is not None:
                handoff_ready(env)
                handoff_ready = None
            for name, weight in self._handoff_at[index]:
                if _viewed(env, weights[weight]):  # a live view still reads the weight
                    deferred.append((weight, env.pop(name)))
                else:
                    on_ready(weight, env.pop(name))

        def take(now: int) -> None:
            """The effects of the side steps that have finished, the plan being at step
            ``now``; then, if the side is idle, the hand-overs that waited for it."""
            for j, (outs, error) in sides.take():
                if error is not None:
                    raise error
                settle(self.steps[j], outs)
                if now > j:
                    release(j, self.steps[j])
                else:
                    sides.joined.add(j)
            if sides.handoffs and not sides.busy:
                waiting, sides.handoffs = sides.handoffs, []
                for index in sorted(waiting):
                    hand_over(index)
            sides.release_if_idle()

        begun = time.perf_counter()
        try:
            for index, step in enumerate(self.steps):
                try:
                    if sides is not None:
                        take(index)
                        for j in sides.starts.get(index, ()):
                            sides.submit(j, env)
                        if index in sides.started:  # its effects come when it is taken
                            if index in sides.joined:
                                release(index, step)
                            continue
                    args = self._gather(step, env)
                    attrs = step.attrs
                    if step.donors:
                        out = _donated(args, step.donors)
                        if out is not None:
                            attrs = {**attrs, "out": out}
                        out = None
                    if profile is not None:
                        start = time.perf_counter()
                        outs = self._call(step.node, step.kernel, xp, args, attrs)
                        sync()
                        profile.add(step.node.name, step.node.op_type, time.perf_counter() - start)
                    elif seconds is not None:
                        start = time.perf_counter()
                        outs = self._call(step.node, step.kernel, xp, args, attrs)
                        seconds[index] = time.perf_counter() - start
                    else:
                        outs = self._call(step.node, step.kernel, xp, args, attrs)
                    settle(step, outs)
                    # Hold no array past its step: env's references are the ones _donated counts.
                    args = attrs = outs = None
                    release(index, step)
                except Exception as exc:
                    _blame(exc, step.node)
                    raise
            if sides is not None:
                sides.wait()
                take(len(self.steps))
        finally:
            if sides is not None:
                sides.wait_quietly()
        if not on_device and profile is None:
            overlap.end(time.perf_counter() - begun)
        before_handoff = handoff_ready
        if on_ready is not None:
            if before_handoff is not None and (deferred or self._handoff_end):
                before_handoff(env)
            for weight, value in deferred:
                on_ready(weight, value)
            for name, weight in self._handoff_end:
                on_ready(weight, self.backend.asarray(self._fetch_consts[name]))
        result = {}
        for f in self.fetch:
            if on_ready is not None and f in self.handoff:
                continue
            if f in env:
                result[f] = env[f]
            elif f in self._fetch_consts:
                result[f] = self.backend.asarray(self._fetch_consts[f])
            else:
                raise ModelError(f"value {f!r} is not computed by graph {self.graph.name!r}")
        return result

    def _alone(self, step: Step, args: list, xp: Any) -> tuple:
        """Run a side step: its kernel on its arguments, with no donated storage; an
        error names the step's node."""
        try:
            return self._call(step.node, step.kernel, xp, args, step.attrs)
        except Exception as exc:
            _blame(exc, step.node)
            raise

    def _gather(self, step: Step, env: dict[str, Any]) -> list:
        """A step's arguments: values from ``env``, bound constants, host inputs on the
        host and, on a device, shape values as device tensors."""
        args = [env[a] if type(a) is str else a.value for a in step.args]
        for i in step.host_args:
            if args[i] is not None:
                args[i] = self.backend.to_host(args[i])
        if self.backend.xp is not np:  # shape values computed on the host, read as tensors
            for i in step.device_args:
                if isinstance(args[i], np.ndarray):
                    args[i] = self.backend.asarray(args[i])
        return args

    @staticmethod
    def _call(node: Node, kernel: Callable, xp: Any, args: list, attrs: dict) -> tuple:
        try:
            return kernel(xp, *args, **attrs)
        except OnnxgradError:
            raise
        except (ValueError, IndexError, TypeError, ZeroDivisionError, OverflowError,
                ArithmeticError, KeyError, AttributeError) as exc:
            # A kernel given inputs or attributes the model should not have (a string
            # tensor where numbers go, a zero stride, an axis out of range…).
            raise ShapeError(f"node {node.name!r} ({node.op_type}) failed on inputs "
                             f"[{_describe(args)}]: {type(exc).__name__}: {exc}") from exc
        except MemoryError as exc:
            raise ShapeError(f"node {node.name!r} ({node.op_type}): its result does not fit in "
                             f"memory for inputs [{_describe(args)}]") from exc


#: Ops whose outputs are views of their input (or, for a Reshape of a strided array,
#: a copy of the same size): :func:`_hoist_views` moves them early.
_VIEW_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def _hoist_views(steps: list[Step], definitions: list) -> tuple[list[Step], list]:
    """The schedule with each view step (:data:`_VIEW_OPS`, standard domain) moved to
    just after the step that makes the last of its inputs.

    A gradient rule writes its shape ops next to the product that needs them, e.g.
    a product's input gradient, two Reshapes, then its weight gradient; hoisted,
    the Reshapes no longer stand between the two products, which can then run at
    the same time (see :class:`_Overlap`).  A view holds its input's storage, which
    must live until the view's original place anyway, so memory stays the same.

    Each step gets a sort key: ``(i,)`` for step ``i`` that stays, the key of the
    step it follows plus ``(i,)`` for a view; the schedule is the steps by key."""
    keys: list[tuple] = []
    made_by: dict[str, tuple] = {}  # value -> key of the step making it
    for index, step in enumerate(steps):
        if step.node.op_type in _VIEW_OPS and not step.node.domain:
            key = max((made_by[a] for a in step.args if type(a) is str and a in made_by),
                      default=(-1,)) + (index,)
        else:
            key = (index,)
        keys.append(key)
        for name in step.outputs:
            if name:
                made_by[name] = key
    order = sorted(range(len(steps)), key=keys.__getitem__)
    return [steps[i] for i in order], [definitions[i] for i in order]


class _Overlap:
    """Which steps of a plan run on a second thread while the plan goes on.

    Small kernels gain little from splitting their work: handing a part to
    another thread costs tens of microseconds.  Independent kernels, each whole
    on its own thread, keep two cores busy instead: above all the weight
    gradients of a backward pass, which no step reads (the optimizer takes
    them), beside the chain of input gradients that every later step waits
    for.  Such a *side step* ``j``, one whose outputs no step reads and that
    takes no kernel context (random numbers and running statistics keep their
    order), is queued as soon as the plan reaches :attr:`start` ``[j]`` (the
    step after the last one making its inputs, at most :data:`WINDOW` steps
    before ``j``); the pool's first helper thread runs the queue in order
    (:func:`~onnxgrad.threads.begin`), and the plan goes on without it, its
    kernels splitting their work over the other helpers.

    A side step's effects on the run come when the plan takes its result, at
    a later step or at the end: its outputs enter the value table then; the
    values it was the last to read are freed, and the values due to be handed
    over after it are handed over, at the later of then and its own turn.
    Hand-overs due while side steps are queued or running wait until none is,
    so that no weight changes while a side step may read it.  A side step
    runs with no donated storage, and while its arguments are held for it no
    other step can take their storage either (:func:`_donated` counts
    references).

    Whether side steps pay is measured on the CPU, on a plan's own runs:
    :data:`ROUNDS` runs from run :data:`CALIBRATION` on time every step; the
    side steps that, by those times, would hide enough of their time behind the
    plan's other steps (:meth:`_choose`) run on the side in every other run of
    the next 2 × :data:`ROUNDS`, and from then on if the best of those runs took
    at most :data:`GAIN` of the best of the runs between, without them (runs in
    turn see the same moods of a shared machine).  Results do not depend on it:
    kernels split their work by shape alone (a nested split runs in the
    kernel's own thread), and a side step computes what it computes in turn.
    """

    CALIBRATION = 2
    ROUNDS = 3
    WINDOW = 8
    MIN_SECONDS = 50e-6
    HIDDEN = 0.25
    GAIN = 0.97

    def __init__(self, steps: list):
        made: dict[str, int] = {}
        readers: dict[str, list[int]] = {}
        for index, step in enumerate(steps):
            for a in step.args:
                if type(a) is str:
                    readers.setdefault(a, []).append(index)
            for name in step.outputs:
                if name:
                    made[name] = index
        #: Side step -> the first step at which it may start.
        self.start: dict[int, int] = {}
        for j, step in enumerate(steps):
            if "ctx" in step.attrs or any(readers.get(name) for name in step.outputs if name):
                continue  # a kernel context, or a step reads its outputs
            inputs = [made[a] for a in step.args if type(a) is str and a in made]
            self.start[j] = max([j - self.WINDOW, 0] + [i + 1 for i in inputs])
        self.count = len(steps)
        self.runs = 0
        self.seconds: list[float] | None = None  # per step, the best of the timed runs
        self.walls: dict[str, float] = {}        # phase -> its best run
        self.trial: frozenset[int] | None = None
        self.side: frozenset[int] = frozenset()  # the side steps that paid
        self._timing: list[float] | None = None

    def _phase(self) -> str:
        first = self.runs - self.CALIBRATION
        if 0 <= first < self.ROUNDS:
            return "time"
        if self.ROUNDS <= first < 3 * self.ROUNDS:
            return "try" if (first - self.ROUNDS) % 2 == 0 else "without"
        return "run"

    def begin(self) -> tuple[frozenset[int], list[float] | None]:
        """This run's side steps, and a list to time each step into (or None)."""
        self.runs += 1
        if not self.start or get_num_threads() < 2:
            return frozenset(), None
        phase = self._phase()
        if phase == "time":
            self._timing = [0.0] * self.count
            return frozenset(), self._timing
        if phase in ("try", "without") and self.seconds is not None:
            if self.trial is None:
                self.trial = self._choose(self.seconds)
            return (self.trial if phase == "try" else frozenset()), None
        return self.side, None

    def _finish(self, t: list[float], side: set[int]) -> float:
        """When a run with these step times and these side steps would end: the plan's
        thread runs the other steps one after another, the helper the side steps
        in the order they are queued, each once it is queued and the helper free."""
        plan = helper = 0.0
        queued = sorted(side, key=lambda j: (self.start[j], j))
        for index in range(self.count):
            while queued and self.start[queued[0]] == index:
                j = queued.pop(0)
                helper = max(helper, plan) + t[j]
            if index not in side:
                plan += t[index]
        return max(plan, helper)

    def _choose(self, t: list[float]) -> frozenset[int]:
        """The side steps to try: in order, each that took :data:`MIN_SECONDS` or more
        and, with the times measured, would hide at least :data:`HIDDEN` of its time
        behind the plan's other steps (:meth:`_finish`)."""
        side: set[int] = set()
        end = self._finish(t, side)
        for j in sorted(self.start):
            if t[j] < self.MIN_SECONDS:
                continue
            with_j = self._finish(t, side | {j})
            if with_j <= end - self.HIDDEN * t[j]:
                side.add(j)
                end = with_j
        return frozenset(side)

    def end(self, seconds: float) -> None:
        """Record what a run (that :meth:`begin` started and that finished) measured:
        its steps' times, or ``seconds``, its own."""
        if not self.start or get_num_threads() < 2:
            return
        phase = self._phase()
        if self._timing is not None:
            t, self._timing = self._timing, None
            self.seconds = t if self.seconds is None else list(map(min, self.seconds, t))
        if phase in ("try", "without"):
            self.walls[phase] = min(seconds, self.walls.get(phase, math.inf))
        if self.runs == self.CALIBRATION + 3 * self.ROUNDS - 1 and self.trial:
            if self.walls.get("try", math.inf) <= self.GAIN * self.walls.get("without", 0.0):
                self.side = self.trial


class _SideRun:
    """The side steps of one run (see :class:`_Overlap`): one helper thread runs them
    one after another, in the order they became ready, while the plan goes on."""

    def __init__(self, plan: "Plan", side: frozenset[int], xp: Any):
        self.plan, self.xp = plan, xp
        self.starts: dict[int, list[int]] = {}
        for j in sorted(side):
            self.starts.setdefault(plan._overlap.start[j], []).append(j)
        self.started: set[int] = set()
        self.joined: set[int] = set()            # joined before their turn
        self.handoffs: list[int] = []            # steps whose hand-overs wait for the side
        self.finished: dict[int, tuple] = {}     # step -> (outputs, error), not yet taken
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._active = False                     # the helper is taking steps from the queue
        self._worker: Any = None                 # its Running

    def submit(self, j: int, env: dict[str, Any]) -> None:
        """Queue side step ``j`` (its arguments are taken now) and make sure the helper
        runs."""
        step = self.plan.steps[j]
        with self._lock:
            self._queue.append((j, step, self.plan._gather(step, env)))
            self.started.add(j)
            if self._active:
                return
            self._active = True
        if self._worker is not None:
            self._worker.result()  # the last helper task, returning
        self._worker = begin(self._work)

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._active = False
                    return
                j, step, args = self._queue.popleft()
            try:
                result = (self.plan._alone(step, args, self.xp), None)
            except Exception as exc:  # raised in the plan's thread when taken
                result = (None, exc)
            args = None
            with self._lock:
                self.finished[j] = result
            result = None

    def take(self) -> list[tuple[int, tuple]]:
        """The side steps that have finished since the last call, in order."""
        with self._lock:
            done = sorted(self.finished.items())
            self.finished.clear()
        return done

    @property
    def busy(self) -> bool:
        """Whether side steps are queued or running."""
        return self._active

    def release_if_idle(self) -> None:
        """Once the helper has found its queue empty, wait for its task to return: the
        pool's first helper, held until then, takes the split kernels' parts of the
        steps that follow again (with two threads, the only helper)."""
        if self._worker is not None and not self._active:
            self.wait()

    def wait(self) -> None:
        """Wait until every queued side step has run."""
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.result()

    def wait_quietly(self) -> None:
        """:meth:`wait`, after a run that failed: the run's own error is the one raised."""
        with self._lock:
            self._queue.clear()
        try:
            self.wait()
        except Exception:
            pass


class ShapeSpecializedRunner:
    """Runs a graph through plans specialised to the shapes of its inputs.

    The first run with new input shapes goes through the generic plan and
    records the values of its shape-only subgraphs (Shape → Gather → Concat →
    Reshape arithmetic); later runs with the same shapes use a plan in which
    those subgraphs are folded into constants.  The ``limit`` most recently
    used specialisations are kept.
    """

    def __init__(self, make_plan: Callable[[dict | None], "Plan"], inputs: Iterable[str],
                 limit: int = 8):
        self._make_plan = make_plan
        self.generic = make_plan(None)
        self._inputs = tuple(inputs)
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._limit = limit

    @property
    def backend(self) -> Backend:
        return self.generic.backend

    def run(self, env: dict[str, Any], profile: Profile | None = None,
            on_ready: Callable[[str, Any], None] | None = None,
            before_handoff: Callable[[dict[str, Any]], None] | None = None,
            inspect: Callable[[Node, list, tuple], None] | None = None) -> dict[str, Any]:
        if not self.generic.recordable:
            return self.generic.run(env, profile, on_ready=on_ready,
                                    before_handoff=before_handoff, inspect=inspect)
        signature = tuple(_shape_key(env[name]) for name in self._inputs)
        plan = self._plans.get(signature)
        if plan is not None:
            self._plans.move_to_end(signature)
            return plan.run(env, profile, on_ready=on_ready, before_handoff=before_handoff,
                            inspect=inspect)
        recorded: dict[str, np.ndarray] = {}
        result = self.generic.run(env, profile, recorded, on_ready, before_handoff, inspect)
        self._plans[signature] = self._make_plan(recorded)
        if len(self._plans) > self._limit:
            self._plans.popitem(last=False)
        return result


def _describe(args: list) -> str:
    return ", ".join(
        "None" if a is None else f"{getattr(a, 'dtype', type(a).__name__)}"
        f"{list(getattr(a, 'shape', ()))}" for a in args)


def _blame(exc: BaseException, node: Node) -> None:
    """Note on ``exc`` the node that raised it (read when a recorded step fails)."""
    if getattr(exc, "onnxgrad_node", None) is None:
        try:
            exc.onnxgrad_node = node
        except AttributeError:  # an exception type without attributes of its own
            pass


def _references(args: list, i: int) -> int:
    """sys.getrefcount of ``args[i]``, as :func:`_donated` sees it."""
    value = args[i]
    return sys.getrefcount(value)


def _unshared_references() -> int | None:
    """What :func:`_references` counts for an array that only a run holds (its
    ``env`` entry and the step's argument list), measured rather than assumed:
    interpreters differ in which references they count.  None where the count
    cannot tell (then no storage is reused)."""
    probe = np.empty(1)
    env, args = {"probe": probe}, [probe]
    del probe
    alone = _references(args, 0)
    view = env["probe"][:]  # one more holder must show
    shared = _references(args, 0)
    del view
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        return None  # free-threaded CPython: reference counts are not exact
    return alone if shared > alone >= 2 else None


#: See :func:`_unshared_references`.
_UNSHARED_REFS = _unshared_references()


def _donated(args: list, donors: tuple[int, ...]) -> Any:
    """The first donor argument whose storage nothing else can see, or None.

    A donor dies at this step, but the same array may live on under another
    name (Identity returns its input), as the base of a live view, or in the
    caller's hands (a feed, a weight): each of those holds a reference, so an
    array is given to the kernel only when the run's own references are all
    there are."""
    if _UNSHARED_REFS is None:
        return None
    for i in donors:
        if _references(args, i) > _UNSHARED_REFS:
            continue
        value = args[i]
        flags = getattr(value, "flags", None)
        if flags is not None and flags.owndata and getattr(flags, "writeable", True):
            return value
    return None


def _owner(array: Any) -> Any:
    """The array that owns ``array``'s memory (itself unless it is a view)."""
    while True:
        base = getattr(array, "base", None)
        if base is None or not hasattr(base, "shape"):
            return array
        array = base


def _viewed(env: dict[str, Any], weight: Any) -> bool:
    """Whether a value in ``env`` (or in a sequence there) is ``weight`` or a view
    of it (e.g. Identity's output, or a Transpose of it)."""
    if weight is None:
        return False
    owner = _owner(weight)
    for value in env.values():
        for item in (value if type(value) in (list, tuple) else (value,)):
            if item is weight or item is owner:
                return True
            base = getattr(item, "base", None)  # None for arrays that own their memory
            if base is not None and _owner(base) is owner:
                return True
    return False


def _shape_key(value: Any) -> Any:
    """An input's part of a specialisation's key: its shape; for a sequence (a list), its
    elements' shapes; None for an empty optional; for a map (a dict), its size."""
    if value is None:
        return None
    if isinstance(value, dict):
        return ("map", len(value))
    if isinstance(value, (list, tuple)):
        return ("sequence",) + tuple(_shape_key(v) for v in value)
    return tuple(value.shape)


#: Ops whose output shapes depend on the values of their (non-host) inputs.
_DATA_DEPENDENT_SHAPES = frozenset({
    "NonZero", "Unique", "Compress", "NonMaxSuppression", "Loop", "If", "Scan", "StringSplit",
    "SplitToSequence", "SequenceAt", "SequenceConstruct", "SequenceInsert", "SequenceErase",
    "ConcatFromSequence", "RegexFullMatch",
})


def _shape_only_values(graph: Graph, nodes: list[Node], consts: dict[str, Any]) -> frozenset[str]:
    """Outputs of Shape/Size nodes whose values follow from the graph's input shapes.

    A value's shape is fixed by the input shapes when it is an input, an
    initializer or a constant, or when its op's output shape depends only on
    its inputs' shapes and the *values* of its host inputs (shapes, axes), and
    those values are themselves fixed by the input shapes.
    """
    shape_known = set(graph.inputs) | set(graph.initializers) | set(consts)
    value_known = set(consts)
    found = set()
    for node in nodes:
        ins = [x for x in node.inputs if x]
        definition = lookup(node.op_type, node.domain, node.opset, node.name)
        if node.domain == "" and node.op_type in ("Shape", "Size") and ins[0] in shape_known:
            found.update(o for o in node.outputs if o)
            value_known.update(node.outputs)
            shape_known.update(node.outputs)
        elif all(x in value_known for x in ins) and not definition.wants_ctx:  # also Constant
            value_known.update(node.outputs)
            shape_known.update(node.outputs)
        elif node.op_type not in _DATA_DEPENDENT_SHAPES and all(
                (x in value_known) if definition.is_host_input(i) else (x in shape_known)
                for i, x in enumerate(node.inputs) if x):
            shape_known.update(node.outputs)
    return frozenset(found)
