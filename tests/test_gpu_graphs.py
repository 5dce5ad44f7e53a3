"""Training steps recorded as CUDA graphs, and the fused optimizer kernels, on a
real device: replayed steps equal eager steps, and a step that cannot be
recorded runs eagerly and says why.  Skipped where no CUDA device exists."""

from __future__ import annotations

import numpy as np
import pytest

import onnxgrad
from helpers import helper, make_model, mlp_model
from onnxgrad.backend import get_backend
from onnxgrad.optimizers import DeviceUpdate
from test_fused_optimizer import OPTIMIZERS

pytestmark = pytest.mark.gpu

@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_update_matches_cpu(name, dtype):
    cp = get_backend("cuda").xp
    rng = np.random.default_rng(0)
    shapes = {"w": (33, 7), "b": (5,)}
    cpu = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    gpu = {k: cp.asarray(v) for k, v in cpu.items()}
    reference, fused = OPTIMIZERS[name](), OPTIMIZERS[name]()
    update = DeviceUpdate(fused, cp, gpu)
    for step in range(6):
        if step == 3:
            reference.lr = fused.lr = reference.lr / 2
        grads = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
        reference.update(np, cpu, grads)
        update.begin_step()
        for k in shapes:
            update(k, cp.asarray(grads[k]))
    for k in shapes:
        np.testing.assert_allclose(cp.asnumpy(gpu[k]), cpu[k], rtol=2e-7 if dtype == np.float32
                                   else 1e-15, atol=0, err_msg=k)


def _bn_cnn():
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["p1"], name="pool"),
        helper.make_node("Flatten", ["p1"], ["f1"], name="flat"),
        helper.make_node("Gemm", ["f1", "w2", "b2"], ["logits"], name="fc", transB=1),
    ]
    inits = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
             "g1": np.ones(8, np.float32), "b1": np.zeros(8, np.float32),
             "m1": np.zeros(8, np.float32), "v1": np.ones(8, np.float32),
             "w2": rng.standard_normal((4, 8)).astype(np.float32) * 0.3,
             "b2": np.zeros(4, np.float32)}
    return make_model(nodes, [("x", np.float32, ["N", 3, 8, 8])],
                      [("logits", np.float32, ["N", 4])], inits)


def _dropout_mlp():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Dropout", ["h", "ratio"], ["d"], name="drop"),
             helper.make_node("Gemm", ["d", "w2", "b2"], ["logits"], name="fc2", transB=1)]
    inits = {"w1": rng.standard_normal((16, 8)).astype(np.float32) * 0.3,
             "b1": np.zeros(16, np.float32),
             "w2": rng.standard_normal((4, 16)).astype(np.float32) * 0.3,
             "b2": np.zeros(4, np.float32), "ratio": np.array(0.5, np.float32)}
    return make_model(nodes, [("x", np.float32, ["N", 8])], [("logits", np.float32, ["N", 4])],
                      inits, opset=13)


CASES = {
    "mlp-adamw": (lambda: mlp_model(sizes=(8, 16, 4)), (8,), onnxgrad.AdamW),
    "cnn-batchnorm-sgd": (_bn_cnn, (3, 8, 8), lambda lr: onnxgrad.SGD(lr, momentum=0.9)),
    "dropout-adam": (_dropout_mlp, (8,), onnxgrad.Adam),
}


def _train(case, graphs: bool, steps: int = 8):
    make, shape, optimizer = CASES[case]
    model = onnxgrad.load(make())
    opt = optimizer(0.01)
    trainer = onnxgrad.Trainer(model, optimizer=opt, device="cuda", seed=3, cuda_graphs=graphs)
    rng = np.random.default_rng(4)
    losses = []
    for step in range(steps):
        if step == 5:
            opt.lr = 0.003  # a recorded step reads the learning rate of each replay
        batch = 16 if step != 6 else 12  # a second input signature
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        y = rng.integers(0, 4, batch)
        losses.append(trainer.step({"x": x}, y))
    return losses, model.parameters(), trainer


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_steps_equal_eager_steps(case):
    eager_losses, eager_params, _ = _train(case, graphs=False)
    losses, params, trainer = _train(case, graphs=True)
    assert trainer.graphs.recorded == 1 and trainer.graphs.replayed == 4, \
        trainer.graphs.describe()
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-6)
    for name, value in eager_params.items():
        np.testing.assert_allclose(params[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_dropout_masks_differ_between_replays():
    make, shape, _ = CASES["dropout-adam"]
    trainer = onnxgrad.Trainer(onnxgrad.load(make()), optimizer=onnxgrad.SGD(lr=0.0),
                               device="cuda", seed=5)
    x = np.ones((16, *shape), np.float32)
    y = np.zeros(16, np.int64)
    losses = [trainer.step({"x": x}, y) for _ in range(6)]
    assert trainer.graphs.replayed == 3, trainer.graphs.describe()
    assert len(set(losses)) == 6, losses  # lr 0: only the dropout mask changes the loss


def test_a_step_that_reads_the_host_runs_eagerly_and_says_why():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
             helper.make_node("Reshape", ["h", "shape"], ["logits"], name="reshape_by_input")]
    proto = make_model(nodes, [("x", np.float32, ["N", 8]), ("shape", np.int64, [2])],
                       [("logits", np.float32, ["N", 4])],
                       {"w": rng.standard_normal((4, 8)).astype(np.float32),
                        "b": np.zeros(4, np.float32)})
    results = {}
    for graphs in (False, True):
        model = onnxgrad.load(proto)
        trainer = onnxgrad.Trainer(model, optimizer=onnxgrad.SGD(lr=0.1), device="cuda",
                                   cuda_graphs=graphs)
        data = np.random.default_rng(7)
        for _ in range(5):
            x = data.standard_normal((6, 8)).astype(np.float32)
            trainer.step({"x": x, "shape": np.array([6, 4])}, data.integers(0, 4, 6))
        results[graphs] = model.parameters()
    assert trainer.graphs.recorded == 0 and trainer.graphs.eager == 5
    (reason,) = trainer.graphs.refused.values()
    assert "reshape_by_input" in reason, reason
    assert any("reshape_by_input" in line for line in trainer.graphs.describe())
    for name, value in results[False].items():
        np.testing.assert_array_equal(results[True][name], value)


def test_replaced_optimizer_state_is_recorded_again():
    proto = mlp_model(sizes=(8, 16, 4))
    trainer = onnxgrad.Trainer(onnxgrad.load(proto), optimizer=onnxgrad.Adam(lr=0.01),
                               device="cuda")
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((16, 8)).astype(np.float32), rng.integers(0, 4, 16)
    for _ in range(4):
        trainer.step({"x": x}, y)
    trainer.optimizer.reset()  # new moment arrays: the recorded step must not write the old
    for _ in range(2):
        trainer.step({"x": x}, y)
    assert trainer.graphs.recorded == 2
    assert all(s["step"] == 2 for s in trainer.optimizer.state.values())


def test_device_column_chunks_equal_one_product(monkeypatch):
    """Conv columns made per batch item on the GPU (conv.DEVICE_COLUMN_BUDGET forced
    to one item) give the gradients of one product over the batch."""
    from onnxgrad.ops import conv

    default = conv.DEVICE_COLUMN_BUDGET
    monkeypatch.setattr(conv, "_batch_major", lambda *args: True)
    im2col, calls = conv._im2col, []
    monkeypatch.setattr(conv, "_im2col", lambda *a, **k: calls.append(1) or im2col(*a, **k))
    proto = _bn_cnn()
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((6, 3, 8, 8)).astype(np.float32), rng.integers(0, 4, 6)
    grads, made = {}, {}
    for budget in (default, 1):
        monkeypatch.setattr(conv, "DEVICE_COLUMN_BUDGET", budget)
        calls.clear()
        trainer = onnxgrad.Trainer(onnxgrad.load(proto), device="cuda")
        grads[budget] = trainer.gradients({"x": x}, y)
        made[budget] = len(calls)
    assert made[1] == 6 * made[default], made  # per item, against once per product
    for name, value in grads[1].items():
        np.testing.assert_allclose(value, grads[default][name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_device_draws_are_uniform_and_seeded():
    from onnxgrad.ops.fused import Draws

    cp = get_backend("cuda").xp
    a, b = Draws(cp, 11), Draws(cp, 11)
    first = [cp.asnumpy(a.random((1000, 1000), np.float32)) for _ in range(2)]
    again = cp.asnumpy(b.random((1000, 1000), np.float32))
    np.testing.assert_array_equal(again, first[0])  # the same seed, the same numbers
    assert not np.array_equal(first[0], first[1])  # each draw advances the generator
    for values in first:
        assert values.min() >= 0 and values.max() < 1
        assert abs(values.mean() - 0.5) < 2e-3 and abs(values.var() - 1 / 12) < 2e-3
    doubles = cp.asnumpy(Draws(cp, 12).random((1000, 1000), np.float64))
    assert doubles.dtype == np.float64 and abs(doubles.mean() - 0.5) < 2e-3
