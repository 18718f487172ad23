"""Scoring a curation run against the web-like corpus's labels: a confusion table and per-kind figures.

recall(kind)     = fraction of that kind's documents removed (by any stage; for prose: wrongly removed)
precision        = fraction of the removed documents that were junk (not prose)
precision(stage) = fraction of one stage's removals that were junk; precision(reason) the same per reason
precision(kind)  = how often the rules that removed this kind were right: the precision of each reason,
                   weighted by how many documents of the kind it removed. A reason that removes spam and
                   as many prose pages has precision 0.5, and so has spam caught by it. (A kind has no
                   precision of its own: a removal does not say which kind of junk it thought it saw.)
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
    removed = [(labels[i], o) for i, o in outcomes.items() if o is not None and i in labels]
    precision = sum(k != clean_kind for k, _ in removed) / max(1, len(removed))
    by_stage, by_reason = defaultdict(list), defaultdict(list)
    for k, (stage, reason) in removed:
        by_stage[stage].append(k != clean_kind)
        by_reason[f"{stage}/{reason}"].append(k != clean_kind)
    p_reason = {r: sum(v) / len(v) for r, v in sorted(by_reason.items())}
    p_kind = {}
    for k, c in table.items():
        n_removed = sum(v for r, v in c.items() if r != "kept")
        if k != clean_kind and n_removed:
            p_kind[k] = sum(v * p_reason[r] for r, v in c.items() if r != "kept") / n_removed
    return {"recall": dict(sorted(recall.items())), "precision": precision,
            "precision_by_stage": {s: sum(v) / len(v) for s, v in sorted(by_stage.items())},
            "precision_by_reason": p_reason, "precision_by_kind": dict(sorted(p_kind.items())),
            "confusion": {k: dict(sorted(c.items())) for k, c in sorted(table.items())}}


def format_tables(score):
    """The per-kind table (documents, removed = recall, precision) and the confusion table by reason
    (rows: kinds; columns: stage/reason and kept; last row: each reason's precision) as text."""
    conf = score["confusion"]
    lines = [f"{'kind':16s} {'docs':>5s} {'removed':>8s} {'precision':>9s}"]
    for k, c in conf.items():
        p = score["precision_by_kind"].get(k)
        lines.append(f"{k:16s} {sum(c.values()):5d} {score['recall'][k]:8.3f} {'' if p is None else f'{p:9.3f}'}")
    lines.append(f"{'all junk':16s} {'':5s} {'':8s} {score['precision']:9.3f}   (removed documents that were junk)")
    reasons = list(score["precision_by_reason"]) + ["kept"]
    kinds = list(conf)
    w = max(len(r) for r in reasons)
    lines += ["", "confusion by reason (rows: stage/reason; columns: label; last column: the reason's precision)",
              f"  {'':{w}s} " + " ".join(f"{k[:9]:>9s}" for k in kinds) + f" {'precision':>9s}"]
    for r in reasons:
        p = score["precision_by_reason"].get(r)
        lines.append(f"  {r:{w}s} " + " ".join(f"{conf[k].get(r, 0) or '.':>9}" for k in kinds)
                     + ("" if p is None else f" {p:9.3f}"))
    return "\n".join(lines)
