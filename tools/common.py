"""Pieces the ``onnxgrad`` commands share: the error boundary, loading and
checking models and data, metrics, and the data-key options."""

from __future__ import annotations

import functools
import math
import os

import click

import onnxgrad
from onnxgrad.errors import ModelError, OnnxgradError

from . import data as D
from .metrics import LOSSES, Metrics, evaluate
from .report import feed_inputs, fmt_shape

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


def resolve_output(model, output: str | None, loss=None) -> str:
    """The value the loss reads: --output, else the first graph output; where that output
    comes from a Softmax (LogSoftmax) and the loss is cross-entropy, the Softmax's input
    (the logits), said on stderr."""
    graph = model.graph
    if output is None:
        if not graph.outputs:
            raise ModelError("the model has no outputs")
        output = graph.outputs[0]
        producer = next((n for n in graph.nodes if output in n.outputs), None)
        if (loss is not None and loss.name == "cross_entropy" and producer is not None
                and producer.op_type in ("Softmax", "LogSoftmax") and producer.domain == ""
                and producer.inputs[0]):
            click.echo(f"note: {output!r} is the output of {producer.op_type}; the loss reads "
                       f"its input {producer.inputs[0]!r}, the logits (choose with --output)",
                       err=True)
            return producer.inputs[0]
        return output
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


def read_dataset(path: str, model, input_keys, target_key, need_target=True,
                 source: D.Source | None = None) -> D.Dataset:
    """The data at ``path`` (any source :func:`onnxgrad.tools.data.load_data` reads),
    checked against the model; an image folder's class names in ``dataset.classes``."""
    names = feed_inputs(model.graph)
    mapping = D.parse_input_keys(input_keys, names)
    source = source or D.Source()
    info = input_info(model)
    if len(names) == 1:
        source.input_shape = info.get(names[0], (None, None))[1]
    arrays, extra = D.load_data(path, source)
    keys, tkey = D.resolve_keys(arrays, path, names, mapping, target_key, need_target)
    dataset = D.build_dataset(arrays, path, keys, tkey, info)
    dataset.classes = extra.get("classes")
    return dataset


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


def _options(options: list):
    """A decorator that applies ``options`` (click options) in their listed order."""
    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return apply


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
    click.option("--target-column", default=None, metavar="NAME",
                 help="For a .csv or .parquet table: the column of targets. Default: the first "
                      "of 'label', 'labels', 'y', 'target', 'targets'."),
    click.option("--feature-columns", default=None, metavar="A,B,...",
                 help="For a table: the columns that make the features, in order. Default: "
                      "every column but the target's."),
    click.option("--mean", default=None, metavar="M[,M,M]",
                 help="For an image folder: subtracted from the pixels (scaled to 0..1), one "
                      "value or one per channel."),
    click.option("--std", default=None, metavar="S[,S,S]",
                 help="For an image folder: the pixels are divided by it after --mean."),
    click.option("--class-axis", type=int, default=None, metavar="AXIS",
                 help="Axis of the output that holds the classes, for cross_entropy and nll: "
                      "1 (default) for [N, C, ...], -1 for a language model's [N, T, C]."),
    click.option("--ignore-index", type=int, default=None, metavar="LABEL",
                 help="Targets equal to LABEL count for nothing (padding), for cross_entropy "
                      "and nll."),
]


key_options = _options(_key_options)


def _set_threads(ctx, param, value):
    if value is not None:
        if value < 1:
            raise click.BadParameter(f"expected 1 or more threads, got {value}", ctx, param)
        onnxgrad.set_num_threads(value)
    return value


#: ``--threads N``: the thread count of every costly kernel (an eager option,
#: so that it takes effect before the command runs).
threads_option = click.option(
    "--threads", type=int, default=None, metavar="N", expose_value=False, is_eager=True,
    callback=_set_threads,
    help="Threads for every costly kernel, matrix products included. Default: "
         "ONNXGRAD_NUM_THREADS, else the cores available.")


#: ``--precision fp32|bf16|fp16``: mixed-precision training (``Trainer(precision=...)``).
precision_option = click.option(
    "--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32",
    show_default=True,
    help="Run MatMul, Gemm, Conv, ConvTranspose, Einsum and Attention in bfloat16 or float16 "
         "(mixed precision; weights, normalisation and the loss stay float32, and the saved "
         "model keeps float32 weights). fp16 scales the loss dynamically and skips steps "
         "whose gradients overflow.")


OPTIMIZERS = ("sgd", "adam", "adamw")
#: Default learning rate per optimizer (PyTorch's defaults for Adam/AdamW).
DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}
#: Default weight decay per optimizer (PyTorch's defaults).
DEFAULT_WD = {"sgd": 0.0, "adam": 0.0, "adamw": 0.01}

_optimizer_options = [
    click.option("--optimizer", default="adam", show_default=True, metavar="sgd|adam|adamw",
                 help="Optimizer; matches torch.optim numerically."),
    click.option("--lr", type=float, default=None,
                 help="Learning rate. Default: 0.01 for sgd, 0.001 for adam and adamw."),
    click.option("--momentum", type=float, default=None,
                 help="SGD momentum (sgd only). Default: 0."),
    click.option("--weight-decay", type=float, default=None,
                 help="Weight decay. Default: 0 for sgd and adam, 0.01 for adamw "
                      "(as in torch.optim)."),
]


optimizer_options = _options(_optimizer_options)


def build_optimizer(name: str, lr: float | None, momentum: float | None,
                    weight_decay: float | None) -> onnxgrad.Optimizer:
    """The optimizer that --optimizer, --lr, --momentum and --weight-decay describe."""
    name = name.lower()
    if name not in OPTIMIZERS:
        raise click.ClickException(f"unknown optimizer {name!r}; choose one of "
                                   f"{', '.join(OPTIMIZERS)}")
    if momentum is not None and name != "sgd":
        raise click.ClickException(f"--momentum applies to --optimizer sgd only (got {name})")
    lr = DEFAULT_LR[name] if lr is None else lr
    weight_decay = DEFAULT_WD[name] if weight_decay is None else weight_decay
    if not (lr > 0 and math.isfinite(lr)):
        raise click.ClickException(f"--lr must be a positive number (got {lr})")
    if weight_decay < 0 or (momentum is not None and momentum < 0):
        raise click.ClickException("--weight-decay and --momentum must not be negative")
    if name == "sgd":
        return onnxgrad.SGD(lr=lr, momentum=momentum or 0.0, weight_decay=weight_decay)
    if name == "adam":
        return onnxgrad.Adam(lr=lr, weight_decay=weight_decay)
    return onnxgrad.AdamW(lr=lr, weight_decay=weight_decay)


_schedule_options = [
    click.option("--lr-schedule", type=click.Choice(
        ["constant", "step", "multistep", "exponential", "cosine", "linear", "onecycle"]),
        default="constant", show_default=True,
        help="How the learning rate moves, step by step, as torch.optim.lr_scheduler's: step "
             "(--step-size, --gamma), multistep (--milestones, --gamma), exponential "
             "(--gamma), cosine (to --min-lr, after --warmup-steps), linear (warmup, then "
             "down to 0), onecycle (up to --max-lr and down; cycles momentum)."),
    click.option("--warmup-steps", type=int, default=None, metavar="N",
                 help="cosine, linear: steps of linear warmup first. Default: 0."),
    click.option("--min-lr", type=float, default=None, help="cosine: the final learning rate."),
    click.option("--step-size", type=int, default=None, metavar="N",
                 help="step: steps between decays."),
    click.option("--gamma", type=float, default=None,
                 help="step, multistep (default 0.1), exponential: the decay factor."),
    click.option("--milestones", default=None, metavar="N,N,...",
                 help="multistep: the steps at which the learning rate decays."),
    click.option("--max-lr", type=float, default=None,
                 help="onecycle: the peak learning rate. Default: --lr."),
]


schedule_options = _options(_schedule_options)


#: Which --lr-schedule each schedule option applies to.
_SCHEDULE_OPTIONS = {"warmup_steps": ("cosine", "linear"), "min_lr": ("cosine",),
                     "step_size": ("step",), "gamma": ("step", "multistep", "exponential"),
                     "milestones": ("multistep",), "max_lr": ("onecycle",)}


def build_schedule(name: str, optimizer, total_steps: int, warmup_steps, min_lr, step_size,
                   gamma, milestones, max_lr):
    """The schedule --lr-schedule and its options describe (None for constant)."""
    given = {"warmup_steps": warmup_steps, "min_lr": min_lr, "step_size": step_size,
             "gamma": gamma, "milestones": milestones, "max_lr": max_lr}
    for option, value in given.items():
        if value is not None and name not in _SCHEDULE_OPTIONS[option]:
            flag = "--" + option.replace("_", "-")
            raise click.ClickException(
                f"{flag} applies to --lr-schedule {' or '.join(_SCHEDULE_OPTIONS[option])}, "
                f"not to {name}")
    if name == "constant":
        return None
    try:
        if name == "step":
            if step_size is None:
                raise click.ClickException("--lr-schedule step needs --step-size")
            return onnxgrad.StepLR(optimizer, step_size, 0.1 if gamma is None else gamma)
        if name == "multistep":
            if not milestones:
                raise click.ClickException("--lr-schedule multistep needs --milestones")
            try:
                steps = [int(v) for v in milestones.split(",")]
            except ValueError:
                raise click.ClickException(f"--milestones {milestones!r}: expected step "
                                           "numbers separated by commas") from None
            return onnxgrad.MultiStepLR(optimizer, steps, 0.1 if gamma is None else gamma)
        if name == "exponential":
            if gamma is None:
                raise click.ClickException("--lr-schedule exponential needs --gamma")
            return onnxgrad.ExponentialLR(optimizer, gamma)
        if name == "cosine":
            return onnxgrad.CosineAnnealingLR(optimizer, total_steps, min_lr or 0.0,
                                              warmup_steps or 0)
        if name == "linear":
            return onnxgrad.LinearWarmupDecay(optimizer, total_steps, warmup_steps or 0)
        return onnxgrad.OneCycleLR(optimizer, optimizer.lr if max_lr is None else max_lr,
                                   total_steps)
    except OnnxgradError as exc:
        raise click.ClickException(f"--lr-schedule {name}: {exc}") from None


def data_source(target_column, feature_columns, mean, std) -> D.Source:
    """The --target-column, --feature-columns, --mean and --std options."""
    def floats(option, text):
        if text is None:
            return ()
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise click.ClickException(f"{option} {text!r}: expected numbers separated by "
                                       "commas") from None

    columns = tuple(c.strip() for c in feature_columns.split(",")) if feature_columns else ()
    return D.Source(target_column=target_column, feature_columns=columns,
                    mean=floats("--mean", mean), std=floats("--std", std))
