"""The Hangul font the figures are drawn with: NanumGothic from the `koreanize-matplotlib`
wheel, registered with matplotlib, and text made drawable with it."""

from __future__ import annotations

import functools
import importlib.metadata
import pathlib


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


def rc() -> dict:
    # The minus sign U+2212 is not in NanumGothic: tick labels use the ASCII hyphen instead.
    # No axis is logarithmic: log-axis labels are mathtext, whose \mathdefault font is this
    # family again, so their minus signs would be drawn as boxes.
    return {"font.family": [FONT_FAMILY, "DejaVu Sans"], "axes.unicode_minus": False, "font.size": 9}
