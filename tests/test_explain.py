"""Tests for `python -m jaxdec.explain`: the Hangul font resolves and has the glyphs, byte labels
group each syllable's UTF-8 bytes, FLOPs counted from the config match XLA's count, a checkpoint
of a train.py run loads, and the report runs end to end on tiny random models (HTML + every PNG)."""

from __future__ import annotations

import base64
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import checkpoint, explain
from jaxdec.config import DecoderConfig, Seq2SeqConfig, TrainConfig
from jaxdec.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer

TOKENIZER = ByteTokenizer()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_matplotlib_resolves_a_font_with_every_hangul_glyph_the_report_draws():
    from matplotlib import font_manager, ft2font

    path = explain.hangul_font()
    assert path.name == "NanumGothic.ttf" and path.is_file()
    # The family name resolves to that file, with no fallback to matplotlib's default font.
    resolved = font_manager.findfont(font_manager.FontProperties(family=explain.FONT_FAMILY),
                                     fallback_to_default=False)
    assert pathlib.Path(resolved) == path
    charmap = ft2font.FT2Font(str(path)).get_charmap()
    drawn = "".join([explain.SEED_SENTENCE, *explain.PADDED_SENTENCES, explain.DEFAULT_LM_TEXT,
                     explain.DEFAULT_DATES_TEXT, "월화수목금토일요일", "[SOS]-0123456789·¶→"])
    missing = sorted({c for c in drawn if not c.isspace() and ord(c) not in charmap})
    assert not missing, f"the font lacks {missing}"
    assert all(0xAC00 + i in charmap for i in range(0, 11172, 97))  # syllables across the whole block


def test_characters_the_font_lacks_are_written_as_code_points():
    assert explain.drawable("나는 학교에") == "나는 학교에"
    assert explain.drawable("a🙂b") == "aU+1F642b"


def test_labels_group_the_utf8_bytes_of_each_syllable():
    ids = np.concatenate([[BOS_ID], TOKENIZER.encode("나 a\n"), [0xEB], [EOS_ID, PAD_ID]])
    labels, groups = explain.token_labels(ids)
    assert labels == ["SOS", "EB", "82", "98", "SP", "a", "¶", "EB", "EOS", "PAD"]
    assert groups == [explain.Unit(1, 4, "나")]  # the stray lead byte 0xEB stays a lone byte
    assert explain.text_of(ids) == "[SOS]나 a\n\\xeb[EOS][PAD]"


# One layer per stack: XLA's cost analysis counts the body of the layer scan once.
@pytest.mark.parametrize("config, source_len", [
    (DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=1, d_model=64, num_heads=4, max_len=64,
                   num_kv_heads=2, position="rope"), 0),
    (Seq2SeqConfig(vocab_size=VOCAB_SIZE, num_encoder_layers=1, num_decoder_layers=1, d_model=64,
                   num_heads=4, max_len=64), 29),
])
def test_counted_flops_match_xla_cost_analysis(config, source_len):
    # XLA also counts elementwise work (norms, softmax, GELU); the matmuls we count dominate it.
    params = jax.eval_shape(lambda key: jaxdec.init_params(config, key), jax.random.key(0))
    T = 40 if not source_len else 11
    args = dict(source=jnp.ones((1, source_len), jnp.int32), source_lengths=jnp.array([source_len])
                ) if source_len else {}
    compiled = jax.jit(jaxdec.api.apply, static_argnames="config").lower(
        params, config, jnp.ones((1, T), jnp.int32), jnp.array([T]), **args).compile()
    xla = compiled.cost_analysis()["flops"]
    counted = explain.decoder_flops(config, T, T, T, source_len)
    if source_len:
        counted += explain.encoder_flops(config, source_len)
    assert 1.0 <= xla / counted < 1.15


def _pngs_in(html: str, out: pathlib.Path) -> set[str]:
    """Names of the PNGs in `out` whose exact bytes the HTML embeds."""
    return {p.name for p in out.glob("*.png") if base64.b64encode(p.read_bytes()).decode() in html}


def _no_missing_glyphs(caplog) -> None:
    """matplotlib logs (mathtext) or warns (text) when a font has no glyph: a tofu box."""
    assert not [r.getMessage() for r in caplog.records if "glyph" in r.getMessage().lower()]


# matplotlib warns "Glyph ... missing from font(s)" where it would draw a tofu box.
@pytest.mark.slow  # the whole report end to end, its benchmark timings included
@pytest.mark.filterwarnings("error:.*[Gg]lyph.*missing")
def test_report_end_to_end_on_a_tiny_random_decoder(tmp_path, capsys, caplog):
    out = tmp_path / "report"
    path = explain.main(["--out", str(out), "--new-tokens", "3", "--samples", "2", "--repeats", "1"])
    assert path == out / "report.html"
    layers = explain.RANDOM_MODELS["lm"].num_layers
    expected = {"causal_mask.png", "padding_mask.png", "padded_causal_mask.png", "decode_cost.png",
                *(f"self_attention_layer{i}.png" for i in range(layers))}
    assert {p.name for p in out.glob("*.png")} == expected
    for png in out.glob("*.png"):
        assert png.read_bytes().startswith(PNG_SIGNATURE)
    html = path.read_text(encoding="utf-8")
    assert _pngs_in(html, out) == expected  # self-contained: every image embedded
    assert "<img" in html and 'src="http' not in html
    assert "나는 학교에 간다" in html
    assert f"report: {path}" in capsys.readouterr().out
    _no_missing_glyphs(caplog)


@pytest.mark.filterwarnings("error:.*[Gg]lyph.*missing")
@pytest.mark.slow  # compiles the encoder-decoder's programs; the decoder-only end-to-end test covers the default run
def test_report_end_to_end_on_a_tiny_random_encoder_decoder(tmp_path, caplog):
    out = tmp_path / "dates"
    path = explain.main(["--task", "dates", "--out", str(out), "--samples", "2", "--repeats", "1"])
    c = explain.RANDOM_MODELS["dates"]
    expected = {"causal_mask.png", "padding_mask.png", "padded_causal_mask.png", "decode_cost.png",
                *(f"{kind}_layer{i}.png" for kind in ("self_attention", "cross_attention")
                  for i in range(c.num_decoder_layers)),
                *(f"encoder_attention_layer{i}.png" for i in range(c.num_encoder_layers))}
    assert {p.name for p in out.glob("*.png")} == expected
    html = path.read_text(encoding="utf-8")
    assert _pngs_in(html, out) == expected
    assert explain.DEFAULT_DATES_TEXT in html
    _no_missing_glyphs(caplog)


def test_a_train_py_run_loads_from_its_checkpoint(tmp_path):
    from jaxdec.trainer import RunConfig
    from jaxdec.training import create_train_state

    model = DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=1, d_model=16, num_heads=2, max_len=32)
    run = RunConfig(model=model, train=TrainConfig(seed=3))
    run_dir = tmp_path / "myrun"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(run)))
    state = jax.jit(create_train_state, static_argnums=(0, 1))(model, run.train, jax.random.key(7))
    checkpoint.save(run_dir / "checkpoints", state, 5)
    loaded = explain.load_checkpoint(run_dir / "checkpoints")
    assert loaded.config == model and "step 5" in loaded.description
    jax.tree.map(np.testing.assert_array_equal, loaded.params, state.params)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "no/such/run/checkpoints"], "is not a directory"),
    (["--new-tokens", "1"], "new_tokens must be an int >= 2"),
    (["--text", "가" * 60], "exceeds the model's max_len=128"),
])
def test_bad_arguments_exit_with_the_reason(tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        explain.main(argv + ["--out", str(tmp_path / "x")])
    assert message in str(exit_info.value.code)
    assert not (tmp_path / "x").exists()  # refused before anything was written
