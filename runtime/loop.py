"""The training loop: ``Trainer.fit``.  The command line drives its runs through it
too, with callbacks for its progress bar, reports, logs and checkpoints.

Data is either arrays, ``(feeds, target)`` with ``feeds`` a dict of arrays of
one row per sample (shuffled each epoch by a seeded generator, cut into
batches), or an iterable of ``(feeds, target)`` batches, used as it comes
(iterated once per epoch: a list, or an object whose ``iter()`` starts again).

A callback is any object with some of these methods, called in this order:
``on_epoch_begin(trainer, epoch, batches)`` (``batches``: their number, or None
for an iterable without a length), ``on_step_end(trainer, logs)`` (logs: epoch,
step within the epoch, samples, loss) and ``on_epoch_end(trainer, logs)`` (logs:
epoch, steps, step_loss (the mean of the epoch's losses, by sample), samples,
seconds, and val_loss / val_acc when ``val`` is given).  A callback stops the
run by setting ``trainer.stop_training``.

A loader thread prepares each batch while the step before it runs.

The loop resumes: a trainer restored from a checkpoint continues with the epoch
after its last one, with the shuffling generator where the checkpoint left it,
so that the run ends as an uninterrupted one would.

In data-parallel training (a trainer with a communicator) each rank takes its
shard of every epoch's order, as PyTorch's DistributedSampler does (see
:func:`onnxgrad.distributed.shard`): the same seeded permutation on every rank,
rank ``r`` taking every ``N``-th sample from ``r``, so that ``batch_size`` is per
rank and a step's batches together are one ``N`` times larger.  An iterable of
batches is taken as this rank's own, and must have a length, the same on every
rank.  Rank 0's callbacks decide ``stop_training`` for every rank, and an
epoch's ``samples`` counts every rank's.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from onnxgrad.distributed import check_same, shard
from onnxgrad.errors import DataError, OnnxgradError
from onnxgrad.model import check_finite


def fit(trainer, data, epochs: int = 5, val=None, callbacks: Sequence[Any] = (),
        batch_size: int = 32, shuffle: bool = True, seed: int = 0,
        drop_last: bool = False) -> list[dict[str, Any]]:
    """Train for ``epochs`` epochs (see the module's doc); returns each epoch's logs."""
    if epochs < 1 or batch_size < 1:
        raise OnnxgradError(f"epochs and batch_size must be at least 1, got {epochs} and "
                            f"{batch_size}")
    arrays = _arrays(data)
    if arrays is None and iter(data) is data and epochs - trainer.epoch > 1:
        raise DataError("fit: data is an iterator, which can be consumed once; give a list of "
                        "batches, or an object whose iter() starts again")
    if arrays is not None:  # refused by key and row before training, not at a NaN loss
        for name, values in arrays[0].items():
            check_finite(values, f"fit: input {name!r}")
        if arrays[1] is not None:
            check_finite(arrays[1], "fit: the target")
    comm = getattr(trainer, "comm", None)
    if comm is not None and arrays is None:
        _check_batches(comm, data)
    rng = np.random.default_rng(seed)
    if trainer.epoch and "shuffle" in trainer.loop_state:
        rng.bit_generator.state = trainer.loop_state["shuffle"]
    trainer.stop_training = False
    history = []
    for epoch in range(trainer.epoch + 1, epochs + 1):
        started = time.perf_counter()
        if arrays is not None:
            feeds, target = arrays
            n = len(next(iter(feeds.values())))
            order = rng.permutation(n) if shuffle else np.arange(n)
            if comm is not None:
                order = shard(order, comm.rank, comm.size)
            if drop_last:
                order = order[:len(order) - len(order) % batch_size]
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            stream = (({k: v[index] for k, v in feeds.items()},
                       None if target is None else target[index]) for index in batches)
            count = len(batches)
        else:
            stream = iter(data)
            count = len(data) if hasattr(data, "__len__") else None
        _call(callbacks, "on_epoch_begin", trainer, epoch, count)
        total = seen = 0
        for step, (batch, labels) in enumerate(_prefetched(stream), start=1):
            loss = trainer.step(batch, labels)
            size = len(next(iter(batch.values())))
            total += loss * size
            seen += size
            _call(callbacks, "on_step_end", trainer,
                  {"epoch": epoch, "step": step, "samples": size, "loss": loss})
        trainer.finish_accumulation()  # an epoch's last micro-batches, if they were fewer
        trainer.epoch = epoch
        trainer.loop_state["shuffle"] = rng.bit_generator.state
        logs = {"epoch": epoch, "steps": trainer.steps,
                "samples": seen * (1 if comm is None else comm.size),
                "step_loss": total / seen if seen else float("nan"),
                "seconds": time.perf_counter() - started}
        if val is not None:
            logs.update({f"val_{k}": v for k, v in _evaluate(trainer, val, batch_size).items()})
        history.append(logs)
        _call(callbacks, "on_epoch_end", trainer, logs)
        if comm is not None:  # rank 0's callbacks decide for every rank
            stop = np.array([int(bool(trainer.stop_training))], dtype=np.int64)
            comm.broadcast(stop)
            trainer.stop_training = bool(stop[0])
        if trainer.stop_training:
            break
    return history


def _check_batches(comm, data) -> None:
    """Refuse an iterable of batches whose number may differ between the ranks: a rank
    that ran out would leave the others waiting in a step."""
    if not hasattr(data, "__len__"):
        raise DataError(f"fit: in data-parallel training, give (feeds, target) arrays, which "
                        f"fit shards between the ranks, or a list (an iterable with a length) of "
                        f"this rank's batches; got {type(data).__name__}, which has no length")
    check_same(comm, {"number of batches": len(data)}, "fit")


#: Batches a loader thread prepares ahead of the step that runs.
PREFETCH = 2


def _prefetched(batches: Iterator[Any]) -> Iterator[Any]:
    """``batches``, each prepared by a loader thread while the step before it runs (reading
    rows of memory-mapped arrays, slicing, a data set's own iteration), in order."""
    ready: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()
    end = object()

    def load():
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        ready.put((batch, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((end, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put((end, exc))

    loader = threading.Thread(target=load, name="onnxgrad-batches", daemon=True)
    loader.start()
    try:
        while True:
            batch, error = ready.get()
            if batch is end:
                if error is not None:
                    raise error
                return
            yield batch
    finally:
        stop.set()


def _arrays(data) -> tuple[Mapping[str, Any], Any] | None:
    """``(feeds, target)`` of array data, or None for an iterable of batches."""
    if hasattr(data, "feeds") and hasattr(data, "target"):
        return data.feeds, data.target
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Mapping):
        feeds, target = data
        lengths = {len(v) for v in feeds.values()} | ({len(target)} if target is not None else set())
        if len(lengths) != 1:
            raise DataError(f"fit: the arrays have different numbers of rows: {sorted(lengths)}")
        return feeds, target
    if isinstance(data, Iterable):
        return None
    raise DataError(f"fit: data must be (feeds, target) arrays or an iterable of batches, got "
                    f"{type(data).__name__}")


def _evaluate(trainer, val, batch_size: int) -> dict[str, float]:
    arrays = _arrays(val)
    if arrays is not None:
        feeds, target = arrays
        n = len(next(iter(feeds.values())))
        size = max(batch_size, 256)
        batches = [({k: v[i:i + size] for k, v in feeds.items()},
                    None if target is None else target[i:i + size]) for i in range(0, n, size)]
    else:
        batches = val
    return trainer.evaluate(batches)


def _call(callbacks: Iterable[Any], name: str, *args) -> None:
    for callback in callbacks:
        method = getattr(callback, name, None)
        if method is not None:
            method(*args)
