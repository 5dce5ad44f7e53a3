"""``onnxgrad train``: fine-tune a model on a .npz data file, or run the training
algorithm it carries (TrainingInfoProto)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile

import click
import numpy as np

import onnxgrad
from onnxgrad import checkpoint, distributed
from onnxgrad.autodiff import differentiable_ancestors
from onnxgrad.errors import OnnxgradError
from onnxgrad.threads import available_cores

from . import data as D
from .common import (
    CONTEXT,
    boundary,
    build_optimizer,
    build_schedule,
    data_source,
    schedule_options,
    optimizer_options,
    precision_option,
    check_loss,
    choose_batch_size,
    describe,
    fixed_batch,
    key_options,
    load_model,
    measure,
    read_dataset,
    resolve_output,
    threads_option,
    _given,
)
from .log import Logs, MetricsLog, TensorBoardLog, plot
from .log import read as read_log
from .metrics import batches
from .report import is_float, select_trainable


def data_parallel(fn):
    """Run the command as one rank of ``mpiexec -n N onnxgrad train ...`` when an MPI
    launcher started several: ``fn`` gets the communicator as ``comm`` (None when
    the process runs alone).  Ranks other than 0 print nothing unless they fail; a
    failure on any rank prints ``Error: rank R of N: ...`` and ends every rank (MPI
    Abort).  Unless ``--threads`` or ONNXGRAD_NUM_THREADS says otherwise, the ranks
    on one machine share its cores."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            comm = distributed.from_launcher()
        except OnnxgradError as exc:
            rank = distributed.launched_rank()
            raise click.ClickException(f"rank {rank}: {exc}" if rank is not None else str(exc)) \
                from None
        if comm is None:
            return fn(*args, comm=None, **kwargs)
        with contextlib.ExitStack() as stack:
            stack.enter_context(distributed.abort_on_error(comm, _message))
            if comm.rank:  # the others stay quiet unless they fail
                devnull = stack.enter_context(open(os.devnull, "w"))
                stack.enter_context(contextlib.redirect_stdout(devnull))
                stack.enter_context(contextlib.redirect_stderr(devnull))
            if not _given("threads") and not os.environ.get("ONNXGRAD_NUM_THREADS"):
                onnxgrad.set_num_threads(max(1, available_cores() // comm.local[1]))
            return fn(*args, comm=comm, **kwargs)

    return wrapper


def _message(exc: BaseException) -> str:
    if isinstance(exc, click.ClickException):
        return exc.format_message()
    return f"{type(exc).__name__}: {exc}"


#: Options left out of the comparison between ranks: those only rank 0 reads (it alone
#: prints and writes files), and the paths of the model (which the trainer compares by
#: hash) and of the data (compared by number of samples, types and shapes).
_NOT_COMPARED = {"model", "data", "val_path", "out_path", "quiet", "profile", "checkpoint_dir",
                   "save_best", "monitor", "early_stopping", "log_path", "log_every",
                   "tensorboard_dir", "plot_path", "resume_dir"}


def _check_ranks(comm, ds) -> None:
    """Refuse to train unless every rank was started with the same options and data."""
    ctx = click.get_current_context()
    items = {p.opts[0]: ctx.params[p.name] for p in ctx.command.params
             if p.name in ctx.params and p.name not in _NOT_COMPARED}
    items["--resume"] = ctx.params["resume_dir"] is not None
    items["training data"] = {
        "samples": len(ds),
        "inputs": {k: [v.dtype.str, list(v.shape[1:])] for k, v in ds.feeds.items()},
        "target": None if ds.target is None else [ds.target.dtype.str, list(ds.target.shape[1:])]}
    distributed.check_same(comm, items, "onnxgrad train")


def _load_checkpoint(trainer, path: str, comm) -> None:
    """Rank 0 reads the checkpoint at ``path`` and every rank continues from it."""
    if comm is None:
        trainer.load_checkpoint(path)
        return
    data = np.fromfile(path, dtype=np.uint8) if comm.rank == 0 else None
    size = np.array([0 if data is None else data.size], dtype=np.int64)
    comm.broadcast(size)
    if data is None:
        data = np.empty(int(size[0]), dtype=np.uint8)
    comm.broadcast(data)
    if comm.rank == 0:
        trainer.load_checkpoint(path)
        return
    with tempfile.TemporaryDirectory() as folder:
        copy = os.path.join(folder, os.path.basename(path))
        data.tofile(copy)
        trainer.load_state_dict(checkpoint.load(copy), where=f"{path} (from rank 0)")


@click.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="FILE.npz", help="Training data (numpy.savez archive).")
@key_options
@optimizer_options
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the shuffling (and of --val-split).")
@click.option("--trainable", multiple=True, metavar="PATTERN",
              help="Train only parameters with these names or shell globs (repeatable). "
                   "Default: every floating-point initializer of more than one element with a "
                   "gradient path to the loss (one-element ones are exporters' constants).")
@click.option("--freeze", multiple=True, metavar="PATTERN",
              help="Do not train parameters with these names or globs (repeatable).")
@click.option("--val", "val_path", default=None, metavar="FILE.npz",
              help="Validation data, same keys as --data.")
@click.option("--val-split", type=float, default=None, metavar="FRACTION",
              help="Hold out this fraction of --data (chosen at random with --seed) for validation.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda",
              help="Where training runs; cuda needs CuPy (pip install 'onnxgrad[gpu]').")
@click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
              help="With --device cuda: record each training step as a CUDA graph after two "
                   "eager steps with the same shapes, and replay it (one launch per step).")
@click.option("--frozen-batchnorm", type=click.Choice(["train", "eval"]), default="train",
              show_default=True,
              help="BatchNormalization in a frozen part of the model (scale and bias not "
                   "trained, no trained weight before it): 'train' normalises with batch "
                   "statistics and updates the running ones (PyTorch's train()); 'eval' keeps "
                   "and uses the running statistics (a frozen backbone in eval()).")
@click.option("--out", "out_path", default=None, metavar="PATH",
              help="Where to write the trained model. Default: MODEL's name with '_trained' "
                   "added, next to it. --out may not name the model or a data file.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bar and no per-epoch lines; only the before/after summary.")
@click.option("--profile", is_flag=True,
              help="Time every kernel and print where the training steps spent their time.")
@click.option("--training-info", "training_info", is_flag=True,
              help="Run the training algorithm the model carries (ONNX TrainingInfoProto) instead "
                   "of a built-in loss and optimizer: its initialization once, then its algorithm "
                   "once per batch, applying its update bindings. Data keys must be named like "
                   "the algorithm's inputs.")
@click.option("--steps", type=int, default=None,
              help="With --training-info: stop after this many algorithm steps.")
@schedule_options
@click.option("--checkpoint-dir", default=None, metavar="DIR",
              help="Write DIR/last.ckpt after every epoch: weights, optimizer state, schedule, "
                   "random numbers and data order, enough to resume exactly.")
@click.option("--save-best", is_flag=True,
              help="With --checkpoint-dir: also write DIR/best.ckpt (and MODEL_best.onnx beside "
                   "--out) whenever the monitored metric improves.")
@click.option("--monitor", default="val_loss", show_default=True,
              type=click.Choice(["val_loss", "val_acc", "train_loss", "train_acc"]),
              help="The metric --save-best judges by (loss: lower is better; acc: higher).")
@click.option("--tie-weights", is_flag=True,
              help="Train initializers that repeat another bit for bit (or its transpose), as "
                   "exporters write a tied embedding and output matrix, as one weight; the "
                   "copies stay equal in the saved model (inspect lists them).")
@click.option("--detect-anomaly", is_flag=True,
              help="Check every node's outputs at each step and stop at the first value that "
                   "is not finite, naming the node (forward or backward); slower.")
@click.option("--clip-grad-norm", type=float, default=None, metavar="MAX",
              help="Scale the gradients down to a total L2 norm of MAX before each update "
                   "(torch.nn.utils.clip_grad_norm_).")
@click.option("--accumulate", type=int, default=1, show_default=True, metavar="N",
              help="Take one optimizer step per N batches, with their mean gradient (for a "
                   "mean loss, a step on the N times larger batch).")
@click.option("--early-stopping", type=int, default=None, metavar="PATIENCE",
              help="Stop when --monitor has not improved for PATIENCE epochs.")
@click.option("--log", "log_path", default=None, metavar="FILE.csv",
              help="Write one row of metrics per epoch: epoch, step, lr, step_loss, train and "
                   "val loss and accuracy (or perplexity), seconds, samples/s.")
@click.option("--log-every", type=int, default=None, metavar="N",
              help="With --log: also a row every N optimizer steps (step_loss and lr).")
@click.option("--tensorboard", "tensorboard_dir", default=None, metavar="DIR",
              help="Write the same metrics as TensorBoard scalars to DIR (tensorboardX: pip "
                   "install 'onnxgrad[tensorboard]').")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png",
              help="Draw the --log at the end (needs matplotlib: pip install 'onnxgrad[plot]').")
@click.option("--resume", "resume_dir", default=None, metavar="DIR",
              help="Continue the run checkpointed in DIR (DIR/last.ckpt) up to --epochs, with "
                   "the same options; the result equals an uninterrupted run bit for bit.")
@click.option("--sync-batchnorm", is_flag=True,
              help="In data-parallel training (mpiexec -n N onnxgrad train ...): normalise "
                   "BatchNormalization with the statistics of every rank's batch together "
                   "(all-reduced) instead of each rank's own (the default, as PyTorch's DDP).")
@precision_option
@threads_option
@data_parallel
@boundary
def train(model, data, input_keys, target_key, target_column, feature_columns, mean, std, loss,
          output, class_axis, ignore_index, optimizer,
          lr, momentum, weight_decay,
          epochs, batch_size, seed, trainable, freeze, val_path, val_split, device,
          cuda_graphs, frozen_batchnorm, out_path, quiet, profile, training_info, steps,
          lr_schedule, warmup_steps, min_lr, step_size, gamma, milestones, max_lr,
          checkpoint_dir, save_best, monitor, tie_weights, detect_anomaly, clip_grad_norm,
          accumulate,
          early_stopping,
          log_path, log_every, tensorboard_dir, plot_path, resume_dir, sync_batchnorm, precision,
          comm):
    """Train MODEL on a .npz data file and save the trained model.

    Each epoch shuffles the data and takes one optimizer step per batch. A
    progress bar runs on stderr. After each epoch a line gives step_loss,
    the mean of the losses of the epoch's steps (each measured before its
    update), then train_loss and, for classifiers (--loss cross_entropy or
    nll), train_acc: loss and accuracy of the weights at the end of the
    epoch on the whole training data, in inference mode; then val_loss and
    val_acc when --val or --val-split is given. The same metrics are printed
    before and after training. The trained model keeps the original graph
    and runs in any ONNX runtime.

    Started by an MPI launcher (mpiexec -n N onnxgrad train ...), the N
    processes train data-parallel: each takes its shard of every epoch (as
    PyTorch's DistributedSampler), --batch-size is per process, and the
    gradients are averaged before each update (with --device cuda, one GPU per
    process, through NCCL). Rank 0 alone prints and writes the model, logs and
    checkpoints; an error on any rank ends them all.

    \b
    Examples:
      onnxgrad train models/digits_mlp.onnx --data models/digits_train.npz \\
          --val models/digits_test.npz --epochs 5 --out digits_trained.onnx
      onnxgrad train models/digits_mlp.onnx --data models/digits_train.npz \\
          --optimizer sgd --lr 0.05 --momentum 0.9 --val-split 0.2
      onnxgrad train models/digits_mlp.onnx --data models/digits_train.npz \\
          --freeze '*0.weight' --freeze '*0.bias'        # fine-tune the last layer
      onnxgrad train regressor.onnx --data houses.npz --input-key features \\
          --target-key price --loss mse --optimizer sgd --lr 0.001
      mpiexec -n 2 onnxgrad train models/digits_mlp.onnx \\
          --data models/digits_train.npz --batch-size 16     # 2 processes
    """
    echo = (lambda *a, **k: None) if quiet else click.echo
    loss = check_loss(loss, class_axis, ignore_index)
    opt = build_optimizer(optimizer, lr, momentum, weight_decay)
    if epochs < 1:
        raise click.ClickException(f"--epochs must be at least 1 (got {epochs})")
    if batch_size < 1:
        raise click.ClickException(f"--batch-size must be at least 1 (got {batch_size})")
    if val_path is not None and val_split is not None:
        raise click.ClickException("give either --val or --val-split, not both")
    if val_split is not None and not 0 < val_split < 1:
        raise click.ClickException(f"--val-split must lie between 0 and 1 (got {val_split})")
    if device not in ("cpu", "cuda"):
        raise click.ClickException(f"unknown device {device!r}; choose cpu or cuda")
    if training_info and precision != "fp32":
        raise click.ClickException(f"--precision {precision} applies to the built-in loss and "
                                   "optimizer; --training-info runs the model's own algorithm "
                                   "as written (leave --precision at fp32)")
    if comm is not None and training_info:
        raise click.ClickException("--training-info runs the model's algorithm in one process; "
                                   f"start it without mpiexec (started as {comm.size} ranks)")
    if comm is not None and device == "cuda":  # one GPU per rank, gradients through NCCL
        comm = distributed.NCCLComm(comm)
    root = comm is None or comm.rank == 0

    if out_path is None:
        stem, _ = os.path.splitext(model)
        out_path = stem + "_trained.onnx"
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if root:
        _check_out_path(out_path, out_dir, model, data, val_path)

    m = load_model(model)
    if training_info:
        run_training_info(m, data, epochs, batch_size, seed, steps, out_path, quiet, input_keys,
                          target_key)
        return
    output = resolve_output(m, output, loss)
    batch_size = choose_batch_size(m, batch_size, _given("batch_size"))
    source = data_source(target_column, feature_columns, mean, std)
    ds = read_dataset(data, m, input_keys, target_key, source=source)
    val = None
    if val_path is not None:
        if root:  # rank 0 alone measures
            val = read_dataset(val_path, m, input_keys, target_key, source=source)
    elif val_split is not None:
        order = np.random.default_rng(seed).permutation(len(ds))
        n_val = int(round(len(ds) * val_split))
        if n_val == 0 or n_val == len(ds):
            raise click.ClickException(f"--val-split {val_split} of {len(ds)} samples leaves "
                                       f"{'no' if n_val == 0 else 'all'} samples for validation")
        val = ds.take(np.sort(order[:n_val]), path=f"{data} [val-split {val_split}]")
        ds = ds.take(np.sort(order[n_val:]))

    names = None  # the Trainer's default: every weight with a gradient path to the loss
    if trainable or freeze:
        reach = differentiable_ancestors(m.graph, output, strict=False)
        names = select_trainable(m.parameters(), trainable, freeze, reach)
        if not names:
            raise click.ClickException("no parameters left to train (check --trainable/--freeze)")

    eval_bs = max(batch_size, 256)
    checked: set = set()

    def metrics(model_):
        train_m = measure(model_, output, ds, loss, eval_bs, checked)
        val_m = measure(model_, output, val, loss, eval_bs, checked) if val is not None else None
        return train_m, val_m

    if save_best and checkpoint_dir is None:
        raise click.ClickException("--save-best needs --checkpoint-dir")
    if (save_best or early_stopping) and monitor.startswith("val_") and val_path is None \
            and val_split is None:
        raise click.ClickException(f"--monitor {monitor} needs validation data "
                                   "(--val or --val-split)")
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise click.ClickException(f"--clip-grad-norm must be positive (got {clip_grad_norm})")
    if accumulate < 1:
        raise click.ClickException(f"--accumulate must be at least 1 (got {accumulate})")
    if early_stopping is not None and early_stopping < 1:
        raise click.ClickException(f"--early-stopping must be at least 1 (got {early_stopping})")
    if plot_path is not None and log_path is None:
        raise click.ClickException("--plot needs --log FILE.csv")
    if log_every is not None and log_path is None and tensorboard_dir is None:
        raise click.ClickException("--log-every needs --log FILE.csv or --tensorboard DIR")
    if log_every is not None and log_every < 1:
        raise click.ClickException(f"--log-every must be at least 1 (got {log_every})")
    if checkpoint_dir is not None and root:
        if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise click.ClickException(f"--checkpoint-dir {checkpoint_dir!r} is not a folder")
        os.makedirs(checkpoint_dir, exist_ok=True)
    resume_path = None
    if resume_dir is not None:
        resume_path = os.path.join(resume_dir, "last.ckpt")
        if root and not os.path.isfile(resume_path):
            raise click.ClickException(f"--resume {resume_dir!r}: no checkpoint "
                                       f"{resume_path!r} there")

    if comm is not None:
        _check_ranks(comm, ds)
    before = metrics(m) if root else None  # also checks the targets against the output
    trainer = onnxgrad.Trainer(m, loss=loss, output=output, optimizer=opt, trainable=names,
                               device=device, seed=seed, frozen_batchnorm=frozen_batchnorm,
                               cuda_graphs=cuda_graphs, tie_weights=tie_weights, comm=comm,
                               sync_batchnorm=sync_batchnorm and comm is not None,
                               precision=precision)
    local = len(ds) if comm is None else -(-len(ds) // comm.size)  # each rank's shard
    drop_last = fixed_batch(m) is not None and local % batch_size != 0
    per_epoch = -(-(local - (local % batch_size if drop_last else 0)) // batch_size)
    steps_per_epoch = -(-per_epoch // accumulate)
    trainer.schedule = build_schedule(lr_schedule, opt, epochs * steps_per_epoch, warmup_steps,
                                      min_lr, step_size, gamma, milestones, max_lr)
    trainer.clip_grad_norm, trainer.accumulate = clip_grad_norm, accumulate
    trainer.detect_anomaly = detect_anomaly
    if profile:
        trainer.profile = onnxgrad.Profile()
    params = m.parameters()
    n_values = sum(int(params[k].size) for k in trainer.trainable)
    n_float = sum(1 for v in params.values() if is_float(v))
    click.echo(f"data: {ds.describe()}")
    if val is not None:
        click.echo(f"validation: {val.describe()}")
    click.echo(f"training {len(trainer.trainable)} of {n_float} parameter tensors ({n_values:,} "
               f"values) with {optimizer.lower()} lr={opt.lr:g}, loss {loss.name} on {output!r}, {epochs} epoch(s) "
               f"of batch size {batch_size}" + (
                   "" if comm is None else
                   f" per rank on {comm.size} ranks ({batch_size * comm.size} samples per step)")
               + f", on {device}"
               + ("" if precision == "fp32" else f", {precision} mixed precision"))
    if root:
        click.echo(describe("before", *before))
    best, stale = None, 0
    if resume_path is not None:
        _load_checkpoint(trainer, resume_path, comm)
        best, stale = trainer.loop_state.get("best"), trainer.loop_state.get("stale", 0)
        click.echo(f"resumed from {resume_path}: {trainer.epoch} epoch(s), {trainer.steps} "
                   f"step(s) done")
    if drop_last and local < batch_size:
        raise click.ClickException(f"the model's batch dimension is fixed to {batch_size}, "
                                   f"but {data!r} has only {local} training samples"
                                   + ("" if comm is None else " per rank"))
    if drop_last:
        click.echo(f"note: the model's batch dimension is fixed to {batch_size}; each epoch "
                   f"leaves out {local % batch_size} (randomly chosen) samples"
                   + ("" if comm is None else " per rank"))
    if not root:  # the others train, and stay quiet
        trainer.fit(ds, epochs=epochs, batch_size=batch_size, seed=seed, drop_last=drop_last)
        return
    report = _EpochReport(trainer, metrics, echo, opt, epochs, monitor, best, stale,
                          checkpoint_dir, save_best, early_stopping, out_path,
                          Logs([MetricsLog(log_path, append=resume_path is not None)
                                if log_path else None,
                                TensorBoardLog(tensorboard_dir) if tensorboard_dir else None]),
                          log_every)
    report.after = before
    progress = _Progress(epochs, hidden=quiet or not sys.stderr.isatty())
    try:
        trainer.fit(ds, epochs=epochs, callbacks=[progress, report], batch_size=batch_size,
                    seed=seed, drop_last=drop_last)
    except KeyboardInterrupt:
        progress.close()
        saved = os.path.join(checkpoint_dir, "last.ckpt") if checkpoint_dir else None
        if saved and os.path.exists(saved):
            where = (f"the last checkpoint, {saved} (after epoch {trainer.epoch}), is kept; "
                     f"continue with the same options and --resume {checkpoint_dir}")
        else:
            where = "nothing was saved (--checkpoint-dir keeps a resumable state each epoch)"
        click.echo(f"interrupted in epoch {trainer.epoch + 1}: {where}", err=True)
        sys.exit(130)
    finally:
        progress.close()
        report.close()
    after = report.after

    click.echo(describe("after", *after))
    if trainer.loss_scaler is not None:
        click.echo(f"fp16 loss scale {trainer.loss_scale:g}; {trainer.skipped_steps} step(s) "
                   "skipped for gradients that overflowed")
    if trainer.profile is not None:
        click.echo(trainer.profile.report())
    trainer.model.save(out_path)
    click.echo(f"saved {out_path}")
    if ds.classes is not None:
        classes_path = os.path.splitext(out_path)[0] + ".classes.json"
        with open(classes_path, "w") as f:
            json.dump({"classes": ds.classes}, f, indent=1)
        click.echo(f"wrote {classes_path}: the class of each output index")
    if plot_path:
        plot(read_log(log_path), plot_path, title=os.path.basename(model))
        click.echo(f"plotted {log_path} to {plot_path}")


def _check_out_path(out_path, out_dir, model, data, val_path) -> None:
    """Refuse an --out that cannot be written, or that names an input, before the run."""
    if not os.path.isdir(out_dir):
        raise click.ClickException(f"cannot write {out_path!r}: directory {out_dir!r} does not exist")
    if os.path.isdir(out_path):
        raise click.ClickException(f"cannot write {out_path!r}: it is a directory")
    try:  # a file of our own there, now, rather than a failure after the whole run
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise click.ClickException(f"cannot write {out_path!r}: directory {out_dir!r} is not "
                                   f"writable ({exc.strerror})") from None
    for other, what in ((model, "the model"), (data, "the training data"),
                        (val_path, "the validation data")):
        if other is not None and os.path.exists(other) and os.path.exists(out_path) and \
                os.path.samefile(out_path, other):
            raise click.ClickException(f"--out {out_path!r} is {what}; it would be overwritten "
                                       "by the model")


class _Progress:
    """The progress bar of each epoch, on stderr (hidden with --quiet or when stderr is
    not a terminal, so that it does not mix lines into logs)."""

    def __init__(self, epochs: int, hidden: bool):
        self.epochs, self.hidden, self.bar = epochs, hidden, None
        self.total = self.seen = 0

    def on_epoch_begin(self, trainer, epoch, batches):
        self.total = self.seen = 0
        self.bar = click.progressbar(length=batches, label=f"epoch {epoch}/{self.epochs}",
                                     file=sys.stderr, hidden=self.hidden, show_pos=True,
                                     item_show_func=lambda s: s)
        self.bar.__enter__()

    def on_step_end(self, trainer, logs):
        self.total += logs["loss"] * logs["samples"]
        self.seen += logs["samples"]
        self.bar.update(1, f"loss {self.total / self.seen:.4f}")

    def on_epoch_end(self, trainer, logs):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class _EpochReport:
    """After each epoch: the metrics line, the log, checkpoints and early stopping."""

    def __init__(self, trainer, metrics, echo, optimizer, epochs, monitor, best, stale,
                 checkpoint_dir, save_best, early_stopping, out_path, log, log_every):
        self.trainer, self.metrics, self.echo, self.optimizer = trainer, metrics, echo, optimizer
        self.epochs, self.monitor, self.best, self.stale = epochs, monitor, best, stale
        self.checkpoint_dir, self.save_best = checkpoint_dir, save_best
        self.early_stopping, self.out_path = early_stopping, out_path
        self.log, self.log_every = log, log_every
        self.after = None
        self._taken = trainer.steps

    def on_step_end(self, trainer, logs):
        if self.log and self.log_every and trainer.steps != self._taken and \
                trainer.steps % self.log_every == 0:
            self.log.row(logs["epoch"], trainer.steps, self.optimizer.lr, step_loss=logs["loss"])
        self._taken = trainer.steps

    def on_epoch_end(self, trainer, logs):
        epoch = logs["epoch"]
        self.after = train_m, val_m = self.metrics(trainer.model)
        line = (f"epoch {epoch}/{self.epochs}: step_loss {logs['step_loss']:.4f}  "
                f"{train_m.format('train_')}")
        if val_m is not None:
            line += f"  |  {val_m.format('val_')}"
        if trainer.schedule is not None:
            line += f"  lr {self.optimizer.lr:.3g}"
        self.echo(line)
        if self.log:
            self.log.row(epoch, trainer.steps, self.optimizer.lr, step_loss=logs["step_loss"],
                         train=train_m, val=val_m, seconds=logs["seconds"],
                         samples_per_s=logs["samples"] / logs["seconds"])
        value = _monitored(self.monitor, train_m, val_m)
        improved = value is not None and (self.best is None or (
            value < self.best if self.monitor.endswith("loss") else value > self.best))
        if improved:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        if self.checkpoint_dir is not None:
            trainer.loop_state.update(best=self.best, stale=self.stale)
            trainer.save_checkpoint(os.path.join(self.checkpoint_dir, "last.ckpt"))
            if self.save_best and improved:
                trainer.save_checkpoint(os.path.join(self.checkpoint_dir, "best.ckpt"))
                stem, ext = os.path.splitext(self.out_path)
                trainer.model.save(f"{stem}_best{ext or '.onnx'}")
                self.echo(f"  best {self.monitor} so far ({value:.4f}): saved "
                          f"{self.checkpoint_dir}/best.ckpt")
        if self.early_stopping and self.stale >= self.early_stopping:
            click.echo(f"early stopping after epoch {epoch}: {self.monitor} has not improved "
                       f"for {self.stale} epoch(s) (best {self.best:.4f})")
            trainer.stop_training = True

    def close(self):
        if self.log:
            self.log.close()
            self.log = None


def _monitored(name: str, train_m, val_m) -> float | None:
    """The value of --monitor in this epoch's metrics (None where not measured)."""
    metrics = val_m if name.startswith("val_") else train_m
    if metrics is None:
        return None
    return metrics.loss if name.endswith("loss") else metrics.accuracy


def run_training_info(m, data, epochs, batch_size, seed, steps, out_path, quiet,
                      input_keys=(), target_key=None):
    """``train --training-info``: the model's own algorithm, one step per batch.  Each
    algorithm input reads the data key of its name, or the one ``--input-key NAME=KEY``
    gives; an input named ``target`` (as ``onnxgrad convert`` names the loss's target)
    also reads ``--target-key`` or the first of the usual target keys."""
    info = onnxgrad.TrainingInfo(m)
    arrays = D.load_npz(data)
    given = {}
    for item in input_keys:
        name, sep, key = item.partition("=")
        if not sep:
            raise click.ClickException(f"--input-key {item!r}: with --training-info write "
                                       "INPUT=KEY")
        given[name] = key
    keys = {}
    for name in info.inputs:
        if name in given:
            keys[name] = given[name]
        elif name in arrays:
            keys[name] = name
        elif name == "target":
            usual = [target_key] if target_key else ["label", "labels", "y", "targets"]
            keys[name] = next((k for k in usual if k in arrays), name)
        else:
            keys[name] = name
    missing = [f"{name} (key {key!r})" for name, key in keys.items() if key not in arrays]
    if missing:
        raise click.ClickException(
            f"{data!r} lacks key(s) for the training algorithm's inputs: {', '.join(missing)}; "
            f"keys present: {sorted(arrays)}")
    feeds = {name: arrays[key] for name, key in keys.items()}
    lengths = {len(v) for v in feeds.values() if v.ndim}
    if len(lengths) > 1:
        raise click.ClickException(f"the arrays of {data!r} for {info.inputs} have different "
                                   "numbers of samples")
    n = lengths.pop() if lengths else 1
    if steps is not None and steps < 1:
        raise click.ClickException(f"--steps must be at least 1 (got {steps})")
    info.initialize()
    total = steps if steps is not None else epochs * -(-n // batch_size)
    click.echo(f"running training_info[0] of {m.where}: {total} step(s) over {data!r} "
               f"({n} samples, batch size {batch_size}); inputs {info.inputs}, updates "
               f"{sorted(info.update_binding)}")
    rng = np.random.default_rng(seed)
    done, last = 0, {}
    with click.progressbar(length=total, label="steps", file=sys.stderr, hidden=quiet) as bar:
        while done < total:
            for index in batches(n, batch_size, rng.permutation(n)):
                if done == total:
                    break
                last = info.step({k: (v[index] if v.ndim else v) for k, v in feeds.items()})
                done += 1
                bar.update(1)
    scalars = {k: float(v) for k, v in last.items() if np.ndim(v) == 0 and np.issubdtype(np.asarray(v).dtype, np.number)}
    if scalars:
        click.echo("last step: " + "  ".join(f"{k} {v:.6g}" for k, v in scalars.items()))
    m.save(out_path)
    click.echo(f"saved {out_path}")
