"""Scoring a curation run against the web-like corpus's labels: a confusion table and per-kind figures.

recall(kind)    = fraction of that kind's documents removed (by any stage; for prose: wrongly removed)
precision       = fraction of the removed documents that were junk (not prose)
precision(stage)= fraction of one stage's removals that were junk
"""
import json
from collections import Counter, defaultdict
from pathlib import Path


def read_labels(path):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return dict(line.split("\t") for line in lines[1:] if line.strip())


def read_outcomes(out):
    """{id: None (kept) or (stage, reason)} from a run's kept/ and removed/ folders."""
    res = {}
    for folder, removed in (("kept", False), ("removed", True)):
        for f in sorted((Path(out) / folder).glob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                d = json.loads(line)
                res[d["id"]] = (d["metadata"]["removed_by"], d["metadata"]["reason"]) if removed else None
    return res


def score_run(out, labels, clean_kind="prose"):
    """-> dict with per-kind recall, overall and per-stage precision, and the confusion table
    {kind: {stage/reason or "kept": count}}."""
    outcomes = read_outcomes(out)
    missing = set(labels) - set(outcomes)
    if missing:
        raise ValueError(f"{len(missing)} labelled documents are in neither kept/ nor removed/ "
                         f"(e.g. {sorted(missing)[:3]})")
    table = defaultdict(Counter)
    for i, kind in labels.items():
        o = outcomes[i]
        table[kind]["kept" if o is None else f"{o[0]}/{o[1]}"] += 1
    recall = {k: 1.0 - c["kept"] / sum(c.values()) for k, c in table.items()}
    removed = [(labels[i], o[0]) for i, o in outcomes.items() if o is not None and i in labels]
    precision = sum(k != clean_kind for k, _ in removed) / max(1, len(removed))
    by_stage = defaultdict(list)
    for k, stage in removed:
        by_stage[stage].append(k != clean_kind)
    return {"recall": dict(sorted(recall.items())), "precision": precision,
            "precision_by_stage": {s: sum(v) / len(v) for s, v in sorted(by_stage.items())},
            "confusion": {k: dict(sorted(c.items())) for k, c in sorted(table.items())}}


def format_score(score):
    lines = [f"precision (removed that were junk): {score['precision']:.3f}"]
    lines += [f"  stage {s:20s} precision {p:.3f}" for s, p in score["precision_by_stage"].items()]
    lines += [f"  kind {k:16s} removed {r:.3f}  {score['confusion'][k]}" for k, r in score["recall"].items()]
    return "\n".join(lines)
