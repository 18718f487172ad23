"""Benchmark and measurements for data curation: MinHash/LSH accuracy, speed beside datasketch and
datatrove, and the memory of signatures over a large corpus.

    python benchmarks/bench_curation.py [--docs 2500] [--pairs 2000] [--speed-docs 1000] [--rss-mb 200]

Prints, one section each:
  1. estimated Jaccard within 3 sd of the exact value (fraction of pairs; goal >= 0.99);
  2. LSH candidate rate at J in {0.3, 0.5, 0.6, 0.7, 0.8, 0.9} against 1 - (1 - J^8)^14 with the
     exact 95% binomial interval;
  3. end to end on --docs documents with planted near-duplicates against an exact all-pairs Jaccard
     oracle: recall of pairs with J >= 0.85 put in one cluster (goal >= 0.95), and precision of the
     pairs put in one cluster at several Jaccard cut-offs (goal >= 0.95 at J >= 0.7), with LSH
     candidates verified by estimated Jaccard (minhash_clusters) and, for comparison, unverified;
  4. documents per second: our MinHash + LSH vs datasketch (same 112 permutations, the same shingles,
     MinHashLSH with 14 bands x 8 rows), with each side's estimation error; our four heuristic filters
     vs datatrove's (the same documents, one process each);
  5. peak RSS while computing signatures for --rss-mb MB of text, streamed in chunks (only the
     signatures are kept: 896 bytes per document); --only-memory runs this section alone;
  6. with --pipeline-mb N: the whole pipeline (`llama3np data curate`, exact dedup, MinHash, line
     dedup, token KL) on N MB of generated text in a child process, and that process's peak RSS
     (the global stage streams texts; per-document records and signatures stay in memory);
     --only-pipeline runs this section alone.
Datasketch and datatrove are optional; their columns are skipped with the reason when absent.
"""
import _env

_env.clean_blas_env()

import argparse  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from llama3np.data.curation import minhash, webcorpus  # noqa: E402
from llama3np.data.curation.c4_quality import C4QualityFilter  # noqa: E402
from llama3np.data.curation.fineweb_quality import FineWebQualityFilter  # noqa: E402
from llama3np.data.curation.gopher_quality import GopherQualityFilter  # noqa: E402
from llama3np.data.curation.gopher_repetition import GopherRepetitionFilter  # noqa: E402

JS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)


def binomial_interval(n, p, level=0.95):
    """The central `level` interval [lo, hi] of Binomial(n, p) counts."""
    from scipy.stats import binom

    return binom.ppf((1 - level) / 2, n, p), binom.ppf(1 - (1 - level) / 2, n, p)


def section_statistics(n_pairs, rng):
    print("== 1. estimated Jaccard vs exact (112 hash functions)")
    within = []
    for j in (0.1, 0.3, 0.5, 0.7, 0.9, 0.97):
        h, off, je = minhash.shingle_sets_with_jaccard(j, n_pairs // 2, 200, rng)
        sig = minhash.signatures_from_hashes(h, off)
        est = minhash.estimated_jaccard(sig[0::2], sig[1::2])
        w = np.abs(est - je) <= 3 * math.sqrt(je * (1 - je) / 112)
        within.append(w)
        print(f"   J={je:.3f}: mean estimate {est.mean():.4f}, sd {est.std():.4f} "
              f"(theory {math.sqrt(je * (1 - je) / 112):.4f}),"
              f" within 3 sd {w.mean():.4f}")
    print(f"   all {sum(map(len, within))} pairs: within 3 sd {np.mean(np.concatenate(within)):.4f} (goal >= 0.99)")
    print("== 2. LSH candidate rate vs 1-(1-J^8)^14, 14 bands x 8 rows")
    for j in JS:
        h, off, je = minhash.shingle_sets_with_jaccard(j, n_pairs, 200, rng)
        keys = minhash.band_keys(minhash.signatures_from_hashes(h, off))
        k = int(np.any(keys[0::2] == keys[1::2], axis=1).sum())
        p = float(minhash.candidate_probability(je))
        lo, hi = binomial_interval(n_pairs, p)
        print(f"   J={je:.3f}: measured {k / n_pairs:.4f} ({k}/{n_pairs}), theory {p:.4f}, "
              f"95% interval [{lo / n_pairs:.4f}, {hi / n_pairs:.4f}] -> {'inside' if lo <= k <= hi else 'OUTSIDE'}")


def planted_corpus(n_docs, rng):
    """Originals from the grammar plus near-copies with 0.5%..15% of words replaced."""
    n_orig = int(n_docs * 0.6)
    texts = [webcorpus.prose(rng) for _ in range(n_orig)]
    while len(texts) < n_docs:
        src = texts[int(rng.integers(n_orig))]
        texts.append(webcorpus.near_duplicate(rng, src, float(rng.choice([0.005, 0.01, 0.02, 0.04, 0.08, 0.15]))))
    return texts


def exact_jaccard_all_pairs(texts, ngram=5):
    """(N, N) exact Jaccard of the shingle sets (sparse incidence matrix products)."""
    from scipy import sparse

    hashes, offsets = minhash.shingle_hashes(texts, ngram)
    rows, cols = [], []
    for i in range(len(texts)):
        u = np.unique(hashes[offsets[i]:offsets[i + 1]])
        rows.append(np.full(len(u), i)), cols.append(u)
    cols = np.concatenate(cols)
    uniq, col_ids = np.unique(cols, return_inverse=True)
    A = sparse.csr_matrix((np.ones(len(cols)), (np.concatenate(rows), col_ids)), shape=(len(texts), len(uniq)))
    inter = (A @ A.T).toarray()
    size = np.asarray(A.sum(axis=1)).ravel()
    return inter / (size[:, None] + size[None, :] - inter)


def section_end_to_end(n_docs, rng):
    print(f"== 3. end to end on {n_docs} documents with planted near-duplicates, against exact all-pairs Jaccard")
    texts = planted_corpus(n_docs, rng)
    t = time.perf_counter()
    cl = minhash.minhash_clusters(texts)
    print(f"   minhash_clusters: {time.perf_counter() - t:.2f}s, {len(set(cl.tolist()))} clusters; candidates "
          f"verified at estimated Jaccard >= {minhash.VERIFY_THRESHOLD}")
    J = exact_jaccard_all_pairs(texts)
    iu = np.triu_indices(n_docs, k=1)
    jv = J[iu]
    sig = minhash.signatures(texts)
    edges = minhash.candidate_pairs(sig)
    for name, thr in (("unverified (every LSH candidate)", 0.0),
                      (f"verified at the LSH threshold (1/14)^(1/8) = {minhash.lsh_threshold():.3f}",
                       minhash.lsh_threshold()),
                      (f"verified at {minhash.VERIFY_THRESHOLD} (minhash_clusters)", minhash.VERIFY_THRESHOLD)):
        c = minhash.clusters_from_signatures(sig, threshold=thr)
        assert thr != minhash.VERIFY_THRESHOLD or np.array_equal(c, cl)
        same = (c[:, None] == c[None, :])[iu]
        e = minhash.verified_pairs(sig, edges, thr)
        print(f"   {name}:")
        for lo in (0.85, 0.9, 0.95):
            m = jv >= lo
            print(f"     recall  (pairs with J >= {lo} in one cluster): {same[m].mean():.4f} of {m.sum()} pairs")
        for lo in (0.5, 0.6, 0.7):
            print(f"     precision (one-cluster pairs with J >= {lo}): {(jv[same] >= lo).mean():.4f} of {same.sum()} pairs")
        print(f"     precision (joined candidate pairs with J >= 0.7): {(J[e[:, 0], e[:, 1]] >= 0.7).mean():.4f} "
              f"of {len(e)} pairs")
        # document-level, as the pipeline uses it: a removed document's Jaccard with its cluster's kept one
        removed = np.flatnonzero(c != np.arange(n_docs))
        jr = J[removed, c[removed]]
        print(f"     removed documents: {len(removed)}; Jaccard with the kept one >= 0.7: {(jr >= 0.7).mean():.4f}, "
              f">= 0.5: {(jr >= 0.5).mean():.4f}")
    return texts


def section_speed(texts, n_docs):
    print(f"== 4. speed: {n_docs} documents, one process each")
    texts = texts[:n_docs]

    def ours():
        return minhash.minhash_clusters(texts)

    times = {"ours: MinHash + LSH + union-find (text in)": ours}
    try:
        from datasketch import MinHash, MinHashLSH

        from llama3np.data.curation.text import simplify_text

        def theirs():
            lsh = MinHashLSH(num_perm=112, params=(14, 8))
            mhs = []
            for i, t in enumerate(texts):
                w = simplify_text(t).split()  # the same shingling as ours, so only the hashing differs
                sh = [" ".join(w[k:k + 5]).encode() for k in range(max(1, len(w) - 4))]
                m = MinHash(num_perm=112, seed=1)
                m.update_batch(sh)
                lsh.insert(i, m)
                mhs.append(m)
            return mhs

        times["datasketch: MinHash + MinHashLSH insert (text in)"] = theirs
    except ImportError:
        print("   datasketch not installed (pip install datasketch): its column is skipped")
    best = {k: _env.best_of(f, repeat=2, warmup=0) for k, f in times.items()}
    for k, s in best.items():
        print(f"   {k:55s} {len(texts) / s:10.0f} docs/s")
    if len(best) == 2:
        a, b = best.values()
        print(f"   ours / datasketch speed: {b / a:.2f}x")
    dup = np.flatnonzero(minhash.minhash_clusters(texts) != np.arange(len(texts)))[:300]
    if len(best) == 2 and len(dup):
        # accuracy of each on up to 300 pairs of near-copies (a document and its cluster's first one)
        idx = np.stack([dup, minhash.minhash_clusters(texts)[dup]], axis=1)
        sig = minhash.signatures(texts)
        mhs = times["datasketch: MinHash + MinHashLSH insert (text in)"]()
        J = exact_jaccard_all_pairs([texts[i] for i in idx.ravel()])
        je = np.array([J[2 * k, 2 * k + 1] for k in range(len(idx))])
        e_ours = np.array([minhash.estimated_jaccard(sig[a], sig[b]) for a, b in idx])
        e_theirs = np.array([mhs[a].jaccard(mhs[b]) for a, b in idx])
        print(f"   mean |estimate - exact| on {len(idx)} near-copy pairs (mean J {je.mean():.3f}): "
              f"ours {np.abs(e_ours - je).mean():.4f}, "
              f"datasketch {np.abs(e_theirs - je).mean():.4f}")
    filt_texts = webcorpus.varied_corpus(min(n_docs, 600), seed=2, kinds=[k for k in webcorpus.KINDS
                                                                      if k not in ("log", "code")])
    ours_f = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]
    fns = {"ours: Gopher rep. + Gopher quality + C4 + FineWeb": lambda: [f(t) for t in filt_texts for f in ours_f]}
    try:
        from datatrove.data import Document
        from datatrove.pipeline import filters as dt

        theirs_f = [dt.GopherRepetitionFilter(), dt.GopherQualityFilter(), dt.C4QualityFilter(),
                    dt.FineWebQualityFilter()]
        fns["datatrove: the same four filters"] = lambda: [f.filter(Document(text=t, id=str(i)))
                                                           for i, t in enumerate(filt_texts) for f in theirs_f]
    except ImportError:
        print("   datatrove not installed (pip install 'datatrove[processing]' spacy): its column is skipped")
    best = {k: _env.best_of(f, repeat=2, warmup=1) for k, f in fns.items()}
    for k, s in best.items():
        print(f"   {k:55s} {len(filt_texts) / s:10.0f} docs/s")
    if len(best) == 2:
        a, b = best.values()
        print(f"   ours / datatrove speed: {b / a:.2f}x")


def section_memory(mb):
    print(f"== 5. signatures of {mb} MB of text, streamed 2,000 documents at a time")
    rng = np.random.default_rng(0)
    pool = [webcorpus.prose(rng) for _ in range(2000)]  # generating prose is slow: reuse it, renamed per pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sigs, done, t, p = [], 0, time.perf_counter(), 0
    while done < mb * 2**20:
        chunk = [f"pass {p} document {i}. " + d for i, d in enumerate(pool)]
        done += sum(len(c.encode()) for c in chunk)
        sigs.append(minhash.signatures(chunk))
        p += 1
    sig = np.concatenate(sigs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"   {done / 2**20:.0f} MB, {len(sig):,} documents in {time.perf_counter() - t:.0f}s "
          f"({done / 2**20 / (time.perf_counter() - t):.2f} MB/s); signatures {sig.nbytes / 2**20:.1f} MB; "
          f"peak RSS {peak:.0f} MB (before: {before:.0f} MB)")


def write_generated_jsonl(path, mb, seed=0):
    """About `mb` MB of distinct documents as JSONL: 8-20 sentences drawn from a pool of 20,000 grammar
    sentences, in paragraphs of 4 (fast to make; no two documents alike). -> (documents, bytes)."""
    import json

    rng = np.random.default_rng(seed)
    pool = [webcorpus.sentence(rng) for _ in range(20000)]
    n, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 2**20:
            picks = rng.integers(0, len(pool), size=int(rng.integers(8, 21)))
            text = "\n".join(" ".join(pool[i] for i in picks[a:a + 4]) for a in range(0, len(picks), 4))
            line = json.dumps({"id": f"g{n:08d}", "text": text}) + "\n"
            f.write(line)
            n, size = n + 1, size + len(text.encode())
    return n, size


def section_pipeline_memory(mb, workers):
    """The whole pipeline (read, local stages, global stages, write) on `mb` MB in a child process; its
    peak RSS from getrusage(RUSAGE_CHILDREN). Global stages: exact dedup, MinHash, line dedup, token KL
    (q from 200 reference documents)."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    print(f"== 6. the pipeline on {mb} MB of generated text, {workers} worker(s), in a child process")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n, size = write_generated_jsonl(tmp / "in.jsonl", mb)
        rng = np.random.default_rng(1)
        (tmp / "ref.txt").write_text("\n<|end_of_text|>\n".join(webcorpus.prose(rng) for _ in range(200)))
        cfg = {"stages": ["exact_dedup", "minhash", "line_dedup", "token_kl"], "shard_size": 5000,
               "output_shard_size": 50000, "params": {"token_kl": {"reference": str(tmp / "ref.txt")}}}
        (tmp / "cfg.json").write_text(json.dumps(cfg))
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llama3np.cli", "data", "curate", str(tmp / "in.jsonl"), "--out",
                        str(tmp / "out"), "--config", str(tmp / "cfg.json"), "--workers", str(workers), "--quiet"],
                       check=True, cwd=_env.ROOT)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        report = json.loads((tmp / "out" / "report.json").read_text())
        print(f"   {size / 2**20:.0f} MB of text, {n:,} documents ({report['kept']:,} kept) in "
              f"{time.perf_counter() - t:.0f}s; signatures {n * 112 * 8 / 2**20:.0f} MB; "
              f"peak RSS of the largest process {peak:.0f} MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=2500)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--speed-docs", type=int, default=1000)
    ap.add_argument("--rss-mb", type=int, default=200)
    ap.add_argument("--only-memory", action="store_true", help="run section 5 alone")
    ap.add_argument("--pipeline-mb", type=int, default=0, help="section 6: the whole pipeline on this many MB")
    ap.add_argument("--workers", type=int, default=1, help="section 6's --workers")
    ap.add_argument("--only-pipeline", action="store_true", help="run section 6 alone")
    args = ap.parse_args()
    print(_env.machine_note())
    print(_env.pin_threads(1))
    rng = np.random.default_rng(0)
    if args.only_memory:
        return section_memory(args.rss_mb)
    if args.only_pipeline:
        return section_pipeline_memory(args.pipeline_mb, args.workers)
    section_statistics(args.pairs, rng)
    texts = section_end_to_end(args.docs, rng)
    section_speed(texts, args.speed_docs)
    if args.rss_mb:
        section_memory(args.rss_mb)
    if args.pipeline_mb:
        section_pipeline_memory(args.pipeline_mb, args.workers)


if __name__ == "__main__":
    main()
