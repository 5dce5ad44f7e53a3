"""Gradients over the ONNX backend node suite, against central differences in float64.

Every suite case (the ``_expanded`` ones too: function bodies written in standard
ops, which exercise composite gradients) is its own test: the case goes to float64,
its loss is ``Σ sum(Y * U)`` over its floating-point outputs, and the gradient that
``Trainer.gradients`` gives for each floating-point input is checked along a random
direction (see :mod:`node_gradcheck`).  A case that cannot be checked is skipped
with the reason: an op without float64, no float input or output, no gradient rule
(``UnsupportedOpError``), random outputs, a training step that computes another
function than ``Model.run`` (BatchNormalization, Dropout), or suite inputs on a kink,
jump or pole of the function.  A floor on the number of cases checked keeps the coverage from dropping
silently.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest

import node_gradcheck as ng
from onnxgrad.tools import conformance as C

#: Cases whose gradients are wrong, pending fixes in ops/: case name -> reason.  Each is
#: a strict xfail, so a fix shows up as a failure here until its entry is removed.
KNOWN_FAILURES: dict[str, str] = {}

#: Cases checked (not skipped), at least: about 90 % of the 1142 (366 of them expanded)
#: checked when this was written.
COVERED_FLOOR = 1028
EXPANDED_FLOOR = 330

CASES = C.load_cases()
_BY_NAME = {c.name: c for c in CASES}


@functools.lru_cache(maxsize=None)
def outcome(name: str) -> ng.Outcome | ng.Skip:
    """The check of one case (once per process: the coverage test reuses it)."""
    try:
        return ng.check_case(_BY_NAME[name])
    except ng.Skip as skip:
        return skip


def _params():
    for case in CASES:
        marks = ()
        if case.name in KNOWN_FAILURES:
            marks = pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[case.name])
        yield pytest.param(case.name, id=case.name, marks=marks)


@pytest.mark.parametrize("name", list(_params()))
def test_node_case_gradient(name):
    """⟨analytic gradient, v⟩ equals the central difference for every float input."""
    result = outcome(name)
    if isinstance(result, ng.Skip):
        pytest.skip(str(result))
    assert result.checks, f"{name}: nothing was checked"
    assert not result.failures, f"{name}: " + "; ".join(result.failures)


def test_coverage_stays_above_the_floor():
    """Enough cases are checked, expanded ones included; skips are counted by reason."""
    skips = {}
    for case in CASES:
        try:
            result = outcome(case.name)
        except Exception:  # noqa: BLE001 - an error in backward fails the case's own test
            continue
        if isinstance(result, ng.Skip):
            skips[case.name] = result
    covered = [c.name for c in CASES if c.name not in skips]
    expanded = [n for n in covered if ng.is_expanded(n)]
    reasons = Counter(s.reason for s in skips.values())
    summary = f"{len(covered)} checked ({len(expanded)} expanded), skips: {dict(reasons)}"
    assert len(covered) >= COVERED_FLOOR, summary
    assert len(expanded) >= EXPANDED_FLOOR, summary
    assert set(KNOWN_FAILURES) <= set(covered), sorted(set(KNOWN_FAILURES) - set(covered))


def test_a_wrong_rule_is_caught(monkeypatch):
    """The check is not vacuous: a softmax gradient off by 1e-4 fails it."""
    from onnxgrad.ops import lookup

    definition = lookup("SoftmaxGrad", "onnxgrad", 1)
    kernel = definition.kernel
    monkeypatch.setattr(definition, "kernel",
                        lambda xp, *args, **kw: (kernel(xp, *args, **kw)[0] * (1 + 1e-4),))
    result = ng.check_case(C.load_cases("test_softmax_axis_1")[0])
    assert result.failures and "analytic" in result.failures[0]


def test_kinks_are_skipped_not_failed():
    """Relu-like kinks at the suite's inputs (LeakyRelu at exactly 0) are skipped as
    ambiguous, while the same op away from its kink is checked."""
    with pytest.raises(ng.Skip, match="not differentiable"):
        ng.check_case(C.load_cases("test_leakyrelu_example")[0])
    assert not ng.check_case(C.load_cases("test_leakyrelu")[0]).failures
