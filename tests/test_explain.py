"""Tests for `python -m jaxdec.tools.explain`: the Hangul font resolves and has the glyphs, byte
labels group each syllable's UTF-8 bytes, a checkpoint of a train.py run loads, and the report
runs end to end on tiny random models (HTML + every PNG). Its FLOP counts: tests/test_costs.py."""

from __future__ import annotations

import base64
import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from jaxdec import checkpoint
from jaxdec.config import DecoderConfig, TrainConfig
from jaxdec.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer
from jaxdec.tools.explain import fonts, loading, text
from jaxdec.tools.explain.__main__ import main

TOKENIZER = ByteTokenizer()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_matplotlib_resolves_a_font_with_every_hangul_glyph_the_report_draws():
    from matplotlib import font_manager, ft2font

    path = fonts.hangul_font()
    assert path.name == "NanumGothic.ttf" and path.is_file()
    # The family name resolves to that file, with no fallback to matplotlib's default font.
    resolved = font_manager.findfont(font_manager.FontProperties(family=fonts.FONT_FAMILY),
                                     fallback_to_default=False)
    assert pathlib.Path(resolved) == path
    charmap = ft2font.FT2Font(str(path)).get_charmap()
    drawn = "".join([text.SEED_SENTENCE, *text.PADDED_SENTENCES, text.DEFAULT_LM_TEXT,
                     text.DEFAULT_DATES_TEXT, "월화수목금토일요일", "[SOS]-0123456789·¶→"])
    missing = sorted({c for c in drawn if not c.isspace() and ord(c) not in charmap})
    assert not missing, f"the font lacks {missing}"
    assert all(0xAC00 + i in charmap for i in range(0, 11172, 97))  # syllables across the whole block


def test_characters_the_font_lacks_are_written_as_code_points():
    assert fonts.drawable("나는 학교에") == "나는 학교에"
    assert fonts.drawable("a🙂b") == "aU+1F642b"


def test_labels_group_the_utf8_bytes_of_each_syllable():
    ids = np.concatenate([[BOS_ID], TOKENIZER.encode("나 a\n"), [0xEB], [EOS_ID, PAD_ID]])
    labels, groups = text.token_labels(ids)
    assert labels == ["SOS", "EB", "82", "98", "SP", "a", "¶", "EB", "EOS", "PAD"]
    assert groups == [text.Unit(1, 4, "나")]  # the stray lead byte 0xEB stays a lone byte
    assert text.text_of(ids) == "[SOS]나 a\n\\xeb[EOS][PAD]"


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
    path = main(["--out", str(out), "--new-tokens", "3", "--samples", "2", "--repeats", "1"])
    assert path == out / "report.html"
    layers = loading.RANDOM_MODELS["lm"].num_layers
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
    path = main(["--task", "dates", "--out", str(out), "--samples", "2", "--repeats", "1"])
    c = loading.RANDOM_MODELS["dates"]
    expected = {"causal_mask.png", "padding_mask.png", "padded_causal_mask.png", "decode_cost.png",
                *(f"{kind}_layer{i}.png" for kind in ("self_attention", "cross_attention")
                  for i in range(c.num_decoder_layers)),
                *(f"encoder_attention_layer{i}.png" for i in range(c.num_encoder_layers))}
    assert {p.name for p in out.glob("*.png")} == expected
    html = path.read_text(encoding="utf-8")
    assert _pngs_in(html, out) == expected
    assert text.DEFAULT_DATES_TEXT in html
    _no_missing_glyphs(caplog)


def test_a_train_py_run_loads_from_its_checkpoint(tmp_path):
    from jaxdec.tools.run import RunConfig
    from jaxdec.training import create_train_state

    model = DecoderConfig(vocab_size=VOCAB_SIZE, num_layers=1, d_model=16, num_heads=2, max_len=32)
    run = RunConfig(model=model, train=TrainConfig(seed=3))
    run_dir = tmp_path / "myrun"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(run)))
    state = jax.jit(create_train_state, static_argnums=(0, 1))(model, run.train, jax.random.key(7))
    checkpoint.save(run_dir / "checkpoints", state, 5)
    loaded = loading.load_checkpoint(run_dir / "checkpoints")
    assert loaded.config == model and "step 5" in loaded.description
    jax.tree.map(np.testing.assert_array_equal, loaded.params, state.params)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "no/such/run/checkpoints"], "is not a directory"),
    (["--new-tokens", "1"], "new_tokens must be an int >= 2"),
    (["--text", "가" * 60], "exceeds the model's max_len=128"),
])
def test_bad_arguments_exit_with_the_reason(tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path / "x")])
    assert message in str(exit_info.value.code)
    assert not (tmp_path / "x").exists()  # refused before anything was written
