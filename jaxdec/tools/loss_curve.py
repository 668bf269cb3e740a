"""The loss-curve PNG of a run, drawn from its metrics file (`tools.metrics`)."""

from __future__ import annotations

import os
import pathlib

from jaxdec.tools.metrics import read


def plot_loss_curve(
    jsonl_path: str | os.PathLike,
    png_path: str | os.PathLike,
    *,
    title: str = "",
    log_y: bool = False,
) -> pathlib.Path:
    """Plots train "loss" and held-out "eval_loss" against step from a metrics file to a PNG.

    A record with a "loss" key is a train point, one with "eval_loss" an eval point (a record
    may be both). Raises ValueError when the file has neither. Returns the PNG path.
    """
    # Figure + its own Agg canvas, not pyplot: no display needed and no global backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read(jsonl_path)
    # Sorted by step so a log resumed without truncate_after still draws left to right.
    train = sorted((r["step"], r["loss"]) for r in records if r.get("loss") is not None)
    held_out = sorted(
        (r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None
    )
    if not train and not held_out:
        raise ValueError(f"{jsonl_path} has no records with 'loss' or 'eval_loss' to plot")

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="eval loss", markersize=3)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    png_path = pathlib.Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    return png_path
