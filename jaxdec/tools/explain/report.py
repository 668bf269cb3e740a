"""The report's content: its sections, built from the model's own masks, attention and decode
cost, and `explain()`, which checks its arguments, draws every figure and writes the page."""

from __future__ import annotations

import datetime
import functools
import html
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import checks, family
from jaxdec import inspect as jinspect
from jaxdec.attention import decoder_self_mask, padding_mask
from jaxdec.data import dates
from jaxdec.data.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE
from jaxdec.tools.explain.decode_cost import DecodeCost, cost_summary, measure_decode_cost
from jaxdec.tools.explain.fonts import hangul_font, rc
from jaxdec.tools.explain.loading import LoadedModel
from jaxdec.tools.explain.page import Section, paragraph, write_html
from jaxdec.tools.explain.plots import plot_cost, plot_heads, plot_mask, plot_padding
from jaxdec.tools.explain.text import (DEFAULT_DATES_TEXT, DEFAULT_LM_TEXT, PADDED_SENTENCES, SEED_SENTENCE,
                                      TOKENIZER, encode_sentence, padded_batch, text_of)


@functools.partial(jax.jit, static_argnames=("width",))
def mask_tables(lengths: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """The model's own mask functions, in one compiled program: lengths int32 [B] ->
    (decoder self mask bool [B, T, T], padding mask bool [B, T]) with T = width."""
    return decoder_self_mask(lengths, width), padding_mask(lengths, width)


def _mask_sections(out: pathlib.Path) -> Section:
    seed = encode_sentence(SEED_SENTENCE)
    T = len(seed)
    causal = np.asarray(mask_tables(jnp.asarray([T], jnp.int32), T)[0])[0]  # [T, T]
    images = [plot_mask(causal, seed, seed, f"causal mask of [SOS] {SEED_SENTENCE}", out / "causal_mask.png",
                        note="row i (a query) may attend to columns 0..i (keys): itself and everything before")]
    tokens, lengths = padded_batch(PADDED_SENTENCES)
    keys = np.asarray(mask_tables(jnp.asarray(lengths), tokens.shape[1])[1])  # [B, S]
    images.append(plot_padding(PADDED_SENTENCES, tokens, lengths, keys, out / "padding_mask.png"))
    short = int(np.argmin(lengths))
    combined = np.asarray(mask_tables(jnp.asarray(lengths), tokens.shape[1])[0])[short]
    images.append(plot_mask(combined, tokens[short], tokens[short],
                            f"causal AND padding mask of example {short} in the padded batch",
                            out / "padded_causal_mask.png",
                            note="PAD columns are never attended; PAD rows see the real tokens, and their "
                                 "outputs are ignored"))
    text = paragraph(
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
        paragraph("Each panel is one head: row t is the query at token t, its colours the softmax "
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
                paragraph(f"Source <code>{html.escape(text)}</code>; the model's greedy output "
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
    text = paragraph(
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
    with rc_context(rc()):
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
    intro = paragraph(html.escape(
        f"{kind} model, {n_params:,} parameters, from {loaded.description}. Config: {config}. "
        f"Written {datetime.datetime.now().isoformat(timespec='seconds')}. Generated tokens in the cost "
        f"section: {text_of(cost.generated)!r}."))
    return write_html(out / "report.html", "jaxdec: see inside", intro, sections)
