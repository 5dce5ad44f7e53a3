"""The Trainer: forward, loss, backward and optimizer steps on a Model."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from onnxgrad.backend import Backend, get_backend
from onnxgrad.capture import StepGraphs
from onnxgrad import checkpoint, distributed, loop
from onnxgrad.errors import CheckpointError, DataError, NonFiniteError, OnnxgradError
from onnxgrad.executor import RunState, ShapeSpecializedRunner
from onnxgrad.losses import Loss, resolve_loss
from onnxgrad.model import Model, is_weight, prepare_feeds
from onnxgrad.ops import lookup
from onnxgrad.optimizers import SGD, DeviceUpdate, Optimizer
from onnxgrad.precision import LossScaler, autocast_ops, check_device_support, check_precision
from onnxgrad.profile import Profile
from onnxgrad.program import build_program, tied_weights, updated_statistics


class Trainer:
    """Trains the weights of ``model`` by backpropagation.

    ``loss`` names a built-in loss (see :data:`onnxgrad.losses.LOSSES`) that
    reads the value ``output`` (any value of the graph; default: the first
    graph output), or is None when ``output`` already is a scalar loss.
    ``trainable`` is None (every floating-point initializer of more than one
    element with a gradient path to the loss: one-element initializers are
    the scales and epsilons exporters write) or names and glob patterns.
    ``device`` is ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy).  ``seed`` seeds the
    random numbers of training steps (Dropout).  With ``tie_weights``, initializers
    that repeat another bit for bit (or its transpose), as exporters write a tied
    embedding and output matrix, are trained as one weight: its gradient is the sum
    over every use, and the copies stay equal to it in the model.

    In training steps BatchNormalization uses batch statistics and updates its
    running statistics, as PyTorch's ``train()`` mode does.  With
    ``frozen_batchnorm="eval"``, a BatchNormalization whose scale and bias are
    not trained and that no trained weight feeds (a frozen backbone) uses and
    keeps its running statistics instead, as a frozen backbone in ``eval()``
    mode does in PyTorch.

    A step updates each weight as soon as the backward pass is done with it.
    The model always sees the trained values (``parameters``, ``run``,
    ``save``): on the CPU the trainer updates the model's arrays in place
    (storing some column-major, for a faster product); on a GPU it keeps
    device copies and copies them back when the model is read.

    On a GPU, each parameter's update is one fused kernel, and with
    ``cuda_graphs=True`` (the default) the whole step (forward, backward and
    update) is recorded as a CUDA graph after two eager steps with the same
    input shapes, and replayed from then on (see :mod:`onnxgrad.capture`);
    :attr:`graphs` says how steps ran and why any could not be recorded.

    With ``comm`` (a :class:`~onnxgrad.distributed.Communicator`, e.g.
    ``onnxgrad.distributed.MPIComm()``) the trainer is one rank of a
    data-parallel job: every rank must be started with the same model and
    options (compared by hash here; a difference raises on every rank), and
    ``step`` and ``gradients`` are collective calls.  Each step averages the
    gradients over the ranks, in buckets whose all-reduce overlaps the backward
    pass, and returns the loss averaged over the ranks; for a mean loss, ``N``
    ranks at batch ``B`` take the step of one process at batch ``N·B``.  Dropout
    draws different numbers on each rank (rank ``r``'s stream is rank 0's,
    jumped ``r`` times).  Each rank's BatchNormalization uses its own batch's
    statistics, and keeps running statistics of its own, unless
    ``sync_batchnorm`` all-reduces them (see :mod:`onnxgrad.distributed`).  A
    step is not recorded as a CUDA graph then.

    ``precision`` is ``"fp32"`` (the default), ``"bf16"`` or ``"fp16"``: mixed
    precision, as ``torch.autocast`` (see :mod:`onnxgrad.precision`).  The weights
    stay float32 (the optimizer updates them, the model saves them); MatMul, Gemm,
    Conv, ConvTranspose, Einsum and Attention run in the low type in the training
    graph only (Einsum stays float32 where the array module's einsum lacks the type:
    NumPy's and bfloat16); normalisation, its statistics, Softmax and the loss stay
    float32.
    With ``"fp16"`` the loss is scaled dynamically by ``loss_scaler`` (default
    :class:`~onnxgrad.precision.LossScaler`: scale 2**16, doubled after 2000 good
    steps in a row, halved at an overflow): the gradients are unscaled before
    clipping and the update, and a step with an infinite or NaN gradient is
    skipped: no weight, optimizer state or running statistic changes (the running
    statistics the step's forward passes computed are dropped, unlike PyTorch,
    which keeps them), ``steps`` and the schedule do not advance, ``skipped_steps``
    counts it, and the scale is lowered.  :attr:`loss_scale` is the current scale.
    An fp16 step needs every gradient before its update, so it runs as a step with
    ``clip_grad_norm`` does (on a GPU: eagerly, not as a CUDA graph).
    """

    def __init__(self, model: Model, loss: str | Loss | None = "cross_entropy",
                 output: str | None = None, optimizer: Optimizer | None = None,
                 trainable: str | Iterable[str] | None = None, device: str = "cpu",
                 seed: int | None = None, frozen_batchnorm: str = "train",
                 cuda_graphs: bool = True, detect_anomaly: bool = False,
                 tie_weights: bool = False, comm: distributed.Communicator | None = None,
                 sync_batchnorm: bool = False, precision: str = "fp32",
                 loss_scaler: LossScaler | None = None):
        if not isinstance(model, Model):
            raise OnnxgradError(f"Trainer needs an onnxgrad.Model (from onnxgrad.load), "
                                f"got {type(model).__name__}")
        if optimizer is None:
            optimizer = SGD(lr=0.01)
        if not isinstance(optimizer, Optimizer):
            raise OnnxgradError(f"optimizer must be onnxgrad.SGD, Adam or AdamW, "
                                f"got {type(optimizer).__name__}")
        precision = check_precision(precision)
        if loss_scaler is not None and not isinstance(loss_scaler, LossScaler):
            raise OnnxgradError(f"loss_scaler must be an onnxgrad.precision.LossScaler, "
                                f"got {type(loss_scaler).__name__}")
        if loss_scaler is not None and precision != "fp16":
            raise OnnxgradError(f"loss_scaler scales the loss of precision='fp16' training; "
                                f"this trainer has precision={precision!r}, which needs none")
        model._weights()  # values an earlier trainer still holds come back into the model
        self.model = model
        self.optimizer = optimizer
        self.loss = resolve_loss(loss)
        self.backend = get_backend(device)
        self.device = self.backend.name
        check_device_support(precision, self.backend.xp)
        #: "fp32", "bf16" or "fp16" (see :mod:`onnxgrad.precision`).
        self.precision = precision
        #: The dynamic loss scaling of fp16 training, or None.
        self.loss_scaler: LossScaler | None = (
            (loss_scaler or LossScaler()) if precision == "fp16" else None)
        #: fp16 steps skipped because a gradient was not finite.
        self.skipped_steps = 0
        if trainable is not None and not isinstance(trainable, str):
            trainable = list(trainable)
        #: The communicator of data-parallel training (see :mod:`onnxgrad.distributed`), or None.
        self.comm = comm
        if comm is not None:
            _check_ranks(self, comm, output=output, trainable=trainable,
                         frozen_batchnorm=frozen_batchnorm, tie_weights=tie_weights,
                         sync_batchnorm=sync_batchnorm, precision=precision)
        elif sync_batchnorm:
            raise OnnxgradError("sync_batchnorm=True all-reduces BatchNormalization's statistics "
                                "between ranks; it needs comm=onnxgrad.distributed.MPIComm() "
                                "(or NCCLComm())")
        graph = model.graph
        #: Tied copies trained as one weight (``tie_weights``): {copy: (weight, transposed)}.
        self.ties = tied_weights(graph) if tie_weights else {}
        program = build_program(model, self.loss, output, trainable, frozen_batchnorm,
                                self.ties, precision, scale_loss=self.loss_scaler is not None,
                                autocast_ops=autocast_ops(precision, self.backend.xp))
        if sync_batchnorm:
            distributed.use_sync_batchnorm(program.graph, program.inference_nodes)
        #: The training program this trainer runs (see :mod:`onnxgrad.program`).
        self.program = program
        self.output = program.output
        self.loss_value, self.target_input = program.loss_value, program.target_input
        self._scale_input = program.scale_input
        #: Inputs of the training graph the trainer feeds itself (the target, the loss scale).
        self._own_inputs = [x for x in (self.target_input, self._scale_input) if x]
        self.trainable = program.trainable
        train = self.graph = program.graph
        grads = self._grad_values = program.grads
        fetch = [self.loss_value, *grads.values()]
        self._state = RunState(seed, self.backend.xp)
        self._state.inference_nodes = program.inference_nodes
        self._state.comm = comm
        self._split_random_streams()
        # Weights the step may change (trained ones, running statistics) are read at
        # run time; a frozen weight that nodes read only on the host (a Dropout
        # ratio, a Clip bound) is a constant of the plan, so that no step reads a
        # device value on the host (which a CUDA graph cannot record).
        fixed = host_read_weights(train) - set(self.trainable) - set(updated_statistics(train))
        self._weight_names = [k for k, v in train.initializers.items()
                              if k in graph.initializers and is_weight(v) and k not in fixed]
        self._runner = ShapeSpecializedRunner(
            lambda shapes: Model.make_plan(train, self.backend, dict.fromkeys(fetch), self._state,
                                           weights=self._weight_names, shapes=shapes,
                                           handoff={g: p for p, g in grads.items()}),
            train.inputs)
        # Weights that only Gemm nodes read as a transposed B are kept column-major:
        # the product then runs without a transpose in BLAS, and GemmGradB gives
        # their gradients the same layout.  On the CPU the trainer updates the
        # model's own arrays in place (a column-major weight replaces the model's
        # array once); on a GPU it keeps device copies and copies them back into
        # the model when the model is read.
        fortran = set(column_major_weights(train, self._weight_names))
        on_cpu = self.backend.name == "cpu"
        self._copied = set() if on_cpu else set(self._weight_names)
        self._weights = {}
        for k in self._weight_names:
            value = graph.initializers[k] if on_cpu else self.backend.asarray(graph.initializers[k])
            if k in fortran:
                value = self.backend.xp.asfortranarray(value)
                if on_cpu:
                    graph.initializers[k] = value
            self._weights[k] = value
        if self._copied or self.ties:
            model._pull_weights = self._pull
        if self._copied:
            model._on_set_parameters = self._push
        self._stale = False
        self._target_signature: tuple | None = None  # the last target type and shape checked
        self._classes: int | None = None
        #: A :class:`~onnxgrad.profile.Profile` that steps add their kernel times to, or None.
        self.profile: Profile | None = None
        #: On a GPU, the recorded steps (:class:`~onnxgrad.capture.StepGraphs`); None on
        #: the CPU or with ``cuda_graphs=False``.
        self.graphs: StepGraphs | None = (
            StepGraphs(self.backend) if cuda_graphs and not on_cpu and comm is None else None)
        self._reducer = None
        if comm is not None:
            self._reducer = distributed.GradientReducer(
                comm, self.backend.xp, {name: self._weights[name] for name in self.trainable})
        self._device_update: DeviceUpdate | None = None
        #: Optimizer steps taken, and epochs completed (set by a training loop).
        self.steps = 0
        self.epoch = 0
        #: A :class:`~onnxgrad.schedules.Schedule` of the optimizer, stepped after each
        #: step (and saved in checkpoints), or None.
        self.schedule = None
        #: JSON-able state of the training loop that drives this trainer (e.g. its
        #: shuffling), saved in and restored from checkpoints.
        self.loop_state: dict[str, Any] = {}
        #: Clip the gradients' total L2 norm to this before each update (as
        #: ``torch.nn.utils.clip_grad_norm_``), or None.
        self.clip_grad_norm: float | None = None
        #: Micro-batches per optimizer step: their gradients are averaged (for a mean
        #: loss over equal micro-batches, the gradient of their union).
        self.accumulate = 1
        #: The total gradient norm of the last update (with ``clip_grad_norm``).
        self.last_grad_norm: float | None = None
        self._pending: dict[str, Any] | None = None
        self._micro = 0
        #: Set by a callback of :meth:`fit` to end the run after the current epoch.
        self.stop_training = False
        #: Check every node's outputs in each step and name the first that is not finite
        #: (forward or backward), before any update; slower (a pass over every value).
        self.detect_anomaly = bool(detect_anomaly)
        self._forward_nodes = {n.name for n in graph.nodes} | set(program.autocast_nodes)
        # Running statistics, for putting back after a skipped fp16 step.
        self._statistics = [k for k in updated_statistics(train, program.inference_nodes)
                            if k in self._weights]
        self._saved_statistics: dict[str, Any] | None = None
        self._busy = threading.Lock()
        self._evaluator: ShapeSpecializedRunner | None = None

    def _push(self, names: list[str]) -> None:
        """Copy new values of the model's weights into the trainer's device arrays, in
        place (a recorded CUDA graph keeps reading the same arrays)."""
        for name in names:
            if name in self._weights:
                self._weights[name][...] = self.backend.asarray(self.model.graph.initializers[name])

    def _pull(self) -> None:
        """Copy the trainer's own weight arrays back into the model, and each tied weight
        into its copies."""
        weights = self.model.graph.initializers
        if self._stale:
            for name in self._copied:
                weights[name][...] = self.backend.to_host(self._weights[name])
            self._stale = False
        for copy, (first, transposed) in self.ties.items():
            weights[copy][...] = weights[first].T if transposed else weights[first]

    def _target(self, target: Any) -> Any:
        """The target as the loss reads it, on the device; checked against the output
        (its type and shape once per type and shape, class indices every time)."""
        where = self.model.where
        loss = self.loss
        if loss is None:
            if target is not None:
                raise DataError(f"{where}: loss=None reads the loss from {self.output!r}; "
                                "pass target=None")
            return None
        if target is None:
            raise DataError(f"{where}: loss {loss.name!r} needs a target")
        if not hasattr(target, "dtype"):
            target = np.asarray(target)
        signature = (target.dtype, tuple(target.shape))
        if signature != self._target_signature:
            self._classes = self._check_target(target)
            self._target_signature = signature
        if hasattr(target, "__cuda_array_interface__"):
            target = self.backend.to_host(target)
        if loss.target == "class":
            target = target.astype(np.int64, copy=False)
            classes = self._classes
            valid = target if loss.ignore_index is None else target[target != loss.ignore_index]
            if classes is not None and valid.size:
                low, high = int(valid.min()), int(valid.max())
                if low < 0 or high >= classes:
                    raise DataError(f"{where}: target class indices must lie in "
                                    f"[0, {classes}) for {self.output!r}; got values in "
                                    f"[{low}, {high}]")
        else:
            target = target.astype(self.graph.dtype(self.output) or np.float32, copy=False)
        return target

    def _check_target(self, target: Any) -> int | None:
        """Check the target's element type and shape against the loss and the output;
        return the number of classes when the output's shape gives it."""
        where = self.model.where
        loss = self.loss
        out_shape = self.model.graph.shape(self.output)
        if loss.target == "class":
            if not np.issubdtype(target.dtype, np.integer):
                raise DataError(f"{where}: loss {loss.name!r} needs integer class indices as "
                                f"target, got element type {target.dtype}")
            if out_shape is None:
                return None
            axis = loss.class_axis_of(len(out_shape))
            rest = [d for i, d in enumerate(out_shape) if i != axis]
            if not _fits(rest, target.shape):
                raise DataError(
                    f"{where}: target of shape {list(target.shape)} does not fit "
                    f"{self.output!r} of shape {_dims(out_shape)}; expected class indices of "
                    f"shape {_dims(rest)}")
            classes = out_shape[axis]
            return classes if isinstance(classes, int) else None
        if not (np.issubdtype(target.dtype, np.number) or target.dtype == np.bool_):
            raise DataError(f"{where}: loss {loss.name!r} needs a numeric target, "
                            f"got element type {target.dtype}")
        if out_shape is not None and not _fits(out_shape, target.shape):
            raise DataError(f"{where}: target of shape {list(target.shape)} does not fit "
                            f"{self.output!r} of shape {_dims(out_shape)}")
        return None

    # -- running -----------------------------------------------------------------------
    def _run(self, feeds: Mapping[str, Any], target: Any,
             on_ready: Callable[[str, Any], None] | None = None,
             before_handoff: Callable[[dict], None] | None = None,
             inspect: Callable | None = None) -> dict[str, Any]:
        env = dict(self._weights)
        env.update(prepare_feeds(self.graph, feeds, self.backend, self.model.where,
                                 self._own_inputs))
        if self.target_input:
            env[self.target_input] = self.backend.asarray(self._target(target))
        else:
            self._target(target)
        self._feed_scale(env)
        self._state.training = True
        self._state.updates.clear()
        try:
            return self._runner.run(env, self.profile, on_ready, before_handoff, inspect)
        finally:
            self._state.training = False

    def gradients(self, feeds: Mapping[str, Any], target: Any = None) -> dict[str, np.ndarray]:
        """The loss's gradient for each trainable parameter; changes no weight.  With a
        communicator, their average over the ranks (a collective call).  With fp16 loss
        scaling, computed at the current :attr:`loss_scale` and divided by it (an
        overflow shows as infinite or NaN values)."""
        out = self._run(feeds, target)
        self._state.updates.clear()
        grads = {p: out[g] for p, g in self._grad_values.items()}
        if self._reducer is not None:
            grads = self._reducer.average(grads)
        grads = {p: np.array(self.backend.to_host(g), copy=True) for p, g in grads.items()}
        if self.loss_scaler is not None:
            for grad in grads.values():
                grad *= grad.dtype.type(1.0 / self.loss_scaler.scale)
        return grads

    @property
    def loss_scale(self) -> float | None:
        """The current fp16 loss scale (see :class:`~onnxgrad.precision.LossScaler`), or
        None when the loss is not scaled (fp32, bf16)."""
        return None if self.loss_scaler is None else self.loss_scaler.scale

    def _feed_scale(self, env: dict[str, Any]) -> None:
        """Put the loss scale, the seed of the backward pass, into ``env``."""
        if self._scale_input is not None:
            dtype = self.graph.dtype(self._scale_input)
            env[self._scale_input] = self.backend.asarray(
                np.asarray(self.loss_scaler.scale, dtype=dtype))

    def step(self, feeds: Mapping[str, Any], target: Any = None) -> float:
        """Forward, backward and one optimizer update; returns the loss before the update.

        Each parameter is updated as soon as the backward pass no longer reads it
        and its gradient is complete, while that gradient is still in cache; the
        gradient's memory is released then, not at the end of the step.  A trainer
        serves one thread at a time: a second thread calling ``step`` while one runs
        gets an OnnxgradError.
        """
        if not self._busy.acquire(blocking=False):
            raise OnnxgradError(f"{self.model.where}: another thread is in this trainer's step(); "
                                "a Trainer serves one thread at a time")
        try:
            return self._step(feeds, target)
        finally:
            self._busy.release()

    def fit(self, data, epochs: int = 5, val=None, callbacks=(), batch_size: int = 32,
            shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> list[dict[str, Any]]:
        """Train for ``epochs`` epochs on ``data``: ``(feeds, target)`` arrays, shuffled and
        cut into batches, or an iterable of ``(feeds, target)`` batches; with ``val`` (the
        same forms) the validation loss and accuracy after each epoch.  ``callbacks`` see
        each epoch and step (see :mod:`onnxgrad.loop`).  A trainer restored from a
        checkpoint continues after its last epoch.  Returns each epoch's logs."""
        return loop.fit(self, data, epochs, val, callbacks, batch_size, shuffle, seed, drop_last)

    def evaluate(self, batches) -> dict[str, float]:
        """The loss (mean over samples) and, for class losses, the accuracy of the
        current weights on ``batches`` (an iterable of ``(feeds, target)``), in
        inference mode (BatchNormalization's running statistics, no Dropout)."""
        if self._evaluator is None:
            fetch = [self.loss_value, self.output]
            state = RunState(None, self.backend.xp)
            self._evaluator = ShapeSpecializedRunner(
                lambda shapes: Model.make_plan(self.graph, self.backend, fetch, state,
                                               weights=self._weight_names, shapes=shapes),
                self.graph.inputs)
        total = count = correct = counted = 0
        for feeds, target in batches:
            env = dict(self._weights)
            env.update(prepare_feeds(self.graph, feeds, self.backend, self.model.where,
                                     self._own_inputs))
            self._feed_scale(env)
            checked = self._target(target)
            if self.target_input:
                env[self.target_input] = self.backend.asarray(checked)
            out = self._evaluator.run(env)
            size = len(next(iter(feeds.values())))
            total += float(self.backend.to_host(out[self.loss_value])) * size
            count += size
            if self.loss is not None and self.loss.target == "class":
                logits = self.backend.to_host(out[self.output])
                axis = self.loss.class_axis_of(logits.ndim)
                hit = np.argmax(logits, axis=axis) == checked
                if self.loss.ignore_index is not None:
                    keep = checked != self.loss.ignore_index
                    hit, n = hit[keep], int(keep.sum())
                else:
                    n = hit.size
                correct += int(hit.sum())
                counted += n
        if not count:
            raise DataError(f"{self.model.where}: evaluate got no batches")
        result = {"loss": total / count}
        if counted:
            result["acc"] = correct / counted
        return result

    def _step(self, feeds: Mapping[str, Any], target: Any) -> float:
        if self.accumulate != 1 or self.clip_grad_norm is not None or self.detect_anomaly \
                or self.loss_scaler is not None:
            return self._deferred_step(feeds, target)
        if self._reducer is not None:
            return self._distributed_step(feeds, target)
        if self.backend.name != "cpu":
            return self._step_on_device(feeds, target)
        xp, weights, profile = self.backend.xp, self._weights, self.profile

        def update(name: str, grad: Any) -> None:
            start = time.perf_counter() if profile is not None else 0.0
            self.optimizer.update(xp, {name: weights[name]}, {name: grad})
            if profile is not None:
                self.backend.synchronize()
                profile.optimizer_seconds += time.perf_counter() - start

        out = self._run(feeds, target, update, self._check_loss)
        loss = float(self.backend.to_host(out[self.loss_value]))
        start = time.perf_counter() if self.profile is not None else 0.0
        for name, value in self._state.updates.items():  # e.g. running statistics
            if name in self._weights:  # a statistic fed by a Constant node stays constant
                self._weights[name][...] = value
        self._state.updates.clear()
        if self.profile is not None:
            self.backend.synchronize()
            self.profile.optimizer_seconds += time.perf_counter() - start
            self.profile.steps += 1
        self._stale = bool(self._copied)
        self._advance()
        return loss

    def _distributed_step(self, feeds: Mapping[str, Any], target: Any) -> float:
        """A step of data-parallel training: the executor hands each gradient to the
        reducer as soon as it is complete (its bucket's all-reduce starts when the
        bucket is full), the loss is averaged too, and the update follows the last
        bucket; a loss that is not finite on any rank stops every rank before it."""
        reducer = self._reducer
        device = self.backend.stream if self.backend.name != "cpu" else contextlib.nullcontext()
        with device:
            out = self._run(feeds, target, reducer.add,
                            lambda env: reducer.begin(env[self.loss_value]))
            grads, loss = reducer.finish()
            if not np.isfinite(loss):
                self._state.updates.clear()
                raise NonFiniteError(
                    f"{self.model.where}: the loss averaged over the {self.comm.size} ranks is "
                    f"{loss} at step {self.steps + 1} (this rank's: "
                    f"{float(self.backend.to_host(out[self.loss_value]))}); no weight, optimizer "
                    "state or statistic was changed on any rank")
            for name, value in self._state.updates.items():  # e.g. running statistics
                if name in self._weights:
                    self._weights[name][...] = value
            self._state.updates.clear()
            self._apply(grads)
        if self.profile is not None:
            self.profile.steps += 1
        return loss

    def _split_random_streams(self) -> None:
        """In data-parallel training, give rank ``r`` random numbers of its own: rank 0's
        stream jumped ``r`` times.  Every rank draws alike, so the streams stay apart,
        and a state rank 0 saved gives each rank its own when loaded."""
        rank = 0 if self.comm is None else self.comm.rank
        state = self._state
        if rank == 0:
            return
        if hasattr(state.rng.bit_generator, "jumped"):
            state.rng = np.random.Generator(state.rng.bit_generator.jumped(rank))
        if state.draws is not None:
            mixed = hashlib.sha256(f"{state.draws.key}/{rank}".encode()).digest()
            state.draws.key = int.from_bytes(mixed[:8], "little")

    # -- clipping and accumulation: every gradient first, then the update ---------------
    def _deferred_step(self, feeds: Mapping[str, Any], target: Any) -> float:
        if not (isinstance(self.accumulate, int) and self.accumulate >= 1):
            raise OnnxgradError(f"accumulate must be a whole number of micro-batches, at least "
                                f"1; got {self.accumulate!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise OnnxgradError(f"clip_grad_norm must be positive, got {self.clip_grad_norm!r}")
        if self.loss_scaler is not None and self._micro == 0 and self._statistics:
            # A skipped step puts the running statistics back as they were before it.
            self._saved_statistics = {k: self._weights[k].copy() for k in self._statistics}
        # fp16 products overflow by design while the loss scale is too large: the step is
        # then skipped, and NumPy's overflow warnings are noise (silenced in this thread;
        # the thread pool's helpers keep NumPy's default error state).
        quiet = np.errstate(over="ignore", invalid="ignore") \
            if self.loss_scaler is not None else contextlib.nullcontext()
        with quiet:
            out = self._run(feeds, target, inspect=self._anomaly if self.detect_anomaly else None)
        if self.comm is not None:
            loss = self._averaged_loss(out)
        else:
            self._check_loss(out)
            loss = float(self.backend.to_host(out[self.loss_value]))
        for name, value in self._state.updates.items():  # running statistics, each micro-batch
            if name in self._weights:
                self._weights[name][...] = value
        self._state.updates.clear()
        grads = {p: out[g] for p, g in self._grad_values.items()}
        if self._pending is None:
            self._pending = grads
        else:
            for name, grad in grads.items():
                self._pending[name] += grad
        self._micro += 1
        if self._micro == self.accumulate:
            self.finish_accumulation()
        if self.profile is not None:
            self.profile.steps += 1
        return loss

    def finish_accumulation(self) -> bool:
        """Take the optimizer step of the micro-batches accumulated so far (their mean
        gradient), if any; returns whether a step was taken.  A training loop calls it at
        the end of an epoch whose batches do not divide into ``accumulate``."""
        if self._pending is None:
            return False
        grads, count = self._pending, self._micro
        self._pending, self._micro = None, 0
        xp = self.backend.xp
        if count > 1:
            for grad in grads.values():
                grad /= grad.dtype.type(count)
        if self._reducer is not None:
            grads = self._reducer.average(grads)
        scaler = self.loss_scaler
        if scaler is not None:
            # torch.amp.GradScaler: unscale, then skip the step (and lower the scale) if any
            # gradient is infinite or NaN; the same on every rank, after the all-reduce.
            for grad in grads.values():
                grad *= grad.dtype.type(1.0 / scaler.scale)
            finite = xp.stack([xp.isfinite(g).all() for g in grads.values()]).all()
            if not bool(self.backend.to_host(finite)):
                for name, value in (self._saved_statistics or {}).items():
                    self._weights[name][...] = value
                self._saved_statistics = None
                scaler.update(found_inf=True)
                self.skipped_steps += 1
                self._stale = bool(self._copied)
                return False
            self._saved_statistics = None
            scaler.update(found_inf=False)
        if self.clip_grad_norm is not None:
            # torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms, in the
            # gradients' type; every gradient times min(1, max_norm / (norm + 1e-6)).
            norms = [xp.sqrt(xp.sum(g * g)) for g in grads.values()]
            total = xp.sqrt(xp.sum(xp.stack(norms) ** 2))
            self.last_grad_norm = float(self.backend.to_host(total))
            coef = xp.minimum(total.dtype.type(self.clip_grad_norm) / (total + total.dtype.type(1e-6)),
                              total.dtype.type(1.0))
            for grad in grads.values():
                grad *= coef
        start = time.perf_counter() if self.profile is not None else 0.0
        self._apply(grads)
        if self.profile is not None:
            self.backend.synchronize()
            self.profile.optimizer_seconds += time.perf_counter() - start
        return True

    def _apply(self, grads: dict[str, Any]) -> None:
        """The optimizer's update with ``grads`` (name -> gradient, on the device)."""
        xp = self.backend.xp
        if self.backend.name == "cpu":
            self.optimizer.update(xp, self._weights, grads)
        else:
            update = self._device_update
            if update is None or update.optimizer is not self.optimizer:
                trained = {name: self._weights[name] for name in self.trainable}
                update = self._device_update = DeviceUpdate(self.optimizer, xp, trained)
            with self.backend.stream:
                update.begin_step()
                update.apply(grads)
        self._stale = bool(self._copied)
        self._advance()

    def _anomaly(self, node, names, outputs) -> None:
        xp = self.backend.xp
        for name, value in zip(names, outputs):
            if not name or not hasattr(value, "dtype") or value.dtype.kind not in "fc":
                continue
            if not bool(xp.isfinite(value).all()):
                bad = "NaN" if bool(xp.isnan(value).any()) else "an infinite value"
                part = "forward pass" if node.name in self._forward_nodes else "backward pass"
                self._state.updates.clear()
                raise NonFiniteError(
                    f"{self.model.where}: node {node.name!r} ({node.op_type}, {part}) made "
                    f"{bad} in {name!r} at step {self.steps + 1}; nothing was updated")

    def _averaged_loss(self, env: dict[str, Any]) -> float:
        """The step's loss averaged over the ranks (a collective call); NonFiniteError on
        every rank if it is not finite on any."""
        total = np.array([float(self.backend.to_host(env[self.loss_value]))])
        self.comm.allreduce(total)
        loss = float(total[0]) / self.comm.size
        if not np.isfinite(loss):
            self._state.updates.clear()
            raise NonFiniteError(
                f"{self.model.where}: the loss averaged over the {self.comm.size} ranks is "
                f"{loss} at step {self.steps + 1}; nothing was updated on any rank")
        return loss

    def _check_loss(self, env: dict[str, Any]) -> None:
        """Raise NonFiniteError if the step's loss (in ``env``) is not finite: called before
        the first update, so that nothing has changed."""
        loss = float(self.backend.to_host(env[self.loss_value]))
        if not np.isfinite(loss):
            self._state.updates.clear()
            raise NonFiniteError(
                f"{self.model.where}: the loss is {loss} at step {self.steps + 1}; no weight, "
                "optimizer state or statistic was changed (a learning rate too large, or "
                "non-finite data, makes this)")

    def _advance(self) -> None:
        self.steps += 1
        if self.schedule is not None:
            self.schedule.step()

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a run needs to continue exactly: weights (running statistics
        included), the optimizer's type, settings and state, the step and epoch
        counters, random-number state, the schedule's and the loop's state.  Arrays are
        host copies; the rest is JSON-able."""
        host = self.backend.to_host
        weights = {name: np.array(host(value), copy=True) for name, value in self._weights.items()}
        state = {param: {key: np.array(host(v), copy=True) if hasattr(v, "shape") else v
                         for key, v in entries.items()}
                 for param, entries in self.optimizer.state.items()}
        draws = self._state.draws
        rng = ({"numpy": self._state.rng.bit_generator.state} if draws is None else
               {"draws": int(host(draws.counter)[0]), "key": draws.key})
        scaler = None if self.loss_scaler is None else {
            **self.loss_scaler.state_dict(), "skipped_steps": self.skipped_steps}
        return {"weights": weights,
                "optimizer": {"type": type(self.optimizer).__name__,
                              "settings": _settings(self.optimizer), "state": state},
                "steps": self.steps, "epoch": self.epoch, "rng": rng,
                "schedule": None if self.schedule is None else self.schedule.state_dict(),
                "loop": dict(self.loop_state), "scaler": scaler}

    def load_state_dict(self, state: Mapping[str, Any], where: str = "state") -> None:
        """Continue from ``state`` (as :meth:`state_dict` made it).  Everything is checked
        against this trainer first (a mismatch raises :class:`CheckpointError` naming the
        first one) and nothing changes unless all of it fits."""
        try:
            weights = dict(state["weights"])
            optimizer = state["optimizer"]
            kind, settings, entries = optimizer["type"], optimizer["settings"], optimizer["state"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{where}: not a trainer state ({exc!r} missing)") from exc
        if kind != type(self.optimizer).__name__:
            raise CheckpointError(f"{where}: saved with optimizer {kind}, this trainer uses "
                                  f"{type(self.optimizer).__name__}")
        for name, value in self._weights.items():
            if name not in weights:
                raise CheckpointError(f"{where}: has no weight {name!r}")
            saved = np.asarray(weights[name])
            if saved.shape != tuple(value.shape) or saved.dtype != value.dtype:
                raise CheckpointError(
                    f"{where}: weight {name!r} is {saved.dtype}{list(saved.shape)} there, "
                    f"{value.dtype}{list(value.shape)} in the model")
        extra = sorted(set(weights) - set(self._weights))
        if extra:
            raise CheckpointError(f"{where}: weight {extra[0]!r} is not a weight of the model")
        for param, values in entries.items():
            if param not in self.trainable:
                raise CheckpointError(f"{where}: optimizer state for {param!r}, which this "
                                      "trainer does not train")
            for key, value in values.items():
                if hasattr(value, "shape") and tuple(value.shape) != tuple(self._weights[param].shape):
                    raise CheckpointError(f"{where}: optimizer state {param}.{key} has shape "
                                          f"{list(value.shape)}, the parameter "
                                          f"{list(self._weights[param].shape)}")
        schedule = state.get("schedule")
        if (schedule is None) != (self.schedule is None):
            had = f"a {schedule['name']!r} schedule" if schedule else "no schedule"
            has = f"a {self.schedule.name!r} one" if self.schedule else "none"
            raise CheckpointError(f"{where}: the run had {had}, this trainer has {has}")
        if schedule is not None and schedule.get("name") != self.schedule.name:
            raise CheckpointError(f"{where}: the run had a {schedule.get('name')!r} schedule, "
                                  f"this trainer a {self.schedule.name!r} one")
        if schedule is not None:
            for key, value in schedule.get("settings", {}).items():
                mine = self.schedule.settings().get(key)
                if mine != value:
                    raise CheckpointError(f"{where}: the run's {schedule['name']} schedule has "
                                          f"{key}={value!r}, this trainer's {key}={mine!r}")
        scaler = state.get("scaler")
        if scaler is not None and self.loss_scaler is not None:
            _check_scaler(scaler, where)
        # All checked: write.
        for name, value in self._weights.items():
            value[...] = self.backend.asarray(np.asarray(weights[name]))
        self.optimizer.state = {
            param: {key: self.backend.asarray(np.array(v, copy=True)) if hasattr(v, "shape")
                    else v for key, v in values.items()}
            for param, values in entries.items()}
        for key, value in settings.items():
            setattr(self.optimizer, key, tuple(value) if isinstance(value, list) else value)
        self.steps, self.epoch = int(state.get("steps", 0)), int(state.get("epoch", 0))
        rng = state.get("rng") or {}
        if "numpy" in rng and self._state.draws is None:
            self._state.rng.bit_generator.state = rng["numpy"]
            self._split_random_streams()  # a state rank 0 saved: this rank's own stream
        elif "draws" in rng and self._state.draws is not None:
            self._state.draws.key = int(rng["key"])
            self._state.draws.counter[...] = rng["draws"]
            self._split_random_streams()
        if self.schedule is not None:
            self.schedule.load_state_dict(schedule)
        self.loop_state = dict(state.get("loop") or {})
        # A run saved without loss scaling continues with this trainer's initial scale; the
        # scale of an fp16 run is dropped by a trainer that does not scale (bf16, fp32).
        if scaler is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(scaler)
            self.skipped_steps = int(scaler.get("skipped_steps", 0))
        self._stale = bool(self._copied)

    def save_checkpoint(self, path) -> None:
        """Write :meth:`state_dict` to ``path``: one file, atomically, no pickle."""
        checkpoint.save(self.state_dict(), path)

    def load_checkpoint(self, path) -> None:
        """Continue from the checkpoint at ``path`` (see :meth:`load_state_dict`)."""
        self.load_state_dict(checkpoint.load(path), where=str(path))

    # -- steps on a GPU ----------------------------------------------------------------
    def _step_on_device(self, feeds: Mapping[str, Any], target: Any) -> float:
        backend, profile = self.backend, self.profile
        inputs = self._host_inputs(feeds, target)
        update = self._device_update
        if update is None or update.optimizer is not self.optimizer:
            trained = {name: self._weights[name] for name in self.trainable}
            update = self._device_update = DeviceUpdate(self.optimizer, backend.xp, trained)
            if self.graphs is not None:
                self.graphs.clear()
        with backend.stream:
            update.begin_step()
            if self.graphs is None or profile is not None:  # a profile times kernel by kernel
                result = self._launch({k: backend.asarray(v) for k, v in inputs.items()})
            else:
                holds = [*self._weights.values(), *update.arrays()]
                result = self.graphs.run(inputs, self._launch, holds)
            loss = float(backend.to_host(result))
        if not np.isfinite(loss):  # the step ran as one launch: its update is done
            raise NonFiniteError(
                f"{self.model.where}: the loss is {loss} at step {self.steps + 1}; on a GPU the "
                "step's update has been applied (load a checkpoint to go back)")
        if profile is not None:
            profile.steps += 1
            profile.notes = ["kernel by kernel: steps ran eagerly (a CUDA graph is not timed "
                             "per kernel)"] + (self.graphs.describe() if self.graphs else [])
            profile.notes += backend.describe()
        self._stale = True
        self._advance()
        return loss

    def _host_inputs(self, feeds: Mapping[str, Any], target: Any) -> dict[str, Any]:
        """The step's inputs, checked, as host arrays; the target under its input's name."""
        if isinstance(feeds, Mapping):
            feeds = {k: self.backend.to_host(v) if hasattr(v, "__cuda_array_interface__") else v
                     for k, v in feeds.items()}
        inputs = prepare_feeds(self.graph, feeds, _HOST, self.model.where, self._own_inputs)
        checked = self._target(target)
        if self.target_input:
            inputs[self.target_input] = checked
        return inputs

    def _launch(self, inputs: dict[str, Any]) -> Any:
        """Launch one training step on the device (the work a CUDA graph records):
        forward, backward, the fused update (of all parameters at once after the
        backward pass, or of each as soon as its gradient is ready where the update
        is not multi-tensor), and the new running statistics; returns the loss (a
        device scalar)."""
        env = dict(self._weights)
        env.update(inputs)
        update, profile = self._device_update, self.profile
        ready: dict[str, Any] = {}
        if update.multi_tensor:
            on_ready = ready.__setitem__
        else:
            on_ready = update if profile is None else self._timed(update)
        self._state.training = True
        self._state.updates.clear()
        try:
            out = self._runner.run(env, profile, on_ready)
        finally:
            self._state.training = False
        if ready:
            start = time.perf_counter()
            update.apply(ready)
            if profile is not None:
                self.backend.synchronize()
                profile.optimizer_seconds += time.perf_counter() - start
        for name, value in self._state.updates.items():  # e.g. running statistics
            if name in self._weights:
                self._weights[name][...] = value
        self._state.updates.clear()
        return out[self.loss_value]

    def _timed(self, update: DeviceUpdate) -> Callable[[str, Any], None]:
        def timed(name: str, grad: Any) -> None:
            start = time.perf_counter()
            update(name, grad)
            self.backend.synchronize()
            self.profile.optimizer_seconds += time.perf_counter() - start
        return timed


_HOST = Backend()


def _settings(optimizer: Optimizer) -> dict[str, Any]:
    """The optimizer's hyper-parameters, JSON-able."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in vars(optimizer).items() if k != "state" and not k.startswith("_")}


def _check_scaler(scaler: Any, where: str) -> None:
    """Raise CheckpointError unless ``scaler`` is a loss scaler's saved state."""
    try:
        scale, tracker = float(scaler["scale"]), scaler["growth_tracker"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the loss scaler's state is incomplete ({exc!r}); "
                              "expected 'scale' and 'growth_tracker'") from exc
    if not (np.isfinite(scale) and scale > 0):
        raise CheckpointError(f"{where}: the loss scale is {scale!r}; expected a positive number")
    if not (isinstance(tracker, int) and tracker >= 0):
        raise CheckpointError(f"{where}: the loss scaler's growth_tracker is {tracker!r}; "
                              "expected a count of steps")


def column_major_weights(graph, weights) -> list[str]:
    """The 2-D ``weights`` whose every reader is a Gemm taking it as a transposed B
    (``transB=1``), or the layout-only input of GemmGradB: stored column-major, such
    a weight makes the Gemm a plain product for BLAS.  A weight that a backward
    Gemm also reads untransposed (for its input's gradient) stays row-major."""
    readers: dict[str, list] = {w: [] for w in weights}
    for node in graph.nodes:
        for i, name in enumerate(node.inputs):
            if name in readers:
                readers[name].append((node, i))
    chosen = []
    for w, uses in readers.items():
        value = graph.initializers.get(w)
        if value is None or value.ndim != 2 or not uses:
            continue
        if all((n.op_type == "Gemm" and n.domain == "" and i == 1 and n.attrs.get("transB"))
               or (n.op_type == "GemmGradB" and n.domain == "onnxgrad" and i == 2)
               for n, i in uses):
            chosen.append(w)
    return chosen


def host_read_weights(graph) -> set[str]:
    """Initializers that every node reading them reads as a host input."""
    host, device = set(), set()
    for node in graph.nodes:
        definition = lookup(node.op_type, node.domain, node.opset, node.name)
        for i, name in enumerate(node.inputs):
            if name in graph.initializers:
                (host if definition.is_host_input(i) else device).add(name)
    return host - device


def _fits(expected, shape) -> bool:
    """Whether ``shape`` matches static dims ``expected`` (symbolic dims match anything)."""
    return len(expected) == len(shape) and all(
        not isinstance(d, int) or d == s for d, s in zip(expected, shape))


def _dims(shape) -> list:
    return ["?" if not isinstance(d, int) else d for d in shape]


def _check_ranks(trainer: Trainer, comm, **options: Any) -> None:
    """Refuse to train unless every rank of ``comm`` has the same model and options."""
    if not isinstance(comm, distributed.Communicator):
        raise OnnxgradError(f"comm must be an onnxgrad.distributed communicator (MPIComm, "
                            f"NCCLComm), got {type(comm).__name__}")
    if isinstance(comm, distributed.NCCLComm) and trainer.device != "cuda":
        raise OnnxgradError(f"comm=NCCLComm reduces CuPy arrays and needs device='cuda'; "
                            f"this trainer runs on {trainer.device!r} (use MPIComm there)")
    optimizer = trainer.optimizer
    distributed.check_same(comm, {
        "model": distributed.model_digest(trainer.model), "loss": repr(trainer.loss),
        "optimizer": [type(optimizer).__name__, _settings(optimizer)],
        "device": trainer.device, **options}, "onnxgrad.Trainer")
