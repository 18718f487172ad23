"""Line-level dedup (ccNet; Llama 3 section 3.1.1): in each bucket of documents, a line that occurs
more than `max_count` times (6 in Llama 3, over buckets of 30M documents) is removed everywhere in the
bucket. It strips boilerplate that near-duplicate detection misses: cookie banners, navigation menus,
"share this" lines, repeated across otherwise different pages.

Lines are compared after simplify_text; blank lines are never counted. A document whose every line
goes is removed by the pipeline (reason `line_dedup_empty`).
"""
from collections import Counter

from .text import simplify_text


def line_counts(texts):
    """Counter of normalised line -> number of documents that hold it (a line twice in one document
    counts once: the point is lines shared across pages)."""
    counts = Counter()
    for t in texts:
        counts.update({simplify_text(line) for line in t.split("\n")} - {""})
    return counts


def dedup_lines(texts, max_count=6):
    """-> (new texts, lines removed per text): drop every line seen in more than max_count documents."""
    counts = line_counts(texts)
    out, removed = [], []
    for t in texts:
        kept, n = [], 0
        for line in t.split("\n"):
            key = simplify_text(line)
            if key and counts[key] > max_count:
                n += 1
            else:
                kept.append(line)
        out.append("\n".join(kept).strip("\n"))
        removed.append(n)
    return out, removed


def dedup_lines_in_buckets(texts, bucket_size, max_count=6):
    """dedup_lines over consecutive buckets of bucket_size documents (each bucket on its own)."""
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    out, removed = [], []
    for b in range(0, len(texts), bucket_size):
        o, r = dedup_lines(texts[b:b + bucket_size], max_count)
        out += o
        removed += r
    return out, removed
