"""Learning rates (and OneCycleLR's momentum) of torch.optim.lr_scheduler, stepped once
per optimizer step, for tests/test_schedules.py.  Run with torch installed:

    python tests/reference/make_schedule_reference.py      # writes schedules.json beside it
"""

from __future__ import annotations

import json
import pathlib

import torch
from torch.optim import lr_scheduler as S

STEPS = 60


def _run(make_optimizer, make_schedule, momentum_key=None):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([param])
    schedule = make_schedule(opt)
    lrs, momenta = [], []
    for _ in range(STEPS):
        group = opt.param_groups[0]
        lrs.append(group["lr"])
        if momentum_key == "momentum":
            momenta.append(group["momentum"])
        elif momentum_key == "betas":
            momenta.append(group["betas"][0])
        opt.step()
        schedule.step()
    return {"lr": lrs, "momentum": momenta}


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adamw(params):
    return torch.optim.AdamW(params, lr=3e-3)


def warm_cosine(opt, total, warmup, eta_min):
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0,
                                           total_iters=warmup),
                                S.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=eta_min)],
                          milestones=[warmup])


def linear(total, warmup):
    def factor(step):
        if step < warmup:
            return float(step) / float(max(1, warmup))
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    return factor


CASES = {
    "step": ({"step_size": 7, "gamma": 0.5},
             lambda: _run(sgd, lambda o: S.StepLR(o, step_size=7, gamma=0.5))),
    "multistep": ({"milestones": [10, 25, 40], "gamma": 0.3},
                  lambda: _run(sgd, lambda o: S.MultiStepLR(o, [10, 25, 40], gamma=0.3))),
    "exponential": ({"gamma": 0.95}, lambda: _run(sgd, lambda o: S.ExponentialLR(o, 0.95))),
    "cosine": ({"total_steps": 50, "min_lr": 0.001},
               lambda: _run(sgd, lambda o: S.CosineAnnealingLR(o, T_max=50, eta_min=0.001))),
    "cosine-warmup": ({"total_steps": 50, "min_lr": 0.0, "warmup_steps": 8},
                      lambda: _run(sgd, lambda o: warm_cosine(o, 50, 8, 0.0))),
    "linear": ({"total_steps": 50, "warmup_steps": 10},
               lambda: _run(adamw, lambda o: S.LambdaLR(o, linear(50, 10)))),
    "onecycle-sgd": ({"max_lr": 0.5, "total_steps": STEPS},
                     lambda: _run(sgd, lambda o: S.OneCycleLR(o, max_lr=0.5, total_steps=STEPS),
                                  "momentum")),
    "onecycle-adamw": ({"max_lr": 0.01, "total_steps": STEPS, "pct_start": 0.25},
                       lambda: _run(adamw, lambda o: S.OneCycleLR(o, max_lr=0.01,
                                                                  total_steps=STEPS,
                                                                  pct_start=0.25), "betas")),
}


def main() -> None:
    out = {"torch": torch.__version__, "steps": STEPS, "cases": {}}
    for name, (settings, run) in CASES.items():
        out["cases"][name] = {"settings": settings, **run()}
    path = pathlib.Path(__file__).with_name("schedules.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
