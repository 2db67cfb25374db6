"""The HTML both page writers share (report pages, `pathgen diff --html`): escaping, tables, the page shell.

Pages are self-contained (inline style, images as data URIs) and deterministic.
"""

from __future__ import annotations

import html
from typing import Any


def visible(text: str) -> str:
    """Control characters (model output may hold them) as visible symbols; newlines and tabs kept."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in "\n\t":
            out.append(ch)
        elif code < 0x20:
            out.append(chr(0x2400 + code))  # ␀..␟ (control pictures)
        elif code == 0x7F:
            out.append("\u2421")  # ␡
        elif 0x80 <= code <= 0x9F:
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def esc(value: Any) -> str:
    """HTML-escaped text (quotes too), with control characters made visible; None is ''."""
    return html.escape(visible("" if value is None else str(value)), quote=True)


def table(header: list[Any], rows: list[list[Any]], css_class: str | None = None) -> str:
    """A plain table: one header row, every cell escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    attr = f' class="{esc(css_class)}"' if css_class else ""
    return f"<table{attr}>\n<tr>{head}</tr>\n{body}</table>\n"


def page(title: str, body: str, style: str) -> str:
    """A whole HTML5 document around `body`."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{style}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
