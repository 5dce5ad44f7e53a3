"""The ``onnxgrad`` command line: inspect, train and evaluate ONNX models.

Every command turns onnxgrad's own errors (and bad input found while checking
data) into a one-line ``Error: ...`` and a non-zero exit status.  Set
``ONNXGRAD_DEBUG=1`` to see the traceback of an unexpected error instead.
"""

from __future__ import annotations

import click
import numpy as np

from onnxgrad.autodiff import differentiable_ancestors
from onnxgrad.program import tied_weights

from .common import (
    data_source,
    CONTEXT,
    boundary,
    check_loss,
    key_options,
    load_model,
    measure,
    read_dataset,
    resolve_output,
    threads_option,
)
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
from .convert import apply, convert
from .log import plot_command
from .predict import predict
from .train import train


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
      onnxgrad convert models/digits_mlp.onnx --optimizer sgd --out digits_step.onnx

    Run "onnxgrad COMMAND --help" for the options of each command.
    """


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
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Also say what would run the model's kernels there (on cuda: the GPU, and "
                   "whether cuDNN runs the convolutions, or why not).")
@boundary
def inspect(model, trainable, freeze, output, list_params, device):
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
      onnxgrad inspect resnet.onnx --device cuda
    """
    from onnxgrad.backend import get_backend
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
            if vi is not None and vi.kind != "tensor":  # seq(map(int64, float32)) for ZipMap
                echo(f"  {name:<{width}}  {vi.type_str()}")
                continue
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
    for copy, (first, transposed) in tied_weights(graph).items():
        echo(f"tied: {copy!r} repeats {first!r}{' (transposed)' if transposed else ''} bit for "
             "bit; train --tie-weights trains them as one weight")
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
    if device is not None:
        for line in get_backend(device).describe():
            echo(line)


def _op_name(row) -> str:
    return row.op_type if not row.domain else f"{row.domain}::{row.op_type}"


main.add_command(train)
main.add_command(convert)
main.add_command(apply)
main.add_command(plot_command)
main.add_command(predict)


@main.command("eval", context_settings=CONTEXT)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="FILE.npz", help="Data to evaluate on (numpy.savez archive).")
@key_options
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Samples per Model.run call.")
@threads_option
@boundary
def eval_(model, data, input_keys, target_key, target_column, feature_columns, mean, std, loss,
          output, class_axis, ignore_index, batch_size):
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
    output = resolve_output(m, output, loss)
    ds = read_dataset(data, m, input_keys, target_key,
                      source=data_source(target_column, feature_columns, mean, std))
    result = measure(m, output, ds, loss, batch_size, set())
    if not np.isfinite(result.loss):
        raise click.ClickException(f"the loss of {model!r} on {data!r} is {result.loss}: the "
                                   f"output {output!r} holds values that are not finite")
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
            # onnxgrad's own ops are gradient kernels: "forward only" would mislead there.
            entry = name if grad or domain == "onnxgrad" else f"{name} (forward only)"
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
