"""Every size-dependent path of the convolution kernels, forced both ways.

The kernels pick their paths by size through module-level parameters
(``ops/conv.py``: column budget, column layout, weight-gradient product order,
flipped-kernel input gradient; ``ops/winograd.py``; ``ops/depthwise.py``).  ``SWITCHES`` lists
them, one line each; every test is parametrized over it and forces a path on
and off with ``monkeypatch``:

* at realistic sizes, Conv / ConvTranspose forward and the gradients of X and W
  (through the public API, as ``Trainer.gradients`` computes them) agree
  between the two paths in float64, and the forward equals onnxruntime in
  float32 on either path;
* at small sizes, the forward equals the ONNX reference evaluator and float64
  central differences check the gradients of X and W on either path
  (``tests/gradcheck.py``);
* the batch taken in chunks that do not divide it evenly equals one chunk.

A switch whose path replaces the general column products (``diverts``, e.g. a
Winograd or a direct depthwise kernel) is forced off while the other switches
are tested, so that their paths are reached whatever the sizes.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

import gradcheck as gc
from helpers import count_calls
from onnxgrad import threads
from onnxgrad.ops import compiled, conv, depthwise, winograd
from op_db import Sample

BIG = 1 << 40  # a threshold no size reaches
ONE_TILE = 1 << 22  # elements of a tile (buffers are allocated at this size) holding every group here


def _always(*args):
    return True


def _never(*args):
    return False


# -- cases ---------------------------------------------------------------------------------


class Case(NamedTuple):
    id: str
    op: str
    x: tuple
    w: tuple
    attrs: dict
    ref: str = "onnx"  # forward reference of the gradient checks (see tests/op_db.py)
    bias: bool = False  # a Conv with its bias input B

    @property
    def grouped(self) -> bool:
        """A grouped Conv (ConvTranspose never runs the direct kernels)."""
        return self.op == "Conv" and self.attrs.get("group", 1) > 1

    @property
    def depthwise(self) -> bool:
        return self.grouped and self.w[1] == 1

    @property
    def stride1(self) -> bool:
        return all(s == 1 for s in self.attrs.get("strides", [1]))

    def sample(self) -> Sample:
        inputs = [("X", ("real", self.x)), ("W", ("real", self.w))]
        if self.bias:
            inputs.append(("B", ("real", (self.w[0],))))
        return Sample(self.op, inputs, self.attrs, 11, ref=self.ref)


#: Realistic layers: float64 path agreement and float32 forward against onnxruntime.
LAYERS = [
    Case("conv3x3", "Conv", (8, 32, 16, 16), (32, 32, 3, 3), {"pads": [1, 1, 1, 1]}, bias=True),
    Case("conv3x3_stride2_asym", "Conv", (8, 32, 16, 16), (64, 32, 3, 3),
         {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
    Case("conv3x3_group4", "Conv", (8, 64, 16, 16), (64, 16, 3, 3),
         {"group": 4, "pads": [1, 1, 1, 1]}),
    Case("depthwise3x3", "Conv", (8, 32, 16, 16), (32, 1, 3, 3),
         {"group": 32, "pads": [1, 1, 1, 1]}),
    Case("depthwise3x3_stride2", "Conv", (8, 32, 16, 16), (32, 1, 3, 3),
         {"group": 32, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    Case("conv5x5_one_channel_to_6", "Conv", (8, 1, 28, 28), (6, 1, 5, 5), {"pads": [2, 2, 2, 2]}),
    Case("lenet_conv2_6_to_16", "Conv", (8, 6, 14, 14), (16, 6, 5, 5), {}, bias=True),
    Case("stem3x3_3_to_16", "Conv", (4, 3, 32, 32), (16, 3, 3, 3), {"pads": [1, 1, 1, 1]},
         bias=True),
    Case("conv3x3_group8_4ch", "Conv", (8, 32, 16, 16), (32, 4, 3, 3),
         {"group": 8, "pads": [1, 1, 1, 1]}),
    Case("conv3x3_256ch", "Conv", (2, 256, 4, 4), (256, 256, 3, 3), {"pads": [1, 1, 1, 1]}),
    Case("convT3x3", "ConvTranspose", (8, 32, 16, 16), (32, 32, 3, 3), {"pads": [1, 1, 1, 1]}),
    Case("convT3x3_stride2", "ConvTranspose", (8, 32, 8, 8), (32, 16, 3, 3),
         {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    Case("convT3x3_group2", "ConvTranspose", (8, 32, 16, 16), (32, 8, 3, 3),
         {"group": 2, "pads": [1, 1, 1, 1]}),
]

#: Small layers: float64 central differences.
SMALL = [
    Case("conv", "Conv", (3, 4, 6, 5), (5, 4, 3, 3), {"pads": [1, 1, 1, 1]}, bias=True),
    Case("conv_stride2_asym", "Conv", (3, 4, 7, 6), (6, 4, 3, 3),
         {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
    Case("conv_group2_asym", "Conv", (3, 6, 5, 5), (4, 3, 3, 3),
         {"group": 2, "pads": [0, 1, 1, 2]}, bias=True),
    Case("conv_3ch_stride2_dilated", "Conv", (2, 3, 9, 8), (5, 3, 3, 3),
         {"strides": [2, 1], "dilations": [1, 2], "pads": [1, 2, 0, 1]}),
    Case("depthwise_x2_stride2_asym", "Conv", (3, 4, 7, 6), (8, 1, 3, 3),
         {"group": 4, "strides": [2, 2], "pads": [1, 0, 2, 1]}),
    Case("depthwise_dilated", "Conv", (2, 3, 7, 7), (3, 1, 3, 3),
         {"group": 3, "dilations": [2, 1], "pads": [2, 1, 2, 1]}),
    Case("convT_asym", "ConvTranspose", (3, 4, 4, 5), (4, 3, 3, 3), {"pads": [1, 0, 0, 1]}),
    Case("convT_stride2_asym", "ConvTranspose", (3, 4, 3, 4), (4, 3, 3, 3),
         {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]}),
    Case("convT_group2", "ConvTranspose", (3, 4, 4, 3), (4, 2, 3, 3), {"group": 2},
         ref="onnxruntime"),
]


# -- switches ------------------------------------------------------------------------------


class Switch(NamedTuple):
    module: ModuleType
    name: str      # the module attribute set to force the path
    on: Any        # the value that forces the path the switch is about
    off: Any       # the value that forces the other path
    what: str      # the path forced on, against what
    applies: Callable[[Case], bool] = lambda case: True  # cases that reach the switch
    also: tuple = ()       # (module, name, value): settings that make the switch reachable
    diverts: bool = False  # its path replaces the general column products (see top)
    params: tuple = ()     # the size parameters it stands for (default: ``name``)
    calls: tuple = ()      # (module, function): the forced-on path calls each, the other none

    @property
    def id(self) -> str:
        return f"{self.module.__name__.rsplit('.', 1)[-1]}.{self.name.strip('_')}"


def _winograd_shape(case: Case) -> bool:
    """3×3, stride 1, no dilation, one group: Conv's forward and weight gradient, its
    flipped input gradient, and ConvTranspose's input and weight gradients."""
    return (len(case.w) == 4 and tuple(case.w[2:]) == (3, 3) and case.stride1
            and case.attrs.get("group", 1) == 1 and not case.attrs.get("dilations"))


_WINOGRAD_ON = ((winograd, "MIN_CHANNELS", 1), (winograd, "MIN_POSITIONS", 0),
                (winograd, "WEIGHT_GRAD_MAX_POSITIONS", BIG))
_DIRECT_ON = ((depthwise, "DIRECT_MAX_CHANNELS_PER_GROUP", BIG),
              (depthwise, "DIRECT_MAX_OUTPUTS_PER_GROUP", BIG))
_DIRECT = ((depthwise, "conv"), (depthwise, "input_grad"), (depthwise, "weight_grad"))

#: Parameters that size work on a GPU only, so that no CPU run can force them; the
#: gpu-marked test named beside each forces them instead.
DEVICE_ONLY = {
    ("onnxgrad.ops.conv", "DEVICE_COLUMN_BUDGET"):
        "test_gpu_graphs.py::test_device_column_chunks_equal_one_product",
}

SWITCHES = [
    Switch(conv, "COLUMN_BUDGET", 1, BIG,
           "batch-major columns made one batch item at a time, against the whole batch at once",
           also=((conv, "_batch_major", _always), (conv, "MIN_CHUNKS", 1))),
    Switch(conv, "MIN_CHUNKS", BIG, 1,
           "batch-major columns in chunks of one item on the thread pool, against one chunk",
           also=((conv, "_batch_major", _always), (conv, "COLUMN_BUDGET", BIG),
                 (conv, "PARALLEL_COPY", 0))),
    Switch(conv, "PARALLEL_COPY", 0, BIG,
           "batch-inner columns made and scattered in channel parts on the thread pool, "
           "against one part", also=((conv, "_batch_major", _never),)),
    Switch(conv, "_batch_major", _always, _never,
           "batch-major columns per item, against batch-inner columns over the whole batch",
           params=("BATCH_MAJOR_MIN_POSITIONS",), calls=((conv, "_im2col"),)),
    Switch(conv, "BATCH_PART_MIN_ITEMS", 1, BIG,
           "batch-inner layers in parts of the batch on the thread pool, each from input to "
           "output, against the whole batch at once",
           also=((conv, "_batch_major", _never), (threads, "MATMUL_SPLIT_FROM", 0)),
           calls=((conv, "_by_batch_parts"),)),
    Switch(conv, "COMPILED_COLUMNS_MIN_ITEMS", 0, BIG,
           "batch-inner columns made by the compiled kernel, against the NumPy copies",
           also=((conv, "_batch_major", _never),), calls=((conv, "_im2col_inner_kernel"),)),
    Switch(conv, "GRADW_TRANSPOSED_BELOW", 1, BIG,
           "weight gradient as dY @ columns^T, against columns @ dY^T"),
    Switch(conv, "FLIPPED_MIN_CHANNELS", 1, BIG,
           "stride-1 input gradient as a Conv with the flipped kernel, against a column scatter",
           applies=lambda case: case.op == "Conv" and case.stride1,
           calls=((conv, "flipped_input_grad"),)),
    Switch(winograd, "MIN_CHANNELS", 1, BIG,
           "3x3 stride-1 products by Winograd F(2x2, 3x3), against im2col products",
           applies=_winograd_shape, also=_WINOGRAD_ON[1:], diverts=True,
           params=("MIN_CHANNELS", "MIN_POSITIONS", "MIN_BATCH_POSITIONS"),
           calls=((winograd, "conv3x3"), (winograd, "weight_grad3x3"))),
    Switch(winograd, "WEIGHT_GRAD_MAX_POSITIONS", BIG, 0,
           "3x3 stride-1 weight gradient by Winograd, against im2col (the rest by Winograd)",
           applies=_winograd_shape, also=_WINOGRAD_ON[:2], calls=((winograd, "weight_grad3x3"),)),
    Switch(winograd, "F4_MIN_TILES", 0, BIG,
           "3x3 stride-1 Winograd as F(4x4, 3x3), against F(2x2, 3x3)",
           applies=_winograd_shape, also=_WINOGRAD_ON),
    Switch(winograd, "CHUNK_BUDGET", 1, BIG,
           "Winograd tiles transformed one batch item at a time, against the whole batch",
           applies=_winograd_shape, also=_WINOGRAD_ON + ((winograd, "MIN_TILES", 1),),
           params=("CHUNK_BUDGET", "MIN_TILES")),
    Switch(depthwise, "DIRECT_MAX_CHANNELS_PER_GROUP", BIG, 0,
           "grouped Conv by the direct (taps or dense) kernels, against column products",
           applies=lambda case: case.grouped, also=_DIRECT_ON[1:], diverts=True,
           params=("DIRECT_MAX_CHANNELS_PER_GROUP", "DIRECT_MAX_OUTPUTS_PER_GROUP"), calls=_DIRECT),
    Switch(depthwise, "DENSE_MAX_PAIRS", BIG, 0,
           "direct depthwise Conv by dense BLAS products, against the taps method",
           applies=lambda case: case.depthwise,
           also=_DIRECT_ON + ((depthwise, "DENSE_MAX_OUTPUTS_PER_TAP", BIG),
                              (depthwise, "COMPILED_MIN_OUTPUTS", BIG)),
           params=("DENSE_MAX_PAIRS", "DENSE_MAX_OUTPUTS_PER_TAP"),
           calls=((depthwise, "_dense_forward"), (depthwise, "_dense_input_grad"),
                  (depthwise, "_dense_weight_grad"))),
    Switch(depthwise, "TAPS_TILE", 1, ONE_TILE,
           "direct taps method one group per tile (buffers reused), against one tile",
           applies=lambda case: case.grouped,
           also=_DIRECT_ON + ((depthwise, "DENSE_MAX_PAIRS", 0),)),
    Switch(depthwise, "DENSE_TILE", 1, ONE_TILE,
           "direct dense method one group per tile, against one tile",
           applies=lambda case: case.depthwise,
           also=_DIRECT_ON + ((depthwise, "DENSE_MAX_PAIRS", BIG),
                              (depthwise, "DENSE_MAX_OUTPUTS_PER_TAP", BIG),
                              (depthwise, "COMPILED_MIN_OUTPUTS", BIG))),
    Switch(depthwise, "COMPILED_MAX_OUTPUTS_PER_GROUP", BIG, 0,
           "Conv of one input channel per group and many outputs by the compiled direct "
           "kernels, against column products",
           applies=lambda case: case.op == "Conv" and case.w[1] == 1
           and case.w[0] // case.attrs.get("group", 1) > depthwise.DIRECT_MAX_OUTPUTS_PER_GROUP,
           diverts=True, calls=((depthwise, "_compiled_forward"), (depthwise, "_compiled_input_grad"),
                                (depthwise, "_compiled_weight_grad"))),
    Switch(depthwise, "COMPILED_MAX_CHANNELS_PER_GROUP", BIG, 0,
           "direct grouped Conv by the compiled kernels, against the NumPy taps method",
           applies=lambda case: case.grouped,
           also=_DIRECT_ON + ((depthwise, "DENSE_MAX_PAIRS", 0), (depthwise, "COMPILED_MIN_OUTPUTS", 0)),
           calls=((depthwise, "_compiled_forward"), (depthwise, "_compiled_input_grad"),
                  (depthwise, "_compiled_weight_grad"))),
    Switch(depthwise, "COMPILED_PASS", 1, BIG,
           "compiled depthwise kernels one batch item per pass, against the whole batch",
           applies=lambda case: case.depthwise,
           also=_DIRECT_ON + ((depthwise, "DENSE_MAX_PAIRS", 0),)),
    Switch(depthwise, "COMPILED_MIN_OUTPUTS", 0, BIG,
           "compiled taps method on planes the dense method would take, against the dense method",
           applies=lambda case: case.depthwise,
           also=_DIRECT_ON + ((depthwise, "DENSE_MAX_PAIRS", BIG),
                              (depthwise, "DENSE_MAX_OUTPUTS_PER_TAP", BIG)),
           calls=((depthwise, "_compiled_forward"), (depthwise, "_compiled_input_grad"),
                  (depthwise, "_compiled_weight_grad"))),
    Switch(depthwise, "PARALLEL_MIN_WORK", 0, BIG,
           "direct kernels' tiles (compiled: parts of the batch and channels) in 3 tasks on "
           "the thread pool, against one task",
           applies=lambda case: case.grouped,
           also=_DIRECT_ON + ((depthwise, "TAPS_TILE", 1), (depthwise, "DENSE_TILE", 1),
                              (depthwise, "COMPILED_PART", 1), (depthwise, "MAX_TASKS", 3)),
           params=("PARALLEL_MIN_WORK", "MAX_TASKS", "COMPILED_PART")),
]

#: Modules whose upper-case integer parameters must each have a line in SWITCHES.
KERNEL_MODULES = ("onnxgrad.ops.conv", "onnxgrad.ops.winograd", "onnxgrad.ops.depthwise")


def _force(monkeypatch, switch: Switch, value) -> None:
    """Every diverting switch but ``switch`` off, ``switch``'s settings, then ``value``.
    A switch whose path is the compiled kernels' skips where they cannot run."""
    if switch.name.startswith("COMPILED_") and not compiled.available():
        pytest.skip("the compiled kernels do not run here (numba missing or ONNXGRAD_COMPILED=0)")
    for other in SWITCHES:
        if other.diverts and other is not switch:
            monkeypatch.setattr(other.module, other.name, other.off)
    for module, name, setting in switch.also:
        monkeypatch.setattr(module, name, setting)
    monkeypatch.setattr(switch.module, switch.name, value)




def _pairs(cases):
    return [pytest.param(s, c, id=f"{s.id}-{c.id}") for s in SWITCHES for c in cases
            if s.applies(c)]


WAYS = pytest.mark.parametrize("way", ["on", "off"])


# -- helpers -------------------------------------------------------------------------------


def _arrays_and_u(case: Case, dtype=np.float64):
    sample = case.sample()
    arrays = gc.materialize(sample, dtype)
    _, y = gc.run_forward(sample, arrays)
    return sample, arrays, gc.projection_u(sample, y)


def _outputs(sample, arrays, u) -> dict[str, np.ndarray]:
    """Y and the gradients of ``sum(Y * u)`` for X and W, through the public API."""
    _, y = gc.run_forward(sample, arrays)
    grads = gc.analytic_gradients(sample, arrays, ["X", "W"], u)
    return {"Y": y, "dX": grads["X"], "dW": grads["W"]}


def _assert_all_close(got, want, rtol, atol, what):
    for key in want:
        assert got[key].shape == want[key].shape, f"{what} {key}: shape"
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol,
                                   err_msg=f"{what}: {key}")


def _onnxruntime(sample, arrays) -> np.ndarray:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    model = gc.build_model(sample, arrays, set(arrays))
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session.run([gc.OUT], arrays)[0]


# -- tests ---------------------------------------------------------------------------------


def test_every_size_parameter_has_a_switch():
    """Each upper-case integer parameter of the kernel modules is forced by a line of
    SWITCHES, and each line names an attribute its module has."""
    covered = {(s.module.__name__, p) for s in SWITCHES for p in s.params or (s.name,)}
    covered |= set(DEVICE_ONLY)
    for s in SWITCHES:
        assert hasattr(s.module, s.name), f"{s.module.__name__} has no {s.name}"
        assert s.on is not s.off
    for name in KERNEL_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if attr.isupper() and isinstance(value, int) and not isinstance(value, bool):
                assert (name, attr) in covered, f"{name}.{attr} has no line in SWITCHES"


@pytest.mark.parametrize("switch,case", _pairs(LAYERS))
def test_paths_agree_in_float64(switch, case, monkeypatch):
    """Forward, input gradient and weight gradient are the same (rtol 1e-10) with the
    switch's path forced on and forced off; the functions of the path run only when on."""
    sample, arrays, u = _arrays_and_u(case)
    _force(monkeypatch, switch, switch.off)
    counts = count_calls(monkeypatch, switch.calls)
    off = _outputs(sample, arrays, u)
    assert not any(counts.values()), f"forced off, yet called: {counts}"
    _force(monkeypatch, switch, switch.on)
    on = _outputs(sample, arrays, u)
    assert all(counts.values()), f"forced on, yet not called: {counts}"
    _assert_all_close(on, off, rtol=1e-10, atol=1e-10, what=f"{switch.what} ({case.id})")


@WAYS
@pytest.mark.parametrize("switch,case", _pairs(LAYERS))
def test_forward_matches_onnxruntime_float32(switch, case, way, monkeypatch):
    """The float32 forward equals onnxruntime's with the path forced on and off
    (rtol 1e-4, atol 1e-5 of the output's largest magnitude)."""
    sample = case.sample()
    arrays = gc.materialize(sample, np.float32)
    _force(monkeypatch, switch, getattr(switch, way))
    _, y = gc.run_forward(sample, arrays)
    assert y.dtype == np.float32
    want = _onnxruntime(sample, arrays)
    # atol: float32 rounding of sums of hundreds of terms, relative to the output's scale
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@WAYS
@pytest.mark.parametrize("switch,case", _pairs(SMALL))
def test_small_forward_matches_reference(switch, case, way, monkeypatch):
    """The forced path's forward at small sizes equals the ONNX reference evaluator in
    float64 (rtol 1e-10), or onnxruntime in float32 where the sample names it."""
    sample = case.sample()
    _force(monkeypatch, switch, getattr(switch, way))
    if case.ref == "onnxruntime":
        arrays = gc.materialize(sample, np.float32)
        want, tol = _onnxruntime(sample, arrays), 1e-5
    else:
        arrays = gc.materialize(sample, np.float64)
        model = gc.build_model(sample, arrays, set(arrays))
        want, tol = ReferenceEvaluator(model).run(None, arrays)[0], 1e-10
    _, got = gc.run_forward(sample, arrays)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["X", "W"])
@WAYS
@pytest.mark.parametrize("switch,case", _pairs(SMALL))
def test_gradient_of_forced_path(switch, case, way, name, monkeypatch):
    """Central differences (float64) check the gradient of X and W on the forced path."""
    _force(monkeypatch, switch, getattr(switch, way))
    gc.check_gradient(case.sample(), name)


@pytest.mark.parametrize("case", [c for c in LAYERS if c.x[0] == 8], ids=lambda c: c.id)
def test_uneven_chunks_equal_one_chunk(case, monkeypatch):
    """A batch of 8 in batch-major chunks of 3, 3 and 2 items gives the forward and
    both gradients of one chunk (float64, rtol 1e-10)."""
    sample, arrays, u = _arrays_and_u(case)
    monkeypatch.setattr(conv, "_batch_major", _always)
    monkeypatch.setattr(conv, "FLIPPED_MIN_CHANNELS", BIG)
    for s in SWITCHES:
        if s.diverts:
            monkeypatch.setattr(s.module, s.name, s.off)
    monkeypatch.setattr(conv, "COLUMN_BUDGET", BIG)
    monkeypatch.setattr(conv, "MIN_CHUNKS", 1)
    whole = _outputs(sample, arrays, u)
    # The three products of a layer make prod(kernel) * (image channels) *
    # (column positions) elements of columns per item: the input channels and
    # output positions of a Conv, the output channels and input positions of a
    # ConvTranspose.
    kernel = int(np.prod(case.w[2:]))
    if case.op == "Conv":
        per_item = kernel * case.x[1] * int(np.prod(whole["Y"].shape[2:]))
    else:
        per_item = kernel * case.w[1] * case.attrs.get("group", 1) * int(np.prod(case.x[2:]))
    monkeypatch.setattr(conv, "COLUMN_BUDGET", 3 * per_item)
    assert [p.stop - p.start for p in conv._chunks(np, 8, per_item)] == [3, 3, 2]
    _assert_all_close(_outputs(sample, arrays, u), whole, rtol=1e-10, atol=1e-10,
                      what=f"chunks of 3, 3 and 2 items ({case.id})")


@pytest.mark.parametrize("f4_min_tiles,tiles", [(BIG, 64), (0, 16)], ids=["F2", "F4"])
@pytest.mark.parametrize("case", [c for c in LAYERS if c.x[0] == 8 and _winograd_shape(c)],
                         ids=lambda c: c.id)
def test_uneven_winograd_chunks_equal_one_chunk(case, f4_min_tiles, tiles, monkeypatch):
    """Winograd over a batch of 8 in chunks of 3, 3 and 2 items (on the thread pool)
    gives the forward and both gradients of one chunk (float64, rtol 1e-10)."""
    sample, arrays, u = _arrays_and_u(case)
    for module, name, value in _WINOGRAD_ON:
        monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(winograd, "F4_MIN_TILES", f4_min_tiles)
    monkeypatch.setattr(winograd, "CHUNK_BUDGET", BIG)
    whole = _outputs(sample, arrays, u)
    # Every product of these layers has 8 x 8 tiles of 2 x 2 output positions per
    # item, or 4 x 4 tiles of 4 x 4.
    monkeypatch.setattr(winograd, "CHUNK_BUDGET", 1)
    monkeypatch.setattr(winograd, "MIN_TILES", 3 * tiles)
    sizes = []
    monkeypatch.setattr(winograd, "each", lambda xp, parts, work, key=None: sizes.append(len(parts))
                        or threads.each(xp, parts, work, key))
    _assert_all_close(_outputs(sample, arrays, u), whole, rtol=1e-10, atol=1e-10,
                      what=f"Winograd chunks of 3, 3 and 2 items ({case.id})")
    assert sizes and set(sizes) == {3}, f"chunks per product: {sizes}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x,w,strides,dilations,group", [
    ((64, 6, 14, 14), (16, 6, 5, 5), (1, 1), (1, 1), 1),           # LeNet-5's second layer
    ((5, 12, 11, 13), (9, 4, 3, 2), (2, 1), (1, 2), 3),
    ((3, 4, 9, 7), (6, 4, 2, 3), (3, 2), (2, 1), 1),
    ((2, 40, 24, 24), (8, 40, 3, 3), (1, 1), (1, 1), 1),          # channels in parts
], ids=["lenet-5x5", "strided-dilated-groups", "stride3", "channel-parts"])
def test_compiled_batch_inner_scatter_equals_numpy(x, w, strides, dilations, group, dtype,
                                                   monkeypatch):
    """The batch-inner input gradient's scatter of columns, compiled, equals the NumPy
    form (one strided sum per kernel offset) bit for bit, at 1 and 2 threads."""
    if not compiled.available():
        pytest.skip("compiled kernels do not run here (numba missing or switched off)")
    rng = np.random.default_rng(7)
    W = rng.standard_normal(w).astype(dtype)
    full = tuple(x[2:])
    out = tuple((full[i] - (w[2 + i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(2))
    dY = rng.standard_normal((x[0], w[0]) + out).astype(dtype)
    monkeypatch.setattr(conv, "BATCH_MAJOR_MIN_POSITIONS", BIG)  # batch-inner columns
    before = threads.get_num_threads()  # and the BLAS single-threaded, as onnxgrad runs it
    monkeypatch.setattr(compiled, "ENABLED", False)
    want = conv.conv_input_grad(np, dY, W, full, strides, dilations, group)
    monkeypatch.setattr(compiled, "ENABLED", True)
    calls = count_calls(monkeypatch, [(conv, "_col2im_inner_kernel")])
    try:
        for count in (1, 2):
            threads.set_num_threads(count)
            got = conv.conv_input_grad(np, dY, W, full, strides, dilations, group)
            np.testing.assert_array_equal(got, want, err_msg=f"{count} threads")
    finally:
        threads.set_num_threads(before)
    assert sum(calls.values()) >= 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("x,w,strides,dilations,group", [
    ((64, 6, 14, 14), (16, 6, 5, 5), (1, 1), (1, 1), 1),           # LeNet-5's second layer
    ((5, 12, 11, 13), (9, 4, 3, 2), (2, 1), (1, 2), 3),
    ((3, 4, 9, 7), (6, 4, 2, 3), (3, 2), (2, 1), 1),
], ids=["lenet-5x5", "strided-dilated-groups", "stride3"])
def test_compiled_batch_inner_columns_equal_numpy(x, w, strides, dilations, group, dtype,
                                                  monkeypatch):
    """Batch-inner columns made in one compiled pass from the input as it lies equal
    those of the NumPy form (the batch moved last, then one strided copy), for the
    whole batch and a part of it; so do the forward pass and the weight gradient."""
    if not compiled.available():
        pytest.skip("compiled kernels do not run here (numba missing or switched off)")
    rng = np.random.default_rng(3)
    X = rng.standard_normal(x).astype(dtype)
    W = rng.standard_normal(w).astype(dtype)
    kernel = w[2:]
    out = tuple((x[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
                for i in range(2))
    dY = rng.standard_normal((x[0], w[0]) + out).astype(dtype)
    monkeypatch.setattr(conv, "BATCH_MAJOR_MIN_POSITIONS", BIG)  # batch-inner columns
    monkeypatch.setattr(conv, "COMPILED_COLUMNS_MIN_ITEMS", 0)
    calls = count_calls(monkeypatch, [(conv, "_im2col_inner_kernel")])
    for items in (slice(None), slice(1, x[0] - 1)):
        got = conv._columns_inner(np, X, items, kernel, strides, dilations, out, group)
        want = conv._im2col_inner(np, conv._batch_last(np, X[items]), kernel, strides, dilations,
                                  out, group)
        np.testing.assert_array_equal(got, want)
    assert calls["_im2col_inner_kernel"] == 2
    results = {}
    for enabled in (True, False):
        monkeypatch.setattr(compiled, "ENABLED", enabled)
        results[enabled] = (conv.conv_forward(np, X, W, strides, dilations, group, out),
                            conv.conv_weight_grad(np, dY, X, kernel, strides, dilations, group))
    assert calls["_im2col_inner_kernel"] >= 4  # (more where the batch runs in parts)
    for got, want in zip(results[True], results[False]):
        np.testing.assert_array_equal(got, want)


def test_lenet_second_layer_in_batch_parts_has_the_same_bits_at_any_thread_count(monkeypatch):
    """LeNet-5's second layer at batch 64 (float32, batch-inner) runs in parts of the
    batch at the default sizes; its forward and both gradients have the same bits at
    1, 2 and 3 threads (several runs each, past the pool's trials of where to run),
    and equal the whole batch's within float32 rounding."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 6, 14, 14)).astype(np.float32)
    W = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    dY = rng.standard_normal((64, 16, 10, 10)).astype(np.float32)

    def run():
        return (conv.Conv(np, X, W)[0],
                conv.ConvGradX(np, dY, W, np.array(X.shape))[0],
                conv.ConvGradW(np, dY, X, np.array(W.shape))[0])

    counts = count_calls(monkeypatch, ((conv, "_by_batch_parts"),))
    before = threads.get_num_threads()
    try:
        runs = []
        for count in (1, 2, 3):
            threads.set_num_threads(count)
            runs += [run() for _ in range(6)]
    finally:
        threads.set_num_threads(before)
    assert counts["_by_batch_parts"] == 2 * len(runs), "the layer did not run in batch parts"
    monkeypatch.setattr(conv, "BATCH_PART_MIN_ITEMS", BIG)
    whole = run()
    for name, i in (("Y", 0), ("dX", 1), ("dW", 2)):
        for got in runs[1:]:
            np.testing.assert_array_equal(got[i], runs[0][i], err_msg=name)
        np.testing.assert_allclose(runs[0][i], whole[i], rtol=1e-5,
                                   atol=1e-5 * np.abs(whole[i]).max(), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(64, 6, 28, 28), (5, 3, 7), (9, 4), (2, 3, 4, 5, 6)],
                         ids=["lenet", "1d", "no-spatial", "3d"])
def test_compiled_bias_grad_sums_each_channel(shape, dtype, monkeypatch):
    """BiasGrad's compiled sums equal float64 sums within the type's rounding and the
    NumPy form's within twice that, with the same bits in one part and in a part
    per channel on 1 and 2 threads; a strided gradient is summed as it reads."""
    if not compiled.available():
        pytest.skip("compiled kernels do not run here (numba missing or switched off)")
    dY = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    axes = (0,) + tuple(range(2, dY.ndim))
    exact = dY.astype(np.float64).sum(axis=axes)
    scale = np.abs(dY).astype(np.float64).sum(axis=axes)
    eps = np.finfo(dtype).eps
    calls = count_calls(monkeypatch, [(conv, "_bias_grad_kernel")])
    (one,) = conv.BiasGrad(np, dY)
    assert calls["_bias_grad_kernel"] >= 1 and one.dtype == dtype and one.shape == (shape[1],)
    assert np.all(np.abs(one - exact) <= 4 * eps * scale)
    monkeypatch.setattr(compiled, "ENABLED", False)
    (numpy_form,) = conv.BiasGrad(np, dY)
    monkeypatch.setattr(compiled, "ENABLED", True)
    assert np.all(np.abs(one - numpy_form) <= 8 * eps * scale)
    monkeypatch.setattr(compiled, "PART", 1)
    before, made = threads.get_num_threads(), calls["_bias_grad_kernel"]
    try:
        for count in (1, 2):
            threads.set_num_threads(count)
            for _ in range(5):  # past the pool's trials of where to run
                np.testing.assert_array_equal(conv.BiasGrad(np, dY)[0], one)
    finally:
        threads.set_num_threads(before)
    assert calls["_bias_grad_kernel"] - made == 10 * min(shape[1], compiled.MAX_PARTS)  # a part each
    wide = np.repeat(dY, 2, axis=-1)[..., ::2]  # the same values, strided
    np.testing.assert_array_equal(conv.BiasGrad(np, wide)[0], one)


def test_conv_geometry_is_remembered_per_shapes_and_attributes():
    """A layer's geometry is made once for its shapes and attributes, however they
    arrive (tuples, lists, host arrays of the shape inputs), as tuples of ints; an
    empty output is an error each time it is asked for."""
    first = conv._conv_geometry((2, 3, 8, 8), (4, 3, 3, 3), "NOTSET", [1, 1], [1, 1, 1, 1], [2, 2])
    again = conv._conv_geometry(np.array([2, 3, 8, 8]), np.array([4, 3, 3, 3]), "NOTSET",
                                (1, 1), (1, 1, 1, 1), (2, 2))
    assert again is first
    assert first == ((8, 8), (3, 3), (2, 2), (1, 1), (1, 1), (1, 1), (4, 4))
    assert conv._conv_geometry((2, 3, 8, 8), (4, 3, 3, 3), "SAME_UPPER", None, None, None) \
        == ((8, 8), (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), (8, 8))
    for _ in range(2):
        with pytest.raises(ValueError, match="output would be empty"):
            conv._conv_geometry((1, 1, 2, 2), (1, 1, 5, 5), "NOTSET", None, None, None)
