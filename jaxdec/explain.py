"""`python -m jaxdec.explain`: one HTML page that shows what a model attends to and what the KV cache saves.

    python -m jaxdec.explain --checkpoint runs/stdlib/checkpoints --out runs/stdlib/explain
    python -m jaxdec.explain --checkpoint runs/dates/checkpoints --out runs/dates/explain
    python -m jaxdec.explain --task dates --out runs/explain-dates   # a small random model

The page (`report.html`, every image embedded, so the file alone is the report) and its PNGs:
- `causal_mask.png`: the causal mask of "[SOS] 나는 학교에 간다" over its byte tokens;
  `padding_mask.png` and `padded_causal_mask.png`: a batch of unequal lengths, padded.
- `self_attention_layer{i}.png` (and, for an encoder-decoder, `encoder_attention_layer{i}.png`,
  `cross_attention_layer{i}.png`): every head's probabilities from `jaxdec.inspect.attention`.
- `decode_cost.png`: per generated step, query rows, counted FLOPs and measured time of the
  uncached path (a full forward over the growing prefix) and the cached path (one query row).

The tokenizer is bytes, so a Hangul syllable is three tokens: axes label each byte and group
the bytes of one character under it. Text is drawn with NanumGothic, which the
`koreanize-matplotlib` wheel ships (a project dependency): nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import functools
import html
import importlib.metadata
import json
import os
import pathlib
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import api, checkpoint, checks, family
from jaxdec import inspect as jinspect
from jaxdec.attention import decoder_self_mask, padding_mask
from jaxdec.config import DecoderConfig, Seq2SeqConfig, TrainConfig
from jaxdec.data import dates
from jaxdec.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

TOKENIZER = ByteTokenizer()

# The sentences. SEED: the causal mask; PADDED: a batch of unequal lengths.
SEED_SENTENCE = "나는 학교에 간다"
PADDED_SENTENCES = ("오늘 어디에 갈꺼니?", SEED_SENTENCE)
DEFAULT_LM_TEXT = 'print("나는 학교에 간다")'
DEFAULT_DATES_TEXT = "2026년 11월 23일 월요일"

# A small random model per task when no checkpoint is given: seconds end to end on a CPU.
RANDOM_MODELS = {
    "lm": DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=2, d_model=64, num_heads=4, max_len=128,
                        position="rope"),
    "dates": Seq2SeqConfig(vocab_size=VOCAB_SIZE, num_encoder_layers=1, num_decoder_layers=1,
                           d_model=64, num_heads=4, max_len=64),
}


# --- the Hangul font --------------------------------------------------------------------------

FONT_DISTRIBUTION = "koreanize-matplotlib"  # its wheel ships NanumGothic (SIL Open Font License)
FONT_FILE = "NanumGothic.ttf"
FONT_FAMILY = "NanumGothic"


@functools.lru_cache(maxsize=None)
def hangul_font() -> pathlib.Path:
    """Registers NanumGothic with matplotlib; returns the file matplotlib resolves the family to.

    The font is found through the installed distribution's file list rather than by importing
    `koreanize_matplotlib`: that import rewrites matplotlib's global rcParams and needs
    `distutils`, which Python 3.12 removed.
    """
    from matplotlib import font_manager

    try:
        files = importlib.metadata.files(FONT_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the Hangul font comes from the {FONT_DISTRIBUTION!r} package, which is not "
            "installed: pip install -e '.[train]'"
        ) from None
    path = next((pathlib.Path(f.locate()) for f in files if f.name == FONT_FILE), None)
    if path is None or not path.is_file():
        raise RuntimeError(f"{FONT_DISTRIBUTION!r} is installed without {FONT_FILE}; reinstall it")
    font_manager.fontManager.addfont(str(path))
    props = font_manager.FontProperties(family=FONT_FAMILY)
    return pathlib.Path(font_manager.findfont(props, fallback_to_default=False))


@functools.lru_cache(maxsize=None)
def font_codepoints(path: pathlib.Path | None = None) -> frozenset[int]:
    """The code points the font at `path` (default: the resolved Hangul font) has glyphs for."""
    from matplotlib import ft2font

    return frozenset(ft2font.FT2Font(str(path or hangul_font())).get_charmap())


def drawable(text: str) -> str:
    """`text` with every character the font lacks written as U+XXXX, so no tofu box is drawn."""
    have = font_codepoints()
    return "".join(c if ord(c) in have or c.isspace() else f"U+{ord(c):04X}" for c in text)


def _rc() -> dict:
    # The minus sign U+2212 is not in NanumGothic: tick labels use the ASCII hyphen instead.
    # No axis is logarithmic: log-axis labels are mathtext, whose \mathdefault font is this
    # family again, so their minus signs would be drawn as boxes.
    return {"font.family": [FONT_FAMILY, "DejaVu Sans"], "axes.unicode_minus": False, "font.size": 9}


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


# --- byte labels ------------------------------------------------------------------------------

SPECIAL_NAMES = {BOS_ID: "SOS", EOS_ID: "EOS", PAD_ID: "PAD"}  # "[SOS]" is the tokenizer's BOS
_SHOWN_ASCII = {" ": "SP", "\n": "¶", "\t": "→"}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One displayed character: token ids [start, stop) and its text ("" for a lone byte)."""

    start: int
    stop: int
    text: str


def _utf8_width(lead: int) -> int:
    """Bytes in the UTF-8 sequence a lead byte starts (1 for ASCII or a stray byte)."""
    return 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 1


def units(ids: Sequence[int]) -> list[Unit]:
    """Groups byte ids into characters: the UTF-8 bytes of one syllable form one Unit.

    ids: token ids (bytes 0..255 and the specials). A malformed sequence leaves its bytes as
    single-byte units with no text.
    """
    ids = [int(i) for i in ids]
    out, i = [], 0
    while i < len(ids):
        width = _utf8_width(ids[i]) if ids[i] < 256 else 1
        chunk = ids[i : i + width]
        text = ""
        if width > 1 and len(chunk) == width and all(0x80 <= b < 0xC0 for b in chunk[1:]):
            try:
                text = bytes(chunk).decode("utf-8")
            except UnicodeDecodeError:
                text = ""
        if width > 1 and not text:
            width = 1
        out.append(Unit(i, i + width, text))
        i += width
    return out


def byte_label(token: int, in_group: bool) -> str:
    """One tick label: a special's name, a printable ASCII byte as itself, else two hex digits."""
    if token in SPECIAL_NAMES:
        return SPECIAL_NAMES[token]
    if token >= 256:
        return str(token)
    if in_group or token >= 0x80:
        return f"{token:02X}"
    char = chr(token)
    if char in _SHOWN_ASCII:
        return _SHOWN_ASCII[char]
    return char if char.isprintable() else f"{token:02X}"


def token_labels(ids: Sequence[int]) -> tuple[list[str], list[Unit]]:
    """Per-token tick labels and the multi-byte characters to draw under them."""
    groups = [u for u in units(ids) if u.stop - u.start > 1]
    grouped = {i for u in groups for i in range(u.start, u.stop)}
    return [byte_label(int(t), i in grouped) for i, t in enumerate(ids)], groups


def text_of(ids: Sequence[int]) -> str:
    """ids as readable text: specials as [SOS] / [EOS] / [PAD], bytes decoded (invalid ones as \\xNN)."""
    parts, run = [], []
    for t in (int(i) for i in ids):
        if t in SPECIAL_NAMES:
            parts.append(bytes(run).decode("utf-8", errors="backslashreplace"))
            parts.append(f"[{SPECIAL_NAMES[t]}]")
            run = []
        else:
            run.append(t)
    parts.append(bytes(run).decode("utf-8", errors="backslashreplace"))
    return "".join(parts)


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


def encode_sentence(text: str) -> np.ndarray:
    """[SOS] + UTF-8 bytes of text: int32 [T]."""
    return TOKENIZER.encode(text, bos=True)


def padded_batch(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """[SOS] + bytes of each text, right-padded with PAD: tokens int32 [B, T], lengths int32 [B]."""
    rows = [encode_sentence(t) for t in texts]
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), PAD_ID, np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    return tokens, np.array([len(r) for r in rows], np.int32)


@functools.partial(jax.jit, static_argnames=("width",))
def mask_tables(lengths: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """The model's own mask functions, in one compiled program: lengths int32 [B] ->
    (decoder self mask bool [B, T, T], padding mask bool [B, T]) with T = width."""
    return decoder_self_mask(lengths, width), padding_mask(lengths, width)


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


def plot_padding(texts: Sequence[str], tokens: np.ndarray, lengths: np.ndarray,
                 path: pathlib.Path) -> pathlib.Path:
    """The padding (key) mask of a right-padded batch: one strip per example, bool [B, S]."""
    from matplotlib.colors import ListedColormap

    B, S = tokens.shape
    keys = np.asarray(mask_tables(jnp.asarray(lengths), S)[1])  # [B, S]
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


def _block_flops(config, rows: int, keys: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one self-attention block + MLP over `rows` queries
    attending to `keys` keys: QKV and output projections, scores, probs @ V, the MLP."""
    D, N, K, H, F = config.d_model, config.num_heads, config.kv_heads, config.head_dim, config.ff_dim
    projections = 2 * rows * D * (N + 2 * K) * H + 2 * rows * N * H * D
    attention = 2 * 2 * rows * keys * N * H
    return projections + attention + 2 * 2 * rows * D * F


def decoder_flops(config, rows: int, keys: int, logit_rows: int, source_len: int = 0) -> int:
    """FLOPs of the decoder stack over `rows` query rows and `keys` self-attention keys, plus
    cross-attention to `source_len` encoder positions (encoder-decoder) and the output head on
    `logit_rows` rows."""
    D, N, H, V = config.d_model, config.num_heads, config.head_dim, config.vocab_size
    per_layer = _block_flops(config, rows, keys)
    if source_len:
        per_layer += 2 * rows * D * N * H * 2 + 2 * 2 * rows * source_len * N * H  # Q, out; scores, PV
    return config.num_layers * per_layer + 2 * logit_rows * D * V


def encoder_flops(config: Seq2SeqConfig, source_len: int) -> int:
    """FLOPs of the encoder over `source_len` positions plus every decoder layer's cross K/V
    projection of its output."""
    D, K, H = config.d_model, config.kv_heads, config.head_dim
    return (config.num_encoder_layers * _block_flops(config, source_len, source_len)
            + config.num_decoder_layers * 2 * source_len * D * 2 * K * H)


@dataclasses.dataclass
class DecodeCost:
    """Greedy decoding of n tokens after a P-token prompt, per generated step j = 1..n.

    Attributes:
      steps: int [n], 1..n.
      uncached_rows, cached_rows: int [n], query rows computed at each step. Uncached: the whole
        prefix, P + j - 1 rows. Cached: the prompt at step 1 (prefill), then one row.
      uncached_flops, cached_flops: float [n], matmul FLOPs counted from the config.
      sampled_steps: int [k], the steps whose uncached forward was timed;
        uncached_seconds_sampled: float [k], their fastest seconds; uncached_seconds: float [n],
        linear between them (equal to the timings when every step was timed).
      cached_seconds: float [n], measured: step 1 the prefill, step j > 1 one cached step.
      generated: int [n], the greedy tokens.
      prompt_len: P.
      repeats: timed runs per figure (the fastest is kept).
    """

    steps: np.ndarray
    uncached_rows: np.ndarray
    cached_rows: np.ndarray
    uncached_flops: np.ndarray
    cached_flops: np.ndarray
    sampled_steps: np.ndarray
    uncached_seconds_sampled: np.ndarray
    uncached_seconds: np.ndarray
    cached_seconds: np.ndarray
    generated: np.ndarray
    prompt_len: int
    repeats: int

    @property
    def uncached_exact(self) -> bool:
        """Every uncached step was timed (no interpolation)."""
        return len(self.sampled_steps) == len(self.steps)


def _fastest_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of fn() over `repeats` runs, after one untimed run (compilation).

    The fastest run is the one least disturbed by other work on the machine (as `timeit` advises).
    """
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


_apply = jax.jit(api.apply, static_argnames=("config",))


def _cached_functions(config):
    """The family's (prefill, step), jitted: the functions `jaxdec.generate` loops over."""
    fam = family.of(config)
    return (jax.jit(fam.prefill, static_argnames=("config", "capacity")),
            jax.jit(fam.step, static_argnames=("config",)))


def greedy_cached(params, config, prompt: np.ndarray, new_tokens: int, repeats: int,
                  source: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding with the KV cache, one call per step, each call timed.

    Step 1 is the prefill (its logits give token 1); step j > 1 feeds token j - 1 at position
    P + j - 2 to `decode_step`. The first pass decodes (and compiles); `repeats` more passes
    feed the same tokens and are timed, Python dispatch included.

    Args:
      prompt: int32 [P]. source: int32 [S] (encoder-decoder only).

    Returns:
      tokens int32 [n], and seconds float [n] per step (the fastest of the timed passes).
    """
    prefill, step = _cached_functions(config)
    P, n = len(prompt), new_tokens
    prompts, lengths = jnp.asarray(prompt, jnp.int32)[None], jnp.asarray([P], jnp.int32)  # [1, P], [1]
    src = (None, None) if source is None else (jnp.asarray(source, jnp.int32)[None],
                                               jnp.asarray([len(source)], jnp.int32))
    positions = [jnp.asarray([P + j], jnp.int32) for j in range(n - 1)]  # made before any timing
    tokens, fed = np.zeros(n, np.int32), []
    times = np.zeros((repeats + 1, n))
    for r in range(repeats + 1):
        start = time.perf_counter()
        logits, cache = jax.block_until_ready(prefill(params, config, prompts, lengths, P + n, *src))
        times[r, 0] = time.perf_counter() - start
        for j in range(1, n):
            if r == 0:
                tokens[j - 1] = int(np.argmax(logits[0]))
                fed.append(jnp.asarray(tokens[j - 1 : j]))
            start = time.perf_counter()
            logits, cache = jax.block_until_ready(step(params, config, cache, fed[j - 1], positions[j - 1]))
            times[r, j] = time.perf_counter() - start
        if r == 0:
            tokens[n - 1] = int(np.argmax(logits[0]))
    return tokens, times[1:].min(axis=0)


def measure_decode_cost(params, config, prompt: np.ndarray, new_tokens: int, *, samples: int,
                        repeats: int, source: np.ndarray | None = None) -> DecodeCost:
    """Counts and times greedy decoding of `new_tokens` tokens after `prompt`, both ways.

    Cached: `greedy_cached` (prefill, then one `decode_step` per token). Uncached: step j runs a
    full forward (`jaxdec.api.apply`, jitted) over the prefix of P + j - 1 tokens, as a model
    without a cache must, timed at `samples` evenly spaced steps (one compilation per length).

    Args:
      prompt: int32 [P], the decoder prompt. source: int32 [S] (encoder-decoder only).
      new_tokens: n >= 2. samples: >= 2 timed uncached steps. repeats: >= 1 timings per figure.
    """
    P, n = len(prompt), new_tokens
    generated, cached_seconds = greedy_cached(params, config, prompt, n, repeats, source)
    enc = {} if source is None else {"source": jnp.asarray(source, jnp.int32)[None],
                                     "source_lengths": jnp.asarray([len(source)], jnp.int32)}
    sequence = np.concatenate([prompt, generated]).astype(np.int32)
    sampled = np.unique(np.linspace(1, n, min(samples, n)).round().astype(int))
    sampled_seconds = []
    for j in sampled:
        t = P + j - 1
        tokens, lengths = jnp.asarray(sequence[:t])[None], jnp.asarray([t], jnp.int32)  # [1, t], [1]
        sampled_seconds.append(_fastest_seconds(lambda: _apply(params, config, tokens, lengths, **enc),
                                               repeats))

    S_src = 0 if source is None else len(source)
    steps = np.arange(1, n + 1)
    prefix = P + steps - 1  # tokens the uncached forward reruns; keys the cached step attends to
    encoder = encoder_flops(config, S_src) if source is not None else 0
    uncached_flops = np.array([decoder_flops(config, t, t, t, S_src) + encoder for t in prefix], float)
    # The cached path encodes once, prefills the prompt (logits of its last row only), then runs
    # one query row per step over the filled cache slots.
    cached_flops = np.array([decoder_flops(config, P, P, 1, S_src) + encoder]
                            + [decoder_flops(config, 1, t + 1, 1, S_src) for t in prefix[1:]], float)
    return DecodeCost(steps=steps, uncached_rows=prefix, cached_rows=np.array([P] + [1] * (n - 1)),
                      uncached_flops=uncached_flops, cached_flops=cached_flops, sampled_steps=sampled,
                      uncached_seconds_sampled=np.asarray(sampled_seconds),
                      uncached_seconds=np.interp(steps, sampled, sampled_seconds),
                      cached_seconds=cached_seconds, generated=generated, prompt_len=P,
                      repeats=repeats)


UNCACHED_COLOR, CACHED_COLOR = "#c2452d", "#2f6db5"


def cost_summary(cost: DecodeCost) -> list[tuple[str, str, str, str]]:
    """(what, uncached, cached, uncached / cached) rows: totals counted and measured."""
    def ratio(a, b):
        return f"{a / b:.1f}x" if b > 0 else "-"

    rows_u, rows_c = int(cost.uncached_rows.sum()), int(cost.cached_rows.sum())
    flops_u, flops_c = cost.uncached_flops.sum(), cost.cached_flops.sum()
    time_u, time_c = cost.uncached_seconds.sum(), cost.cached_seconds.sum()
    return [
        ("query rows", f"{rows_u:,}", f"{rows_c:,}", ratio(rows_u, rows_c)),
        ("FLOPs, counted", f"{flops_u / 1e9:.4f} G", f"{flops_c / 1e9:.4f} G", ratio(flops_u, flops_c)),
        ("time, measured" + ("" if cost.uncached_exact else " *"),
         f"{time_u * 1e3:.1f} ms", f"{time_c * 1e3:.1f} ms", ratio(time_u, time_c)),
    ]


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


# --- loading a model --------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    params: dict
    config: DecoderConfig | Seq2SeqConfig
    description: str


def _fields(cls, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def load_checkpoint(checkpoint_dir: str | os.PathLike) -> LoadedModel:
    """The params of a `train.py` run's newest usable checkpoint.

    The run's `config.json` (written by `train.py` beside `checkpoints/`) gives the model and
    optimiser configs, from which the restore template is built.
    """
    from jaxdec.training import create_train_state

    checkpoint_dir = pathlib.Path(checkpoint_dir)
    config_path = checkpoint_dir.parent / "config.json"
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"--checkpoint {checkpoint_dir} is not a directory")
    if not config_path.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint_dir}: no run config at {config_path} "
                                "(expected a train.py run folder: <run>/config.json, <run>/checkpoints/)")
    run = json.loads(config_path.read_text())
    model_cls = Seq2SeqConfig if "num_encoder_layers" in run["model"] else DecoderConfig
    model_config = model_cls(**_fields(model_cls, run["model"]))
    train_config = TrainConfig(**_fields(TrainConfig, run["train"]))
    # One compiled program builds the template (its values are ignored, its layout is used).
    template = jax.jit(create_train_state, static_argnums=(0, 1))(model_config, train_config,
                                                                  jax.random.key(train_config.seed))
    state, step = checkpoint.restore(checkpoint_dir, template)
    return LoadedModel(state.params, model_config, f"checkpoint {checkpoint_dir}, step {step}")


def random_model(task: str, seed: int = 0) -> LoadedModel:
    config = RANDOM_MODELS[task]
    # One compiled program instead of one per random array.
    params = jax.jit(api.init_params, static_argnums=0)(config, jax.random.key(seed))
    return LoadedModel(params, config,
                       f"a small random model (seed {seed}, untrained)")


# --- the report -------------------------------------------------------------------------------


@dataclasses.dataclass
class Section:
    title: str
    text: str
    images: list[pathlib.Path]
    html_extra: str = ""


def _img(path: pathlib.Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">' \
           f"<figcaption>{html.escape(path.name)}</figcaption></figure>"


def write_html(path: pathlib.Path, title: str, intro: str, sections: list[Section]) -> pathlib.Path:
    body = [f"<h1>{html.escape(title)}</h1>", intro]
    for s in sections:
        body += [f"<h2>{html.escape(s.title)}</h2>", s.text, s.html_extra] + [_img(p) for p in s.images]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "img{max-width:100%;border:1px solid #ddd}figure{margin:1em 0}figcaption{color:#666;"
             "font-size:.85em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;"
             "text-align:right}code{background:#f4f4f4;padding:0 .2em}")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path


def _p(text: str) -> str:
    return f"<p>{text}</p>"


def _mask_sections(out: pathlib.Path) -> Section:
    seed = encode_sentence(SEED_SENTENCE)
    T = len(seed)
    causal = np.asarray(mask_tables(jnp.asarray([T], jnp.int32), T)[0])[0]  # [T, T]
    images = [plot_mask(causal, seed, seed, f"causal mask of [SOS] {SEED_SENTENCE}", out / "causal_mask.png",
                        note="row i (a query) may attend to columns 0..i (keys): itself and everything before")]
    tokens, lengths = padded_batch(PADDED_SENTENCES)
    images.append(plot_padding(PADDED_SENTENCES, tokens, lengths, out / "padding_mask.png"))
    short = int(np.argmin(lengths))
    combined = np.asarray(mask_tables(jnp.asarray(lengths), tokens.shape[1])[0])[short]
    images.append(plot_mask(combined, tokens[short], tokens[short],
                            f"causal AND padding mask of example {short} in the padded batch",
                            out / "padded_causal_mask.png",
                            note="PAD columns are never attended; PAD rows see the real tokens, and their "
                                 "outputs are ignored"))
    text = _p(
        "Masks are boolean, <b>True (blue) where attention is allowed</b>; a masked score is set to "
        "-inf before the softmax. Tokens are UTF-8 bytes: each Hangul syllable is three bytes, drawn "
        "as three columns with the syllable under them. " + html.escape(
            f"[SOS] {SEED_SENTENCE} is {T} tokens. The batch pads "
            f"{' and '.join(repr(s) for s in PADDED_SENTENCES)} to {tokens.shape[1]} tokens.")
    )
    return Section("Masks", text, images)


def _heads_section(params, config, out: pathlib.Path, text: str) -> Section:
    """Heatmaps of every layer and head for `text` (a decoder-only model)."""
    ids = encode_sentence(text)
    result = jinspect.attention(params, config, ids[None])
    mask = np.asarray(result.masks["self"])[0]
    images = []
    for i, probs in enumerate(result.self_attention):
        images.append(plot_heads(np.asarray(probs)[0], mask, ids, ids,
                                 f"layer {i} self-attention on [SOS] {text}",
                                 out / f"self_attention_layer{i}.png"))
    return Section(
        "Attention, per layer and head",
        _p("Each panel is one head: row t is the query at token t, its colours the softmax "
           "probabilities over keys 0..t (grey: masked). Computed by "
           "<code>jaxdec.inspect.attention</code>, the same pass as <code>jaxdec.forward</code>. "
           f"Input: <code>{html.escape('[SOS] ' + text)}</code> ({len(ids)} byte tokens)."),
        images)


def _seq2seq_sections(params, config, out: pathlib.Path, source: np.ndarray, generated: np.ndarray
                      ) -> list[Section]:
    """Encoder, decoder and cross-attention heatmaps for the model's own greedy translation.

    source: int32 [S]; generated: int32 [n], the greedy tokens (cut after the first EOS here).
    """
    text = TOKENIZER.decode(source)
    src = source[None]  # [1, S]
    eos = np.flatnonzero(generated == EOS_ID)
    output = generated[: eos[0] + 1] if eos.size else generated  # [n'], the EOS included
    decoder_in = np.concatenate([[BOS_ID], output[:-1]]).astype(np.int32)  # row t predicts output[t]
    att = jinspect.attention(params, config, decoder_in[None], source=src)
    enc_mask = np.asarray(att.masks["encoder"])[0]
    self_mask = np.asarray(att.masks["self"])[0]
    cross_mask = np.asarray(att.masks["cross"])[0]
    shown = html.escape(text_of(output))
    cross = [plot_heads(np.asarray(p)[0], cross_mask, decoder_in, source,
                        f"layer {i} cross-attention: {text} -> {text_of(output)}",
                        out / f"cross_attention_layer{i}.png", next_ids=output)
             for i, p in enumerate(att.cross_attention)]
    encoder = [plot_heads(np.asarray(p)[0], enc_mask, source, source, f"encoder layer {i} self-attention",
                          out / f"encoder_attention_layer{i}.png")
               for i, p in enumerate(att.encoder_attention)]
    decoder = [plot_heads(np.asarray(p)[0], self_mask, decoder_in, decoder_in,
                          f"decoder layer {i} masked self-attention", out / f"self_attention_layer{i}.png",
                          next_ids=output)
               for i, p in enumerate(att.self_attention)]
    sections = [
        Section("Cross-attention: which source bytes each output looks at",
                _p(f"Source <code>{html.escape(text)}</code>; the model's greedy output "
                   f"<code>{shown}</code>, fed back as the decoder input (teacher forcing). Row t is "
                   "the decoder query at input token t (left) that predicts the token on the right "
                   "(brown); columns are source bytes."), cross),
        Section("Encoder self-attention (bidirectional, source padding masked)", "", encoder),
        Section("Decoder masked self-attention", "", decoder),
    ]
    return sections


def _cost_section(cost: DecodeCost, out: pathlib.Path, encoder_decoder: bool) -> Section:
    table = ("<table><tr><th>total</th><th>uncached</th><th>cached</th><th>uncached / cached</th></tr>"
             + "".join(f"<tr><th>{html.escape(a)}</th><td>{b}</td><td>{c}</td><td>{d}</td></tr>"
                       for a, b, c, d in cost_summary(cost)) + "</table>")
    sampled = ("every step" if cost.uncached_exact
               else f"{len(cost.sampled_steps)} evenly spaced steps (*: linear in between)")
    text = _p(
        f"Greedy decoding of {len(cost.steps)} tokens after a {cost.prompt_len}-token prompt. "
        "<b>Uncached</b>: step j reruns the whole model over the prefix of P + j - 1 tokens "
        f"(a jitted <code>jaxdec.api.apply</code>, timed at {sampled}). <b>Cached</b>: the prompt "
        "once (<code>prefill</code>), then one query row per step against the KV cache "
        f"(<code>decode_step</code>), each call timed (the fastest of {cost.repeats} runs; "
        "<code>jaxdec.generate</code> runs the same "
        "two functions in one compiled loop). FLOPs are the matmuls counted from the config "
        "(projections, attention scores and values over the filled keys, MLP, output head). "
        + ("The uncached step also reruns the encoder and the cross-attention K/V projections; the "
           "cached path runs them once, in the prefill. " if encoder_decoder else "")
        + "Measured time includes each call's fixed cost (Python dispatch, many small kernels), "
        "which for a small model outweighs its FLOPs: the measured ratio can be far below the "
        f"counted one. Machine: {html.escape(_machine())}."
    )
    return Section("Decode cost: what the KV cache saves", text, [plot_cost(cost, out / "decode_cost.png")],
                   html_extra=table)


def _machine() -> str:
    device = jax.devices()[0]
    flags = os.environ.get("XLA_FLAGS", "")
    return (f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores, "
            f"jax {jax.__version__}" + (f", XLA_FLAGS={flags}" if flags else ", XLA's default threading"))


def explain(loaded: LoadedModel, out: str | os.PathLike, *, text: str | None = None, new_tokens: int = 48,
            samples: int = 8, repeats: int = 5) -> pathlib.Path:
    """Writes report.html and its PNGs into `out`; returns the HTML's path.

    Args:
      loaded: the model (a checkpoint's or a random one).
      out: the output folder (created).
      text: the input: the prompt of a decoder-only model, the source of an encoder-decoder.
      new_tokens: tokens decoded for the cost picture (a decoder-only model; an encoder-decoder
        decodes a date's 11 tokens).
      samples: prefix lengths at which the uncached forward is timed (>= 2).
      repeats: timings per measurement (the fastest is kept; >= 1).
    """
    params, config = loaded.params, loaded.config
    encoder_decoder = family.of(config).takes_source
    text = text if text is not None else (DEFAULT_DATES_TEXT if encoder_decoder else DEFAULT_LM_TEXT)
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty str, got {text!r}")
    samples, repeats, new_tokens = (checks.positive_int(name, value, low) for name, value, low in
                                    (("samples", samples, 2), ("repeats", repeats, 1), ("new_tokens", new_tokens, 2)))
    need = max(len(encode_sentence(s)) for s in (SEED_SENTENCE, *PADDED_SENTENCES))
    if config.vocab_size < VOCAB_SIZE:
        raise ValueError(f"the model's vocab_size {config.vocab_size} does not cover the byte tokenizer's "
                         f"{VOCAB_SIZE} ids")
    length = len(TOKENIZER.encode(text)) + (0 if encoder_decoder else 1)
    if encoder_decoder:
        new_tokens = min(dates.TARGET_BYTES + 1, config.max_len - 1)
        if length > config.max_len:
            raise ValueError(f"text is {length} bytes, beyond the model's max_len={config.max_len}")
    elif length + new_tokens > config.max_len:
        raise ValueError(f"text ({length} tokens with [SOS]) + new_tokens ({new_tokens}) exceeds the "
                         f"model's max_len={config.max_len}")
    if need > config.max_len:
        raise ValueError(f"the mask sentences need max_len >= {need}, the model has {config.max_len}")

    hangul_font()
    from matplotlib import rc_context

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with rc_context(_rc()):
        sections = [_mask_sections(out)]
        if encoder_decoder:
            # The decode-cost run is the model's greedy translation; the heatmaps show it.
            source, prompt = TOKENIZER.encode(text), np.array([BOS_ID], np.int32)
            cost = measure_decode_cost(params, config, prompt, new_tokens, samples=samples,
                                       repeats=repeats, source=source)
            sections += _seq2seq_sections(params, config, out, source, cost.generated)
        else:
            cost = measure_decode_cost(params, config, encode_sentence(text), new_tokens, samples=samples,
                                       repeats=repeats)
            sections.append(_heads_section(params, config, out, text))
        sections.append(_cost_section(cost, out, encoder_decoder))
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    kind = "encoder-decoder" if encoder_decoder else "decoder-only"
    intro = _p(html.escape(
        f"{kind} model, {n_params:,} parameters, from {loaded.description}. Config: {config}. "
        f"Written {datetime.datetime.now().isoformat(timespec='seconds')}. Generated tokens in the cost "
        f"section: {text_of(cost.generated)!r}."))
    return write_html(out / "report.html", "jaxdec: see inside", intro, sections)


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(prog="python -m jaxdec.explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a train.py run's checkpoints folder, e.g. runs/stdlib/checkpoints")
    parser.add_argument("--task", choices=sorted(RANDOM_MODELS), default=None,
                        help="without --checkpoint: the random model's family (lm: decoder-only, "
                             "dates: encoder-decoder); with it, must match the run")
    parser.add_argument("--out", help="output folder (default: <run>/explain, or runs/explain-<task>)")
    parser.add_argument("--text", help=f"the input (default {DEFAULT_LM_TEXT!r}; dates: {DEFAULT_DATES_TEXT!r})")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens decoded for the cost picture")
    parser.add_argument("--samples", type=int, default=8, help="prefix lengths timed on the uncached path")
    parser.add_argument("--repeats", type=int, default=5, help="timings per measurement (the fastest is kept)")
    parser.add_argument("--seed", type=int, default=0, help="the random model's init seed")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.checkpoint:
            loaded = load_checkpoint(args.checkpoint)
            task = "dates" if family.of(loaded.config).takes_source else "lm"
            if args.task is not None and args.task != task:
                raise ValueError(f"--task {args.task} does not match the checkpoint, a {task} run")
            out = args.out or pathlib.Path(args.checkpoint).parent / "explain"
        else:
            task = args.task or "lm"
            loaded = random_model(task, args.seed)
            out = args.out or pathlib.Path("runs") / f"explain-{task}"
        path = explain(loaded, out, text=args.text, new_tokens=args.new_tokens, samples=args.samples,
                       repeats=args.repeats)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        sys.exit(f"error: {err}")
    print(f"report: {path} (and its PNGs in {path.parent})")
    return path


if __name__ == "__main__":
    main()
