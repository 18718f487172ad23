"""Does curation pay off? The same tiny model trained on the curated corpus and on the raw one, with
the same tokenizer, seed and number of training tokens, scored by its loss on held-out clean text.

The tokenizer is a BPE trained once on the reference text (neither corpus), so the two losses are in
the same units. The curated corpus is smaller, so it is seen for more epochs: equal tokens, not equal
epochs, is the fair comparison (a fixed compute budget).
"""
import json
from pathlib import Path


def _texts(path):
    return [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run_payoff(corpus_dir, curated_dir, steps=300, batch_size=8, seq_len=128, vocab_size=2048, seed=0,
               model_overrides=None, log=print):
    """corpus_dir: made by `llama3np data corpus --out` (corpus.jsonl, heldout/, reference/);
    curated_dir: `llama3np data curate` run on it. -> {"raw": loss, "curated": loss, ...} on heldout."""
    from ... import bpe
    from ...training.loop import TrainConfig, evaluate, train
    from ..loader import tokenize_documents

    corpus_dir, curated_dir = Path(corpus_dir), Path(curated_dir)
    work = corpus_dir / "payoff"
    work.mkdir(exist_ok=True)
    tok_path = work / "tokenizer.model"
    if not tok_path.exists():
        bpe.train("\n\n".join(_texts(corpus_dir / "reference" / "clean.jsonl")), vocab_size).save(tok_path)
    (work / "raw").mkdir(exist_ok=True)
    raw_file = work / "raw" / "corpus.jsonl"
    if not raw_file.exists():
        raw_file.write_bytes((corpus_dir / "corpus.jsonl").read_bytes())
    overrides = model_overrides or {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 384,
                                    "max_seq_len": seq_len}
    heldout = _texts(corpus_dir / "heldout" / "clean.jsonl")
    result = {"steps": steps, "tokens": steps * batch_size * seq_len, "curves": {}}
    for name, data in (("raw", work / "raw"), ("curated", curated_dir)):
        cfg = TrainConfig(out=str(work / f"run_{name}"), data=str(data), tokenizer=str(tok_path),
                          model_overrides=overrides, steps=steps, batch_size=batch_size, seq_len=seq_len,
                          seed=seed, eval_every=max(1, steps // 6), save_every=steps, progress=False,
                          resume=(work / f"run_{name}").exists())
        curve = []
        model = train(cfg, log=lambda m: None,
                      on_eval=lambda step, mdl, val, rng: curve.append((step, _heldout_loss(mdl, heldout, seq_len))))
        stream, _ = tokenize_documents(model.tokenizer, heldout)
        result[name] = float(evaluate(model, stream, seq_len))
        result["curves"][name] = curve
        log(f"{name:8s}: held-out clean loss {result[name]:.4f} nats/token after {result['tokens']:,} tokens")
    return result


def _heldout_loss(model, heldout, seq_len, max_docs=40):
    from ...training.loop import evaluate
    from ..loader import tokenize_documents

    stream, _ = tokenize_documents(model.tokenizer, heldout[:max_docs])
    return float(evaluate(model, stream, seq_len))


def plot_payoff(result):
    """Held-out clean loss during training, raw vs curated -> Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.add_subplot()
    for name, color in (("raw", "tab:red"), ("curated", "tab:green")):
        steps, losses = zip(*result["curves"][name]) if result["curves"].get(name) else ((), ())
        ax.plot(steps, losses, "o-", color=color, label=f"{name}: final {result[name]:.3f}")
    ax.set_xlabel("step (equal tokens per step)")
    ax.set_ylabel("loss on held-out clean text (nats/token)")
    ax.legend()
    fig.tight_layout()
    return fig
