"""The ``onnxgrad`` command line: inspect, train and evaluate ONNX models.

Every command turns onnxgrad's own errors (and bad input found while checking
data) into a one-line ``Error: ...`` and a non-zero exit status.  Set
``ONNXGRAD_DEBUG=1`` to see the traceback of an unexpected error instead.
"""

from __future__ import annotations

import functools
import math
import os
import sys

import click
import numpy as np

import onnxgrad
from onnxgrad.autodiff import differentiable_ancestors
from onnxgrad.errors import ModelError, OnnxgradError

from . import data as D
from .metrics import LOSSES, Metrics, batches, evaluate
from .report import (
    blocking_nodes,
    feed_inputs,
    fmt_bytes,
    fmt_dtype,
    fmt_shape,
    is_float,
    op_support,
    select_trainable,
)

OPTIMIZERS = ("sgd", "adam", "adamw")
#: Default learning rate per optimizer (PyTorch's defaults for Adam/AdamW).
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
#: Default weight decay per optimizer (PyTorch's defaults).
DEFAULT_WD = {"sgd": 0.0, "adam": 0.0, "adamw": 0.01}

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- error boundary ---------------------------------------------------------------
def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def boundary(fn):
    """Run a command; onnxgrad errors become ``Error: <message>`` and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxgradError as err:
            raise click.ClickException(_one_line(err) or type(err).__name__) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except MemoryError:
            raise click.ClickException("out of memory; try a smaller --batch-size") from None
        except Exception as err:  # an onnxgrad bug: short message unless debugging
            if os.environ.get("ONNXGRAD_DEBUG"):
                raise
            raise click.ClickException(
                f"internal error: {type(err).__name__}: {_one_line(err)} "
                f"(set ONNXGRAD_DEBUG=1 to see the traceback)"
            ) from None

    return wrapper


# -- shared pieces ----------------------------------------------------------------------
def load_model(path: str):
    if not os.path.exists(path):
        raise ModelError(f"model file {path!r} does not exist")
    if os.path.isdir(path):
        raise ModelError(f"model file {path!r} is a directory")
    try:
        return onnxgrad.load(path)
    except OnnxgradError:
        raise
    except Exception as err:  # the loader should raise ModelError itself
        raise ModelError(f"cannot load model {path!r}: {type(err).__name__}: {_one_line(err)}") from None


def resolve_output(model, output: str | None) -> str:
    graph = model.graph
    if output is None:
        if not graph.outputs:
            raise ModelError("the model has no outputs")
        return graph.outputs[0]
    if output in graph.outputs:
        return output
    known = set(graph.info) | {o for n in graph.nodes for o in n.outputs if o}
    if output not in known:
        raise ModelError(f"the model has no value named {output!r} for --output (graph outputs: "
                         f"{', '.join(map(repr, graph.outputs))})")
    return output


def output_runner(model, output: str):
    """A function ``feeds -> value of output`` running ``model`` in inference mode."""
    return lambda feeds: model.run(feeds, outputs=[output])[output]


def input_info(model) -> dict[str, tuple]:
    graph = model.graph
    out = {}
    for name in feed_inputs(graph):
        vi = graph.info.get(name)
        out[name] = (vi.dtype if vi else None, vi.shape if vi else None)
    return out


def read_dataset(path: str, model, input_keys, target_key, need_target=True) -> D.Dataset:
    names = feed_inputs(model.graph)
    mapping = D.parse_input_keys(input_keys, names)
    arrays = D.load_npz(path)
    keys, tkey = D.resolve_keys(arrays, path, names, mapping, target_key, need_target)
    return D.build_dataset(arrays, path, keys, tkey, input_info(model))


def check_loss(loss: str, class_axis: int | None = None, ignore_index: int | None = None):
    """The onnxgrad.Loss for --loss, --class-axis and --ignore-index."""
    if loss not in LOSSES:
        raise click.ClickException(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    kind = onnxgrad.LOSSES[loss]
    if issubclass(kind, onnxgrad.CrossEntropy):
        return kind(class_axis=1 if class_axis is None else class_axis, ignore_index=ignore_index)
    if class_axis is not None or ignore_index is not None:
        raise click.ClickException(f"--class-axis and --ignore-index apply to class losses "
                                   f"(cross_entropy, nll), not to {loss}")
    return kind()


def fixed_batch(model) -> int | None:
    """The batch size the model's inputs fix (e.g. 1 for shape [1, 64]), if any."""
    for dtype, shape in input_info(model).values():
        if shape and isinstance(shape[0], int):
            return shape[0]
    return None


def choose_batch_size(model, batch_size: int, option_given: bool) -> int:
    fixed = fixed_batch(model)
    if fixed is None or fixed == batch_size:
        return batch_size
    if option_given:
        raise click.ClickException(
            f"the model's inputs have a fixed batch dimension of {fixed} "
            f"({', '.join(f'{k!r} {fmt_shape(s)}' for k, (_, s) in input_info(model).items())}); "
            f"pass --batch-size {fixed} or re-export the model with a dynamic batch axis")
    return fixed


def measure(model, output, ds: D.Dataset, loss, batch_size: int, checked: set) -> Metrics:
    """Metrics of ``model`` on ``ds``; the targets are checked on the first call."""

    def check(y):
        if id(ds) not in checked:
            D.fit_target(ds, loss, output, y.shape, y.dtype)
            checked.add(id(ds))

    fixed = fixed_batch(model)
    return evaluate(output_runner(model, output), ds, loss, fixed or batch_size, check,
                    fixed_batch=fixed is not None)


def _given(name: str) -> bool:
    source = click.get_current_context().get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def describe(name: str, train: Metrics, val: Metrics | None) -> str:
    text = f"{name}: {train.format('train_')}"
    if val is not None:
        text += f"  |  {val.format('val_')}"
    return text


# -- commands ---------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT)
@click.version_option(package_name="onnxgrad", prog_name="onnxgrad")
def main():
    """Train ONNX models by backpropagation on NumPy (CPU) or CuPy (GPU).

    onnxgrad loads an .onnx file, builds the backward graph, trains the
    model's weights on data from a .npz file and writes the trained model
    back as a standard .onnx file that runs in onnxruntime.

    \b
    Data files are NumPy archives (numpy.savez) with one array per model
    input and one array of targets, all with the same number of rows.

    \b
    Examples:
      onnxgrad inspect models/digits_mlp.onnx
      onnxgrad train models/digits_mlp.onnx --data models/digits_train.npz \\
          --val models/digits_test.npz --epochs 5 --out digits_trained.onnx
      onnxgrad eval digits_trained.onnx --data models/digits_test.npz

    Run "onnxgrad COMMAND --help" for the options of each command.
    """


_key_options = [
    click.option("--input-key", "input_keys", multiple=True, metavar="[INPUT=]KEY",
                 help="Key of the data file that feeds a model input. Default: the key named like "
                      "the input; for a single-input model also 'input', 'inputs', 'x', 'X', "
                      "'data' or 'features', whichever is present first. Write INPUT=KEY for a "
                      "model with several inputs (repeat the option)."),
    click.option("--target-key", default=None, metavar="KEY",
                 help="Key of the targets. Default: the first of 'label', 'labels', 'y', "
                      "'target', 'targets' present in the file."),
    click.option("--loss", default="cross_entropy", show_default=True, metavar="NAME",
                 help="Loss: " + "; ".join(f"{k}: {v}" for k, v in LOSSES.items()) + "."),
    click.option("--output", default=None, metavar="VALUE",
                 help="The value the loss reads: a graph output or any value name in the graph "
                      "(e.g. the input of a final Softmax). Default: the first graph output."),
    click.option("--class-axis", type=int, default=None, metavar="AXIS",
                 help="Axis of the output that holds the classes, for cross_entropy and nll: "
                      "1 (default) for [N, C, ...], -1 for a language model's [N, T, C]."),
    click.option("--ignore-index", type=int, default=None, metavar="LABEL",
                 help="Targets equal to LABEL count for nothing (padding), for cross_entropy "
                      "and nll."),
]


def key_options(fn):
    for option in reversed(_key_options):
        fn = option(fn)
    return fn


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--trainable", multiple=True, metavar="PATTERN",
              help="Show which parameters would be trained with these names or globs (repeatable).")
@click.option("--freeze", multiple=True, metavar="PATTERN",
              help="Show the effect of freezing these names or globs (repeatable).")
@click.option("--output", default=None, metavar="VALUE",
              help="The value a loss would read, for the gradient check. Default: first output.")
@click.option("--parameters", "-p", "list_params", is_flag=True,
              help="List every parameter (implied by --trainable/--freeze).")
@boundary
def inspect(model, trainable, freeze, output, list_params):
    """Show a model's inputs, outputs, parameters and ops.

    For every op type in the graph: how many nodes use it, whether onnxgrad
    has a forward kernel for it at the model's opset, and whether it has a
    gradient rule ("n/a": the op has no differentiable input, e.g. Shape).
    Ops without a gradient rule only stop training when a gradient must flow
    through them; those are listed at the end.

    \b
    Examples:
      onnxgrad inspect models/digits_mlp.onnx
      onnxgrad inspect models/digits_mlp.onnx --parameters
      onnxgrad inspect models/digits_mlp.onnx --freeze '*0.weight' --freeze '*0.bias'
    """
    from onnxgrad.ops import lookup

    m = load_model(model)
    graph = m.graph
    out = resolve_output(m, output)
    echo = click.echo
    echo(f"model: {model}")
    opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(graph.opsets.items()))
    echo(f"opsets: {opsets}")

    width = max((len(n) for n in feed_inputs(graph) + list(graph.outputs)), default=0)

    def value_rows(names):
        for name in names:
            vi = graph.info.get(name)
            dtype = fmt_dtype(vi.dtype if vi else graph.dtype(name))
            shape = fmt_shape(vi.shape if vi else graph.shape(name))
            echo(f"  {name:<{width}}  {dtype:<8} {shape}")

    echo("inputs:")
    value_rows(feed_inputs(graph))
    echo("outputs:")
    value_rows(list(graph.outputs))

    params = m.parameters()
    floats = {k: v for k, v in params.items() if is_float(v)}
    n_values = sum(int(v.size) for v in floats.values())
    n_bytes = sum(int(v.nbytes) for v in floats.values())
    echo(f"parameters: {len(floats)} tensors, {n_values:,} values, {fmt_bytes(n_bytes)}")
    consts = {k: v for k, v in params.items() if not is_float(v)}
    if consts:
        echo(f"other initializers (not trainable): {len(consts)} tensors, "
             f"{fmt_bytes(sum(int(v.nbytes) for v in consts.values()))}")
    reach = differentiable_ancestors(graph, out, strict=False)
    chosen = select_trainable(params, trainable, freeze, reach)
    if trainable or freeze or list_params:
        width = max((len(k) for k in floats), default=0)
        for name, arr in floats.items():
            mark = ("trainable" if name in chosen else "frozen" if name in reach
                    else f"no gradient path to {out!r}")
            echo(f"  {name:<{width}}  {fmt_dtype(arr.dtype):<8} {fmt_shape(arr.shape):<14} {mark}")
        n_train = sum(int(floats[k].size) for k in chosen)
        echo(f"trainable: {len(chosen)} of {len(floats)} tensors, {n_train:,} values")

    rows = op_support(graph, lookup)
    echo(f"ops: {len(graph.nodes)} nodes, {len(rows)} op types")
    name_w = max([len("op")] + [len(_op_name(r)) for r in rows])
    echo(f"  {'op':<{name_w}}  {'opset':>5}  {'count':>5}  {'forward':<7}  gradient")
    for r in rows:
        echo(f"  {_op_name(r):<{name_w}}  {r.opset:>5}  {r.count:>5}  "
             f"{'yes' if r.forward else 'NO':<7}  {r.gradient if r.forward else '-'}")
    missing_fwd = [_op_name(r) for r in rows if not r.forward]
    no_grad = [_op_name(r) for r in rows if r.forward and r.gradient == "no"]
    if missing_fwd:
        echo(f"ops without a forward kernel (the model cannot run): {', '.join(missing_fwd)}")
    echo(f"ops without a gradient rule: {', '.join(no_grad) if no_grad else 'none'}")
    if no_grad and chosen:
        blocked = blocking_nodes(graph, lookup, chosen, out)
        if blocked:
            names = ", ".join(f"{n.name or '?'} ({n.op_type})" for n in blocked[:10])
            echo(f"training towards {out!r} would fail at: {names}")
        else:
            echo(f"none of them lies between the trainable parameters and {out!r}")


def _op_name(row) -> str:
    return row.op_type if not row.domain else f"{row.domain}::{row.op_type}"


@main.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="FILE.npz", help="Training data (numpy.savez archive).")
@key_options
@click.option("--optimizer", default="adam", show_default=True, metavar="sgd|adam|adamw",
              help="Optimizer; matches torch.optim numerically.")
@click.option("--lr", type=float, default=None,
              help="Learning rate. Default: 0.01 for sgd, 0.001 for adam and adamw.")
@click.option("--momentum", type=float, default=None, help="SGD momentum (sgd only). Default: 0.")
@click.option("--weight-decay", type=float, default=None,
              help="Weight decay. Default: 0 for sgd and adam, 0.01 for adamw (as in torch.optim).")
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
@click.option("--frozen-batchnorm", type=click.Choice(["train", "eval"]), default="train",
              show_default=True,
              help="BatchNormalization in a frozen part of the model (scale and bias not "
                   "trained, no trained weight before it): 'train' normalises with batch "
                   "statistics and updates the running ones (PyTorch's train()); 'eval' keeps "
                   "and uses the running statistics (a frozen backbone in eval()).")
@click.option("--out", "out_path", default=None, metavar="PATH",
              help="Where to write the trained model. Default: MODEL's name with '_trained' "
                   "added, next to it. The input model is overwritten only if --out names it.")
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
@boundary
def train(model, data, input_keys, target_key, loss, output, class_axis, ignore_index, optimizer,
          lr, momentum, weight_decay,
          epochs, batch_size, seed, trainable, freeze, val_path, val_split, device,
          frozen_batchnorm, out_path, quiet, profile, training_info, steps):
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
    """
    echo = (lambda *a, **k: None) if quiet else click.echo
    loss = check_loss(loss, class_axis, ignore_index)
    optimizer = optimizer.lower()
    if optimizer not in OPTIMIZERS:
        raise click.ClickException(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if momentum is not None and optimizer != "sgd":
        raise click.ClickException(f"--momentum applies to --optimizer sgd only (got {optimizer})")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    weight_decay = DEFAULT_WD[optimizer] if weight_decay is None else weight_decay
    if not (lr > 0 and math.isfinite(lr)):
        raise click.ClickException(f"--lr must be a positive number (got {lr})")
    if weight_decay < 0 or (momentum is not None and momentum < 0):
        raise click.ClickException("--weight-decay and --momentum must not be negative")
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

    if out_path is None:
        stem, _ = os.path.splitext(model)
        out_path = stem + "_trained.onnx"
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise click.ClickException(f"cannot write {out_path!r}: directory {out_dir!r} does not exist")
    if os.path.isdir(out_path):
        raise click.ClickException(f"cannot write {out_path!r}: it is a directory")

    m = load_model(model)
    if training_info:
        run_training_info(m, data, epochs, batch_size, seed, steps, out_path, quiet)
        return
    output = resolve_output(m, output)
    batch_size = choose_batch_size(m, batch_size, _given("batch_size"))
    ds = read_dataset(data, m, input_keys, target_key)
    val = None
    if val_path is not None:
        val = read_dataset(val_path, m, input_keys, target_key)
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

    opt = {
        "sgd": lambda: onnxgrad.SGD(lr=lr, momentum=momentum or 0.0, weight_decay=weight_decay),
        "adam": lambda: onnxgrad.Adam(lr=lr, weight_decay=weight_decay),
        "adamw": lambda: onnxgrad.AdamW(lr=lr, weight_decay=weight_decay),
    }[optimizer]()
    eval_bs = max(batch_size, 256)
    checked: set = set()

    def metrics(model_):
        train_m = measure(model_, output, ds, loss, eval_bs, checked)
        val_m = measure(model_, output, val, loss, eval_bs, checked) if val is not None else None
        return train_m, val_m

    before = metrics(m)  # also checks the targets against the output
    trainer = onnxgrad.Trainer(m, loss=loss, output=output, optimizer=opt, trainable=names,
                               device=device, seed=seed, frozen_batchnorm=frozen_batchnorm)
    if profile:
        trainer.profile = onnxgrad.Profile()
    params = m.parameters()
    n_values = sum(int(params[k].size) for k in trainer.trainable)
    n_float = sum(1 for v in params.values() if is_float(v))
    click.echo(f"data: {ds.describe()}")
    if val is not None:
        click.echo(f"validation: {val.describe()}")
    click.echo(f"training {len(trainer.trainable)} of {n_float} parameter tensors ({n_values:,} "
               f"values) with {optimizer} lr={lr:g}, loss {loss.name} on {output!r}, {epochs} epoch(s) "
               f"of batch size {batch_size}, on {device}")
    click.echo(describe("before", *before))
    rng = np.random.default_rng(seed)
    drop_last = fixed_batch(m) is not None and len(ds) % batch_size != 0
    if drop_last and len(ds) < batch_size:
        raise click.ClickException(f"the model's batch dimension is fixed to {batch_size}, "
                                   f"but {data!r} has only {len(ds)} training samples")
    if drop_last:
        click.echo(f"note: the model's batch dimension is fixed to {batch_size}; each epoch "
                   f"leaves out {len(ds) % batch_size} (randomly chosen) samples")
    after = before
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(ds))
        if drop_last:
            order = order[:len(ds) - len(ds) % batch_size]
        n_batches = -(-len(order) // batch_size)
        total, seen = 0.0, 0
        with click.progressbar(length=n_batches, label=f"epoch {epoch}/{epochs}", file=sys.stderr,
                               hidden=quiet, show_pos=True,
                               item_show_func=lambda s: s) as bar:
            for step, index in enumerate(batches(len(order), batch_size, order), start=1):
                feeds = {k: v[index] for k, v in ds.feeds.items()}
                value = float(trainer.step(feeds, ds.target[index]))
                if not math.isfinite(value):
                    raise click.ClickException(
                        f"training diverged: loss is {value} at epoch {epoch}, step {step}; "
                        f"try a smaller --lr (the model was not saved)")
                total += value * len(index)
                seen += len(index)
                bar.update(1, f"loss {total / seen:.4f}")
        after = metrics(trainer.model)
        train_m, val_m = after
        line = f"epoch {epoch}/{epochs}: step_loss {total / seen:.4f}  {train_m.format('train_')}"
        if val_m is not None:
            line += f"  |  {val_m.format('val_')}"
        echo(line)

    click.echo(describe("after", *after))
    if trainer.profile is not None:
        click.echo(trainer.profile.report())
    trainer.model.save(out_path)
    click.echo(f"saved {out_path}")


def run_training_info(m, data, epochs, batch_size, seed, steps, out_path, quiet):
    """``train --training-info``: the model's own algorithm, one step per batch."""
    info = onnxgrad.TrainingInfo(m)
    arrays = D.load_npz(data)
    missing = [name for name in info.inputs if name not in arrays]
    if missing:
        raise click.ClickException(
            f"{data!r} lacks key(s) {missing} for the training algorithm's inputs {info.inputs}; "
            f"keys present: {sorted(arrays)}")
    feeds = {name: arrays[name] for name in info.inputs}
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


@main.command("eval", context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="FILE.npz", help="Data to evaluate on (numpy.savez archive).")
@key_options
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Samples per Model.run call.")
@boundary
def eval_(model, data, input_keys, target_key, loss, output, class_axis, ignore_index, batch_size):
    """Evaluate MODEL's loss and accuracy on a .npz data file.

    The model runs in inference mode (Dropout off, BatchNormalization with
    running statistics). Accuracy is printed for --loss cross_entropy and nll:
    the fraction of samples whose highest-scoring class is the label.

    \b
    Examples:
      onnxgrad eval models/digits_mlp.onnx --data models/digits_test.npz
      onnxgrad eval digits_trained.onnx --data models/digits_test.npz --batch-size 1024
      onnxgrad eval regressor.onnx --data houses.npz --target-key price --loss mse
    """
    loss = check_loss(loss, class_axis, ignore_index)
    if batch_size < 1:
        raise click.ClickException(f"--batch-size must be at least 1 (got {batch_size})")
    m = load_model(model)
    output = resolve_output(m, output)
    ds = read_dataset(data, m, input_keys, target_key)
    result = measure(m, output, ds, loss, batch_size, set())
    click.echo(f"model: {model}")
    click.echo(f"data: {ds.describe()}")
    click.echo(f"loss ({loss.name} on {output!r}): {result.loss:.4f}")
    if result.perplexity is not None:
        click.echo(f"perplexity: {result.perplexity:.3f}")
    if result.accuracy is not None:
        click.echo(f"accuracy: {result.accuracy:.4f} ({result.correct}/{result.count})")


@main.command(context_settings=CONTEXT)
@click.argument("pattern", required=False)
@click.option("--markdown", is_flag=True,
              help="Print the ai.onnx ops grouped by family as a Markdown list (as in README.md).")
@boundary
def ops(pattern, markdown):
    """List the ops onnxgrad implements, with their gradient support.

    For each op (and each opset where its definition changes): the opset it
    covers from, its differentiable inputs, and whether a gradient rule exists.
    PATTERN filters op names with a shell glob.

    \b
    Examples:
      onnxgrad ops
      onnxgrad ops 'Reduce*'
      onnxgrad ops --markdown
    """
    import fnmatch

    from onnxgrad.ops import registered_ops

    if markdown:
        families: dict[str, list[str]] = {}
        domains: dict[str, list[str]] = {}
        for (domain, name), versions in sorted(registered_ops().items()):
            if pattern and not fnmatch.fnmatchcase(name, pattern):
                continue
            grad = any(v.rule is not None or not v.differentiable for v in versions)
            entry = name if grad else f"{name} (forward only)"
            if domain:
                domains.setdefault(domain, []).append(entry)
                continue
            family = versions[0].kernel.__module__.rsplit(".", 1)[-1]
            families.setdefault(family, []).append(entry)
        for family, names in families.items():
            click.echo(f"- **{family}**: {', '.join(names)}")
        for domain, names in sorted(domains.items(), key=lambda kv: kv[0] == "onnxgrad"):
            what = " (gradient kernels and fused losses)" if domain == "onnxgrad" else ""
            click.echo(f"- domain `{domain}`{what}: {', '.join(names)}")
        return
    rows = []
    for (domain, name), versions in sorted(registered_ops().items(),
                                           key=lambda kv: (kv[0][0] != "", kv[0][0], kv[0][1])):
        if pattern and not fnmatch.fnmatchcase(name, pattern):
            continue
        for d in versions:
            grad = "n/a" if not d.differentiable else ("yes" if d.rule is not None else "no")
            full = name if not domain else f"{domain}::{name}"
            rows.append((full, str(d.since), grad, ", ".join(d.differentiable) or "-"))
    if not rows:
        raise click.ClickException(f"no op matches {pattern!r}")
    widths = [max(len(r[i]) for r in rows + [("op", "since", "gradient", "")]) for i in range(3)]
    click.echo(f"{'op':<{widths[0]}}  {'since':>{widths[1]}}  {'gradient':<{widths[2]}}  differentiable inputs")
    for r in rows:
        click.echo(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    n_ops = len({r[0] for r in rows})
    click.echo(f"{n_ops} ops")


@main.command(context_settings=CONTEXT)
@click.option("--op", "pattern", default=None, metavar="PATTERN",
              help="Only the cases of ops matching this shell glob (e.g. 'Reduce*'), or of cases "
                   "whose names match it when it starts with 'test_'.")
@click.option("--verbose", "-v", is_flag=True,
              help="One line per case, with the reason of each failure.")
@boundary
def conformance(pattern, verbose):
    """Run the ONNX backend node test suite through onnxgrad.

    Every node case that onnx builds (onnx.backend.test.loader) is loaded with
    onnxgrad.load and run with Model.run; outputs must match the suite's
    expected values (rtol 1e-3, atol 1e-7, exact dtypes and shapes). Prints
    pass / fail / unsupported / error counts per op and the total pass rate.

    \b
    Examples:
      onnxgrad conformance
      onnxgrad conformance --op 'Reduce*' --verbose
      onnxgrad conformance --op 'test_gridsample*' -v
    """
    from .conformance import load_cases, run_suite

    cases = load_cases(pattern)
    if not cases:
        raise click.ClickException(f"no case of the node suite matches {pattern!r}")
    click.echo(run_suite(cases=cases).format(verbose=verbose))


if __name__ == "__main__":  # pragma: no cover
    main()
