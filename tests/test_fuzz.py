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


@pytest.mark.parametrize("attrs,message", [
    ({"strides": [0, 1]}, "strides must be whole numbers from 1"),
    ({"pads": [0, 0, 1 << 40, 0]}, "pads must be whole numbers from 0"),
    ({"dilations": [-1, 1]}, "dilations must be whole numbers from 1"),
])
def test_window_attributes_out_of_range_are_refused_by_node(attrs, message):
    import numpy as np

    from helpers import helper, make_model

    node = helper.make_node("Conv", ["x", "w"], ["y"], name="the_conv", **attrs)
    proto = make_model([node], [("x", np.float32, [1, 1, 5, 5])],
                       [("y", np.float32, ["a", "b", "c", "d"])],
                       {"w": np.ones((1, 1, 3, 3), np.float32)})
    model = fuzz.onnxgrad.load(proto)
    with pytest.raises(fuzz.onnxgrad.ModelError, match=f"node 'the_conv' \\(Conv\\): {message}"):
        model.run({"x": np.ones((1, 1, 5, 5), np.float32)})
