"""Exact and URL deduplication: the first document with a given normalised text (or URL) is kept.

Text: a hash of simplify_text(text), so copies that differ only in case, spacing, punctuation or
digits count as one. URL: lowercased scheme and host, no "www.", no fragment, no default port, no
trailing slash, query parameters sorted and tracking parameters (utm_*, fbclid, gclid) dropped.
"""
import hashlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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


def first_occurrences(keys):
    """keys (in document order; "" = no key) -> list of bools: True for the first of each key."""
    seen, keep = set(), []
    for k in keys:
        keep.append(not k or k not in seen)
        if k:
            seen.add(k)
    return keep
