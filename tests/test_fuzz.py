"""Fuzzing: structured and byte-level mutations of small models (tests/fuzz.py) with a
fixed seed.  Every case must end in success or an OnnxgradError: no other exception,
no crash, no hang.  A larger run is marked slow."""

from __future__ import annotations

import warnings

import pytest

import fuzz


def _failures(count: int, seed: int) -> list[str]:
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPy's overflow warnings on mutated weights
        for case in fuzz.cases(count, seed=seed):
            problem = fuzz.run(case)
            if problem:
                found.append(f"case {case.seed} ({case.kind}: {case.what}): {problem}")
    return found


def test_a_few_thousand_mutated_models_fail_only_with_onnxgrad_errors():
    failures = _failures(3000, seed=11)
    assert not failures, "\n".join(failures[:20])


@pytest.mark.slow
def test_twenty_thousand_mutated_models_fail_only_with_onnxgrad_errors():
    failures = _failures(20000, seed=12)
    assert not failures, "\n".join(failures[:20])


def test_the_mutations_reach_the_kernels():
    # The run is only worth something if many mutated models load and run.
    ran = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in fuzz.cases(400, seed=13):
            if case.kind == "structure" and fuzz.run(case) is None:
                try:
                    model = fuzz.onnxgrad.load(fuzz.onnx.load_from_string(case.data))
                    model.run(fuzz._feeds(model))
                    ran += 1
                except fuzz.onnxgrad.OnnxgradError:
                    pass
    assert ran > 50  # of about 200 structural mutations
