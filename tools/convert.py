"""``onnxgrad convert``: a model's training step as a standard ONNX model; and
``onnxgrad apply``: trained values written back into a model."""

from __future__ import annotations

import os

import click
import numpy as np

from onnxgrad.autodiff import differentiable_ancestors
from onnxgrad.convert import (
    eval_model,
    split_initial_state,
    step_model,
    trained_parameters,
    training_info_model,
)
from onnxgrad.errors import DataError
from onnxgrad.exporter import save_atomic

from .common import (
    CONTEXT,
    boundary,
    build_optimizer,
    check_loss,
    load_model,
    optimizer_options,
    resolve_output,
)
from .report import select_trainable


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _writable(path: str, what: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise click.ClickException(f"cannot write {what} {path!r}: folder {folder!r} does not "
                                   "exist")
    if os.path.isdir(path):
        raise click.ClickException(f"cannot write {what} {path!r}: it is a folder")
    if not os.access(folder, os.W_OK):
        raise click.ClickException(f"cannot write {what} {path!r}: folder {folder!r} is not "
                                   "writable")


@click.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", default=None, metavar="STEP.onnx",
              help="Where to write the step model. Default: MODEL's name with '_step' added.")
@click.option("--eval-out", "eval_path", default=None, metavar="EVAL.onnx",
              help="Where to write the model with its trained parameters as inputs (defaults "
                   "from initializers), for evaluating with the current weights. Default: the "
                   "step model's name with '.eval' before '.onnx'.")
@click.option("--loss", default="cross_entropy", show_default=True, metavar="NAME",
              help="The loss, as for train.")
@click.option("--output", default=None, metavar="VALUE",
              help="The value the loss reads. Default: the first graph output.")
@click.option("--class-axis", type=int, default=None, metavar="AXIS",
              help="Axis of the classes, for cross_entropy and nll (-1 for [N, T, C]).")
@click.option("--ignore-index", type=int, default=None, metavar="LABEL",
              help="Targets equal to LABEL count for nothing, for cross_entropy and nll.")
@optimizer_options
@click.option("--trainable", multiple=True, metavar="PATTERN",
              help="Train only parameters with these names or globs (repeatable).")
@click.option("--freeze", multiple=True, metavar="PATTERN",
              help="Do not train parameters with these names or globs (repeatable).")
@click.option("--frozen-batchnorm", type=click.Choice(["train", "eval"]), default="train",
              show_default=True, help="As for train.")
@click.option("--initial-state", type=click.Choice(["inline", "separate"]), default="inline",
              show_default=True,
              help="'inline': each state input of the step model has an initializer holding "
                   "its first value. 'separate': state inputs are plain inputs, and "
                   "STEP.init.onnx (no inputs) outputs their first values, for runtimes that "
                   "cannot feed an input that has an initializer (onnxruntime-web and "
                   "onnxruntime-node); the evaluation model's parameters are plain inputs too.")
@click.option("--training-info", is_flag=True,
              help="Instead of a separate step model, write MODEL itself carrying the step as "
                   "its ONNX training algorithm (TrainingInfoProto: the algorithm graph and "
                   "update bindings), which 'onnxgrad train --training-info' runs. Default "
                   "--out: MODEL's name with '_training' added.")
@boundary
def convert(model, out_path, eval_path, loss, output, class_axis, ignore_index, optimizer, lr,
            momentum, weight_decay, trainable, freeze, frozen_batchnorm, initial_state,
            training_info):
    """Write MODEL's training step as a standard ONNX model that any ONNX runtime runs.

    One run of the step model is one training step: forward pass, loss,
    gradients and the optimizer's update, in standard ONNX operators. Its
    inputs are the model's own, the loss's target ('target'), and the training
    state: each trained parameter under its own name, the optimizer's state,
    the BatchNormalization running statistics, the learning rate 'lr' and, for
    Adam and dampened SGD, the step count 'step'. Every state input has an
    initializer holding its first value, so a first step needs only data and
    target. Its outputs are 'loss' and, for each state input, its value after
    the step; the metadata key 'onnxgrad.state' maps each of those outputs to
    the input it replaces. A training loop in any language: run the step,
    copy each state output to its input, repeat (change 'lr' as you like).

    \b
    Examples:
      onnxgrad convert models/digits_mlp.onnx --optimizer sgd --lr 0.05 --momentum 0.9 \\
          --out digits_step.onnx
      onnxgrad apply models/digits_mlp.onnx state.npz --out digits_trained.onnx
    """
    if out_path is None:
        stem, _ = os.path.splitext(model)
        out_path = stem + ("_training.onnx" if training_info else "_step.onnx")
    if eval_path is None:
        stem, _ = os.path.splitext(out_path)
        eval_path = stem + ".eval.onnx"
    for path, what in ((out_path, "--out"), (eval_path, "--eval-out")):
        if _same_file(path, model):
            raise click.ClickException(f"{what} {path!r} is the input model; choose another "
                                       "file, the model would be overwritten")
    if _same_file(out_path, eval_path):
        raise click.ClickException(f"--out and --eval-out name the same file {out_path!r}")
    _writable(out_path, "the step model")
    _writable(eval_path, "the evaluation model")
    loss_ = check_loss(loss, class_axis, ignore_index)
    opt = build_optimizer(optimizer, lr, momentum, weight_decay)
    m = load_model(model)
    output = resolve_output(m, output, loss_)
    names = None
    if trainable or freeze:
        reach = differentiable_ancestors(m.graph, output, strict=False)
        names = select_trainable(m.parameters(), trainable, freeze, reach)
        if not names:
            raise click.ClickException("no parameters left to train (check --trainable/--freeze)")
    if training_info:
        proto = training_info_model(m, opt, loss=loss_, output=output, trainable=names,
                                    frozen_batchnorm=frozen_batchnorm)
        save_atomic(proto, out_path)
        algorithm = proto.training_info[0].algorithm
        click.echo(f"wrote {out_path}: {model} with one {type(opt).__name__} step (lr "
                   f"{opt.lr:g}) as its training algorithm")
        click.echo(f"  algorithm inputs: {', '.join(i.name for i in algorithm.input)}; "
                   f"{len(proto.training_info[0].update_binding)} update bindings")
        click.echo(f"  train it with: onnxgrad train {out_path} --training-info --data DATA.npz")
        return
    step = step_model(m, opt, loss=loss_, output=output, trainable=names,
                      frozen_batchnorm=frozen_batchnorm)
    inputs = [i.name for i in step.graph.input]
    initial = {t.name for t in step.graph.initializer}
    data = [n for n in inputs if n not in initial]
    state = [n for n in inputs if n in initial]
    trained = trained_parameters(step)
    init_path = None
    if initial_state == "separate":
        step, initial = split_initial_state(step)
        init_path = os.path.splitext(out_path)[0] + ".init.onnx"
        _writable(init_path, "the initial state model")
        save_atomic(initial, init_path)
    save_atomic(step, out_path)
    save_atomic(eval_model(m, trained, defaults=initial_state == "inline"), eval_path)
    click.echo(f"wrote {out_path}: one {type(opt).__name__} step (lr {opt.lr:g}) of {model}")
    click.echo(f"  feed: {', '.join(data)}; state: {len(state)} inputs ({len(trained)} trained "
               f"parameters, {len(state) - len(trained)} more: optimizer state, statistics, lr)")
    click.echo("  outputs: loss, then each state input's next value (metadata "
               "'onnxgrad.state'); the trained parameters are listed in 'onnxgrad.trained'")
    if init_path:
        click.echo(f"wrote {init_path}: the state's first values (run it once, feed its "
                   "outputs to the first step)")
    click.echo(f"wrote {eval_path}: the model with its trained parameters as inputs")


@click.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("state", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", required=True, metavar="TRAINED.onnx",
              help="Where to write the model with the new values.")
@boundary
def apply(model, state, out_path):
    """Write the values of STATE (a .npz archive whose keys name initializers, such as
    the state a step model's training loop kept) into MODEL, as a new model file.

    Keys that are not initializers of MODEL (optimizer state, 'lr', 'step') are
    listed and left out."""
    if _same_file(out_path, model) or _same_file(out_path, state):
        raise click.ClickException(f"--out {out_path!r} is an input file; choose another file")
    _writable(out_path, "the model")
    m = load_model(model)
    try:
        with np.load(state, allow_pickle=False) as archive:
            values = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{state}: not a readable .npz archive ({exc})") from exc
    known = {k: v for k, v in values.items() if k in m.graph.initializers}
    left = sorted(set(values) - set(known))
    if not known:
        raise DataError(f"{state}: no key names an initializer of {model}; its keys are "
                        f"{sorted(values)[:8]}")
    m.set_parameters(known)
    m.save(out_path)
    click.echo(f"wrote {out_path}: {len(known)} initializer(s) of {model} from {state}")
    if left:
        shown = ", ".join(left[:8]) + (", ..." if len(left) > 8 else "")
        click.echo(f"  left out {len(left)} key(s) that are not initializers: {shown}")
