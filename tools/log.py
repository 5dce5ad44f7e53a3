"""The training log: a CSV file with one row per epoch (and, with --log-every, one row
every N optimizer steps), the plot drawn from it (matplotlib, an optional extra), and
the same numbers as TensorBoard scalars (tensorboardX, an optional extra)."""

from __future__ import annotations

import csv
import os

import click

COLUMNS = ["epoch", "step", "lr", "step_loss", "train_loss", "train_acc", "train_ppl",
           "val_loss", "val_acc", "val_ppl", "seconds", "samples_per_s"]


class MetricsLog:
    """Appends rows to ``path`` (written through at once, so that a crash keeps them).
    A resumed run appends to the file of the run it continues."""

    def __init__(self, path: str, append: bool = False):
        self.path = path
        fresh = not (append and os.path.exists(path))
        try:
            self._file = open(path, "a" if not fresh else "w", newline="")
        except OSError as exc:
            raise click.ClickException(f"--log {path!r}: cannot write ({exc.strerror})") from exc
        self._writer = csv.DictWriter(self._file, COLUMNS)
        if fresh:
            self._writer.writeheader()
            self._file.flush()

    def row(self, epoch: int, step: int, lr: float, step_loss: float | None = None,
            train=None, val=None, seconds: float | None = None,
            samples_per_s: float | None = None) -> None:
        values = {"epoch": epoch, "step": step, "lr": f"{lr:.6g}",
                  "step_loss": _num(step_loss), "seconds": _num(seconds),
                  "samples_per_s": _num(samples_per_s)}
        for prefix, metrics in (("train", train), ("val", val)):
            if metrics is not None:
                values[f"{prefix}_loss"] = _num(metrics.loss)
                values[f"{prefix}_acc"] = _num(metrics.accuracy)
                values[f"{prefix}_ppl"] = _num(metrics.perplexity)
        self._writer.writerow(values)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLog:
    """The rows of :class:`MetricsLog` as TensorBoard scalars (``loss/step``,
    ``loss/train``, ``accuracy/val``, ``lr``…), at the optimizer step."""

    def __init__(self, folder: str):
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 - an optional extra
        except ImportError:
            raise click.ClickException("--tensorboard needs tensorboardX: pip install "
                                       "'onnxgrad[tensorboard]'") from None
        try:
            self._writer = SummaryWriter(folder)
        except OSError as exc:
            raise click.ClickException(f"--tensorboard {folder!r}: cannot write ({exc})") \
                from exc

    def row(self, epoch: int, step: int, lr: float, step_loss: float | None = None,
            train=None, val=None, seconds: float | None = None,
            samples_per_s: float | None = None) -> None:
        scalars = {"lr": lr, "loss/step": step_loss, "samples_per_s": samples_per_s}
        for prefix, metrics in (("train", train), ("val", val)):
            if metrics is not None:
                scalars.update({f"loss/{prefix}": metrics.loss,
                                f"accuracy/{prefix}": metrics.accuracy,
                                f"perplexity/{prefix}": metrics.perplexity})
        for tag, value in scalars.items():
            if value is not None:
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class Logs:
    """Several logs fed the same rows."""

    def __init__(self, logs):
        self.logs = [log for log in logs if log is not None]

    def __bool__(self) -> bool:
        return bool(self.logs)

    def row(self, *args, **kwargs) -> None:
        for log in self.logs:
            log.row(*args, **kwargs)

    def close(self) -> None:
        for log in self.logs:
            log.close()


def _num(value) -> str:
    return "" if value is None else f"{value:.6g}"


def read(path: str) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot read ({exc.strerror})") from exc
    if not rows or "epoch" not in rows[0] or "step" not in rows[0]:
        raise click.ClickException(f"{path}: not an onnxgrad training log (no epoch and step "
                                   "columns)")
    return rows


def plot(rows: list[dict[str, str]], out: str, title: str = "") -> None:
    """Loss, and accuracy or perplexity, against the optimizer step: the per-step
    losses as a thin line, the per-epoch metrics as markers."""
    try:
        import matplotlib  # noqa: PLC0415 - an optional extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise click.ClickException("plotting needs matplotlib: pip install 'onnxgrad[plot]'") \
            from exc

    def series(column, epoch_rows):
        points = [(int(r["step"]), float(r[column])) for r in epoch_rows if r.get(column)]
        return [p[0] for p in points], [p[1] for p in points]

    epochs = [r for r in rows if r.get("train_loss")]
    steps = [r for r in rows if not r.get("train_loss")]
    score = next((c for c in ("acc", "ppl") if any(r.get(f"train_{c}") for r in epochs)), None)
    fig, axes = plt.subplots(1, 2 if score else 1, figsize=(11 if score else 6, 4),
                             squeeze=False)
    ax = axes[0][0]
    if steps:
        ax.plot(*series("step_loss", steps), lw=0.8, alpha=0.5, label="step loss")
    for prefix in ("train", "val"):
        x, y = series(f"{prefix}_loss", epochs)
        if x:
            ax.plot(x, y, "o-", label=f"{prefix} loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    if score:
        ax = axes[0][1]
        for prefix in ("train", "val"):
            x, y = series(f"{prefix}_{score}", epochs)
            if x:
                ax.plot(x, y, "o-", label=f"{prefix} {'accuracy' if score == 'acc' else 'perplexity'}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("accuracy" if score == "acc" else "perplexity")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise click.ClickException(f"{out}: cannot write the plot ({exc.strerror})") from exc
    finally:
        plt.close(fig)


@click.command("plot")
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_path", required=True, metavar="FILE.png",
              help="Where to write the plot (PNG, or any format matplotlib knows).")
def plot_command(log, out_path):
    """Plot a training log (train --log FILE.csv): loss, and accuracy or perplexity."""
    plot(read(log), out_path, title=os.path.basename(log))
    click.echo(f"wrote {out_path}")
