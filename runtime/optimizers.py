"""Optimizers that match ``torch.optim`` numerically, each written once.

An optimizer's arithmetic is written once, in two methods over an *algebra*
(an object with ``add``, ``sub``, ``mul``, ``div``, ``sqrt``, ``select`` and
constants):

* :meth:`Optimizer.step_scalars`: the numbers a step derives from the
  learning rate and the step count (bias corrections, the first-step flag), in
  double precision;
* :meth:`Optimizer.rule`: the update of one parameter and its state, element
  by element, in the parameter's own precision.

These algebras run them:

* :class:`_Arrays` on NumPy or CuPy arrays, in place (an operation given
  ``out`` writes there), with the scalars computed on the host
  (:class:`_HostDoubles`): :meth:`Optimizer.update` where no compiled loop
  runs;
* :class:`_Loop` writes the rule as the body of a loop that numba compiles
  (one pass over memory per parameter, split in parts on the thread pool):
  :meth:`Optimizer.update` on NumPy float32 and float64 arrays where compiled
  kernels run (see :mod:`onnxgrad.ops.compiled`);
* :class:`_CUDA` writes the rule as the body of a CUDA kernel, which reads the
  step's scalars and the hyper-parameters from a small device array, so that a
  step recorded as a CUDA graph replays with each later step's learning rate,
  bias corrections and scheduled hyper-parameters (:class:`DeviceUpdate`): one
  kernel over every parameter (a multi-tensor update,
  :func:`multi_tensor_source`), or one per parameter (:func:`kernel_source`);
* :class:`_Nodes` and :class:`_NodeDoubles` append the update and its scalars
  as standard ONNX nodes, the scalars computed from the model's ``lr`` and
  ``step`` inputs (:meth:`Optimizer.update_nodes`, for :mod:`onnxgrad.convert`).

Each algebra performs the operations in the order the rule states them, each
rounded to the parameter's type (the CUDA kernels are compiled without fused
multiply-adds, the compiled loop without fast-math), so the forms agree bit for
bit given the same scalars.  The order follows PyTorch's single-tensor
implementations, so that results agree with ``torch.optim`` to the last few
bits.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Iterable

import numpy as np

from onnxgrad.errors import OnnxgradError


class Optimizer:
    """Base class: holds hyper-parameters and per-parameter state by name.

    A subclass defines :meth:`step_scalars`, :meth:`rule` and the names of its
    state arrays (:attr:`STATE`); everything else derives from them."""

    #: The per-parameter state arrays, as :attr:`state` names them.
    STATE: tuple[str, ...] = ()

    # ``_loop`` holds the compiled loop of the present settings (see :func:`_loop_of`);
    # a slot, so that it is none of the attributes that ``vars()`` lists as settings.
    __slots__ = ("__dict__", "__weakref__", "_loop")

    def __init__(self, lr: float):
        if not lr >= 0.0:
            raise OnnxgradError(f"invalid learning rate {lr!r}; expected lr >= 0")
        self.lr = float(lr)
        self.state: dict[str, dict[str, Any]] = {}
        self._loop: _Remembered | None = None

    def __getstate__(self) -> dict[str, Any]:
        """The attributes a copy or a pickle takes: not the remembered compiled loop."""
        return vars(self)

    # -- written by each optimizer ---------------------------------------------------------
    def step_scalars(self, d) -> dict[str, Any]:  # pragma: no cover - abstract
        """The scalars of one step, by name, in the double-precision algebra ``d``,
        whose ``d.lr`` is the learning rate, ``d.step`` the number of steps taken
        before this one and ``d.first`` whether there were none (a flag for
        ``select``).  The names are the same at every step."""
        raise NotImplementedError

    def rule(self, t, p, g, s: dict, k: dict) -> tuple[Any, dict]:  # pragma: no cover
        """The update of parameter ``p`` given its gradient ``g``, its state ``s`` (by
        the names of :attr:`STATE`) and the step's scalars ``k``, in the algebra
        ``t``: ``t.const(v)`` is a hyper-parameter and ``t.scalar(k[name])`` a step
        scalar, both in the parameter's type; an operation given ``out=`` (the
        parameter or a state value) may write its result there.  Returns the new
        parameter and the new state."""
        raise NotImplementedError

    def _steps_taken(self, state: dict) -> int:
        """The steps this parameter took before (from its host state)."""
        return int(state.get("step", 0))

    # -- on arrays ------------------------------------------------------------------------
    def update(self, xp: Any, params: dict[str, Any], grads: dict[str, Any]) -> None:
        """Apply one step to every parameter of ``params`` that has a gradient, in place:
        one compiled pass over each parameter where :func:`_loop_applies`, the rule
        on whole arrays otherwise (the same numbers, bit for bit)."""
        for name, grad in grads.items():
            param = params[name]
            state = self.state.setdefault(name, {})
            k = self.host_scalars(xp, param, state)
            states = [state[key] for key in self.STATE]
            if _loop_applies(xp, param, grad, states):
                _run_loop(self, param, grad, states, k)
                continue
            new_param, new_state = self.rule(_Arrays(xp, param.dtype), param, grad,
                                             dict(zip(self.STATE, states)), k)
            _assign(param, new_param)
            for key in self.STATE:
                _assign(state[key], new_state[key])

    def host_scalars(self, xp: Any, param: Any, state: dict) -> dict[str, Any]:
        """The host's part of one step of ``param``: its missing state arrays created
        (zeros, on ``xp``), its step count advanced, and the step's scalars."""
        taken = self._steps_taken(state)
        for key in self.STATE:
            if key not in state:
                state[key] = xp.zeros_like(param)
        if "step" in state or self.counts_steps:
            state["step"] = taken + 1
        return self.step_scalars(_HostDoubles(self.lr, taken))

    #: Whether the host state keeps a step count (``state["step"]``).
    counts_steps = False

    def reset(self) -> None:
        """Forget all per-parameter state (momentum buffers, moments, step counts)."""
        self.state.clear()

    # -- as ONNX nodes (see onnxgrad.convert) ----------------------------------------------
    def uses_step(self) -> bool:
        """Whether the update reads the step count (a state shared by all parameters)."""
        return False

    def state_arrays(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """The initial state of one parameter, by the names :attr:`state` uses."""
        return {key: np.zeros_like(param) for key in self.STATE}

    def update_nodes(self, g, param: str, grad: str, state: dict[str, str], lr: str,
                     step: str | None) -> tuple[str, dict[str, str]]:
        """Append the update of ``param`` as standard ONNX nodes through the builder ``g``:
        ``state`` maps state names to values, ``lr`` is the learning rate (a float
        scalar), ``step`` the number of steps taken before this one (int64).  Returns
        the new parameter and the new state values."""
        k = self.step_scalars(_NodeDoubles(g, lr, step))
        return self.rule(_Nodes(g, param), param, grad, dict(state), k)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "state")
        return f"{type(self).__name__}({args})"


def _assign(target: Any, value: Any) -> None:
    if value is not target:
        target[...] = value


def _check(name: str, value: float, low: float = 0.0, high: float | None = None) -> float:
    value = float(value)
    if not (value >= low and (high is None or value < high)) or math.isnan(value):
        bound = f"[{low}, {high})" if high is not None else f">= {low}"
        raise OnnxgradError(f"invalid {name} {value!r}; expected a value in {bound}")
    return value


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``."""

    def __init__(self, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(lr)
        self.momentum = _check("momentum", momentum)
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        self.weight_decay = _check("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise OnnxgradError("nesterov momentum requires a momentum > 0 and zero dampening")

    @property
    def STATE(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("momentum_buffer",) if self.momentum else ()

    def _steps_taken(self, state):
        return 0 if "momentum_buffer" not in state else 1  # only the first step differs

    def uses_step(self) -> bool:
        return bool(self.momentum and self.dampening)  # the first step takes the gradient as is

    def step_scalars(self, d):
        k = {"lr": d.lr}
        if self.uses_step():
            k["first"] = d.first
        return k

    def rule(self, t, p, g, s, k):
        d = g
        if self.weight_decay:
            d = t.add(d, t.mul(t.const(self.weight_decay), p))
        new = {}
        if self.momentum:
            # A new buffer holds zeros: momentum·0 + d is torch's first buffer, d itself.
            buf = t.mul(s["momentum_buffer"], t.const(self.momentum), out=s["momentum_buffer"])
            buf = t.add(buf, t.mul(t.const(1 - self.dampening), d) if self.dampening else d,
                        out=buf)
            if self.dampening:  # torch's first step takes the gradient undamped
                buf = t.select(k["first"], d, buf, out=buf)
            new["momentum_buffer"] = buf
            d = t.add(d, t.mul(t.const(self.momentum), buf)) if self.nesterov else buf
        return t.sub(p, t.mul(d, t.scalar(k["lr"])), out=p), new


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 weight decay added to the gradient)."""

    decoupled = False
    STATE = ("exp_avg", "exp_avg_sq")
    counts_steps = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr)
        b1, b2 = betas
        self.betas = (_check("beta1", b1, 0.0, 1.0), _check("beta2", b2, 0.0, 1.0))
        self.eps = _check("eps", eps)
        self.weight_decay = _check("weight_decay", weight_decay)

    def uses_step(self) -> bool:
        return True

    def step_scalars(self, d):
        beta1, beta2 = self.betas
        count = d.add(d.step, d.const(1.0))
        k = {"neg_step_size": d.neg(d.div(d.lr, d.sub(d.const(1.0),
                                                      d.pow(d.const(beta1), count)))),
             "bias2_sqrt": d.sqrt(d.sub(d.const(1.0), d.pow(d.const(beta2), count)))}
        if self.weight_decay and self.decoupled:
            k["kept"] = d.sub(d.const(1.0), d.mul(d.lr, d.const(self.weight_decay)))
        return k

    def rule(self, t, p, g, s, k):
        beta1, beta2 = self.betas
        m, v = s["exp_avg"], s["exp_avg_sq"]
        if self.weight_decay and self.decoupled:
            p = t.mul(p, t.scalar(k["kept"]), out=p)
        elif self.weight_decay:
            g = t.add(g, t.mul(t.const(self.weight_decay), p))
        # torch: exp_avg.lerp_(grad, 1 - beta1), whose formula depends on the weight
        weight = 1 - beta1
        if weight < 0.5:
            m = t.add(m, t.mul(t.const(weight), t.sub(g, m)), out=m)
        else:
            m = t.sub(g, t.mul(t.sub(g, m), t.const(1 - weight)), out=m)
        v = t.mul(v, t.const(beta2), out=v)
        v = t.add(v, t.mul(t.mul(t.const(1 - beta2), g), g), out=v)
        denom = t.add(t.div(t.sqrt(v), t.scalar(k["bias2_sqrt"])), t.const(self.eps))
        p = t.add(p, t.div(t.mul(t.scalar(k["neg_step_size"]), m), denom), out=p)
        return p, {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW`` (decoupled weight decay)."""

    decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(lr, betas, eps, weight_decay)


# -- the algebras ---------------------------------------------------------------------------


class _HostDoubles:
    """Step scalars on the host: Python floats (double precision)."""

    def __init__(self, lr: float, step: int):
        self.lr, self.step, self.first = float(lr), float(step), step == 0

    const = staticmethod(float)

    @staticmethod
    def add(a, b):
        return a + b

    @staticmethod
    def sub(a, b):
        return a - b

    @staticmethod
    def mul(a, b):
        return a * b

    @staticmethod
    def div(a, b):
        return a / b

    @staticmethod
    def pow(a, b):
        return a ** b

    @staticmethod
    def neg(a):
        return -a

    sqrt = staticmethod(math.sqrt)


class _Arrays:
    """The rule on NumPy or CuPy arrays in the parameter's type ``dtype``; step scalars
    are host numbers (flags: booleans)."""

    def __init__(self, xp: Any, dtype: Any):
        self.xp = xp
        self.type = np.dtype(dtype).type

    def const(self, value):
        return self.type(value)

    scalar = const

    def add(self, a, b, out=None):
        return self.xp.add(a, b, out=out)

    def sub(self, a, b, out=None):
        return self.xp.subtract(a, b, out=out)

    def mul(self, a, b, out=None):
        return self.xp.multiply(a, b, out=out)

    def div(self, a, b, out=None):
        return self.xp.divide(a, b, out=out)

    def sqrt(self, a):
        return self.xp.sqrt(a)

    @staticmethod
    def select(flag, a, b, out=None):
        value = a if flag else b
        if out is None:
            return value
        _assign(out, value)
        return out


class _Nodes:
    """The rule as standard ONNX nodes appended through the gradient builder ``g``, in
    the type of the parameter ``like``; step scalars are double tensors."""

    def __init__(self, g, like: str):
        self.g, self.like, self.dtype = g, like, g.dtype(like)

    def const(self, value):
        return self.g.scalar(value, like=self.like)

    def scalar(self, value):
        return self.g.Cast(value, to=_tensor_type(self.dtype), dtype=self.dtype)

    def add(self, a, b, out=None):
        return self.g.Add(a, b)

    def sub(self, a, b, out=None):
        return self.g.Sub(a, b)

    def mul(self, a, b, out=None):
        return self.g.Mul(a, b)

    def div(self, a, b, out=None):
        return self.g.Div(a, b)

    def sqrt(self, a):
        return self.g.Sqrt(a)

    def select(self, flag, a, b, out=None):
        return self.g.Where(flag, a, b, dtype=self.dtype)


class _NodeDoubles:
    """Step scalars as double-precision ONNX nodes, from the model's ``lr`` input (a
    float scalar) and ``step`` input (int64, the steps taken before this one)."""

    _DOUBLE = np.dtype(np.float64)

    def __init__(self, g, lr: str, step: str | None):
        self.g, self._lr, self._step = g, lr, step

    def _double(self, name):
        return self.g.Cast(name, to=_tensor_type(self._DOUBLE), dtype=self._DOUBLE)

    @property
    def lr(self):
        return self._double(self._lr)

    @property
    def step(self):
        return self._double(self._stepped())

    @property
    def first(self):
        return self.g.Equal(self._stepped(), self.g.const(0, dtype="int64"), dtype="bool")

    def _stepped(self):
        if self._step is None:
            raise OnnxgradError("this optimizer reads the step count but uses_step() is False")
        return self._step

    def const(self, value):
        return self.g.const(value, dtype=self._DOUBLE)

    def add(self, a, b):
        return self.g.Add(a, b)

    def sub(self, a, b):
        return self.g.Sub(a, b)

    def mul(self, a, b):
        return self.g.Mul(a, b)

    def div(self, a, b):
        return self.g.Div(a, b)

    def pow(self, a, b):
        return self.g.Pow(a, b)

    def neg(self, a):
        return self.g.Neg(a)

    def sqrt(self, a):
        return self.g.Sqrt(a)


class _CUDA:
    """The rule as CUDA C statements for ``cupy.ElementwiseKernel``, in the type
    placeholder ``T``: each operation one statement (a temporary, or an assignment
    to its ``out``).  Step scalars and hyper-parameters are items of the double row
    ``r``: the ``first`` step scalars, then the constants in the order the rule
    states them (:attr:`constants`), so that the kernel depends on the rule's
    choices, not on the hyper-parameters' values, and a schedule that changes one
    (OneCycleLR's momentum) runs the kernel compiled before.  A constant is
    converted to ``T`` where it is read, as a literal of its double value would
    be (rounded to nearest), which is how :class:`_Arrays` rounds it."""

    def __init__(self, first: int):
        self.lines: list[str] = []
        self.first = first
        #: The rule's constants, in the order of their items of ``r`` after the step scalars.
        self.constants: list[float] = []

    def _emit(self, expr: str, out: str | None) -> str:
        if out is None:
            out = f"t{len(self.lines)}"
            self.lines.append(f"T {out} = {expr};")
        else:
            self.lines.append(f"{out} = {expr};")
        return out

    def _item(self, value) -> int:
        """The item of ``r`` that holds the constant ``value`` (a new one each time)."""
        self.constants.append(float(value))
        return self.first + len(self.constants) - 1

    def const(self, value):
        return f"(T)r[{self._item(value)}]"

    @staticmethod
    def scalar(value):
        return f"(T){value}"

    def add(self, a, b, out=None):
        return self._emit(f"{a} + {b}", out)

    def sub(self, a, b, out=None):
        return self._emit(f"{a} - {b}", out)

    def mul(self, a, b, out=None):
        return self._emit(f"{a} * {b}", out)

    def div(self, a, b, out=None):
        return self._emit(f"{a} / {b}", out)

    def sqrt(self, a):
        return self._emit(f"sqrt({a})", None)

    def select(self, flag, a, b, out=None):
        return self._emit(f"{flag} != 0.0 ? {a} : {b}", out)


def _written(optimizer: Optimizer, algebra: type, end: str
             ) -> tuple[_CUDA, int, tuple[str, ...], dict[str, str]]:
    """The rule of ``optimizer`` written as statements by ``algebra`` (:class:`_CUDA`
    or :class:`_Loop`, each statement ending in ``end``) over the parameter ``p``,
    the gradient ``g`` and the state values ``s0, s1, ...``, reading the step
    scalars and then the constants from ``r``.  Returns the algebra (its lines and
    constants), the number of step scalars, the state arrays in order and their
    values' names."""
    keys = list(optimizer.step_scalars(_HostDoubles(optimizer.lr, 0)))
    names = tuple(optimizer.STATE)
    code = algebra(len(keys))
    state = {name: f"s{i}" for i, name in enumerate(names)}
    p, new = optimizer.rule(code, "p", "g", dict(state),
                            {key: f"r[{i}]" for i, key in enumerate(keys)})
    if p != "p":
        code.lines.append(f"p = {p}{end}")
    for name in names:
        if new[name] != state[name]:
            code.lines.append(f"{state[name]} = {new[name]}{end}")
    return code, len(keys), names, state


def kernel_source(optimizer: Optimizer
                  ) -> tuple[str, str, str, tuple[str, ...], tuple[float, ...]]:
    """The fused update of one parameter as a ``cupy.ElementwiseKernel``: its input
    and output parameters and its body, which reads row ``row`` of the double array
    ``h`` (the step scalars, then the hyper-parameters); the state arrays it
    updates, in the order of its outputs after the parameter; and the
    hyper-parameters' values, which follow the step scalars in each row.  The
    source depends on the rule's choices (which terms are present, which form a
    formula takes), not on the values of the hyper-parameters.  The body is C that
    a host compiler runs as well (see the tests)."""
    code, count, names, state = _written(optimizer, _CUDA, ";")
    width = count + len(code.constants)
    body = "\n".join([f"const double* r = &h[row * {width}];"] + code.lines)
    outputs = ", ".join(["T p"] + [f"T {state[name]}" for name in names])
    return "T g, raw float64 h, int64 row", outputs, body, names, tuple(code.constants)


_KERNELS: dict[Any, Any] = {}  # source -> compiled CUDA kernel (compiled on first use)


class _Loop(_CUDA):
    """The rule as the Python statements of a loop body that numba compiles, in the
    type ``T`` (a NumPy scalar type): each operation one statement, as :class:`_CUDA`
    writes them.  Step scalars and hyper-parameters are items of the loop's tuple
    argument ``r``, laid out as :class:`_CUDA` lays out its row, so that a schedule
    that changes a hyper-parameter (OneCycleLR's momentum) runs the loop compiled
    before."""

    def _emit(self, expr: str, out: str | None) -> str:
        if out is None:
            out = f"t{len(self.lines)}"
        self.lines.append(f"{out} = {expr}")
        return out

    def const(self, value):
        return f"T(r[{self._item(value)}])"

    @staticmethod
    def scalar(value):
        return f"T({value})"

    def sqrt(self, a):
        return self._emit(f"np.sqrt({a})", None)

    def select(self, flag, a, b, out=None):
        return self._emit(f"{a} if {flag} != 0.0 else {b}", out)


def loop_source(optimizer: Optimizer) -> tuple[str, tuple[str, ...], tuple[float, ...]]:
    """The update of one parameter as the source of a Python function for numba,
    ``update(P, G, S0, ..., r)``: a loop over the flat parameter, gradient and state
    arrays, all of the type ``T`` (a name the source is run with), which reads the
    step's scalars and then the hyper-parameters from the tuple ``r``.  Returns the
    source, the state arrays in the order of its ``S`` arguments and the
    hyper-parameters' values.  The source depends on the rule's choices (which
    terms are present, which form a formula takes), not on the values of the
    hyper-parameters."""
    code, _, names, _ = _written(optimizer, _Loop, "")
    arrays = ["P", "G"] + [f"S{i}" for i in range(len(names))]
    lines = [f"def update({', '.join(arrays)}, r):",
             "    for i in range(P.size):",
             "        g = G[i]",
             "        p = P[i]"]
    lines += [f"        s{i} = S{i}[i]" for i in range(len(names))]
    lines += [f"        {line}" for line in code.lines]
    lines += ["        P[i] = p"]
    lines += [f"        S{i}[i] = s{i}" for i in range(len(names))]
    return "\n".join(lines) + "\n", names, tuple(code.constants)


_compiled: Any = None  # onnxgrad.ops.compiled, imported on first use (ops import the runtime)
_SOURCES: dict[tuple, Any] = {}  # (form, optimizer type, settings) -> sources
_LOOPS: dict[tuple[str, np.dtype], Any] = {}  # (source, type) -> numba dispatcher


def _loop_applies(xp: Any, param: Any, grad: Any, states: list) -> bool:
    """Whether the compiled loop updates ``param``: compiled kernels run for NumPy
    arrays of its type (float32 or float64), the gradient and the state have its
    type and shape, all of them are C-contiguous, and the gradient does not
    overlap the parameter or its state (the loop reads each element before it
    writes it, but an overlap shifted by some elements would read written ones)."""
    global _compiled
    if _compiled is None:
        from onnxgrad.ops import compiled  # noqa: PLC0415

        _compiled = compiled
    if not (_compiled.available(xp, param) and param.flags.c_contiguous):
        return False
    dtype, shape = param.dtype, param.shape
    for a in (grad, *states):
        if a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous:
            return False
    if np.may_share_memory(grad, param):
        return False
    for a in states:
        if np.may_share_memory(grad, a):
            return False
    return True


def _settings(optimizer: Optimizer) -> tuple[tuple[str, Any], ...]:
    """``optimizer``'s settings: its attributes other than its state and its learning
    rate (which the compiled forms read at each step), as (name, value) pairs."""
    return tuple((k, v) for k, v in vars(optimizer).items() if k not in ("state", "lr"))


def _remembered(form: str, optimizer: Optimizer, make: Any) -> Any:
    """``make(optimizer)`` (a source and its constants, for the compiled ``form``) for
    ``optimizer``'s present settings, its hyper-parameters other than the learning
    rate, remembered for the settings.  A schedule that changes a hyper-parameter
    at every step makes a new source each step, which is the same text, so the
    compiled code is found by its text."""
    key = (form, type(optimizer), _settings(optimizer))
    try:
        found = _SOURCES.get(key)
    except TypeError:  # a setting that cannot be a key: the source is made each time
        key, found = None, None
    if found is None:
        found = make(optimizer)
        if key is not None:
            if len(_SOURCES) >= 256:  # settings that change at every step
                _SOURCES.clear()
            _SOURCES[key] = found
    return found


class _Remembered:
    """The compiled loop of one optimizer's settings, which :func:`_loop_of` keeps on
    the optimizer: the source and the constants of :func:`loop_source`, the loops
    compiled from the source by element type, and what tells at little cost
    whether the optimizer's settings are still these: its type, its number of
    attributes, and the values of its settings (:func:`_settings`) as
    :attr:`read` reads them from its attributes.  A setting set to another value,
    added or removed (a schedule's momentum, a checkpoint's settings) changes one
    of these.  The values compare as :func:`_remembered`'s keys do (the same
    object, or equal); settings that cannot be a key (:attr:`values` is None)
    never compare as unchanged."""

    __slots__ = ("type", "size", "read", "values", "source", "constants", "loops")

    def __init__(self, optimizer: Optimizer, source: str, constants: tuple[float, ...]):
        attributes = vars(optimizer)
        names = tuple(k for k, _ in _settings(optimizer))
        self.type, self.size = type(optimizer), len(attributes)
        #: The values of ``names`` in a dict, as a tuple (a KeyError if one is missing).
        self.read = (operator.itemgetter(*names) if len(names) > 1
                     else lambda d: tuple(d[k] for k in names))
        self.values: tuple | None = self.read(attributes)
        try:
            hash(self.values)
        except TypeError:
            self.values = None
        self.source, self.constants = source, constants
        #: The numba dispatchers of :attr:`source`, by element type.
        self.loops: dict[np.dtype, Any] = {}

    def holds(self, optimizer: Optimizer) -> bool:
        """Whether ``optimizer``'s settings are those this was made for."""
        attributes = vars(optimizer)
        if (type(optimizer) is not self.type or len(attributes) != self.size
                or self.values is None):
            return False
        try:
            return self.read(attributes) == self.values
        except KeyError:  # a setting removed and another added
            return False


def _loop_of(optimizer: Optimizer) -> _Remembered:
    """:func:`loop_source` of ``optimizer``'s present settings (its source and its
    hyper-parameters) and the loops compiled from it, remembered for the settings:
    on the optimizer (its ``_loop``), for the updates that follow while its
    settings stay these, which a few comparisons tell; and by :func:`_remembered`,
    for other optimizers and settings met again."""
    try:
        found = optimizer._loop
    except AttributeError:  # a subclass that did not call Optimizer.__init__
        found = None
    if found is not None and found.holds(optimizer):
        return found

    def make(opt: Optimizer) -> tuple[str, tuple[float, ...]]:
        source, _, constants = loop_source(opt)
        return source, constants

    found = optimizer._loop = _Remembered(optimizer, *_remembered("loop", optimizer, make))
    return found


def _run_loop(optimizer: Optimizer, param: Any, grad: Any, states: list,
              k: dict[str, Any]) -> None:
    """One step of ``param`` by the compiled loop, over parts of the flat arrays on
    the thread pool (each element on its own, so any split gives the same numbers)."""
    found = _loop_of(optimizer)
    flat = [a.ravel() for a in (param, grad, *states)]  # views: each is C-contiguous
    r = (*map(float, k.values()), *found.constants)
    loop = found.loops.get(param.dtype)
    if loop is None:
        loop = found.loops[param.dtype] = _compiled_loop(optimizer, found.source, flat, r)
    size = flat[0].size
    if size < _compiled.PART:
        loop(*flat, r)
        return

    def work(start: int, stop: int) -> None:
        loop(*[a[start:stop] for a in flat], r)

    _compiled.by_parts(size, size, work)


def _compiled_loop(optimizer: Optimizer, source: str, flat: list, r: tuple) -> Any:
    """The loop of ``source`` for the arrays ``flat`` (and the tuple ``r``).  It is
    compiled on its first use in the process, for each source and type: numba
    cannot cache a function made from source text on disk."""
    dtype = flat[0].dtype
    loop = _LOOPS.get((source, dtype))
    if loop is None:
        import numba  # noqa: PLC0415 - available() has imported it

        from onnxgrad.threads import single_threaded_blas  # noqa: PLC0415

        namespace = {"np": np, "T": dtype.type}
        exec(compile(source, f"<onnxgrad {type(optimizer).__name__} update>", "exec"),  # noqa: S102
             namespace)
        loop = numba.njit(nogil=True, error_model="numpy")(namespace["update"])
        loop(*[a[:0] for a in flat], r)  # compiled here, not in the pool's threads
        single_threaded_blas()  # numba's code generator may have loaded SciPy's BLAS
        _LOOPS[(source, dtype)] = loop
    return loop


#: Whether :class:`DeviceUpdate` updates the parameters of a step with one kernel
#: launch per element type (a multi-tensor update, as PyTorch's fused optimizers
#: do) rather than one launch per parameter.
MULTI_TENSOR = True

_KERNEL_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def multi_tensor_name(optimizer: Optimizer, dtype: Any) -> str:
    """The name of the multi-tensor kernel of ``optimizer`` for elements of ``dtype``."""
    return f"onnxgrad_{type(optimizer).__name__.lower()}_multi_tensor_{np.dtype(dtype).name}"


def multi_tensor_source(optimizer: Optimizer
                        ) -> tuple[str, tuple[str, ...], tuple[float, ...]]:
    """The update of many parameters in one launch, as CUDA source for
    ``cupy.RawKernel``: a kernel for float32 and one for float64 elements (named by
    :func:`multi_tensor_name`), the state arrays they update, in order, and the
    hyper-parameters' values (as for :func:`kernel_source`).

    Each kernel takes ``(blocks, meta, h, chunk)``.  Block ``b`` updates the
    elements ``[start, start + chunk)`` of tensor ``t``, where ``(t, start)`` is row
    ``b`` of ``blocks`` (int64, two columns); row ``t`` of ``meta`` (int64) holds the
    tensor's size, its row of ``h`` (doubles: the step scalars, then the
    hyper-parameters, as for :func:`kernel_source`) and the addresses of its
    parameter, its gradient and its state arrays, in that order (contiguous arrays
    of the kernel's type).  The threads of a block take the chunk's elements in
    turn; each element is updated by the body of :func:`kernel_source`.  The source
    depends on the rule's choices, not on the hyper-parameters' values.  It is C++
    that a host compiler runs as well, given stand-ins for CUDA's keywords and
    block indices (see the tests)."""
    _, _, body, names, constants = kernel_source(optimizer)
    return _multi_tensor_text(optimizer, body, names), names, constants


def _multi_tensor_text(optimizer: Optimizer, body: str, names: tuple[str, ...]) -> str:
    """The source of :func:`multi_tensor_source` around the body of
    :func:`kernel_source` (which updates the state arrays ``names``)."""
    fields = 4 + len(names)
    pointers = ["    T* P = (T*)m[2];", "    const T* G = (const T*)m[3];"]
    pointers += [f"    T* S{i} = (T*)m[{4 + i}];" for i in range(len(names))]
    loads = ["        T g = G[i];", "        T p = P[i];"]
    loads += [f"        T s{i} = S{i}[i];" for i in range(len(names))]
    stores = ["        P[i] = p;"] + [f"        S{i}[i] = s{i};" for i in range(len(names))]
    lines = [
        "template <typename T>",
        "__device__ void onnxgrad_multi_tensor_chunk(const long long* blocks,",
        "        const long long* meta, const double* h, long long chunk) {",
        "    const long long b = 2 * (long long)blockIdx.x;",
        "    const long long start = blocks[b + 1];",
        f"    const long long* m = &meta[{fields} * blocks[b]];",
        "    const long long n = m[0], row = m[1];",
        "    const long long stop = n - start < chunk ? n : start + chunk;",
        *pointers,
        "    for (long long i = start + threadIdx.x; i < stop; i += blockDim.x) {",
        *loads,
        "        {",
        *[f"            {line}" for line in body.splitlines()],
        "        }",
        *stores,
        "    }",
        "}",
    ]
    for dtype, ctype in _KERNEL_TYPES.items():
        lines += ["",
                  f'extern "C" __global__ void {multi_tensor_name(optimizer, dtype)}(',
                  "        const long long* blocks, const long long* meta, const double* h,",
                  "        long long chunk) {",
                  f"    onnxgrad_multi_tensor_chunk<{ctype}>(blocks, meta, h, chunk);",
                  "}"]
    return "\n".join(lines) + "\n"


def _device_sources(optimizer: Optimizer) -> tuple[tuple, tuple]:
    """:func:`kernel_source` and :func:`multi_tensor_source` of ``optimizer``'s
    present settings, from one writing of its rule."""
    single = kernel_source(optimizer)
    _, _, body, names, constants = single
    return single, (_multi_tensor_text(optimizer, body, names), names, constants)


def _address(array: Any) -> int:
    """Where ``array``'s first element lies: device memory for CuPy, host for NumPy."""
    data = getattr(array, "data", None)
    pointer = getattr(data, "ptr", None)
    return int(pointer) if pointer is not None else int(array.ctypes.data)


def _tensor_type(dtype: Any) -> int:
    from onnx import helper  # noqa: PLC0415 - only the node form needs onnx

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class DeviceUpdate:
    """An optimizer's steps on a GPU, as fused kernels.

    :meth:`begin_step` is the host's part of a step (new state arrays, step
    counts, this step's scalars and the optimizer's present hyper-parameters
    written to a device array, one row per parameter); :meth:`apply` then
    launches the update of the parameters given their gradients, and calling the
    object with one parameter's gradient launches that parameter's own kernel.
    The kernels read the scalars and the hyper-parameters from the device array.
    A step recorded as a CUDA graph thus replays with the learning rate, the bias
    corrections and the hyper-parameters (a momentum that a schedule changes) of
    each later step, as long as :meth:`begin_step` runs before each replay.

    A kernel is compiled once per rule structure (see :func:`kernel_source`) and
    element type, whatever the hyper-parameters' values.  Where a change of a
    hyper-parameter changes the structure (a term that appears or goes, a
    formula that takes its other form), :meth:`begin_step` takes the kernels of
    the new structure and a new device array for the rows, so that a step
    recorded with the former kernels, which holds the former array (see
    :meth:`arrays`), is not replayed.

    With :attr:`multi_tensor` (the default, :data:`MULTI_TENSOR`), :meth:`apply`
    updates all the parameters of one element type with one launch of the
    kernel of :func:`multi_tensor_source`, which reads the parameters', the
    gradients' and the state's addresses from a small table that each launch
    uploads (while a step is recorded, the upload is held with the recorded
    step; see :meth:`onnxgrad.backend.CudaBackend.recording`).  Parameters that
    table cannot describe (a gradient of another type or layout) get their own
    kernel.
    """

    #: Elements of one tensor that one block of the multi-tensor kernel updates.
    CHUNK = 1 << 13
    #: Threads per block of the multi-tensor kernel.
    THREADS = 256

    def __init__(self, optimizer: Optimizer, xp: Any, params: dict[str, Any],
                 multi_tensor: bool | None = None):
        self.optimizer = optimizer
        self.xp = xp
        self.params = params
        self.rows = {name: i for i, name in enumerate(params)}
        #: Whether :meth:`apply` launches one multi-tensor kernel per element type.
        self.multi_tensor = MULTI_TENSOR if multi_tensor is None else bool(multi_tensor)
        self.chunk = self.CHUNK
        #: :func:`kernel_source` and :func:`multi_tensor_source` of the settings of
        #: the latest :meth:`begin_step` (of the optimizer's settings until then).
        self.source: tuple = ()
        self.multi_source: tuple = ()
        self._follow_settings()

    def _follow_settings(self) -> None:
        """Take the sources of the optimizer's present settings.  Those of the same
        structure differ in their constants only, which :meth:`begin_step` writes
        to the rows; another structure gets new rows (``host`` and ``device``),
        whose width is its number of step scalars and constants."""
        source, multi_source = _remembered("cuda", self.optimizer, _device_sources)
        same = source[:4] == self.source[:4]
        self.source, self.multi_source = source, multi_source
        if same:
            return
        opt = self.optimizer
        count = len(opt.step_scalars(_HostDoubles(opt.lr, 0)))
        self.host = np.zeros((len(self.params), count + len(source[4])))
        self.device = self.xp.zeros(self.host.shape)

    def begin_step(self, names: Iterable[str] | None = None) -> None:
        """The host's part of a step of the parameters ``names`` (all by default):
        their state created, their step counts advanced, and their rows of the
        device array set to this step's scalars followed by the optimizer's
        present hyper-parameters (an upload in stream order)."""
        self._follow_settings()
        opt = self.optimizer
        constants = list(self.source[4])
        for name in self.params if names is None else names:
            state = opt.state.setdefault(name, {})
            scalars = opt.host_scalars(self.xp, self.params[name], state)
            self.host[self.rows[name]] = [float(v) for v in scalars.values()] + constants
        if isinstance(self.device, np.ndarray):
            self.device[...] = self.host
        else:
            self.device.set(self.host)  # a host-to-device copy in stream order

    def arrays(self) -> list[Any]:
        """Every device array a step reads or writes besides the gradients: the
        parameters, the optimizer's state arrays and the scalars."""
        found = [self.device, *self.params.values()]
        for name in self.params:
            found += [v for v in self.optimizer.state.get(name, {}).values() if hasattr(v, "shape")]
        return found

    def __call__(self, name: str, grad: Any) -> None:
        opt, xp = self.optimizer, self.xp
        state = opt.state[name]
        in_params, out_params, body, names, _ = self.source
        kernel = _KERNELS.get(body)
        if kernel is None:
            kernel = _KERNELS[body] = xp.ElementwiseKernel(
                in_params, out_params, body, f"onnxgrad_{type(opt).__name__.lower()}_update",
                options=("--fmad=false",))
        kernel(grad, self.device, self.rows[name], self.params[name],
               *(state[n] for n in names))

    def apply(self, grads: dict[str, Any]) -> None:
        """Launch the update of each parameter named in ``grads`` (name -> gradient)
        after :meth:`begin_step`: one multi-tensor kernel per element type where
        :attr:`multi_tensor`, one kernel per parameter otherwise."""
        if not self.multi_tensor:
            for name, grad in grads.items():
                self(name, grad)
            return
        tables, alone = self.multi_tensor_tables(grads)
        for name in alone:
            self(name, grads[name])
        source = self.multi_source[0]
        for dtype, (blocks, meta) in tables.items():
            name = multi_tensor_name(self.optimizer, dtype)
            kernel = _KERNELS.get((source, name))
            if kernel is None:
                kernel = _KERNELS[(source, name)] = self.xp.RawKernel(
                    source, name, options=("--fmad=false",))
            table = self.xp.asarray(np.concatenate([blocks.reshape(-1), meta.reshape(-1)]))
            kernel((len(blocks),), (self.THREADS,),
                   (table[:blocks.size], table[blocks.size:], self.device, np.int64(self.chunk)))

    def multi_tensor_tables(self, grads: dict[str, Any]
                            ) -> tuple[dict[np.dtype, tuple[np.ndarray, np.ndarray]], list[str]]:
        """The host's tables for the multi-tensor launches over ``grads``, by element
        type: ``(blocks, meta)`` as :func:`multi_tensor_source` reads them (chunks of
        :attr:`chunk` elements); and the names of the parameters that need their own
        kernel: those whose parameter, gradient and state are not contiguous arrays
        of one shape and of type float32 or float64.  Empty parameters are in
        neither."""
        names = self.multi_source[1]
        rows: dict[np.dtype, list] = {}
        alone = []
        for name, grad in grads.items():
            param = self.params[name]
            state = self.optimizer.state[name]
            arrays = (param, grad, *(state[n] for n in names))
            if param.dtype not in _KERNEL_TYPES or any(
                    a.dtype != param.dtype or a.shape != param.shape or not a.flags.c_contiguous
                    for a in arrays):
                alone.append(name)
            elif param.size:
                rows.setdefault(param.dtype, []).append(
                    [param.size, self.rows[name], *map(_address, arrays)])
        tables = {}
        for dtype, found in rows.items():
            meta = np.array(found, dtype=np.int64)
            counts = -(-meta[:, 0] // self.chunk)
            first = np.repeat(np.cumsum(counts) - counts, counts)  # each block's tensor's first
            blocks = np.stack([np.repeat(np.arange(len(found)), counts),
                               (np.arange(int(counts.sum())) - first) * self.chunk], axis=1)
            tables[dtype] = (blocks.astype(np.int64), meta)
        return tables, alone
