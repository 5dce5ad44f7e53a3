"""Learning-rate schedules that match ``torch.optim.lr_scheduler``.

A schedule sets its optimizer's learning rate from the number of optimizer
steps taken: make it after the optimizer, call :meth:`Schedule.step` after
each optimizer step (``Trainer.fit`` and ``onnxgrad train --lr-schedule`` do).
For the same settings the learning rate at every step equals torch's (torch's
schedulers here are stepped once per optimizer step as well); the arithmetic
follows torch's own, so the values agree to the last bits.

    opt = onnxgrad.SGD(lr=0.1, momentum=0.9)
    schedule = onnxgrad.CosineAnnealingLR(opt, total_steps=1000, warmup_steps=100)
"""

from __future__ import annotations

import bisect
import math
from typing import Any

from onnxgrad.errors import OnnxgradError
from onnxgrad.optimizers import Optimizer


class Schedule:
    """Base class: ``lr_at(step)`` is the learning rate after ``step`` optimizer steps."""

    name = "constant"

    def __init__(self, optimizer: Optimizer):
        if not isinstance(optimizer, Optimizer):
            raise OnnxgradError(f"a schedule needs an onnxgrad optimizer, got "
                                f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self) -> float:
        """One optimizer step was taken: set the learning rate of the next; returns it."""
        self.last_step += 1
        return self._apply()

    def _apply(self) -> float:
        self.optimizer.lr = self.lr_at(self.last_step)
        return self.optimizer.lr

    def settings(self) -> dict[str, Any]:
        """The schedule's own settings (what its constructor took besides the optimizer)."""
        skip = {"optimizer", "base_lr", "last_step"}
        return {k: v for k, v in vars(self).items() if k not in skip and not k.startswith("_")}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base_lr": self.base_lr, "last_step": self.last_step,
                "settings": self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise OnnxgradError(f"schedule state of {state.get('name')!r} given to a "
                                f"{self.name!r} schedule")
        saved, mine = state.get("settings", {}), self.settings()
        for key in sorted(saved):
            if saved.get(key) != mine.get(key):
                raise OnnxgradError(f"the run's {self.name} schedule has {key}={saved.get(key)!r}, "
                                    f"this one {key}={mine.get(key)!r}")
        self.base_lr = float(state["base_lr"])
        self.last_step = int(state["last_step"])
        self._apply()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "optimizer")
        return f"{type(self).__name__}({args})"


def _positive(name: str, value, minimum: float = 1) -> None:
    if value is None or value < minimum:
        raise OnnxgradError(f"{name} must be at least {minimum}, got {value!r}")


class StepLR(Schedule):
    """The learning rate times ``gamma`` every ``step_size`` steps (torch's StepLR)."""

    name = "step"

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        _positive("step_size", step_size)
        self.step_size, self.gamma = int(step_size), float(gamma)
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** (step // self.step_size)


class MultiStepLR(Schedule):
    """The learning rate times ``gamma`` at each milestone step (torch's MultiStepLR)."""

    name = "multistep"

    def __init__(self, optimizer: Optimizer, milestones, gamma: float = 0.1):
        milestones = sorted(int(m) for m in milestones)
        if not milestones or milestones[0] < 1:
            raise OnnxgradError(f"milestones must be steps of 1 or more, got {milestones}")
        self.milestones, self.gamma = milestones, float(gamma)
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, step)


class ExponentialLR(Schedule):
    """The learning rate times ``gamma`` every step (torch's ExponentialLR)."""

    name = "exponential"

    def __init__(self, optimizer: Optimizer, gamma: float):
        self.gamma = float(gamma)
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** step


class CosineAnnealingLR(Schedule):
    """Cosine decay from the learning rate to ``min_lr`` over ``total_steps``
    (torch's CosineAnnealingLR with ``T_max = total_steps - warmup_steps``), after
    an optional linear warmup of ``warmup_steps`` from ``lr / warmup_steps`` (torch's
    LinearLR with ``start_factor = 1 / warmup_steps``, in a SequentialLR)."""

    name = "cosine"

    def __init__(self, optimizer: Optimizer, total_steps: int, min_lr: float = 0.0,
                 warmup_steps: int = 0):
        _positive("total_steps", total_steps)
        if not 0 <= warmup_steps < total_steps:
            raise OnnxgradError(f"warmup_steps must lie in [0, total_steps), got {warmup_steps}")
        self.total_steps, self.min_lr = int(total_steps), float(min_lr)
        self.warmup_steps = int(warmup_steps)
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return _linear_warmup(self.base_lr, step, self.warmup_steps)
        t = step - self.warmup_steps
        period = self.total_steps - self.warmup_steps
        return self.min_lr + (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t / period)) / 2


def _linear_warmup(base: float, step: int, steps: int) -> float:
    """torch's LinearLR from 1/steps to 1 over ``steps`` steps, in its closed form."""
    start = 1.0 / steps
    return base * (start + (1.0 - start) * min(steps, step) / steps)


class LinearWarmupDecay(Schedule):
    """Linear warmup from 0 over ``warmup_steps``, then linear decay to 0 at
    ``total_steps`` (Hugging Face's ``get_linear_schedule_with_warmup``, a torch
    LambdaLR)."""

    name = "linear"

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0):
        _positive("total_steps", total_steps)
        if not 0 <= warmup_steps < total_steps:
            raise OnnxgradError(f"warmup_steps must lie in [0, total_steps), got {warmup_steps}")
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        super().__init__(optimizer)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            factor = float(step) / float(max(1, self.warmup_steps))
        else:
            factor = max(0.0, float(self.total_steps - step)
                         / float(max(1, self.total_steps - self.warmup_steps)))
        return self.base_lr * factor


class OneCycleLR(Schedule):
    """torch's OneCycleLR (two phases, cosine annealing): from ``max_lr / div_factor``
    up to ``max_lr`` over ``pct_start`` of ``total_steps``, then down to
    ``max_lr / (div_factor · final_div_factor)``.  With ``cycle_momentum`` the
    momentum (SGD) or beta1 (Adam, AdamW) moves the other way, between
    ``max_momentum`` and ``base_momentum``, as torch's does."""

    name = "onecycle"

    def __init__(self, optimizer: Optimizer, max_lr: float, total_steps: int,
                 pct_start: float = 0.3, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, cycle_momentum: bool = True,
                 base_momentum: float = 0.85, max_momentum: float = 0.95):
        _positive("total_steps", total_steps, 2)
        if not 0 < pct_start < 1:
            raise OnnxgradError(f"pct_start must lie in (0, 1), got {pct_start}")
        self.max_lr, self.total_steps = float(max_lr), int(total_steps)
        self.initial_lr = self.max_lr / div_factor
        self.min_lr = self.initial_lr / final_div_factor
        self.phase_end = float(pct_start * self.total_steps) - 1
        self.cycle_momentum = bool(cycle_momentum) and (
            getattr(optimizer, "momentum", 0) or hasattr(optimizer, "betas"))
        self.base_momentum, self.max_momentum = float(base_momentum), float(max_momentum)
        super().__init__(optimizer)
        self.base_lr = self.initial_lr

    @staticmethod
    def _cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def _phase(self, step: int) -> tuple[float, float, float]:
        """(learning rate, momentum) at ``step``, as torch's get_lr computes them."""
        if step <= self.phase_end:
            pct = step / self.phase_end
            return (self._cos(self.initial_lr, self.max_lr, pct),
                    self._cos(self.max_momentum, self.base_momentum, pct), pct)
        pct = (step - self.phase_end) / (self.total_steps - 1 - self.phase_end)
        return (self._cos(self.max_lr, self.min_lr, pct),
                self._cos(self.base_momentum, self.max_momentum, pct), pct)

    def lr_at(self, step: int) -> float:
        if step > self.total_steps:  # torch refuses the step after the last one, too
            raise OnnxgradError(f"OneCycleLR was set for {self.total_steps} steps; step {step} "
                                "lies past its end")
        return self._phase(step)[0]

    def _apply(self) -> float:
        lr = super()._apply()
        if self.cycle_momentum:
            momentum = self._phase(self.last_step)[1]
            if hasattr(self.optimizer, "betas"):
                self.optimizer.betas = (momentum, self.optimizer.betas[1])
            else:
                self.optimizer.momentum = momentum
        return lr


#: --lr-schedule name -> class.
SCHEDULES = {cls.name: cls for cls in (StepLR, MultiStepLR, ExponentialLR, CosineAnnealingLR,
                                       LinearWarmupDecay, OneCycleLR)}
