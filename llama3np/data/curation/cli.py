"""`llama3np data curate INPUT --out DIR`, `llama3np data corpus` and `llama3np data train-classifier`
(add_subcommands; main for tests)."""
import argparse
import json
import sys
from pathlib import Path

import numpy as np


def cmd_curate(args):
    from .pipeline import CurateConfig, curate

    cfg = CurateConfig.from_file(args.config) if args.config else CurateConfig()
    cfg.progress = not args.quiet
    comm = None
    try:
        if args.mpi:
            from ...parallel.mpi import world

            comm = world(timeout=24 * 3600.0)  # ranks wait while rank 0 reads and runs the global stages
            cfg.progress = cfg.progress and comm.rank == 0
        report = curate(args.input, args.out, cfg, workers=args.workers, comm=comm)
    except ImportError as e:  # an optional dependency (better-profanity, trafilatura): say which, no traceback
        raise ValueError(str(e)) from None
    except ValueError:
        if comm is not None and comm.rank != 0:
            return 2  # rank 0 prints the message once
        raise
    if report is None:  # not rank 0
        return 0
    print(f"{report['documents']:,} documents: {report['kept']:,} kept, {report['removed']:,} removed "
          f"-> {Path(args.out) / 'kept'}  (report: {Path(args.out) / 'report.md'})")
    return 0


def assemble_corpus(out, n_docs=2000, seed=0, sources=None, heldout_docs=200, log=print):
    """Write the labelled web-like corpus to `out`: corpus.jsonl (id, text, metadata.kind/.source),
    labels.tsv (id, kind), heldout/clean.jsonl (real prose kept out of the corpus, for evaluation),
    reference/clean.jsonl (other real prose: the token-KL reference, the classifier's positives) and
    curate_config.json. Real prose from the installed sources, else the built-in grammar."""
    from ...fileio import atomic_write_bytes
    from . import sources as src
    from .webcorpus import STAND_IN_DIRTY, make_web_corpus, prose
    from .writers import write_jsonl

    out = Path(out)
    names = list(sources) if sources is not None else [n for n, (p, _) in src.available_sources().items() if p]
    pool = []
    for n in names:
        pool += [(n, d) for d in src.read_source(n)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    if not pool:  # no real text here: the grammar's prose plays every part
        pool = [("grammar", prose(rng)) for _ in range(2 * heldout_docs)]
        order = np.arange(len(pool))
    heldout = [pool[i] for i in order[:heldout_docs]]
    reference = [pool[i] for i in order[heldout_docs:2 * heldout_docs]]
    pool = [pool[i] for i in order[2 * heldout_docs:]]
    used = []

    def real_prose(r):
        name, text = pool[len(used) % len(pool)]
        used.append(name)
        return text

    # stand-in dirty words: a real list (better-profanity's) also holds "god", "kill" and "ass", which
    # would make the King James Bible an NSFW source; the pipeline is told the stand-ins in its config
    dirty = STAND_IN_DIRTY
    texts, labels = make_web_corpus(n_docs, seed=seed, prose_fn=real_prose if names else prose, dirty_words=dirty)
    docs = [{"id": f"web{i:06d}", "text": t, "metadata": {"kind": k}} for i, (t, k) in enumerate(zip(texts, labels))]
    prose_docs = [d for d in docs if d["metadata"]["kind"] == "prose"]  # prose_fn ran once for each, in order
    for d, name in zip(prose_docs, used or ["grammar"] * len(prose_docs)):
        d["metadata"]["source"] = name
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "corpus.jsonl", docs)
    atomic_write_bytes(out / "labels.tsv", ("id\tkind\n" + "".join(f"{d['id']}\t{d['metadata']['kind']}\n"
                                                                   for d in docs)).encode())
    (out / "heldout").mkdir(exist_ok=True)
    write_jsonl(out / "heldout" / "clean.jsonl", [{"id": f"held{i:05d}", "text": t, "metadata": {"source": n}}
                                                  for i, (n, t) in enumerate(heldout)])
    (out / "reference").mkdir(exist_ok=True)
    write_jsonl(out / "reference" / "clean.jsonl", [{"id": f"ref{i:05d}", "text": t, "metadata": {"source": n}}
                                                    for i, (n, t) in enumerate(reference)])
    cfg = {"params": {"nsfw": {"words": list(STAND_IN_DIRTY)}}}
    cfg["params"]["token_kl"] = {"reference": str((out / "reference" / "clean.jsonl").resolve())}
    atomic_write_bytes(out / "curate_config.json", (json.dumps(cfg, indent=1) + "\n").encode())
    counts = {k: labels.count(k) for k in sorted(set(labels))}
    log(f"wrote {len(docs)} documents to {out / 'corpus.jsonl'} (prose from: {', '.join(names) or 'the grammar'}); "
        f"kinds: {counts}")
    return docs


def cmd_corpus(args):
    from .sources import available_sources

    avail = available_sources()
    for name, (present, how) in avail.items():
        print(f"  {'[x]' if present else '[ ]'} {name:12s} {'' if present else 'install: ' + how}")
    if args.out:
        names = args.sources.split(",") if args.sources else None
        for n in names or []:
            if n not in avail:
                raise ValueError(f"unknown source {n!r}; known: {', '.join(avail)}")
        assemble_corpus(args.out, args.docs, args.seed, names, args.heldout)
    return 0


def _texts(path, kinds=None):
    """Texts of the documents under `path`; with `kinds`, only those whose metadata.kind is one of them
    (documents without a kind are all taken)."""
    from .readers import read_documents

    return [d.text for d in read_documents(path) if d.text.strip() and
            (kinds is None or d.metadata.get("kind") is None or d.metadata["kind"] in kinds)]


def cmd_train_classifier(args):
    """Train quality classifier (a), save it (.npz) and, with --config, point a curate config at it."""
    from ...fileio import atomic_write_bytes
    from .fasttext_classifier import train_quality_classifier
    from .pipeline import DEFAULT_STAGES, CurateConfig

    kinds = set(args.negative_kinds.split(",")) if args.negative_kinds else None
    pos, neg = _texts(args.positive), _texts(args.negative, kinds)
    clf, info = train_quality_classifier(pos, neg, holdout=args.holdout, seed=args.seed, n_buckets=args.buckets,
                                         dim=args.dim, epochs=args.epochs, lr=args.lr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clf.save(out)
    auroc = "n/a" if info["heldout_auroc"] is None else f"{info['heldout_auroc']:.4f}"
    print(f"trained on {info['train']:,} documents ({len(pos):,} positive, {len(neg):,} negative in all); "
          f"loss per epoch {', '.join(f'{x:.4f}' for x in info['loss'])}; held-out AUROC {auroc} "
          f"on {info['heldout']:,} -> {out}")
    if args.config:
        cfg_path = Path(args.config)
        d = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        if not isinstance(d, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object with stages/params/shard_size")
        stages = list(d.get("stages", DEFAULT_STAGES))
        if "quality_classifier" not in stages:
            stages.append("quality_classifier")
        d["stages"] = stages
        d.setdefault("params", {}).setdefault("quality_classifier", {})["model"] = str(out.resolve())
        CurateConfig.from_dict(d, cfg_path)  # what `curate --config` will read: check it before writing
        atomic_write_bytes(cfg_path, (json.dumps(d, indent=1) + "\n").encode())
        print(f"{cfg_path}: stage quality_classifier reads {out.resolve()}")
    return 0


def add_subcommands(subparsers):
    """Add `data` with its sub-commands `curate` and `corpus` to the main CLI's sub-parsers."""
    p = subparsers.add_parser("data", help="pre-training data: curation pipeline and corpora")
    sub = p.add_subparsers(dest="data_command", required=True)
    c = sub.add_parser("curate", help="filter and deduplicate a corpus (Llama 3's pipeline)")
    c.add_argument("input", help="a text/JSONL/HTML file or a folder of them")
    c.add_argument("--out", required=True, help="output folder: kept/, removed/, report.json, report.md, plots")
    c.add_argument("--config", help="JSON: {stages: [...], params: {stage: {name: value}}, shard_size: N}")
    c.add_argument("--workers", type=int, default=1, help="processes for the per-document stages")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--mpi", action="store_true", help="run as one rank of an mpiexec job (pip install -e '.[mpi]')")
    c.set_defaults(func=cmd_curate)
    k = sub.add_parser("corpus", help="list the real text sources here; with --out, assemble a labelled "
                                      "web-like corpus")
    k.add_argument("--out", help="folder for corpus.jsonl, labels.tsv, heldout/, reference/, curate_config.json")
    k.add_argument("--docs", type=int, default=2000)
    k.add_argument("--heldout", type=int, default=200, help="real documents kept out, for evaluation")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--sources", help="comma-separated subset of the sources (default: all present)")
    k.set_defaults(func=cmd_corpus)
    t = sub.add_parser("train-classifier", help="train quality classifier (a) (hashed n-grams, logistic "
                                                "regression) on reference prose against junk; save it as .npz",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--positive", required=True, help="reference text (file/folder; e.g. CORPUS/reference/)")
    t.add_argument("--negative", required=True, help="junk text (file/folder; e.g. CORPUS/corpus.jsonl)")
    t.add_argument("--negative-kinds", default="boilerplate,spam,log,code,lorem,repeated_lines,token_noise",
                   help="take only negative documents whose metadata.kind is one of these ('' = all)")
    t.add_argument("--out", required=True, help="the classifier file (.npz)")
    t.add_argument("--config", help="a curate config (JSON) to add the quality_classifier stage and the model to "
                                    "(created if absent)")
    t.add_argument("--holdout", type=float, default=0.2, help="fraction of each class kept out and scored (AUROC)")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--dim", type=int, default=16)
    t.add_argument("--buckets", type=int, default=1 << 18, help="hashed n-gram buckets")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train_classifier)
    return p


def main(argv=None) -> int:
    """`llama3np data ...` from Python (tests) or `python -m`: the one command line, llama3np.cli.main,
    so the errors, warnings and exit codes are the same; argv starts with the sub-command."""
    from ...cli import main as llama3np_main

    return llama3np_main(argv)


if __name__ == "__main__":
    sys.exit(main())
