"""Writers: documents -> JSONL shards, each written atomically (a killed run leaves no half shard)."""
import json
from pathlib import Path

from ...fileio import atomic_write_bytes
from .document import Document


def write_jsonl(path, docs):
    """Write documents (Document or dict) as one JSON object per line, atomically."""
    lines = [json.dumps(d.to_json() if isinstance(d, Document) else d, ensure_ascii=False) for d in docs]
    atomic_write_bytes(Path(path), ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))


def read_jsonl(path):
    """JSONL written by write_jsonl -> list of Documents."""
    with open(path, encoding="utf-8") as f:
        return [Document.from_json(json.loads(line)) for line in f if line.strip()]


def write_shards(folder, docs, shard_size, prefix):
    """docs -> folder/prefix_00000.jsonl, ... of at most shard_size documents; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, max(len(docs), 1), shard_size):
        p = folder / f"{prefix}_{k // shard_size:05d}.jsonl"
        write_jsonl(p, docs[k:k + shard_size])
        paths.append(p)
    return paths
