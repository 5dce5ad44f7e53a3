"""The compiled CPU update remembers, on each optimizer, the loop of its present
settings (``optimizers._loop_of``), so that an update with unchanged settings
does not look them up again.  Here: a hyper-parameter changed between two
updates takes effect at the next one (each kind of change: a value, a change of
the rule's form, an attribute added or removed, a setting mutated in place),
optimizers with other settings in one process keep their own, and a copy or a
pickle of an optimizer takes its settings and state but not the remembered loop.
Each run is compared bit for bit with the rule on whole arrays (compiled kernels
switched off), one update per parameter as the Trainer calls it."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import onnxgrad
from onnxgrad import optimizers
from onnxgrad.ops import compiled
from test_multi_tensor_optimizer import _assert_same

needs_compiled = pytest.mark.skipif(not compiled.available(), reason="numba is not installed")

DTYPES = [np.float32, np.float64]
SHAPES = {"w": (10, 84), "b": (10,), "big": (compiled.PART + 3,)}


def _arrays(rng, dtype):
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def _update(optimizer, params, grads, monkeypatch=None):
    """One update per parameter (as the Trainer calls it); with ``monkeypatch``, the
    rule on whole arrays instead of the compiled loop."""
    for name in grads:
        if monkeypatch is None:
            optimizer.update(np, {name: params[name]}, {name: grads[name]})
        else:
            with monkeypatch.context() as m:
                m.setattr(compiled, "ENABLED", False)
                optimizer.update(np, {name: params[name]}, {name: grads[name]})


def _run(make, change, dtype, monkeypatch, steps=6):
    """``steps`` updates of an optimizer from ``make()`` by the compiled loop and by
    the rule on whole arrays, ``change(optimizer, step)`` before each; the same bits."""
    rng = np.random.default_rng(0)
    plain, looped = make(), make()
    a = _arrays(rng, dtype)
    b = {k: v.copy() for k, v in a.items()}
    for step in range(steps):
        change(plain, step)
        change(looped, step)
        grads = _arrays(rng, dtype)
        _update(plain, a, grads, monkeypatch)
        _update(looped, b, grads)
    _assert_same(a, b, plain, looped)
    return plain, looped


def _sgd_changes(opt, step):
    opt.lr = 0.05 / (1 + step)
    opt.momentum = 0.9 - 0.05 * step  # a new value at every step (OneCycleLR's momentum)
    if step == 2:
        opt.weight_decay = 1e-2  # a term the rule did not have
    if step == 3:
        opt.nesterov = True
    if step == 4:
        opt.nesterov, opt.dampening = False, 0.25
    if step == 5:
        opt.momentum = 0.0  # no momentum term any more (the buffer stays, unread)


def _adam_changes(opt, step):
    opt.lr = 0.01 * (1 + step)
    opt.betas = (0.9 - 0.1 * step, 0.999)  # 1 - beta1 passes 0.5 at step 4: the other form
    if step == 2:
        opt.eps = 1e-3
    if step == 3:
        opt.weight_decay = 0.0 if opt.weight_decay else 0.05


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make, change", [
    (lambda: onnxgrad.SGD(lr=0.05, momentum=0.9), _sgd_changes),
    (lambda: onnxgrad.Adam(lr=0.01, weight_decay=1e-2), _adam_changes),
    (lambda: onnxgrad.AdamW(lr=0.01), _adam_changes),
], ids=["sgd", "adam", "adamw"])
def test_a_hyper_parameter_changed_between_updates_takes_effect_at_the_next(
        make, change, dtype, monkeypatch):
    _run(make, change, dtype, monkeypatch)


@needs_compiled
def test_settings_that_come_back_find_the_loop_again(monkeypatch):
    """A -> B -> A: the loop remembered for A is not taken for B, nor B's for A."""
    def change(opt, step):
        opt.momentum = 0.9 if step % 2 == 0 else 0.5
        opt.weight_decay = 0.0 if step % 3 else 1e-2

    _run(lambda: onnxgrad.SGD(lr=0.05, momentum=0.9), change, np.float32, monkeypatch, steps=7)


@needs_compiled
def test_an_attribute_added_or_removed_is_a_change_of_settings(monkeypatch):
    """A rule that reads an attribute only when it is there: one added, one removed,
    and one removed while another is added (the same number of attributes)."""

    class Shrunk(onnxgrad.SGD):
        def rule(self, t, p, g, s, k):
            if hasattr(self, "shrink"):
                g = t.mul(g, t.const(self.shrink))
            return super().rule(t, p, g, s, k)

    def change(opt, step):
        if step == 1:
            opt.shrink = 0.5
        if step == 2:
            del opt.shrink
        if step == 3:
            opt.other = 1
        if step == 4:
            del opt.other
            opt.shrink = 0.25

    _run(lambda: Shrunk(lr=0.05, momentum=0.9), change, np.float32, monkeypatch)


@needs_compiled
def test_a_setting_mutated_in_place_takes_effect(monkeypatch):
    """A setting that cannot be a key (a list) is never taken as unchanged."""

    class Listed(onnxgrad.SGD):
        def __init__(self, lr, scales):
            super().__init__(lr, momentum=0.9)
            self.scales = scales

        def rule(self, t, p, g, s, k):
            return super().rule(t, p, t.mul(g, t.const(self.scales[0])), s, k)

    def change(opt, step):
        opt.scales[0] = 1.0 + step

    _run(lambda: Listed(0.05, [1.0]), change, np.float32, monkeypatch)


@needs_compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizers_with_other_settings_keep_their_own(dtype, monkeypatch):
    """Updates of several optimizers interleaved, parameter by parameter."""
    makers = [lambda: onnxgrad.SGD(lr=0.05, momentum=0.9),
              lambda: onnxgrad.SGD(lr=0.05, momentum=0.5),
              lambda: onnxgrad.SGD(lr=0.05, momentum=0.9, nesterov=True),
              lambda: onnxgrad.Adam(lr=0.01),
              lambda: onnxgrad.Adam(lr=0.01, betas=(0.3, 0.99)),
              lambda: onnxgrad.AdamW(lr=0.01)]
    rng = np.random.default_rng(1)
    plain, looped = [m() for m in makers], [m() for m in makers]
    a = [_arrays(rng, dtype) for _ in makers]
    b = [{k: v.copy() for k, v in params.items()} for params in a]
    for _ in range(3):
        grads = _arrays(rng, dtype)
        for name in grads:
            for i in range(len(makers)):
                _update(plain[i], a[i], {name: grads[name]}, monkeypatch)
                _update(looped[i], b[i], {name: grads[name]})
    for i in range(len(makers)):
        _assert_same(a[i], b[i], plain[i], looped[i])


@needs_compiled
def test_unchanged_settings_do_not_look_the_loop_up_again(monkeypatch):
    """Only a change of settings looks the loop up; the learning rate is no setting."""
    looked_up = []
    remembered = optimizers._remembered
    monkeypatch.setattr(optimizers, "_remembered",
                        lambda *args: looked_up.append(1) or remembered(*args))
    rng = np.random.default_rng(2)
    opt, params = onnxgrad.SGD(lr=0.05, momentum=0.9), _arrays(rng, np.float32)
    for step in range(3):
        opt.lr = 0.05 / (1 + step)
        _update(opt, params, _arrays(rng, np.float32))
    assert len(looked_up) == 1
    opt.momentum = 0.8
    _update(opt, params, _arrays(rng, np.float32))
    assert len(looked_up) == 2


@pytest.mark.parametrize("duplicate", [copy.copy, copy.deepcopy,
                                       lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["copy", "deepcopy", "pickle"])
def test_a_copied_optimizer_takes_its_settings_and_state_not_its_loop(duplicate):
    rng = np.random.default_rng(3)
    opt, params = onnxgrad.Adam(lr=0.01, betas=(0.8, 0.99)), _arrays(rng, np.float32)
    _update(opt, params, _arrays(rng, np.float32))
    other = duplicate(opt)
    assert repr(other) == repr(opt) and "_loop" not in vars(other) and "_loop" not in repr(opt)
    assert other.state.keys() == opt.state.keys()
    if duplicate is copy.copy:  # a shallow copy shares the state: no second run
        return
    again = {k: v.copy() for k, v in params.items()}
    for _ in range(2):
        grads = _arrays(rng, np.float32)
        _update(opt, params, grads)
        _update(other, again, grads)
    _assert_same(params, again, opt, other)
