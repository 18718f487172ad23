"""The curation pipeline: stages in order over shards, every removal with a reason, resumable.

    read      INPUT -> _work/raw/shard_*.jsonl              (sequential; shard_size documents each)
    local     per shard, in N processes: the per-document stages (heuristic filters, NSFW) give each
              document its first failing stage and reason; plus URL key, text hash, token count and
              MinHash signature                             -> _work/local/shard_*.json, .npy
    global    stage by stage in the configured order over all documents in input order: dedups
              (URL, exact, MinHash), line dedup in buckets, token KL, quality classifier, SemDeDup;
              a document is removed by the first stage that removes it. Texts are streamed from the
              raw shards (TextStream), never held whole: in memory stay per-document columns (Records,
              ~30 bytes), the signatures (896 bytes) and SemDeDup's embeddings; line dedup holds one
              bucket and writes its rewritten texts to _work/lines/; token KL without a reference
              leaves its first pass's token ids in _work/token_kl/ for its second
                                                            -> _work/decisions.npz, decisions.json
    write     kept/kept_*.jsonl, removed/removed_*.jsonl (with metadata.removed_by and .reason),
              written as the raw shards stream past; report.json, report.md, funnel/score/S-curve plots

Measured (benchmarks/bench_curation.py --only-pipeline --pipeline-mb 1024): the whole pipeline on 1 GB
of text, 976,324 documents, peak RSS 1,544 MB, of which 834 MB are the signatures.

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

from ...fileio import atomic_write, atomic_write_bytes, remove_stale_temporaries
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
        return cls.from_dict(d, path)

    @classmethod
    def from_dict(cls, d, where="config"):
        """A config file's JSON object -> the validated config (its stages list becomes a tuple). `where`
        names the file in the error messages."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object with stages/params/shard_size")
        unknown = set(d) - {"stages", "params", "shard_size", "output_shard_size"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected stages, params, shard_size, "
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
class TextStream:
    """The documents' current texts, read from the raw shards in input order, never all at once.

    What stays in memory for the whole corpus is small per document (the local records, the MinHash
    signatures, per-document scores, SemDeDup's embeddings); texts pass through in chunks. Line dedup
    rewrites texts bucket by bucket into _work/lines/bucket_*.json (ccNet's buckets, on disk), and the
    stream reads a rewritten text from there as it passes that bucket's range."""

    def __init__(self, work, n_shards):
        self.work, self.n_shards = work, n_shards
        self.buckets = []  # (first, last global index, path) of line dedup's rewritten texts, in order

    def documents(self):
        """(global index, Document with its current text) for every document, in input order."""
        g, b, changed, last = 0, 0, {}, -1
        for k in range(self.n_shards):
            for d in read_jsonl(self.work / "raw" / f"shard_{k:05d}.jsonl"):
                if g > last and b < len(self.buckets) and g >= self.buckets[b][0]:
                    changed = {int(i): t for i, t in json.loads(self.buckets[b][2].read_text()).items()}
                    last, b = self.buckets[b][1], b + 1
                d.text = changed.get(g, d.text)
                yield g, d
                g += 1

    def __iter__(self):
        """(global index, text) for every document, in input order."""
        for g, d in self.documents():
            yield g, d.text

    def chunks(self, alive, size):
        """Lists of (global index, text) of up to `size` alive documents, in input order."""
        chunk = []
        for g, t in self:
            if alive[g]:
                chunk.append((g, t))
                if len(chunk) == size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


def stage_line_dedup(stream, alive, p, remove, lines_removed):
    """ccNet line dedup over buckets of bucket_size alive documents; rewritten texts go to disk."""
    folder = stream.work / "lines"
    folder.mkdir(exist_ok=True)
    for b, chunk in enumerate(stream.chunks(alive, p["bucket_size"])):
        new, nrem = line_dedup.dedup_lines([t for _, t in chunk], p["max_count"])
        changed = {}
        for (g, _), t, r in zip(chunk, new, nrem):
            if r:
                changed[str(g)] = t
                lines_removed[g] = r
                if not t.strip():
                    remove(g, "line_dedup", "line_dedup_empty")
        path = folder / f"bucket_{b:05d}.json"
        atomic_write_bytes(path, json.dumps(changed).encode())
        stream.buckets.append((chunk[0][0], chunk[-1][0], path))


def stage_token_kl(stream, alive, p, chunk_size):
    """-> (global indices, scores, threshold). q and the clean curve from the reference text if given
    (read whole: it is small), else from a first streamed pass over the corpus, which leaves each
    chunk's token ids on disk for the scoring pass: every document is tokenized once."""
    tok = token_kl.default_tokenizer()
    vocab = tok.n_words
    chunks = ((np.array([g for g, _ in c], dtype=np.int64), token_kl.token_ids([t for _, t in c], tok))
              for c in stream.chunks(alive, chunk_size))  # (global indices, token ids per document)
    if p["reference"]:
        ref = token_kl.token_ids([d.text for d in read_documents(p["reference"])], tok)
        counts, curve_ids = token_kl.corpus_counts(ref, vocab), ref[:token_kl.CURVE_DOCS]
    else:
        counts, curve_ids, paths = np.zeros(vocab), [], []
        (stream.work / "token_kl").mkdir(exist_ok=True)
        for k, (g, ids) in enumerate(chunks):
            counts += token_kl.corpus_counts(ids, vocab)
            curve_ids += ids[:token_kl.CURVE_DOCS - len(curve_ids)]
            paths.append(_save_token_ids(stream.work / "token_kl" / f"chunk_{k:05d}.npz", g, ids))
        chunks = (_load_token_ids(path) for path in paths)
    curve = token_kl.clean_curve(curve_ids, counts) if p["length_aware"] else None
    q = token_kl.smoothed_q(counts)
    gs, scores = [], []
    for g, ids in chunks:
        s = token_kl.adjusted_scores(ids, counts, curve, q) if curve else token_kl.kl_scores(ids, counts, q)
        gs += g.tolist()
        scores.append(s)
    if not p["reference"]:
        (stream.work / "token_kl").rmdir()  # its files were deleted as they were read
    scores = np.concatenate(scores) if scores else np.zeros(0)
    thr = token_kl.robust_threshold(scores, p["z"]) if p["threshold"] is None else float(p["threshold"])
    return gs, scores, thr


def _save_token_ids(path, g, ids):
    """One chunk's global indices and token ids per document -> path (.npz; the ids as uint32, 4 bytes a
    token: Llama 3's 128,256 ids fit)."""
    atomic_write(path, lambda f: np.savez(f, g=g, ids=np.concatenate(ids).astype(np.uint32),
                                          lens=np.array([len(i) for i in ids], dtype=np.int64)))
    return path


def _load_token_ids(path):
    """_save_token_ids's file -> (global indices, token ids (int64) per document); the file is deleted: it
    is read once, and the corpus's tokens need not stay on disk."""
    with np.load(path) as z:
        g, ids, lens = z["g"], z["ids"].astype(np.int64), z["lens"]
    path.unlink()
    return g, np.split(ids, np.cumsum(lens)[:-1])


def stage_embeddings(stream, alive, p, chunk_size):
    """-> (global indices, (N, dim) unit embeddings) for SemDeDup: a saved model's mean-pooled hidden
    states, or hashed TF-IDF (document frequencies from a first streamed pass)."""
    from . import semdedup

    gs, emb = [], []
    if p["model"]:
        from ...formats import load

        model = load(p["model"])
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(f"semdedup model {p['model']} has no tokenizer.model beside it")
        embed = lambda texts: semdedup.model_embeddings(model, model.tokenizer, texts, max_len=p["max_len"])  # noqa: E731
    else:
        df, n = np.zeros(1 << 16), 0
        for chunk in stream.chunks(alive, chunk_size):
            d, m = semdedup.document_frequencies([t for _, t in chunk])
            df, n = df + d, n + m
        proj = semdedup.random_projection(len(df), seed=p["seed"])
        embed = lambda texts: semdedup.tfidf_transform(texts, df, n, seed=p["seed"], proj=proj)  # noqa: E731
    for chunk in stream.chunks(alive, chunk_size):
        gs += [g for g, _ in chunk]
        emb.append(embed([t for _, t in chunk]))
    return gs, (np.concatenate(emb) if emb else np.zeros((0, 1), np.float32))


@dataclass
class Records:
    """What the global stage keeps per document besides its signature, as arrays (~30 bytes each).
    Keys are 64-bit: the text hash is already 64 bits (exact_dedup.text_hash); a URL is hashed to 64
    (two different URLs collide with probability ~N^2 / 2^65: 3e-8 for a million documents)."""
    url_key: np.ndarray  # (N,) uint64; 0 = no URL
    text_key: np.ndarray  # (N,) uint64
    n_tokens: np.ndarray  # (N,) int64
    local: np.ndarray  # (N,) int32: code of the first failing per-document stage or the reader's reason; 0 = none


def _url_key(url):
    return int.from_bytes(hashlib.blake2b(url.encode(), digest_size=8).digest(), "little") | 1 if url else 0


def load_records(work, n_shards, codes):
    """The local stage's records, shard by shard, into Records; `codes` is the (stage, reason) table
    (codes[0] = None) that the codes index, extended as new pairs appear."""
    index = {c: i for i, c in enumerate(codes)}
    cols = {"url_key": [], "text_key": [], "n_tokens": [], "local": []}
    for k in range(n_shards):
        recs = json.loads((work / "local" / f"shard_{k:05d}.json").read_text())
        cols["url_key"].append(np.array([_url_key(r["url"]) for r in recs], dtype=np.uint64))
        cols["text_key"].append(np.array([int(r["hash"], 16) for r in recs], dtype=np.uint64))
        cols["n_tokens"].append(np.array([r["n_tokens"] for r in recs], dtype=np.int64))
        local = []
        for r in recs:
            c = (r["stage"], r["reason"]) if r["stage"] else None
            if c not in index:
                index[c] = len(codes)
                codes.append(c)
            local.append(index[c])
        cols["local"].append(np.array(local, dtype=np.int32))
    return Records(**{k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()})


# per-document numbers the stages add, in stage order: written into the document's metadata, and the score
# stages' (token_kl, quality_classifier) histogrammed in the report
EXTRA_COLUMNS = (("minhash", "duplicate_of"), ("line_dedup", "lines_removed"), ("token_kl", "token_kl"),
                 ("quality_classifier", "quality_score"))


def step_global(work, n_shards, cfg):
    """-> decisions: `removed` (N,) int32 codes into `codes` [(stage, reason), 0 = kept], the extra
    columns (duplicate_of as a global index, lines_removed, token_kl, quality_score; -1/0/nan = none),
    the funnel, the scores' thresholds and the LSH curve. Saved as decisions.npz + decisions.json."""
    path = work / "decisions.json"
    if path.exists():
        d = json.loads(path.read_text())
        with np.load(work / "decisions.npz") as z:
            d.update({k: z[k] for k in z.files})
        d["codes"] = [tuple(c) if c else None for c in d["codes"]]
        return d
    codes = [None, ("read", "empty")]
    rec = load_records(work, n_shards, codes)
    n = len(rec.n_tokens)
    mh = _params(cfg, "minhash")
    sig, a = np.empty((n, mh["num_bands"] * mh["rows_per_band"]), np.uint64), 0  # filled in place: no 2nd copy
    for k in range(n_shards):
        s = np.load(work / "local" / f"shard_{k:05d}.npy")
        sig[a:a + len(s)], a = s, a + len(s)
    stream = TextStream(work, n_shards)
    code_of = {c: i for i, c in enumerate(codes)}
    removed = np.where(np.isin(rec.local, [code_of[c] for c in codes[1:] if c[0] == "read"]), rec.local, 0)
    col = {"duplicate_of": np.full(n, -1, np.int64), "lines_removed": np.zeros(n, np.int32),
           "token_kl": np.full(n, np.nan), "quality_score": np.full(n, np.nan)}

    def remove(i, stage, reason):  # i: an index or an index array; only alive documents change
        if (stage, reason) not in code_of:
            code_of[(stage, reason)] = len(codes)
            codes.append((stage, reason))
        i = np.atleast_1d(i)
        removed[i[removed[i] == 0]] = code_of[(stage, reason)]

    def alive():
        return np.flatnonzero(removed == 0)

    funnel = [("input", n, int(rec.n_tokens.sum())), ("read", len(alive()), int(rec.n_tokens[alive()].sum()))]
    scores = {}
    for stage in cfg.stages:
        p = _params(cfg, stage)
        idx = alive()
        if stage in LOCAL_STAGES:
            for c in range(1, len(codes)):
                if codes[c][0] == stage:
                    remove(idx[rec.local[idx] == c], stage, codes[c][1])
        elif stage in ("url_dedup", "exact_dedup"):
            keys = rec.url_key[idx] if stage == "url_dedup" else rec.text_key[idx]
            has_key = keys != 0 if stage == "url_dedup" else np.ones(len(idx), bool)  # 0: no URL
            first = exact_dedup.first_occurrences(keys, has_key)
            remove(idx[~first], stage, "duplicate_url" if stage == "url_dedup" else "exact_duplicate")
        elif stage == "minhash":
            cl = minhash.clusters_from_signatures(sig, p["num_bands"], p["rows_per_band"], p["verify_threshold"],
                                                  rows=idx)
            dup = np.flatnonzero(cl != np.arange(len(idx)))
            remove(idx[dup], stage, "minhash_duplicate")
            col["duplicate_of"][idx[dup]] = idx[cl[dup]]
            scores["lsh_curve"] = _measured_lsh_rates(sig, idx, p["num_bands"], p["rows_per_band"])
        elif stage == "line_dedup":
            stage_line_dedup(stream, removed == 0, p, remove, col["lines_removed"])
        elif stage == "token_kl" and len(idx):
            gs, s, thr = stage_token_kl(stream, removed == 0, p, cfg.shard_size)
            gs = np.array(gs, dtype=np.int64)
            col["token_kl"][gs] = s
            scores["token_kl"] = {"threshold": thr}
            remove(gs[s > thr], stage, "token_kl_outlier")
        elif stage == "quality_classifier":
            if not p["model"]:
                raise ValueError("stage quality_classifier needs params.quality_classifier.model: a classifier "
                                 "saved by FastTextClassifier.save (.npz) or `llama3np data train-classifier`")
            from .fasttext_classifier import FastTextClassifier

            clf = FastTextClassifier.load(p["model"])
            for chunk in stream.chunks(removed == 0, cfg.shard_size):
                gs = np.array([g for g, _ in chunk], dtype=np.int64)
                prob = clf.predict_proba([t for _, t in chunk])
                col["quality_score"][gs] = prob
                remove(gs[prob < p["threshold"]], stage, "low_quality_score")
            scores["quality_classifier"] = {"threshold": p["threshold"]}
        elif stage == "semdedup":
            from .semdedup import semdedup

            gs, emb = stage_embeddings(stream, removed == 0, p, cfg.shard_size)
            keep = semdedup(emb, eps=p["eps"], n_clusters=p["n_clusters"] or None, seed=p["seed"])
            remove(np.array(gs, dtype=np.int64)[~keep], stage, "semantic_duplicate")
        idx = alive()
        funnel.append((stage, len(idx), int(rec.n_tokens[idx].sum())))
    decisions = {"codes": codes, "funnel": funnel, "scores": scores,
                 "line_buckets": [(a, b, p.name) for a, b, p in stream.buckets]}
    arrays = {"removed": removed, **col}
    atomic_write(work / "decisions.npz", lambda f: np.savez(f, **arrays))
    atomic_write_bytes(path, json.dumps(decisions).encode())  # last: its presence marks the step done
    return {**decisions, **arrays}


def _measured_lsh_rates(sig, rows, num_bands, rows_per_band, max_docs=1500, seed=0):
    """For pairs of (up to max_docs) of the documents `rows`, binned by estimated Jaccard: the fraction
    that share a band. Plotted over the S-curve: the two should agree."""
    if len(rows) < 2:
        return []
    rng = np.random.default_rng(seed)
    s = sig[rows[np.sort(rng.choice(len(rows), size=min(len(rows), max_docs), replace=False))]]
    keys = minhash.band_keys(s, num_bands, rows_per_band)
    i, j = np.triu_indices(len(s), k=1)
    est, cand = np.zeros(len(i)), np.zeros(len(i), dtype=bool)
    for a in range(0, len(i), 20000):  # blocks of pairs keep memory small (2 x 20000 x 112 x 8 B = 36 MB)
        sl = slice(a, a + 20000)
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
    """kept/ and removed/ shards of output_shard_size documents, written as the raw shards stream past
    (line dedup's rewritten texts read from _work/lines/), then the report."""
    codes, removed = decisions["codes"], decisions["removed"]
    stream = TextStream(work, n_shards)
    stream.buckets = [(a, b, work / "lines" / name) for a, b, name in decisions["line_buckets"]]
    counts, buffers = {"kept": 0, "removed": 0}, {"kept": [], "removed": []}
    dup_of = decisions["duplicate_of"]
    roots, id_of = set(dup_of[dup_of >= 0].tolist()), {}  # a cluster's kept document comes first
    columns = [(name, decisions[name]) for stage, name in EXTRA_COLUMNS if stage in cfg.stages]

    def flush(name):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / f"{name}_{counts[name] // cfg.output_shard_size:05d}.jsonl", buffers[name])
        counts[name] += len(buffers[name])
        buffers[name] = []

    for g, d in stream.documents():  # one read of the raw shards (with line dedup's rewritten texts)
        if g in roots:
            id_of[g] = d.id
        for name, v in columns:
            if name == "duplicate_of" and v[g] >= 0:
                d.metadata[name] = id_of[int(v[g])]
            elif name == "lines_removed" and v[g] > 0:
                d.metadata[name] = int(v[g])
            elif name in ("token_kl", "quality_score") and not np.isnan(v[g]):
                d.metadata[name] = round(float(v[g]), 6)
        name = "kept" if removed[g] == 0 else "removed"
        if removed[g]:
            d.metadata["removed_by"], d.metadata["reason"] = codes[removed[g]]
        buffers[name].append(d)
        if len(buffers[name]) == cfg.output_shard_size:
            flush(name)
    for name in ("kept", "removed"):
        if buffers[name] or counts[name] == 0:  # an empty folder still gets one (empty) shard
            flush(name)
        n_out = max(1, -(-counts[name] // cfg.output_shard_size))
        for stale in sorted((out / name).glob(f"{name}_*.jsonl"))[n_out:]:  # from an older, bigger run
            stale.unlink()
    from .report import write_report

    return write_report(out, cfg, decisions, n_kept=counts["kept"], n_removed=counts["removed"])


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
        remove_stale_temporaries(out)  # a killed run's half-written files (never under their real names)
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
