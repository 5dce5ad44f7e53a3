"""Trainer.fit, the one training loop (the command line runs through it too): batches,
callbacks, validation, resuming from a checkpoint, and one thread at a time."""

from __future__ import annotations

import pathlib
import threading

import numpy as np
import pytest

import onnxgrad

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN = np.load(ROOT / "models" / "digits_train.npz")
TEST = np.load(ROOT / "models" / "digits_test.npz")
DATA = ({"input": TRAIN["input"]}, TRAIN["label"])
VAL = ({"input": TEST["input"]}, TEST["label"])


def _trainer(model="digits_cnn.onnx"):
    return onnxgrad.Trainer(onnxgrad.load(ROOT / "models" / model),
                            optimizer=onnxgrad.SGD(lr=0.05, momentum=0.9))


def test_fit_is_the_seeded_loop_of_steps():
    fitted, manual = _trainer(), _trainer()
    history = fitted.fit(DATA, epochs=2, batch_size=50, seed=3)
    rng = np.random.default_rng(3)
    for _ in range(2):
        order = rng.permutation(len(TRAIN["label"]))
        for i in range(0, len(order), 50):
            index = order[i:i + 50]
            manual.step({"input": TRAIN["input"][index]}, TRAIN["label"][index])
    for name, value in manual.model.parameters().items():
        np.testing.assert_array_equal(fitted.model.parameters()[name], value, err_msg=name)
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["steps"] == 2 * 29
    assert history[0]["samples"] == len(TRAIN["label"])


def test_validation_is_measured_in_inference_mode():
    trainer = _trainer()
    history = trainer.fit(DATA, epochs=1, val=VAL)
    logits = trainer.model.run({"input": TEST["input"]})["logits"]  # inference: running stats
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_prob[np.arange(len(TEST["label"])), TEST["label"]].mean()
    np.testing.assert_allclose(history[0]["val_loss"], loss, rtol=1e-5)
    assert history[0]["val_acc"] == (logits.argmax(1) == TEST["label"]).mean()


def test_callbacks_see_each_epoch_and_step_and_can_stop():
    seen = []

    class Recorder:
        def on_epoch_begin(self, trainer, epoch, batches):
            seen.append(("begin", epoch, batches))

        def on_step_end(self, trainer, logs):
            seen.append(("step", logs["step"]))

        def on_epoch_end(self, trainer, logs):
            seen.append(("end", logs["epoch"]))
            trainer.stop_training = logs["epoch"] == 2

    history = _trainer().fit(DATA, epochs=5, batch_size=500, callbacks=[Recorder()])
    assert len(history) == 2
    assert seen == [("begin", 1, 3), ("step", 1), ("step", 2), ("step", 3), ("end", 1),
                    ("begin", 2, 3), ("step", 1), ("step", 2), ("step", 3), ("end", 2)]


def test_an_iterable_of_batches_and_an_iterator():
    batches = [({"input": TRAIN["input"][i:i + 64]}, TRAIN["label"][i:i + 64])
               for i in range(0, 640, 64)]
    history = _trainer().fit(batches, epochs=2)
    assert history[-1]["steps"] == 20 and history[-1]["samples"] == 640
    with pytest.raises(onnxgrad.DataError, match="an iterator, which can be consumed once"):
        _trainer().fit(iter(batches), epochs=2)


def test_fit_resumes_after_its_last_epoch(tmp_path):
    whole = _trainer()
    whole.fit(DATA, epochs=4, seed=1)
    first = _trainer()
    first.fit(DATA, epochs=2, seed=1)
    first.save_checkpoint(tmp_path / "c.ckpt")
    resumed = _trainer()
    resumed.load_checkpoint(tmp_path / "c.ckpt")
    history = resumed.fit(DATA, epochs=4, seed=1)
    assert [h["epoch"] for h in history] == [3, 4]
    for name, value in whole.model.parameters().items():
        np.testing.assert_array_equal(resumed.model.parameters()[name], value, err_msg=name)


def test_a_trainer_serves_one_thread_at_a_time():
    trainer = _trainer("digits_mlp.onnx")
    inside, release = threading.Event(), threading.Event()
    step = trainer._step

    def slow(*args):
        inside.set()
        release.wait(10)
        return step(*args)

    trainer._step = slow
    worker = threading.Thread(target=trainer.step, args=({"input": TRAIN["input"][:8]},
                                                         TRAIN["label"][:8]))
    worker.start()
    inside.wait(10)
    try:
        with pytest.raises(onnxgrad.OnnxgradError, match="one thread at a time"):
            trainer.step({"input": TRAIN["input"][:8]}, TRAIN["label"][:8])
    finally:
        release.set()
        worker.join(10)
    assert trainer.steps == 1


def test_fit_refuses_non_finite_data_by_key_and_row():
    x = TRAIN["input"].copy()
    x[77, 1] = np.nan
    trainer = _trainer()
    with pytest.raises(onnxgrad.DataError, match="fit: input 'input' holds nan at row 77"):
        trainer.fit(({"input": x}, TRAIN["label"]), epochs=1)
    assert trainer.steps == 0
