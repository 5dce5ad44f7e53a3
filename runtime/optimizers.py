"""Optimizers that match ``torch.optim`` numerically.

Each optimizer updates parameters in place on the array module of the arrays
it is given (NumPy or CuPy), in the parameters' own precision.  The order of
floating-point operations follows PyTorch's single-tensor implementations so
that results agree to the last few bits.
"""

from __future__ import annotations

import math
from typing import Any

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


class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW`` (decoupled weight decay)."""

    decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(lr, betas, eps, weight_decay)
