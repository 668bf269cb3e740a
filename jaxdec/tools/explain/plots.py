"""The report's figures, drawn with matplotlib from NumPy arrays: masks, every head's attention,
the decode cost. Each figure has its own Agg canvas (no pyplot, no display, no global backend
state); tokens are labelled byte by byte with each multi-byte character under its bytes."""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from jaxdec.tools.explain.decode_cost import DecodeCost, cost_summary
from jaxdec.tools.explain.fonts import drawable
from jaxdec.tools.explain.text import token_labels


def _figure(width: float, height: float):
    """A Figure with its own Agg canvas: no pyplot, no display, no global backend state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.15)
    return path


def _label_axis(ax, ids: Sequence[int], axis: str, *, side: str | None = None, byte_size: float = 6.5,
                char_size: float = 10.0, color: str = "black") -> None:
    """Writes each token's byte label beside an axis and each multi-byte character under its bytes.

    axis "x" labels columns below the axes (above with side="top"); axis "y" labels rows left of
    the axes (right with side="right"). Labels are drawn as text, not ticks, so that a
    character can span the positions of its bytes.
    """
    from matplotlib import transforms
    from matplotlib.lines import Line2D

    labels, groups = token_labels(ids)
    horizontal = axis == "x"
    flip = side in ("top", "right")
    anchor = 1.0 if flip else 0.0  # the axes edge the labels hang off, in axes coordinates
    base = ax.get_xaxis_transform() if horizontal else ax.get_yaxis_transform()
    if horizontal:
        align = {"ha": "center", "va": "bottom" if flip else "top"}
    else:
        align = {"ha": "left" if flip else "right", "va": "center"}

    def away(points: float):
        """`base` moved `points` away from the axes edge."""
        d = points if flip else -points
        return transforms.offset_copy(base, fig=ax.figure, x=0 if horizontal else d,
                                      y=d if horizontal else 0, units="points")

    def at(i: float) -> tuple[float, float]:
        return (i, anchor) if horizontal else (anchor, i)

    near = away(2)
    for i, label in enumerate(labels):
        # Below a column, names longer than two hex digits (SOS, PAD) are turned upright.
        rotation = 90 if horizontal and len(label) > 2 else 0
        ax.text(*at(i), drawable(label), transform=near, fontsize=byte_size, color=color,
                rotation=rotation, clip_on=False, **align)
    # Room the byte labels take before the characters' row: rough text extents in points.
    longest = max((len(s) for s in labels), default=1)
    room = longest * 0.62 * byte_size if not horizontal or longest > 2 else 1.2 * byte_size
    for g in groups:
        span = [g.start - 0.4, g.stop - 0.6]
        xs, ys = (span, [anchor, anchor]) if horizontal else ([anchor, anchor], span)
        ax.add_artist(Line2D(xs, ys, transform=away(room + 4), color="0.45", linewidth=0.8, clip_on=False))
        ax.text(*at((g.start + g.stop - 1) / 2), drawable(g.text), transform=away(room + 6),
                fontsize=char_size, color=color, clip_on=False, **align)


def _grid(ax, rows: int, cols: int) -> None:
    """White cell borders and no ticks (labels are drawn by _label_axis)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.vlines(np.arange(0.5, cols - 1, 1), -0.5, rows - 0.5, colors="white", linewidth=0.6)
    ax.hlines(np.arange(0.5, rows - 1, 1), -0.5, cols - 0.5, colors="white", linewidth=0.6)


# --- masks ------------------------------------------------------------------------------------

MASK_COLORS = ("#f1f1f1", "#2f6db5")  # masked, allowed


def _cell_size(n: int) -> float:
    """Inches per grid cell: large enough for a two-hex-digit label, smaller for long inputs."""
    return float(np.clip(7.5 / max(n, 1), 0.16, 0.32))


def plot_mask(mask: np.ndarray, row_ids: Sequence[int], col_ids: Sequence[int], title: str,
              path: pathlib.Path, note: str = "") -> pathlib.Path:
    """A boolean mask bool [T, S] as a labelled grid (blue: may attend), rows = queries."""
    from matplotlib.colors import ListedColormap

    T, S = mask.shape
    cell = _cell_size(max(T, S))
    fig = _figure(cell * S + 1.5, cell * T + 1.5)
    ax = fig.add_axes((0.12, 0.12, 0.85, 0.8))
    ax.imshow(mask.astype(np.int32), cmap=ListedColormap(MASK_COLORS), vmin=0, vmax=1, aspect="equal",
              interpolation="nearest")
    _grid(ax, T, S)
    _label_axis(ax, col_ids, "x")
    _label_axis(ax, row_ids, "y")
    ax.set_title(drawable(title + ("\n" + note if note else "")), fontsize=10.5, pad=8)
    ax.set_xlabel("key (column): the token looked at", labelpad=38)
    ax.set_ylabel("query (row): the token looking", labelpad=40)
    return _save(fig, path)


def plot_padding(texts: Sequence[str], tokens: np.ndarray, lengths: np.ndarray, keys: np.ndarray,
                 path: pathlib.Path) -> pathlib.Path:
    """The padding (key) mask of a right-padded batch, keys bool [B, S]: one strip per example."""
    from matplotlib.colors import ListedColormap

    B, S = tokens.shape
    cell = _cell_size(S)
    fig = _figure(cell * S + 1.5, 1.35 * B + 0.6)
    for b in range(B):
        ax = fig.add_axes((0.08, 1 - (b + 1) / B + 0.25 / B, 0.9, 0.45 / B))
        ax.imshow(keys[b : b + 1].astype(np.int32), cmap=ListedColormap(MASK_COLORS), vmin=0, vmax=1,
                  aspect="equal", interpolation="nearest")
        _grid(ax, 1, S)
        _label_axis(ax, tokens[b], "x")
        ax.set_title(drawable(f'example {b}: "[SOS] {texts[b]}" — length {int(lengths[b])}, '
                              f"{S - int(lengths[b])} padding"),
                     fontsize=10, loc="left")
    fig.suptitle("padding mask: key j of example b may be attended iff j < length[b] (grey: PAD, never "
                 "attended)", fontsize=10.5, x=0.08, ha="left", y=1.04)
    return _save(fig, path)


# --- attention heatmaps -----------------------------------------------------------------------


def plot_heads(probs: np.ndarray, mask: np.ndarray, row_ids: Sequence[int], col_ids: Sequence[int],
               title: str, path: pathlib.Path, next_ids: Sequence[int] | None = None) -> pathlib.Path:
    """One layer's heads in a near-square grid: probs float32 [N, T, S], mask bool [T, S].

    Rows are queries, columns keys; masked cells are grey. next_ids: the token each row
    predicts (teacher forcing), written right of the rightmost panels.
    """
    import matplotlib
    from matplotlib.colors import PowerNorm

    N, T, S = probs.shape
    per_row = int(np.ceil(np.sqrt(N)))  # a near-square grid keeps the page narrow
    grid_rows = -(-N // per_row)
    cell = _cell_size(max(T, S)) * (0.85 if N > 1 else 1.0)
    panel_w, panel_h = cell * S, cell * T
    # Inches around each panel for the byte labels and the characters drawn under them.
    left_room, right_room, below, above = 0.9, (0.9 if next_ids is not None else 0.35), 0.75, 0.35
    top = 0.55
    fig_w = per_row * (left_room + panel_w + right_room) + 0.9
    fig_h = top + grid_rows * (above + panel_h + below)
    fig = _figure(fig_w, fig_h)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e3e3e3")
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)  # square-root scale: small weights stay visible
    sizes = dict(byte_size=6.5, char_size=9.5)
    image = None
    for n in range(N):
        r, c = divmod(n, per_row)
        x0 = c * (left_room + panel_w + right_room) + left_room
        y0 = fig_h - top - r * (above + panel_h + below) - above - panel_h
        ax = fig.add_axes((x0 / fig_w, y0 / fig_h, panel_w / fig_w, panel_h / fig_h))
        image = ax.imshow(np.ma.masked_where(~mask, probs[n]), cmap=cmap, norm=norm, aspect="equal",
                          interpolation="nearest")
        _grid(ax, T, S)
        _label_axis(ax, col_ids, "x", **sizes)
        _label_axis(ax, row_ids, "y", **sizes)
        if next_ids is not None:
            _label_axis(ax, next_ids, "y", side="right", color="#8a3b12", **sizes)
        ax.set_title(f"head {n}", fontsize=10, pad=3)
    fig.suptitle(drawable(title), fontsize=11.5, x=0.1 / fig_w, ha="left", y=1 - 0.1 / fig_h, va="top")
    cax = fig.add_axes(((fig_w - 0.55) / fig_w, 0.3, 0.14 / fig_w, 0.4))
    fig.colorbar(image, cax=cax).set_label("probability (square-root scale); grey: masked", fontsize=8)
    return _save(fig, path)


# --- decode cost ------------------------------------------------------------------------------

UNCACHED_COLOR, CACHED_COLOR = "#c2452d", "#2f6db5"


def plot_cost(cost: DecodeCost, path: pathlib.Path) -> pathlib.Path:
    """Query rows, FLOPs and time per step, their cumulative sums and the totals."""
    fig = _figure(13, 7.4)
    axes = fig.subplots(2, 3, gridspec_kw={"hspace": 0.45, "wspace": 0.3})
    steps = cost.steps
    width = 0.4

    ax = axes[0, 0]
    ax.bar(steps - width / 2, cost.uncached_rows, width, color=UNCACHED_COLOR, label="uncached: whole prefix")
    ax.bar(steps + width / 2, cost.cached_rows, width, color=CACHED_COLOR, label="cached: 1 row (prompt at step 1)")
    ax.set_title("query rows computed per step")
    ax.set_ylabel("rows")

    ax = axes[0, 1]
    ax.plot(steps, cost.uncached_flops / 1e6, "o-", ms=2.5, color=UNCACHED_COLOR, label="uncached")
    ax.plot(steps, cost.cached_flops / 1e6, "o-", ms=2.5, color=CACHED_COLOR, label="cached")
    ax.set_ylim(bottom=0)
    ax.set_title("FLOPs per step (counted from the config)")
    ax.set_ylabel("MFLOP")

    ax = axes[0, 2]
    if not cost.uncached_exact:
        ax.plot(steps, cost.uncached_seconds * 1e3, "--", color=UNCACHED_COLOR, lw=1)
    ax.plot(cost.sampled_steps, cost.uncached_seconds_sampled * 1e3, "o-" if cost.uncached_exact else "o",
            ms=3, color=UNCACHED_COLOR, label="uncached" + ("" if cost.uncached_exact else " (timed steps)"))
    ax.plot(steps, cost.cached_seconds * 1e3, "o-", ms=3, color=CACHED_COLOR, label="cached")
    ax.set_ylim(bottom=0)
    ax.set_title("time per step (measured)")
    ax.set_ylabel("ms")

    ax = axes[1, 0]
    ax.plot(steps, np.cumsum(cost.uncached_flops) / 1e9, color=UNCACHED_COLOR, label="uncached")
    ax.plot(steps, np.cumsum(cost.cached_flops) / 1e9, color=CACHED_COLOR, label="cached")
    ax.set_title("cumulative FLOPs (counted)")
    ax.set_ylabel("GFLOP")

    ax = axes[1, 1]
    ax.plot(steps, np.cumsum(cost.uncached_seconds) * 1e3, color=UNCACHED_COLOR, label="uncached")
    ax.plot(steps, np.cumsum(cost.cached_seconds) * 1e3, color=CACHED_COLOR, label="cached")
    ax.set_title("cumulative time (measured)")
    ax.set_ylabel("ms")

    for ax in axes.flat[:5]:
        ax.set_xlabel("generated step")
        ax.set_xlim(0.4, len(steps) + 0.6)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

    ax = axes[1, 2]
    ax.axis("off")
    lines = [f"{len(steps)} tokens after a {cost.prompt_len}-token prompt", "",
             f"{'total':<14}{'uncached':>12}{'cached':>12}{'ratio':>8}"]
    for what, u, c, r in cost_summary(cost):
        short = {"query rows": "rows", "FLOPs, counted": "FLOPs"}
        lines.append(f"{short.get(what, 'time' + (' *' if '*' in what else '')):<14}{u:>12}{c:>12}{r:>8}")
    lines += ["", f"time: each step's call timed alone, fastest of {cost.repeats}"]
    if not cost.uncached_exact:
        lines.append(f"* uncached timed at {len(cost.sampled_steps)} steps, linear between")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8.5,
            transform=ax.transAxes)
    fig.suptitle("What the KV cache saves: uncached (full forward over the growing prefix) vs cached "
                 "(one query row per step)", fontsize=11)
    return _save(fig, path)
