"""The curation pipeline: stages in order over shards, every removal with a reason, resumable.

    read      INPUT -> _work/raw/shard_*.jsonl              (sequential; shard_size documents each)
    local     per shard, in N processes: the per-document stages (heuristic filters, NSFW) give each
              document its first failing stage and reason; plus URL key, text hash, token count and
              MinHash signature                             -> _work/local/shard_*.json, .npy
    global    one pass over all documents in input order, stage by stage in the configured order:
              dedups (URL, exact, MinHash), line dedup in buckets, token KL, quality classifier,
              SemDeDup; a document is removed by the first stage that removes it
                                                            -> _work/decisions.json
    write     kept/kept_*.jsonl, removed/removed_*.jsonl (with metadata.removed_by and .reason),
              report.json, report.md, funnel/score/S-curve plots

Every step writes its files atomically and is skipped when they already exist, so a run killed at any
moment and started again ends with the same bytes as one that was never interrupted. Everything is a
function of (input, config): the same with 1 worker or N, and under mpiexec (curate(..., comm=...)).
"""
import hashlib
import json
import multiprocessing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...fileio import atomic_write, atomic_write_bytes
from . import exact_dedup, line_dedup, minhash, token_kl
from .c4_quality import C4QualityFilter
from .fineweb_quality import FineWebQualityFilter
from .gopher_quality import GopherQualityFilter
from .gopher_repetition import GopherRepetitionFilter
from .nsfw import NSFWFilter
from .readers import read_documents
from .writers import read_jsonl, write_jsonl

# stage name -> the filter class (per-document stages) or None (stages that look at many documents)
LOCAL_STAGES = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
                "c4_quality": C4QualityFilter, "fineweb_quality": FineWebQualityFilter, "nsfw": NSFWFilter}
GLOBAL_STAGES = ("url_dedup", "exact_dedup", "minhash", "line_dedup", "token_kl", "quality_classifier", "semdedup")
ALL_STAGES = tuple(LOCAL_STAGES) + GLOBAL_STAGES
# Llama 3's order: dedup first (URL, document, line), then heuristics, then model-based filters. We run
# the cheap exact dedups first, then the per-document heuristics, then MinHash on what is left.
DEFAULT_STAGES = ("url_dedup", "exact_dedup", "gopher_repetition", "gopher_quality", "c4_quality",
                  "fineweb_quality", "nsfw", "minhash", "line_dedup", "token_kl")
# parameters of the global stages (the local ones take their filter class's arguments)
GLOBAL_PARAMS = {"minhash": {"num_bands": 14, "rows_per_band": 8, "ngram": 5, "seed": 0,
                             "verify_threshold": minhash.VERIFY_THRESHOLD},
                 "line_dedup": {"bucket_size": 100000, "max_count": 6},
                 "token_kl": {"z": 6.0, "threshold": None, "reference": "", "length_aware": True},  # reference: clean text (file/folder)
                 "quality_classifier": {"model": "", "threshold": 0.5},
                 # model: "" = hashed TF-IDF embeddings; else a model folder (llama3np.load) to mean-pool.
                 # eps 0.2 suits TF-IDF: paraphrases (reordered sentences, 2 words changed) sit at cosine
                 # 0.82-0.95, unrelated prose below 0.4 (tests/test_curation.py); tune it for a model
                 "semdedup": {"eps": 0.2, "n_clusters": 0, "seed": 0, "model": "", "max_len": 256},
                 "url_dedup": {}, "exact_dedup": {}}


# our defaults that differ from the filter classes' (which are datatrove's): Gopher's alpha ratio over
# whitespace words, as in the paper. datatrove's spaCy tokens count "," and "." as words, which removed
# 709 of 1,810 real prose documents (plays, the Bible) of the web-like corpus; whitespace words: 1.
DEFAULT_PARAMS = {"gopher_quality": {"alpha_words": "whitespace"}}


@dataclass
class CurateConfig:
    """What to run: `stages` in order, `params` per stage (thresholds), shard size, workers."""
    stages: tuple = DEFAULT_STAGES
    params: dict = field(default_factory=dict)  # stage -> {name: value}
    shard_size: int = 1000
    output_shard_size: int = 10000
    progress: bool = True

    def validate(self):
        if isinstance(self.stages, str) or not all(isinstance(s, str) for s in self.stages):
            raise TypeError(f"stages must be a list of stage names, got {self.stages!r}")
        for s in self.stages:
            if s not in ALL_STAGES:
                raise ValueError(f"unknown stage {s!r}; known stages: {', '.join(ALL_STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"a stage is listed twice in {list(self.stages)}")
        for s, p in self.params.items():
            if s not in ALL_STAGES:
                raise ValueError(f"params for unknown stage {s!r}; known stages: {', '.join(ALL_STAGES)}")
            if not isinstance(p, dict):
                raise TypeError(f"params[{s!r}] must be a mapping of parameter -> value, got {type(p).__name__}")
            defaults = _defaults(s)
            for k, v in p.items():
                if k not in defaults:
                    raise ValueError(f"unknown parameter {k!r} for stage {s!r}; known: {', '.join(defaults)}")
                _check_type(s, k, v, defaults[k])
        for name in ("shard_size", "output_shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TypeError(f"{name} must be a positive integer, got {v!r}")
        return self

    @classmethod
    def from_file(cls, path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object with stages/params/shard_size")
        unknown = set(d) - {"stages", "params", "shard_size", "output_shard_size"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected stages, params, shard_size, "
                             "output_shard_size")
        cfg = cls(**{k: (tuple(v) if k == "stages" and isinstance(v, list) else v) for k, v in d.items()})
        return cfg.validate()


def _defaults(stage):
    if stage in LOCAL_STAGES:
        import inspect

        sig = inspect.signature(LOCAL_STAGES[stage].__init__)
        return {k: p.default for k, p in sig.parameters.items() if k != "self"}
    return GLOBAL_PARAMS[stage]


def _check_type(stage, name, value, default):
    """A threshold must have its default's type (ints may stand for floats; None where None is allowed)."""
    if value is None or default is None:
        return
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          tuple: lambda v: isinstance(v, (list, tuple))}.get(type(default), lambda v: True)
    if not ok(value):
        raise TypeError(f"parameter {name!r} of stage {stage!r} must be {type(default).__name__} "
                        f"(default {default!r}), got {type(value).__name__} {value!r}")


def _params(cfg, stage):
    p = dict(_defaults(stage))
    p.update(DEFAULT_PARAMS.get(stage, {}))
    p.update(cfg.params.get(stage, {}))
    return p


def _config_key(cfg):
    d = asdict(cfg)
    d.pop("progress")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _bar(cfg, iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not cfg.progress, dynamic_ncols=True, **kw)


# ---------------------------------------------------------------------------------------------------
# read
def step_read(input_path, work, cfg):
    """INPUT -> raw shards of shard_size documents (ids checked unique). Skipped when done."""
    raw = work / "raw"
    done = raw / "DONE.json"
    if done.exists():
        return json.loads(done.read_text())["n_shards"]
    raw.mkdir(parents=True, exist_ok=True)
    shard, n_shards, seen = [], 0, set()
    for doc in _bar(cfg, read_documents(input_path), desc="read", unit="doc"):
        if doc.id in seen:
            raise ValueError(f"document id {doc.id!r} ({doc.source}) appears twice in the input; ids must be unique")
        seen.add(doc.id)
        shard.append(doc)
        if len(shard) == cfg.shard_size:
            write_jsonl(raw / f"shard_{n_shards:05d}.jsonl", shard)
            shard, n_shards = [], n_shards + 1
    if shard or n_shards == 0:
        write_jsonl(raw / f"shard_{n_shards:05d}.jsonl", shard)
        n_shards += 1
    atomic_write_bytes(done, json.dumps({"n_shards": n_shards}).encode())
    return n_shards


# ---------------------------------------------------------------------------------------------------
# local: per-document stages, one shard per call (runs in worker processes)
def _local_filters(cfg):
    filters = []
    for s in cfg.stages:
        if s in LOCAL_STAGES:
            filters.append((s, LOCAL_STAGES[s](**_params(cfg, s))))
    return filters


def process_shard(args):
    """(work dir, shard index, config as dict) -> writes _work/local/shard_k.json and .npy."""
    work, k, cfg_dict = args
    cfg = CurateConfig(**cfg_dict)
    out_json, out_sig = work / "local" / f"shard_{k:05d}.json", work / "local" / f"shard_{k:05d}.npy"
    if out_json.exists() and out_sig.exists():
        return k
    docs = read_jsonl(work / "raw" / f"shard_{k:05d}.jsonl")
    filters = _local_filters(cfg)
    tok = token_kl.default_tokenizer()
    records = []
    for d in docs:
        rec = {"id": d.id, "url": exact_dedup.normalize_url(d.url), "hash": exact_dedup.text_hash(d.text),
               "n_tokens": len(tok.encode(d.text, bos=False, eos=False)), "stage": None, "reason": None}
        if d.metadata.get("reason"):  # the reader already knows: not UTF-8, binary, no text in the page
            rec["stage"], rec["reason"] = "read", d.metadata["reason"]
        elif not d.text.strip():
            rec["stage"], rec["reason"] = "read", "empty"
        else:
            for name, filt in filters:
                keep, reason = filt(d.text)
                if not keep:
                    rec["stage"], rec["reason"] = name, reason
                    break
        records.append(rec)
    mh = _params(cfg, "minhash")
    sig = minhash.signatures([d.text for d in docs], mh["num_bands"] * mh["rows_per_band"], mh["ngram"], mh["seed"])
    atomic_write(out_sig, lambda f: np.save(f, sig))
    atomic_write_bytes(out_json, json.dumps(records).encode())
    return k


def step_local(work, n_shards, cfg, workers=1):
    (work / "local").mkdir(exist_ok=True)
    todo = [(work, k, asdict(cfg)) for k in range(n_shards)
            if not (work / "local" / f"shard_{k:05d}.json").exists()]
    bar = _bar(cfg, total=n_shards, initial=n_shards - len(todo), desc="filter shards", unit="shard")
    if workers <= 1 or len(todo) <= 1:
        for a in todo:
            process_shard(a)
            bar.update()
    else:
        # spawn: a clean interpreter per worker (no inherited threads or locks), same results as fork
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(process_shard, todo):
                bar.update()
    bar.close()


# ---------------------------------------------------------------------------------------------------
# global: the stages that compare documents with each other
def step_global(work, n_shards, cfg):
    path = work / "decisions.json"
    if path.exists():
        return json.loads(path.read_text())
    recs, sigs, texts = [], [], []
    for k in range(n_shards):
        recs += json.loads((work / "local" / f"shard_{k:05d}.json").read_text())
        sigs.append(np.load(work / "local" / f"shard_{k:05d}.npy"))
        texts += [d.text for d in read_jsonl(work / "raw" / f"shard_{k:05d}.jsonl")]
    sig = np.concatenate(sigs) if sigs else np.zeros((0, 112), np.uint64)
    n = len(recs)
    removed = [(r["stage"], r["reason"]) if r["stage"] == "read" else None for r in recs]
    extra = [{} for _ in range(n)]  # per-document metadata the stages add (scores, cluster ids)
    funnel = [("input", n, sum(r["n_tokens"] for r in recs))]

    def alive():
        return [i for i in range(n) if removed[i] is None]

    def remove(i, stage, reason):
        if removed[i] is None:
            removed[i] = (stage, reason)

    funnel.append(("read", len(alive()), sum(recs[i]["n_tokens"] for i in alive())))
    scores = {}
    for stage in cfg.stages:
        p = _params(cfg, stage)
        idx = alive()
        if stage in LOCAL_STAGES:
            for i in idx:
                if recs[i]["stage"] == stage:
                    remove(i, stage, recs[i]["reason"])
        elif stage in ("url_dedup", "exact_dedup"):
            key = "url" if stage == "url_dedup" else "hash"
            first = exact_dedup.first_occurrences([recs[i][key] for i in idx])
            for i, keep in zip(idx, first):
                if not keep:
                    remove(i, stage, "duplicate_url" if stage == "url_dedup" else "exact_duplicate")
        elif stage == "minhash":
            cl = minhash.clusters_from_signatures(sig[idx], p["num_bands"], p["rows_per_band"],
                                                  p["verify_threshold"])
            for j, i in enumerate(idx):
                if cl[j] != j:
                    remove(i, stage, "minhash_duplicate")
                    extra[i]["duplicate_of"] = recs[idx[cl[j]]]["id"]
            scores["lsh_curve"] = _measured_lsh_rates(sig[idx], p["num_bands"], p["rows_per_band"])
        elif stage == "line_dedup":
            new, nrem = line_dedup.dedup_lines_in_buckets([texts[i] for i in idx], p["bucket_size"], p["max_count"])
            for i, t, r in zip(idx, new, nrem):
                if r:
                    texts[i] = t
                    extra[i]["lines_removed"] = r
                    if not t.strip():
                        remove(i, stage, "line_dedup_empty")
        elif stage == "token_kl":
            if idx:
                ref = [d.text for d in read_documents(p["reference"])] if p["reference"] else None
                keep, s, thr = token_kl.token_kl_filter([texts[i] for i in idx], z=p["z"], threshold=p["threshold"],
                                                        reference_texts=ref, length_aware=p["length_aware"])
                scores["token_kl"] = {"scores": s.tolist(), "threshold": thr}
                for i, k, v in zip(idx, keep, s):
                    extra[i]["token_kl"] = round(float(v), 6)
                    if not k:
                        remove(i, stage, "token_kl_outlier")
        elif stage == "quality_classifier":
            if not p["model"]:
                raise ValueError("stage quality_classifier needs params.quality_classifier.model: a classifier "
                                 "saved by FastTextClassifier.save (.npz)")
            from .fasttext_classifier import FastTextClassifier

            prob = FastTextClassifier.load(p["model"]).predict_proba([texts[i] for i in idx])
            scores["quality_classifier"] = {"scores": prob.tolist(), "threshold": p["threshold"]}
            for i, v in zip(idx, prob):
                extra[i]["quality_score"] = round(float(v), 6)
                if v < p["threshold"]:
                    remove(i, stage, "low_quality_score")
        elif stage == "semdedup":
            from .semdedup import model_embeddings, semdedup, tfidf_embeddings

            if p["model"]:
                from ...formats import load

                model = load(p["model"])
                if getattr(model, "tokenizer", None) is None:
                    raise ValueError(f"semdedup model {p['model']} has no tokenizer.model beside it")
                emb = model_embeddings(model, model.tokenizer, [texts[i] for i in idx], max_len=p["max_len"])
            else:
                emb = tfidf_embeddings([texts[i] for i in idx], seed=p["seed"])
            keep = semdedup(emb, eps=p["eps"], n_clusters=p["n_clusters"] or None, seed=p["seed"])
            for i, k in zip(idx, keep):
                if not k:
                    remove(i, stage, "semantic_duplicate")
        idx = alive()
        funnel.append((stage, len(idx), sum(recs[i]["n_tokens"] for i in idx)))
    decisions = {"removed": removed, "extra": extra, "texts_changed": {str(i): texts[i] for i in range(n)
                                                                        if "lines_removed" in extra[i]},
                 "funnel": funnel, "scores": scores}
    atomic_write_bytes(path, json.dumps(decisions).encode())
    return decisions


def _measured_lsh_rates(sig, num_bands, rows_per_band, max_docs=1500, seed=0):
    """For pairs of (up to max_docs) documents binned by estimated Jaccard: the fraction that share
    a band. Plotted over the S-curve: the two should agree."""
    if len(sig) < 2:
        return []
    rng = np.random.default_rng(seed)
    s = sig[np.sort(rng.choice(len(sig), size=min(len(sig), max_docs), replace=False))]
    keys = minhash.band_keys(s, num_bands, rows_per_band)
    i, j = np.triu_indices(len(s), k=1)
    est, cand = np.zeros(len(i)), np.zeros(len(i), dtype=bool)
    for a in range(0, len(i), 200000):  # blocks of pairs keep memory small
        sl = slice(a, a + 200000)
        est[sl] = np.mean(s[i[sl]] == s[j[sl]], axis=1)
        cand[sl] = np.any(keys[i[sl]] == keys[j[sl]], axis=1)
    bins = np.linspace(0, 1, 21)
    out = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        m = (est >= lo) & (est < hi)
        if m.sum():
            out.append({"j_lo": lo, "j_hi": hi, "pairs": int(m.sum()), "candidate_rate": float(cand[m].mean())})
    return out


# ---------------------------------------------------------------------------------------------------
# write
def step_write(work, out, n_shards, cfg, decisions):
    removed, extra, changed = decisions["removed"], decisions["extra"], decisions["texts_changed"]
    kept_docs, removed_docs, g = [], [], 0
    for k in range(n_shards):
        for d in read_jsonl(work / "raw" / f"shard_{k:05d}.jsonl"):
            if str(g) in changed:
                d.text = changed[str(g)]
            d.metadata.update(extra[g])
            if removed[g] is None:
                kept_docs.append(d)
            else:
                d.metadata["removed_by"], d.metadata["reason"] = removed[g]
                removed_docs.append(d)
            g += 1
    for name, docs in (("kept", kept_docs), ("removed", removed_docs)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        size = cfg.output_shard_size
        n_out = max(1, -(-len(docs) // size))
        for s in range(n_out):
            write_jsonl(folder / f"{name}_{s:05d}.jsonl", docs[s * size:(s + 1) * size])
        for stale in sorted(folder.glob(f"{name}_*.jsonl"))[n_out:]:  # from an older, bigger run
            stale.unlink()
    from .report import write_report

    return write_report(out, cfg, decisions, n_kept=len(kept_docs), n_removed=len(removed_docs))


def curate(input_path, out, cfg=None, workers=1, comm=None):
    """Run the pipeline over INPUT into folder `out`; returns the report (a dict). Resumes if `out`
    holds a partial run of the same config; raises ValueError if it holds a run of another config.

    comm: a llama3np.parallel ProcessGroup (e.g. llama3np.parallel.mpi.world() under mpiexec): rank 0
    reads and writes, every rank filters the shards k with k % size == rank, then rank 0 runs the
    global stages. The output is the same bytes as one process's. Other ranks return None."""
    cfg = (cfg or CurateConfig()).validate()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    rank, size = (0, 1) if comm is None else (comm.rank, comm.size)
    out = Path(out)
    work = out / "_work"
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        key_file, key = work / "config.json", {"config": _config_key(cfg), "input": str(Path(input_path).resolve())}
        error = None
        if key_file.exists() and json.loads(key_file.read_text()) != key:
            error = f"{out} holds a run of another input or config; choose a new --out or delete it"
        else:
            atomic_write_bytes(key_file, json.dumps(key).encode())
            try:
                n_shards = step_read(input_path, work, cfg)
            except (ValueError, FileNotFoundError) as e:
                error = str(e)
        if comm is not None:
            comm.broadcast_object(("error", error) if error else ("ok", n_shards))
        if error:
            raise ValueError(error)
    else:
        status, value = comm.broadcast_object(None)
        if status == "error":
            raise ValueError(value)
        n_shards = value
    if size == 1:
        step_local(work, n_shards, cfg, workers)
    else:
        (work / "local").mkdir(exist_ok=True)
        for k in range(rank, n_shards, size):  # this rank's shards
            process_shard((work, k, asdict(cfg)))
        comm.barrier()
    if rank != 0:
        return None
    decisions = step_global(work, n_shards, cfg)
    return step_write(work, out, n_shards, cfg, decisions)
