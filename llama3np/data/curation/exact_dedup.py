"""Exact and URL deduplication: the first document with a given normalised text (or URL) is kept.

Text: a hash of simplify_text(text), so copies that differ only in case, spacing, punctuation or
digits count as one. URL: lowercased scheme and host, no "www.", no fragment, no default port, no
trailing slash, query parameters sorted and tracking parameters (utm_*, fbclid, gclid) dropped.
"""
import hashlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from .text import simplify_text

TRACKING_PARAMS = ("fbclid", "gclid", "ref", "source")


def text_hash(text):
    """A 16-hex-digit hash of the normalised text (equal for copies up to case/spacing/punctuation)."""
    return hashlib.blake2b(simplify_text(text).encode(), digest_size=8).hexdigest()


def normalize_url(url):
    """"HTTP://www.Example.com:80/a/?b=2&a=1&utm_source=x#top" -> "http://example.com/a?a=1&b=2"."""
    url = url.strip()
    if not url:
        return ""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    host = host[4:] if host.startswith("www.") else host
    port = parts.port
    if port and not (scheme, port) in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    path = parts.path.rstrip("/")
    query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                   if not k.lower().startswith("utm_") and k.lower() not in TRACKING_PARAMS)
    return urlunsplit((scheme, host, path, urlencode(query), ""))


def first_occurrences(keys, has_key=None):
    """(N,) keys in document order, (N,) bool has_key -> (N,) bool: True for the first document of each key
    and for those without one. has_key defaults to "the key is not empty" ("" or 0)."""
    keys = np.asarray(keys)
    if has_key is None:
        has_key = keys != keys.dtype.type()
    keep = np.ones(len(keys), dtype=bool)
    idx = np.flatnonzero(has_key)
    _, first = np.unique(keys[idx], return_index=True)  # index of each key's first occurrence
    keep[idx] = False
    keep[idx[first]] = True
    return keep
