"""Self-contained HTML reports: small pure functions that build one page per analysis.

Every script that writes a folder of results (analyze, truncation_sweep, faithfulness, evaluate) also
writes a ``report.html``: figures embedded as base64 PNG (``<img src="data:image/png;base64,...">``),
the numbers in HTML tables, the settings, the model and the prompt as the tokenizer cut it. The page
has no external file, script, font or style sheet: it can be mailed or archived alone.

Everything given to these functions is escaped (``esc``) unless it is wrapped in ``Raw`` (HTML built
by these functions themselves), so a question such as ``<script>alert(1)</script>`` is shown as text.

Tokens (``token_views``): the prompt's ids are shown one token each; a run of image tokens is collapsed
to one marker ``[image: 576 tokens]``; a token equal to the tokenizer's ``unk_token_id`` is flagged
(``class="tok unk"``, a red frame), and ``unknown_words`` names the words of a text that became it
("words the tokenizer does not know").
"""
from __future__ import annotations

import base64
import dataclasses
import html
import math
import os

import numpy as np

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1200px;
 padding:0 1em;color:#1d1d1f;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:.2em;
 margin-top:1.8em}h3{font-size:1.05em;margin-top:1.3em}
.sub{color:#555;margin-top:0}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #d0d0d0;padding:.2em .5em;text-align:right;vertical-align:top}
th{background:#f2f2f2}td.l,th.l{text-align:left}
tr.hl td{background:#fff4d6}
table.kv td:first-child{font-weight:600;text-align:left;background:#fafafa}table.kv td{text-align:left}
figure{margin:.8em 0}figure img{max-width:100%;border:1px solid #e0e0e0}
figcaption{font-size:.85em;color:#555}
.toks{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;line-height:2}
.tok{display:inline-block;border:1px solid #c8c8c8;border-radius:3px;padding:0 .25em;margin:0 .1em;
 background:#fafafa;white-space:pre}
.tok.img{background:#e3efff;border-color:#7aa7e8;font-weight:600}
.tok.ans{background:#e7f7e7;border-color:#79b979}
.tok.special{color:#777}
.tok.unk{background:#ffe3e3;border:2px solid #d00;color:#a00;font-weight:700}
.note{border-left:4px solid #e0a000;background:#fff8e6;padding:.4em .8em;margin:.6em 0}
.note.err{border-color:#d00;background:#ffefef}
.note.ok{border-color:#2a2;background:#effbef}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
nav a{margin-right:.8em}
"""


class Raw(str):
    """HTML that these functions built: inserted as it is (everything else is escaped)."""


def esc(value) -> str:
    """Text (any value, via str) -> HTML-escaped text (quotes too); Raw passes unchanged."""
    if isinstance(value, Raw):
        return str(value)
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value, digits: int = 4) -> str:
    """A number for a table cell: floats with `digits` decimals (tiny or huge ones in e-notation),
    NaN / inf spelled out, None as an en dash; everything else via str."""
    if value is None:
        return "\u2013"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e6):
            return f"{v:.{max(digits - 1, 1)}e}"
        return f"{v:.{digits}f}"
    return str(value)


def png_data_uri(png) -> str:
    """PNG bytes or a PNG file's path -> a data: URI."""
    if isinstance(png, (str, os.PathLike)):
        with open(png, "rb") as f:
            png = f.read()
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")


def figure(png, caption: str = "", alt: str | None = None) -> Raw:
    """An embedded PNG (bytes or a path) with an optional caption."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return Raw(f'<figure><img src="{png_data_uri(png)}" alt="{esc(alt if alt is not None else caption)}">{cap}'
               "</figure>")


def table(header, rows, *, left=(), highlight=(), caption: str | None = None, cls: str = "") -> Raw:
    """An HTML table: `header` (column names), `rows` (sequences of cells; numbers go through `fmt`,
    Raw cells are kept, everything else is escaped). `left`: column indices aligned left (text);
    `highlight`: row indices drawn highlighted."""
    left, highlight = set(left), set(highlight)

    def cell(tag, j, v):
        text = esc(v) if isinstance(v, str) else esc(fmt(v))
        align = ' class="l"' if j in left else ""
        return f"<{tag}{align}>{text}</{tag}>"

    out = [f'<table class="{esc(cls)}">' if cls else "<table>"]
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append("<tr>" + "".join(cell("th", j, h if isinstance(h, str) else str(h)) for j, h in enumerate(header))
               + "</tr>")
    for i, r in enumerate(rows):
        hl = ' class="hl"' if i in highlight else ""
        out.append(f"<tr{hl}>" + "".join(cell("td", j, v) for j, v in enumerate(r)) + "</tr>")
    out.append("</table>")
    return Raw("".join(out))


def kv_table(pairs, header=("setting", "value")) -> Raw:
    """Name / value rows (a dict or (name, value) pairs): settings, the model. Lists are joined with
    commas, None shown as an en dash."""
    items = pairs.items() if isinstance(pairs, dict) else pairs
    rows = []
    for k, v in items:
        if isinstance(v, (list, tuple)):
            v = ", ".join(fmt(x) if not isinstance(x, str) else x for x in v) if v else "(none)"
        rows.append((str(k), v if isinstance(v, (str, Raw)) else fmt(v)))
    return table(header, rows, left=(0, 1), cls="kv")


def note(text, kind: str = "warn") -> Raw:
    """A highlighted paragraph: kind "warn" (amber), "err" (red) or "ok" (green)."""
    return Raw(f'<div class="note {esc(kind)}">{esc(text)}</div>')


def para(text) -> Raw:
    return Raw(f"<p>{esc(text)}</p>")


def section(title, *parts, anchor: str | None = None, level: int = 2) -> Raw:
    """A heading and its content (Raw parts kept, text parts escaped as paragraphs)."""
    body = "".join(p if isinstance(p, Raw) else para(p) for p in parts if p is not None)
    aid = f' id="{esc(anchor)}"' if anchor else ""
    return Raw(f"<section{aid}><h{level}>{esc(title)}</h{level}>{body}</section>")


def link(text, anchor: str) -> Raw:
    return Raw(f'<a href="#{esc(anchor)}">{esc(text)}</a>')


def page(title, *parts, subtitle: str | None = None) -> str:
    """A whole self-contained HTML document."""
    body = "".join(p if isinstance(p, Raw) else para(p) for p in parts if p is not None)
    sub = f'<p class="sub">{esc(subtitle)}</p>' if subtitle else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>{sub}{body}</body></html>\n")


def write_html(path: str, document: str) -> str:
    """Writes a page atomically (a temporary file renamed into place); returns path."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(document)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- the model


def model_facts(bundle, checkpoint=None) -> dict:
    """What the report says about the model: name, family, decoder layers, dtype, checkpoint, template,
    image tokens per image (where fixed)."""
    cfg = bundle.config
    try:
        dtype = str(np.dtype(bundle.model.dtype))
    except (AttributeError, TypeError):
        dtype = "unknown"
    facts = {"name": bundle.name, "family": bundle.family, "decoder layers": int(cfg.text.num_layers),
             "dtype": dtype,
             "checkpoint": "the embedded toy model" if checkpoint is None else os.path.abspath(os.fspath(checkpoint)),
             "prompt template": bundle.template}
    n = getattr(cfg, "num_image_tokens", None)
    if isinstance(n, (int, np.integer)) and n > 0:
        facts["image tokens per image"] = int(n)
    return facts


# --------------------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True)
class TokenView:
    """One shown token: kind "text", "special", "image" (a collapsed run of `count` image tokens),
    "unk" (the tokenizer's unknown token) or "answer" (a teacher-forced answer token)."""
    kind: str
    text: str
    id: int
    count: int = 1


def _token_text(tokenizer, tid: int) -> str:
    try:
        t = tokenizer.convert_ids_to_tokens(int(tid))
    except Exception:  # noqa: BLE001 - a tokenizer without the method: show the id
        t = None
    if t is None:
        return f"#{int(tid)}"
    if isinstance(t, bytes):
        t = t.decode("utf-8", "backslashreplace")
    return str(t).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def token_views(tokenizer, ids, *, image_token_id: int, attention_mask=None, answer_mask=None) -> list[TokenView]:
    """One row's ids (padding dropped by `attention_mask`) -> the tokens to show, each run of image
    tokens collapsed to one view of kind "image"."""
    ids = np.asarray(ids).reshape(-1)
    keep = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).reshape(-1) > 0
    ans = np.zeros(ids.shape, bool) if answer_mask is None else np.asarray(answer_mask).reshape(-1).astype(bool)
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(int(s) for s in (getattr(tokenizer, "all_special_ids", None) or ()))
    out: list[TokenView] = []
    for tid, k, a in zip(ids.tolist(), keep.tolist(), ans.tolist()):
        if not k:
            continue
        if tid == image_token_id:
            if out and out[-1].kind == "image":
                out[-1] = dataclasses.replace(out[-1], count=out[-1].count + 1)
            else:
                out.append(TokenView("image", "", tid, 1))
            continue
        if unk is not None and tid == unk:
            kind = "unk"
        elif a:
            kind = "answer"
        elif tid in special:
            kind = "special"
        else:
            kind = "text"
        out.append(TokenView(kind, _token_text(tokenizer, tid), tid))
    return out


def tokens_html(views) -> Raw:
    """The tokens as framed spans; an image run as one marker "[image: N tokens]"."""
    parts = []
    for v in views:
        if v.kind == "image":
            parts.append(f'<span class="tok img" title="image token id {v.id}">[image: {v.count} '
                         f'token{"s" if v.count != 1 else ""}]</span>')
        elif v.kind == "unk":
            parts.append(f'<span class="tok unk" title="id {v.id}: the tokenizer\'s unknown token">'
                         f"{esc(v.text)} \u26a0</span>")
        else:
            cls = {"answer": "tok ans", "special": "tok special"}.get(v.kind, "tok")
            parts.append(f'<span class="{cls}" title="id {v.id}">{esc(v.text)}</span>')
    return Raw(f'<div class="toks">{" ".join(parts)}</div>')


def unknown_words(tokenizer, text: str) -> list[str]:
    """The pieces of `text` that the tokenizer maps to its unknown token (in order, without repeats);
    [] when it has no unknown token. Uses the fast tokenizer's offsets, else tokenises word by word."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return []
    found: list[str] = []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if tid == unk:
                found.append(text[a:b].strip() or repr(text[a:b]))
    except (NotImplementedError, TypeError, ValueError, KeyError):
        for word in text.split():
            if unk in tokenizer(word, add_special_tokens=False)["input_ids"]:
                found.append(word)
    return list(dict.fromkeys(found))


def prompt_html(tokenizer, ids, *, image_token_id: int, attention_mask=None, answer_mask=None, texts=()) -> Raw:
    """The prompt as tokenised (`token_views`) with a legend, and a warning naming the words of
    `texts` (the question, a given answer) that the tokenizer does not know."""
    views = token_views(tokenizer, ids, image_token_id=image_token_id, attention_mask=attention_mask,
                        answer_mask=answer_mask)
    n_tok = sum(v.count for v in views)
    n_img = sum(v.count for v in views if v.kind == "image")
    unknown = list(dict.fromkeys(w for t in texts for w in unknown_words(tokenizer, t)))
    n_unk = sum(1 for v in views if v.kind == "unk")
    legend = (f"{n_tok} tokens ({n_img} image tokens, shown as one marker per image)"
              + ("; answer tokens (teacher-forced) in green" if any(v.kind == "answer" for v in views) else "")
              + (f"; {n_unk} unknown token{'s' if n_unk != 1 else ''} framed in red" if n_unk else ""))
    parts = [tokens_html(views), Raw(f'<p class="sub">{esc(legend)}</p>')]
    if unknown:
        parts.append(note("words the tokenizer does not know (each became its unknown token "
                          f"{_token_text(tokenizer, tokenizer.unk_token_id)!s}, so the model did not read them): "
                          + ", ".join(repr(w) for w in unknown), "err"))
    elif n_unk:
        parts.append(note(f"{n_unk} token(s) are the tokenizer's unknown token", "err"))
    return Raw("".join(parts))


def unknown_words_table(tokenizer, texts, *, limit: int = 50) -> Raw | None:
    """Over many texts (a data set's questions): each unknown word with the number of texts holding
    it, most frequent first (None when every word is known)."""
    counts: dict[str, int] = {}
    for t in texts:
        for w in unknown_words(tokenizer, t):
            counts[w] = counts.get(w, 0) + 1
    if not counts:
        return None
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = rows[:limit]
    more = f" (the first {limit} of {len(rows)})" if len(rows) > limit else ""
    return Raw(note(f"words the tokenizer does not know: {len(rows)} distinct{more}; each became its unknown token",
                    "err") + table(("word", "texts holding it"), shown, left=(0,)))


__all__ = ["CSS", "Raw", "esc", "fmt", "png_data_uri", "figure", "table", "kv_table", "note", "para", "section",
           "link", "page", "write_html", "model_facts", "TokenView", "token_views", "tokens_html", "unknown_words",
           "prompt_html", "unknown_words_table"]
