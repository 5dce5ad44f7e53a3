"""StepGraphs' decisions on a stand-in device (no GPU needed): when a step is
recorded, that replays copy new inputs into the recorded buffers and run nothing
else, and that a step which cannot be recorded runs eagerly with its reason."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest

from onnxgrad.capture import StepGraphs


class FakeStream:
    def __init__(self, log):
        self.log = log
        self.capturing = False

    def begin_capture(self):
        assert not self.capturing
        self.capturing = True
        self.log.append("begin")

    def end_capture(self):
        assert self.capturing
        self.capturing = False
        self.log.append("end")
        return SimpleNamespace(launch=lambda stream: self.log.append("launch"))


class FakeDevice:
    def __init__(self):
        self.log = []
        self.stream = FakeStream(self.log)
        self.pool = None  # the pool allocations come from

    def graph_memory(self):
        return object()

    @contextlib.contextmanager
    def allocating_from(self, pool):
        self.pool, before = pool, self.pool
        try:
            yield
        finally:
            self.pool = before

    @contextlib.contextmanager
    def recording(self):
        yield ["an upload"]

    def asarray(self, host):
        return host.copy()

    def empty_like(self, host):
        self.log.append(("alloc", self.pool is not None))
        return np.empty_like(host)

    def copy_in(self, buffer, host):
        buffer[...] = host
        self.log.append("copy")


def _step(device, seen, fail=None):
    def step(inputs):
        seen.append({k: v.copy() for k, v in inputs.items()})
        device.log.append(("step", device.stream.capturing, device.pool is not None))
        if fail is not None and device.stream.capturing:
            raise fail
        return {"loss": inputs["x"].sum()}
    return step


def test_records_after_the_warmup_then_replays_with_new_inputs():
    device, seen = FakeDevice(), []
    graphs = StepGraphs(device, warmup=2)
    step = _step(device, seen)
    holds = [object()]
    for i in range(5):
        graphs.run({"x": np.full(3, float(i))}, step, holds)
    assert (graphs.eager, graphs.recorded, graphs.replayed) == (2, 1, 2)
    assert len(seen) == 3  # two eager steps, one recorded; replays run no Python step
    assert device.log.count("launch") == 3  # the recorded step's own launch, two replays
    assert ("step", True, True) in device.log  # recorded while capturing, from its own pool
    assert device.log.count(("alloc", True)) == 1  # the static input buffer
    replayed = graphs._graphs[next(iter(graphs._graphs))]
    np.testing.assert_array_equal(replayed.inputs["x"], np.full(3, 4.0))  # the last feed
    assert replayed.uploads == ["an upload"]  # kept as long as the graph


def test_each_signature_has_its_own_warmup_and_the_oldest_graph_goes():
    device, seen = FakeDevice(), []
    graphs = StepGraphs(device, warmup=1, limit=2)
    step = _step(device, seen)
    for n in (2, 2, 3, 3, 4, 4, 2):
        graphs.run({"x": np.ones(n)}, step, [])
    assert graphs.recorded == 4 and len(graphs._graphs) == 2  # shape 2 recorded again
    assert "CUDA graphs: 4 step(s) recorded" in graphs.describe()[0]


def test_replaced_state_is_recorded_again():
    device, seen = FakeDevice(), []
    graphs = StepGraphs(device, warmup=0)
    step = _step(device, seen)
    weights = [object()]
    graphs.run({"x": np.ones(2)}, step, weights)
    graphs.run({"x": np.ones(2)}, step, weights)
    graphs.run({"x": np.ones(2)}, step, [object()])  # e.g. the optimizer was reset
    assert graphs.recorded == 2 and graphs.replayed == 1


def test_a_step_that_fails_while_recording_runs_eagerly_with_the_reason():
    device, seen = FakeDevice(), []
    graphs = StepGraphs(device, warmup=1)
    error = RuntimeError("the current stream is capturing, so D2H transfers are disallowed")
    error.onnxgrad_node = SimpleNamespace(name="reshape_by_input", op_type="Reshape")
    step = _step(device, seen, fail=error)
    results = [graphs.run({"x": np.full(2, float(i))}, step, []) for i in range(4)]
    assert [float(r["loss"]) for r in results] == [0.0, 2.0, 4.0, 6.0]
    assert graphs.recorded == 0 and graphs.eager == 4
    assert device.log.count("begin") == 1 and device.log.count("end") == 1  # tried once
    (reason,) = graphs.refused.values()
    assert reason == ("node 'reshape_by_input' (Reshape): RuntimeError: the current stream "
                      "is capturing, so D2H transfers are disallowed")
    assert "eager for inputs x [2]: node 'reshape_by_input'" in graphs.describe()[1]


@pytest.mark.parametrize("value,what", [([np.ones(2)], "a sequence"), (None, "an empty optional")])
def test_inputs_that_are_not_tensors_run_eagerly(value, what):
    device = FakeDevice()
    device.asarray = lambda v: v
    graphs = StepGraphs(device, warmup=0)
    graphs.run({"x": np.ones(2), "s": value}, lambda inputs: inputs, [])
    assert graphs.eager == 1 and graphs.recorded == 0
    assert list(graphs.refused.values()) == [f"input 's' is {what}, not a tensor"]
