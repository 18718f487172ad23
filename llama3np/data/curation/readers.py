"""Readers: plain text, JSONL and HTML files (or folders of them) -> Documents, in a fixed order.

Every input becomes documents; nothing is silently skipped. A file that is not UTF-8 or is binary
still yields one document with empty text and `metadata["reason"]` set ("not_utf8", "binary"), so the
pipeline counts it as a removal with a reason. A JSONL line that is not a JSON object with a string
`text` is an error naming the file and the line: that is a broken export, not a bad document.
"""
from pathlib import Path

from ..loader import TEXT_SUFFIXES, read_jsonl, split_on_separator
from .document import Document

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
HTML_SUFFIXES = (".html", ".htm")


def _suffix(path):
    name = path.name.lower()
    for s in JSONL_SUFFIXES + HTML_SUFFIXES + TEXT_SUFFIXES:
        if name.endswith(s):
            return s
    return None


def list_input_files(path):
    """A file, or every readable file under a folder (recursively, sorted by relative path)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        return [path]
    files = sorted((p for p in path.rglob("*") if p.is_file() and _suffix(p)), key=lambda p: p.as_posix())
    if not files:
        known = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + HTML_SUFFIXES)
        raise ValueError(f"no input files ({known}) found under {path}")
    return files


def _decode(raw):
    """bytes -> (text, reason): reason is "binary" (NUL bytes) or "not_utf8", else None."""
    if b"\x00" in raw:
        return "", "binary"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return "", "not_utf8"


def read_text_file(path, name):
    """A text file -> documents (one, or several split by lines holding only <|end_of_text|>)."""
    text, reason = _decode(Path(path).read_bytes())
    if reason:
        yield Document(id=f"{name}#0", text="", source=name, metadata={"reason": reason})
        return
    parts = split_on_separator(text)  # as the training loader splits a file
    for i, part in enumerate(parts):
        yield Document(id=f"{name}#{i}", text=part.strip("\n"), source=name)


def read_jsonl_file(path, name):
    """JSONL: one object per line with a string `text`; optional `id`, `url`, `metadata` (datatrove's
    and Hugging Face datasets' shape). Blank lines are skipped."""
    for lineno, d in read_jsonl(path):
        meta = d.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"{path}:{lineno}: 'metadata' must be a JSON object")
        doc_id = str(d["id"]) if "id" in d else f"{name}#{lineno}"
        yield Document(id=doc_id, text=d["text"], source=f"{name}:{lineno}", url=str(d.get("url") or ""),
                       metadata=dict(meta))


def html_to_text(html):
    """Main text of an HTML page by trafilatura (what FineWeb uses); "" when it finds none."""
    try:
        import trafilatura
    except ImportError as e:
        raise ImportError("reading HTML needs trafilatura, an optional dependency: "
                          "pip install trafilatura lxml_html_clean") from e
    return trafilatura.extract(html, include_comments=False, include_tables=False, favor_precision=True) or ""


def read_html_file(path, name):
    """An HTML page -> one document of its extracted main text (url from <link rel=canonical> if any)."""
    raw = Path(path).read_bytes()
    html, reason = _decode(raw)
    if reason:
        yield Document(id=f"{name}#0", text="", source=name, metadata={"reason": reason})
        return
    text = html_to_text(html)
    meta = {} if text.strip() else {"reason": "no_extracted_text"}
    yield Document(id=f"{name}#0", text=text, source=name, url=_canonical_url(html), metadata=meta)


def _canonical_url(html):
    import re

    m = re.search(r'<link[^>]+rel=["\']canonical["\'][^>]*href=["\']([^"\']+)', html, re.I)
    return m.group(1) if m else ""


def read_documents(path):
    """Every document under `path` (a file or a folder), in a fixed order: files sorted, then in order."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    for f in list_input_files(path):
        name = f.relative_to(root).as_posix()
        suffix = _suffix(f) or ".txt"  # a single file given by name is read as text whatever its suffix
        if suffix in JSONL_SUFFIXES:
            yield from read_jsonl_file(f, name)
        elif suffix in HTML_SUFFIXES:
            yield from read_html_file(f, name)
        else:
            yield from read_text_file(f, name)
