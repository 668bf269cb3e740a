"""The HTML writer: one self-contained page (every PNG embedded as base64) of titled sections."""

from __future__ import annotations

import base64
import dataclasses
import html
import pathlib


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


def paragraph(text: str) -> str:
    return f"<p>{text}</p>"
