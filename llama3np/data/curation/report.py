"""The run's report: report.json (numbers), report.md (readable), funnel / score / S-curve plots."""
import json
from collections import Counter

import numpy as np

from ...fileio import atomic_write, atomic_write_bytes
from .minhash import candidate_probability
from .pipeline import EXTRA_COLUMNS


def plot_funnel(funnel):
    """Documents and tokens left after each stage (two bar charts side by side) -> Figure."""
    from matplotlib.figure import Figure

    names, docs, toks = zip(*funnel)
    fig = Figure(figsize=(11, 4))
    for ax, vals, label in ((fig.add_subplot(1, 2, 1), docs, "documents"), (fig.add_subplot(1, 2, 2), toks, "tokens")):
        ax.barh(range(len(names)), vals, color="tab:blue")
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel(f"{label} left after the stage")
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:,}", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def plot_scores(scores):
    """Histograms of the score stages (token KL, quality classifier) with their thresholds -> Figure."""
    from matplotlib.figure import Figure

    items = [(k, v) for k, v in scores.items() if isinstance(v, dict) and "scores" in v]
    fig = Figure(figsize=(5 * max(1, len(items)), 3.5))
    for n, (name, v) in enumerate(items, 1):
        ax = fig.add_subplot(1, len(items), n)
        ax.hist(v["scores"], bins=50, color="tab:gray")
        ax.axvline(v["threshold"], color="tab:red", label=f"threshold {v['threshold']:.3g}")
        ax.set_title(name)
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    return fig


def plot_lsh_curve(rates, num_bands=14, rows_per_band=8):
    """The S-curve 1-(1-J^r)^b with the measured candidate rates (by estimated Jaccard) -> Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    j = np.linspace(0, 1, 200)
    ax.plot(j, candidate_probability(j, num_bands, rows_per_band), label=f"1-(1-J^{rows_per_band})^{num_bands}")
    if rates:
        mid = [(r["j_lo"] + r["j_hi"]) / 2 for r in rates]
        ax.scatter(mid, [r["candidate_rate"] for r in rates], color="tab:red", zorder=3,
                   s=[10 + 30 * np.log10(r["pairs"]) for r in rates], label="measured (pairs binned by est. J)")
    ax.set_xlabel("Jaccard similarity")
    ax.set_ylabel("P(candidate pair)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def write_report(out, cfg, decisions, n_kept, n_removed):
    """decisions: pipeline.step_global's (removed codes into `codes`, the score columns, funnel, scores)."""
    codes, removed = decisions["codes"], np.asarray(decisions["removed"])
    reasons = Counter({f"{codes[c][0]}/{codes[c][1]}": int(v) for c, v in enumerate(np.bincount(removed))
                       if c and v})
    # the score histograms: each score stage's column over the documents it scored, with its threshold
    # (the stages with a threshold in decisions["scores"]: token_kl, quality_classifier)
    columns = dict(EXTRA_COLUMNS)
    hists = {k: {"scores": decisions[columns[k]][~np.isnan(decisions[columns[k]])], "threshold": v["threshold"]}
             for k, v in decisions["scores"].items() if k in columns}
    report = {"documents": len(removed), "kept": n_kept, "removed": n_removed,
              "removed_by_reason": dict(sorted(reasons.items())),
              "funnel": [{"stage": s, "documents": d, "tokens": t} for s, d, t in decisions["funnel"]],
              "stages": list(cfg.stages), "params": cfg.params,
              "thresholds": {k: v["threshold"] for k, v in decisions["scores"].items()
                             if isinstance(v, dict) and "threshold" in v},
              "lsh_curve": decisions["scores"].get("lsh_curve", [])}
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    lines = ["# Curation report", "", f"{len(removed):,} documents in, {n_kept:,} kept, {n_removed:,} removed.", "",
             "| stage | documents left | tokens left |", "| --- | ---: | ---: |"]
    lines += [f"| {s} | {d:,} | {t:,} |" for s, d, t in decisions["funnel"]]
    lines += ["", "| removed by / reason | documents |", "| --- | ---: |"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(reasons.items())]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    _save(plot_funnel(decisions["funnel"]), out / "funnel.png")
    if hists:
        _save(plot_scores(hists), out / "scores.png")
    mh = cfg.params.get("minhash", {})
    _save(plot_lsh_curve(report["lsh_curve"], mh.get("num_bands", 14), mh.get("rows_per_band", 8)),
          out / "lsh_curve.png")
    return report
