"""Optimizers that match ``torch.optim`` numerically.

Each optimizer updates parameters in place on the array module of the arrays
it is given (NumPy or CuPy), in the parameters' own precision.  The order of
floating-point operations follows PyTorch's single-tensor implementations so
that results agree to the last few bits.

On a GPU the trainer uses :class:`DeviceUpdate` instead: the same arithmetic as
one compiled kernel per parameter, which reads the step's scalars (learning
rate, bias corrections) from a small device array, so that a step recorded as a
CUDA graph replays with each later step's values.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from onnxgrad.errors import OnnxgradError


class Optimizer:
    """Base class: holds hyper-parameters and per-parameter state by name."""

    def __init__(self, lr: float):
        if not lr >= 0.0:
            raise OnnxgradError(f"invalid learning rate {lr!r}; expected lr >= 0")
        self.lr = float(lr)
        self.state: dict[str, dict[str, Any]] = {}

    def update(self, xp: Any, params: dict[str, Any], grads: dict[str, Any]) -> None:
        """Apply one step to every parameter of ``params`` that has a gradient."""
        for name, grad in grads.items():
            self._update_one(xp, name, params[name], grad, self.state.setdefault(name, {}))

    def _update_one(self, xp, name, param, grad, state) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        """Forget all per-parameter state (momentum buffers, moments, step counts)."""
        self.state.clear()

    # -- the update as ONNX nodes (see onnxgrad.convert) ----------------------------------
    #: Whether the update reads the step count (a state shared by all parameters).
    def uses_step(self) -> bool:
        return False

    def state_arrays(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """The initial state of one parameter, by the names :attr:`state` uses."""
        return {}

    def update_nodes(self, g, param: str, grad: str, state: dict[str, str], lr: str,
                     step: str | None) -> tuple[str, dict[str, str]]:  # pragma: no cover
        """Append the update of ``param`` as standard ONNX nodes through the builder ``g``:
        ``state`` maps state names to values, ``lr`` is the learning rate (a float
        scalar), ``step`` the number of steps taken before this one (int64).  Returns
        the new parameter and the new state values.  The arithmetic is :meth:`update`'s,
        step for step, with the scalars that it computes in double precision computed
        in double precision."""
        raise NotImplementedError

    # -- the fused device update (see DeviceUpdate) --------------------------------------
    #: How many scalars a step of one parameter reads (a row of DeviceUpdate's array).
    SCALARS = 0

    def scalars(self, xp, param, state) -> tuple[float, ...]:  # pragma: no cover - abstract
        """The host's part of one step of ``param``: create missing state arrays (as
        zeros, on ``xp``), advance the step count, and return the step's scalars,
        each computed in double precision as :meth:`update` computes it."""
        raise NotImplementedError

    def kernel(self, state) -> tuple[str, str, str, tuple[str, ...]]:  # pragma: no cover
        """The device's part, for ``cupy.ElementwiseKernel``: its input and output
        parameters and its body, which reads row ``row`` of the scalars ``h``; and
        the names of the state arrays it updates, in the order of its outputs after
        the parameter."""
        raise NotImplementedError

    def reference(self, param, grad, state, row) -> None:  # pragma: no cover - abstract
        """The kernel's arithmetic in NumPy, reading the scalars ``row`` as it does."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "state")
        return f"{type(self).__name__}({args})"


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

    def _update_one(self, xp, name, param, grad, state) -> None:
        d_p = grad
        if self.weight_decay:
            d_p = d_p + self.weight_decay * param
        if self.momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = xp.array(d_p, copy=True)
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * d_p if self.dampening else d_p
            d_p = d_p + self.momentum * buf if self.nesterov else buf
        param -= d_p * self.lr

    def uses_step(self) -> bool:
        return bool(self.momentum and self.dampening)  # the first step takes the gradient as is

    def state_arrays(self, param):
        return {"momentum_buffer": np.zeros_like(param)} if self.momentum else {}

    def update_nodes(self, g, param, grad, state, lr, step):
        def c(value):
            return g.scalar(value, like=param)

        d = grad
        if self.weight_decay:
            d = g.Add(d, g.Mul(c(self.weight_decay), param))
        new_state = {}
        if self.momentum:
            buf = g.Mul(state["momentum_buffer"], c(self.momentum))
            buf = g.Add(buf, g.Mul(c(1 - self.dampening), d) if self.dampening else d)
            if self.dampening:  # torch's first step: the buffer is the gradient itself
                first = g.Equal(step, g.const(0, dtype="int64"), dtype="bool")
                buf = g.Where(first, d, buf, dtype=g.dtype(param))
            new_state["momentum_buffer"] = buf
            d = g.Add(d, g.Mul(c(self.momentum), buf)) if self.nesterov else buf
        lr_t = g.Cast(lr, to=_tensor_type(g.dtype(param)), dtype=g.dtype(param))
        return g.Sub(param, g.Mul(d, lr_t)), new_state

    SCALARS = 7  # lr, weight decay, momentum, 1 - dampening, dampened, first step, nesterov

    def scalars(self, xp, param, state) -> tuple[float, ...]:
        first = False
        if self.momentum and "momentum_buffer" not in state:
            state["momentum_buffer"] = xp.zeros_like(param)
            first = True
        return (self.lr, self.weight_decay, self.momentum, 1 - self.dampening,
                float(bool(self.dampening)), float(first), float(self.nesterov))

    def kernel(self, state):
        if not self.momentum:
            return "T g, raw float64 h, int64 row", "T p", _SGD_BODY, ()
        return ("T g, raw float64 h, int64 row", "T p, T b", _SGD_MOMENTUM_BODY,
                ("momentum_buffer",))

    def reference(self, param, grad, state, row) -> None:
        lr, weight_decay, momentum, undamped, dampened, first, nesterov = row
        t = param.dtype.type
        d = grad
        if weight_decay:
            d = d + t(weight_decay) * param
        if momentum:
            buf = state["momentum_buffer"]
            if first:
                buf[...] = d
            else:
                buf *= t(momentum)
                buf += t(undamped) * d if dampened else d
            d = d + t(momentum) * buf if nesterov else buf
        param -= d * t(lr)


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 weight decay added to the gradient)."""

    decoupled = False

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr)
        b1, b2 = betas
        self.betas = (_check("beta1", b1, 0.0, 1.0), _check("beta2", b2, 0.0, 1.0))
        self.eps = _check("eps", eps)
        self.weight_decay = _check("weight_decay", weight_decay)

    def _update_one(self, xp, name, param, grad, state) -> None:
        beta1, beta2 = self.betas
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(param)
            state["exp_avg_sq"] = xp.zeros_like(param)
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if self.weight_decay:
            if self.decoupled:
                param *= 1 - self.lr * self.weight_decay
            else:
                grad = grad + self.weight_decay * param
        # torch: exp_avg.lerp_(grad, 1 - beta1), whose formula depends on the weight
        weight = 1 - beta1
        if weight < 0.5:
            exp_avg += weight * (grad - exp_avg)
        else:
            exp_avg[...] = grad - (grad - exp_avg) * (1 - weight)
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * grad * grad
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = self.lr / bias_correction1
        denom = xp.sqrt(exp_avg_sq) / math.sqrt(bias_correction2) + self.eps
        param += (-step_size * exp_avg) / denom

    def uses_step(self) -> bool:
        return True

    def state_arrays(self, param):
        return {"exp_avg": np.zeros_like(param), "exp_avg_sq": np.zeros_like(param)}

    def update_nodes(self, g, param, grad, state, lr, step):
        beta1, beta2 = self.betas
        dtype = g.dtype(param)
        double = np.dtype(np.float64)

        def c(value):
            return g.scalar(value, like=param)

        def d(value):
            return g.const(value, dtype=double)

        def to_param(value):
            return g.Cast(value, to=_tensor_type(dtype), dtype=dtype)

        count = g.Cast(g.Add(step, g.const(1, dtype="int64")), to=_tensor_type(double),
                       dtype=double)
        lr_d = g.Cast(lr, to=_tensor_type(double), dtype=double)
        bias1 = g.Sub(d(1.0), g.Pow(d(beta1), count))
        bias2 = g.Sub(d(1.0), g.Pow(d(beta2), count))
        if self.weight_decay and self.decoupled:
            param = g.Mul(param, to_param(g.Sub(d(1.0), g.Mul(lr_d, d(self.weight_decay)))))
        elif self.weight_decay:
            grad = g.Add(grad, g.Mul(c(self.weight_decay), param))
        m, v = state["exp_avg"], state["exp_avg_sq"]
        weight = 1 - beta1
        if weight < 0.5:
            m = g.Add(m, g.Mul(c(weight), g.Sub(grad, m)))
        else:
            m = g.Sub(grad, g.Mul(g.Sub(grad, m), c(1 - weight)))
        v = g.Add(g.Mul(v, c(beta2)), g.Mul(g.Mul(c(1 - beta2), grad), grad))
        denom = g.Add(g.Div(g.Sqrt(v), to_param(g.Sqrt(bias2))), c(self.eps))
        step_size = to_param(g.Neg(g.Div(lr_d, bias1)))
        return g.Add(param, g.Div(g.Mul(step_size, m), denom)), {"exp_avg": m, "exp_avg_sq": v}

    # 1 - lr·decay (decoupled), decay (coupled), 1 - beta1, 1 - (1 - beta1), beta2, 1 - beta2,
    # -step size, sqrt(bias correction 2), eps, decoupled decay on
    SCALARS = 10

    def scalars(self, xp, param, state) -> tuple[float, ...]:
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(param)
            state["exp_avg_sq"] = xp.zeros_like(param)
        state["step"] += 1
        beta1, beta2 = self.betas
        step = state["step"]
        decoupled = bool(self.decoupled and self.weight_decay)
        coupled = self.weight_decay if not self.decoupled else 0.0
        return (1 - self.lr * self.weight_decay, coupled, 1 - beta1, 1 - (1 - beta1), beta2,
                1 - beta2, -(self.lr / (1 - beta1**step)), math.sqrt(1 - beta2**step), self.eps,
                float(decoupled))

    def kernel(self, state):
        return ("T g, raw float64 h, int64 row", "T p, T m, T v", _ADAM_BODY,
                ("exp_avg", "exp_avg_sq"))

    def reference(self, param, grad, state, row) -> None:
        (kept, coupled, weight, unweighted, beta2, one_minus_beta2, neg_step_size,
         bias2_sqrt, eps, decoupled) = row
        t = param.dtype.type
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if decoupled:
            param *= t(kept)
        elif coupled:
            grad = grad + t(coupled) * param
        if weight < 0.5:
            m += t(weight) * (grad - m)
        else:
            m[...] = grad - (grad - m) * t(unweighted)
        v *= t(beta2)
        v += t(one_minus_beta2) * grad * grad
        denom = np.sqrt(v) / t(bias2_sqrt) + t(eps)
        param += (t(neg_step_size) * m) / denom


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW`` (decoupled weight decay)."""

    decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(lr, betas, eps, weight_decay)


# The kernels' bodies: the arithmetic of ``update``, step for step in the parameter's
# type T, with the scalars (computed in double precision) cast to T where NumPy casts
# them.  Compiled without fused multiply-adds, so that they round as NumPy does.
_SGD_BODY = """
const double* r = &h[row * 7];
T d = g;
if (r[1] != 0.0) d = d + (T)r[1] * p;
p = p - d * (T)r[0];
"""

_SGD_MOMENTUM_BODY = """
const double* r = &h[row * 7];
T d = g;
if (r[1] != 0.0) d = d + (T)r[1] * p;
if (r[5] != 0.0) {
    b = d;
} else {
    b = b * (T)r[2];
    b = b + (r[4] != 0.0 ? (T)r[3] * d : d);
}
d = r[6] != 0.0 ? d + (T)r[2] * b : b;
p = p - d * (T)r[0];
"""

_ADAM_BODY = """
const double* r = &h[row * 10];
T grad = g;
if (r[9] != 0.0) p = p * (T)r[0];
else if (r[1] != 0.0) grad = grad + (T)r[1] * p;
if (r[2] < 0.5) m = m + (T)r[2] * (grad - m);
else m = grad - (grad - m) * (T)r[3];
v = v * (T)r[4];
v = v + (T)r[5] * grad * grad;
T denom = sqrt(v) / (T)r[7] + (T)r[8];
p = p + ((T)r[6] * m) / denom;
"""

_KERNELS: dict[str, Any] = {}  # body -> compiled kernel (compiled on first use)


def _tensor_type(dtype: Any) -> int:
    from onnx import helper  # noqa: PLC0415 - only the node form needs onnx

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class DeviceUpdate:
    """An optimizer's steps on a GPU: one fused kernel launch per parameter.

    :meth:`begin_step` is the host's part of a step (new state arrays, step
    counts, this step's scalars written to a device array); calling the object
    with a parameter's gradient launches that parameter's kernel, which reads its
    scalars from the device array.  A step recorded as a CUDA graph thus replays
    with the learning rate and bias corrections of each later step, as long as
    :meth:`begin_step` runs before each replay.
    """

    def __init__(self, optimizer: Optimizer, xp: Any, params: dict[str, Any]):
        self.optimizer = optimizer
        self.xp = xp
        self.params = params
        self.rows = {name: i for i, name in enumerate(params)}
        self.host = np.zeros((len(params), optimizer.SCALARS))
        self.device = xp.zeros(self.host.shape)

    def begin_step(self, names: Iterable[str] | None = None) -> None:
        opt = self.optimizer
        for name in self.params if names is None else names:
            state = opt.state.setdefault(name, {})
            self.host[self.rows[name]] = opt.scalars(self.xp, self.params[name], state)
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
        in_params, out_params, body, names = opt.kernel(state)
        kernel = _KERNELS.get(body)
        if kernel is None:
            kernel = _KERNELS[body] = xp.ElementwiseKernel(
                in_params, out_params, body, f"onnxgrad_{type(opt).__name__.lower()}_update",
                options=("--fmad=false",))
        kernel(grad, self.device, self.rows[name], self.params[name],
               *(state[n] for n in names))
