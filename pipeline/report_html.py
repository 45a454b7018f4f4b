"""``outputs/<run>/report.html``: the run report as one self-contained page that opens in any browser.

The Markdown of ``report.md`` is rendered by markdown-it-py (CommonMark plus tables). The page loads
nothing from outside itself:

- each image the report links (its PNGs under the run folder) is inlined as a base64 ``data:`` URI; an
  image outside the run folder, missing, remote or of an unknown type is replaced by its alt text;
- the only raw HTML that passes through is what the report writes itself: ``<br>`` inside table cells and
  the ``<details>``/``<summary>`` blocks around the full metrics. Any other HTML in the text (a model's
  generation or a prompt may hold some) is shown escaped, as text;
- the style sheet is inline.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml"}
_INLINE_ALLOWED = re.compile(r"<br\s*/?>", re.IGNORECASE)
_BLOCK_TAG = r"(?:</?details(?:\s+open)?>|<summary>[^<>]*</summary>)"
_BLOCK_ALLOWED = re.compile(rf"\s*{_BLOCK_TAG}(?:\s*{_BLOCK_TAG})*\s*", re.IGNORECASE)

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; line-height: 1.45; color: #1f2328;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; display: block; overflow-x: auto; font-size: 90%; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f6f8fa; }
tr:nth-child(2n) td { background: #fbfcfd; }
img { max-width: 100%; height: auto; }
code { background: #f6f8fa; padding: 0 .25em; border-radius: 3px; }
details { margin: .6em 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _markdown_parser():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table")


def _image_data_uri(src: str, base_dir: Path) -> str | None:
    """``src`` (a path relative to ``base_dir``) as a data URI; None when it is not a readable image inside
    ``base_dir`` (a URL, an absolute path elsewhere, a missing file, an unknown type)."""
    if not src or re.match(r"^[a-z][a-z0-9+.-]*:", src, re.IGNORECASE):  # http:, file:, data: ...
        return None
    root = base_dir.resolve()
    path = (root / src).resolve()
    mime = IMAGE_TYPES.get(path.suffix.lower())
    if mime is None or not path.is_relative_to(root) or not path.is_file():
        return None
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _make_self_contained(tokens: list[Any], base_dir: Path) -> None:
    """In place: inline the images, escape every raw HTML token the report did not write itself."""
    from markdown_it.common.utils import escapeHtml

    for token in tokens:
        if token.type == "html_block" and not _BLOCK_ALLOWED.fullmatch(token.content):
            token.content = f"<pre>{escapeHtml(token.content)}</pre>\n"
        for child in token.children or []:
            if child.type == "html_inline" and not _INLINE_ALLOWED.fullmatch(child.content):
                child.content = escapeHtml(child.content)
            elif child.type == "image":
                uri = _image_data_uri(str(child.attrGet("src") or ""), base_dir)
                if uri is not None:
                    child.attrSet("src", uri)
                else:
                    alt = "".join(c.content for c in child.children or [])
                    child.type, child.tag, child.children, child.attrs = "text", "", None, {}
                    child.content = f"[image not available: {alt or child.attrGet('src') or '?'}]"


def markdown_to_html(markdown: str, base_dir: Path, title: str = "alignpipe run report") -> str:
    """A complete HTML page for ``markdown`` whose relative image links are resolved under ``base_dir``."""
    from markdown_it.common.utils import escapeHtml

    parser = _markdown_parser()
    env: dict[str, Any] = {}
    tokens = parser.parse(markdown, env)
    _make_self_contained(tokens, Path(base_dir))
    body = parser.renderer.render(tokens, parser.options, env)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escapeHtml(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def write_html_report(markdown_path: Path, html_path: Path | None = None) -> Path:
    """Render ``report.md`` to ``report.html`` beside it (or ``html_path``); return the HTML's path."""
    from .manifest import atomic_write_text

    markdown_path = Path(markdown_path)
    text = markdown_path.read_text()
    first = next((line for line in text.splitlines() if line.startswith("# ")), "# alignpipe run report")
    html_path = Path(html_path) if html_path is not None else markdown_path.with_suffix(".html")
    atomic_write_text(html_path, markdown_to_html(text, markdown_path.parent, first[2:].strip()))
    return html_path
