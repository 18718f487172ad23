# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 — Curating pre-training data the way Llama 3 did
#
# "More data is not more intelligence": before training Llama 3, Meta removed duplicates (by URL, by
# document with MinHash, by line), ran heuristic filters (Gopher's repetition and quality rules, C4's,
# FineWeb's), counted dirty words, dropped documents full of outlier tokens, and scored the rest with
# quality classifiers. `llama3np.data.curation` builds each of those stages in a short file, with
# datatrove's names, thresholds and reason strings.
#
# We build a **web-like corpus** (real prose from the Bible, Shakespeare, the Jargon File, fortunes and
# Wikipedia when they are installed — `llama3np data corpus` says how — else prose from a grammar) mixed
# with junk of known kinds, run the pipeline, and look at: the funnel, the LSH S-curve, what each
# reason removed, and whether a tiny model trained on the curated text beats one trained on the raw text.
#
# `LLAMA3NP_NOTEBOOK_FAST=1` (the tests) uses a small generated corpus and a very short training run.

# %%
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from llama3np.data import curation
from llama3np.data.curation import minhash, report, sources, webcorpus
from llama3np.data.curation.cli import assemble_corpus
from llama3np.data.curation.evaluate import format_tables, read_labels, score_run
from llama3np.data.curation.pipeline import CurateConfig, curate
from llama3np.exercises import check

FAST = os.environ.get("LLAMA3NP_NOTEBOOK_FAST") == "1"
work = Path(tempfile.mkdtemp(prefix="curation_"))

# %% [markdown]
# ## 1. One filter, one reason
# Every filter is called as `filt(text) -> (keep, reason)`; the reason is datatrove's string.

# %%
rng = np.random.default_rng(0)
examples = {"prose": webcorpus.prose(rng), "spam": webcorpus.spam(rng), "log": webcorpus.log(rng),
            "lorem": webcorpus.lorem(rng), "boilerplate": webcorpus.boilerplate(rng)}
filters = [curation.GopherRepetitionFilter(), curation.GopherQualityFilter(), curation.C4QualityFilter(),
           curation.FineWebQualityFilter()]
for kind, text in examples.items():
    print(f"{kind:12s}", [f(text)[1] for f in filters])

# %% [markdown]
# ## 2. A labelled web-like corpus
# Real sources present on this machine (the rest can be installed with the command shown):

# %%
for name, (present, how) in sources.available_sources().items():
    print(f"{'[x]' if present else '[ ]'} {name:12s} {'' if present else how}")
n_docs = 150 if FAST else 3000
docs = assemble_corpus(work / "corpus", n_docs, seed=0, sources=[] if FAST else None,
                       heldout_docs=20 if FAST else 200)
print(Counter(d["metadata"]["kind"] for d in docs))

# %% [markdown]
# ## 3. The pipeline
# `llama3np data curate corpus.jsonl --out DIR --config curate_config.json` does the same. Every input
# document ends in exactly one of `kept/` and `removed/`, a removed one with the stage and the reason.

# %%
# one process here; `--workers N` (or `curate(..., workers=N)` from a script guarded by
# `if __name__ == "__main__":`) filters the shards in N processes with the same output
cfg = CurateConfig(**json.loads((work / "corpus" / "curate_config.json").read_text()), progress=False,
                   shard_size=100 if FAST else 500)
rep = curate(work / "corpus" / "corpus.jsonl", work / "out", cfg)
print(f"{rep['documents']} in, {rep['kept']} kept, {rep['removed']} removed")

# %% [markdown]
# ### Per kind and per reason
# `removed` is the recall of each kind of junk (for prose: what was lost); a kind's `precision` is how
# often the rules that removed it were right (each reason's precision, weighted by how many of the kind
# it removed). The confusion table has one row per stage/reason. On the 3,000-document corpus of real
# prose (`python benchmarks/curation_real_corpus.py`) every kind of junk is removed at >= 0.985 with
# precision >= 0.95; what prose is lost is lost to the heuristics' own thresholds on genuinely
# repetitive text (the Bible's genealogies and offerings, refrains, repeated stage directions).

# %%
print(format_tables(score_run(work / "out", read_labels(work / "corpus" / "labels.tsv"))))

# %% [markdown]
# ### The funnel: documents and tokens left after each stage

# %%
funnel = [(f["stage"], f["documents"], f["tokens"]) for f in rep["funnel"]]
report.plot_funnel(funnel)

# %% [markdown]
# ### The LSH S-curve
# Two documents of Jaccard similarity J share one of 14 bands of 8 MinHash rows with probability
# 1 - (1 - J^8)^14. The dots are the measured candidate rates of pairs from this corpus, binned by their
# estimated Jaccard.

# %%
report.plot_lsh_curve(rep["lsh_curve"])

# %% [markdown]
# ### What each reason removed (first 160 characters of one example)

# %%
removed = [json.loads(line) for f in sorted((work / "out" / "removed").glob("*.jsonl"))
           for line in f.read_text().splitlines()]
seen = set()
for d in removed:
    key = (d["metadata"]["removed_by"], d["metadata"]["reason"])
    if key not in seen:
        seen.add(key)
        print(f"--- {key[0]} / {key[1]}  (a {d['metadata'].get('kind')} document)")
        print(d["text"][:160].replace("\n", " | "))

# %% [markdown]
# ## 4. MinHash, measured
# The estimate of the Jaccard similarity from 112 hash functions has standard deviation sqrt(J(1-J)/112).

# %%
rng = np.random.default_rng(1)
js, est = [], []
for j in np.linspace(0.05, 0.95, 19):
    m, o = 200, int(round(400 * j / (1 + j)))
    for _ in range(10 if FAST else 50):
        u = rng.integers(0, 2**64, size=2 * m - o, dtype=np.uint64)
        sig = minhash.signatures_from_hashes(np.concatenate([u[:m], u[m - o:]]), np.array([0, m, 2 * m]))
        js.append(o / (2 * m - o)), est.append(minhash.estimated_jaccard(sig[0], sig[1]))
js, est = np.array(js), np.array(est)
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.scatter(js, est, s=4, alpha=0.4)
grid = np.linspace(0, 1, 100)
for k in (-3, 3):
    ax.plot(grid, grid + k * np.sqrt(grid * (1 - grid) / 112), "r--", lw=0.8)
ax.set_xlabel("exact Jaccard"), ax.set_ylabel("MinHash estimate")
print(f"within 3 sd: {np.mean(np.abs(est - js) <= 3 * np.sqrt(js * (1 - js) / 112)):.3f}")

# %% [markdown]
# ### Candidates are verified before they are joined
# At J = 0.5 about 5% of pairs share a band by chance; union-find would join their clusters, and a
# chain of such joins puts unrelated pages together. `minhash_clusters` keeps a candidate pair only if
# its 112 rows agree on >= 0.75 of the rows (`minhash.VERIFY_THRESHOLD`; the S-curve's own midpoint is
# (1/14)^(1/8) = 0.719).

# %%
for j in (0.5, 0.7, 0.8, 0.9):
    h, off, je = minhash.shingle_sets_with_jaccard(j, 200, 200, rng)
    sig = minhash.signatures_from_hashes(h, off)
    cand = minhash.candidate_pairs(sig)
    cand = cand[(cand[:, 0] % 2 == 0) & (cand[:, 1] == cand[:, 0] + 1)]  # the planted pairs (2k, 2k+1)
    kept = minhash.verified_pairs(sig, cand, minhash.VERIFY_THRESHOLD)
    print(f"J={je:.2f}: {len(cand) / 200:.3f} of the pairs are LSH candidates, {len(kept) / 200:.3f} after verification")

# %%
check("ex23")  # exercise: MinHash signatures

# %% [markdown]
# ## 5. The payoff
# The same tiny Llama 3, the same seed, the same tokenizer (a BPE trained on separate reference text) and
# the same number of training tokens, once on the raw corpus and once on the curated one; both scored on
# held-out clean text.

# %%
from llama3np.data.curation.payoff import plot_payoff, run_payoff  # noqa: E402

small = {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "hidden_dim": 96, "max_seq_len": 64}
result = run_payoff(work / "corpus", work / "out", steps=6 if FAST else 300, batch_size=4 if FAST else 8,
                    seq_len=64 if FAST else 128, vocab_size=600 if FAST else 2048,
                    model_overrides=small if FAST else None)
plot_payoff(result)
