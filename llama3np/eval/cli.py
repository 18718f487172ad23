"""`llama3np eval mmlu` and `llama3np eval robustness`: MMLU from the command line, resumable.

    llama3np eval mmlu --model DIR [--data PATH|lm-eval-cot|stories] [--shots 5] [--subjects ...]
                       [--limit N] [--style harness|original|cloze] [--no-bos] [--out results.json] [--resume]
                       [--generate [--max-new-tokens N]]
    llama3np eval robustness --model DIR [--data ...] [--shots 5] [--limit N] --out DIR

--data: a hendrycks data/ folder (dev/*_dev.csv, test/*_test.csv), a cais/mmlu parquet file or folder,
"lm-eval-cot" (the 281 real MMLU dev questions inside lm-evaluation-harness, scored with leave-one-out
shots: NOT the MMLU test set), or "stories" (default: the MMLU-format set generated from the story grammar).
The JSON results are rewritten atomically every --save-every questions; --resume continues an
interrupted run from its last save (same arguments required) and ends with the same numbers.
"""
import json
import os
import sys
from pathlib import Path

RESULTS_VERSION = 1


def add_subcommands(subparsers):
    """Add `eval` (with `mmlu` and `robustness`) to the `llama3np` command's subparsers."""
    e = subparsers.add_parser("eval", help="evaluate a model: MMLU (k-shot log-likelihood or generative)")
    sub = e.add_subparsers(dest="eval_command", required=True)

    m = sub.add_parser("mmlu", help="MMLU k-shot accuracy, per subject, with 95%% intervals")
    _data_arguments(m)
    m.add_argument("--style", choices=("harness", "original", "cloze"), default="harness",
                   help="the prompt: lm-evaluation-harness's template (default), hendrycks' original, or cloze")
    m.add_argument("--no-bos", action="store_true", help="leave out <|begin_of_text|> (the harness's default)")
    m.add_argument("--out", default="mmlu_results.json", help="the JSON results file (default mmlu_results.json)")
    m.add_argument("--resume", action="store_true", help="continue the interrupted run saved in --out")
    m.add_argument("--save-every", type=int, default=20, help="rewrite --out every N questions (default 20)")
    m.add_argument("--generate", action="store_true",
                   help="0-shot chain of thought in the chat template, greedy, letter extracted (Instruct models)")
    m.add_argument("--max-new-tokens", type=int, default=512, help="with --generate (default 512)")
    m.set_defaults(func=cmd_mmlu)

    r = sub.add_parser("robustness", help="accuracy under other label sets, answer orders, same-answer shots")
    _data_arguments(r)
    r.add_argument("--style", choices=("harness", "original"), default="harness")
    r.add_argument("--out", required=True, help="folder for robustness.json and robustness.png")
    r.set_defaults(func=cmd_robustness)
    return e


def _data_arguments(p):
    p.add_argument("--model", required=True, help="a run folder, or a Hugging Face / Meta Llama 3 folder")
    p.add_argument("--data", default="stories",
                   help="hendrycks data/ folder, cais/mmlu parquet file or folder, 'lm-eval-cot', or 'stories' "
                        "(default: the generated story-world set)")
    p.add_argument("--shots", type=int, default=5, help="k-shot (default 5)")
    p.add_argument("--subjects", nargs="+", default=None, help="only these subjects (default all)")
    p.add_argument("--limit", type=int, default=None, help="at most N questions per subject")
    p.add_argument("--n-per-subject", type=int, default=40, help="with --data stories (default 40)")
    p.add_argument("--backend", choices=("c", "numpy"), default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------------------------------
def load_questions(a):
    """-> (questions, dev, leave_one_out, notes) for the --data / --subjects / --limit arguments."""
    from . import data, story_mmlu

    notes, leave_one_out = [], False
    if a.data == "stories":
        questions, dev = story_mmlu.generate_split(a.n_per_subject, max(a.shots, 1))
        notes.append(f"data: the generated story-world MMLU ({a.n_per_subject} questions per subject, dev from "
                     "another seed)")
    elif a.data == "lm-eval-cot":
        questions, defects = data.read_lm_eval_cot()
        dev, leave_one_out = questions, True
        notes.append("data: lm-evaluation-harness's CoT prompts: 281 real MMLU DEV questions (not the test set), "
                     "leave-one-out shots; cleaned: " + "; ".join(f"{d['subject']}: {d['defect']} ({d['fix']})"
                                                                  for d in defects))
    else:
        questions, dev = data.load(a.data)
        notes.append(f"data: {a.data}")
    if a.subjects:
        unknown = [s for s in a.subjects if s not in questions]
        if unknown:
            raise ValueError(f"--subjects: unknown subject(s) {unknown}; available: {sorted(questions)}")
        questions = {s: questions[s] for s in a.subjects}
    if a.limit is not None:
        if a.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {a.limit}")
        questions = {s: items[: a.limit] for s, items in questions.items()}
    if a.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {a.shots}")
    return questions, dev, leave_one_out, notes


def load_model_and_tokenizer(path, backend=None):
    from .. import backend as backend_mod
    from ..formats import load

    if not Path(path).exists():
        raise FileNotFoundError(f"--model: {path} not found (a run folder, or a Hugging Face / Meta folder)")
    if backend is not None:
        backend_mod.set_backend(backend)
    model = load(path)
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer, so the questions cannot be encoded")
    return model, model.tokenizer


def _write_json(path, obj):
    from ..fileio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _run_config(a, leave_one_out):
    """What must be the same for --resume to continue a run (and what the results file records)."""
    return dict(model=os.path.abspath(a.model), data=a.data, shots=a.shots, subjects=a.subjects, limit=a.limit,
                n_per_subject=a.n_per_subject if a.data == "stories" else None, style=a.style, bos=not a.no_bos,
                generate=a.generate, max_new_tokens=a.max_new_tokens if a.generate else None,
                leave_one_out=leave_one_out)


def _previous_items(path, config, resume):
    """The items saved by an earlier run with the same config (for --resume), else [] (or an error)."""
    if not path.exists():
        return []
    if not resume:
        raise ValueError(f"{path} already exists: pass --resume to continue that run, or choose another --out")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a results file ({e})") from None
    if saved.get("config") != config:
        diff = [f"{k}: {saved.get('config', {}).get(k)!r} -> {v!r}" for k, v in config.items()
                if saved.get("config", {}).get(k) != v]
        raise ValueError(f"--resume needs the arguments of the run in {path}; these differ: " + "; ".join(diff))
    return saved.get("items", [])


def cmd_mmlu(a):
    from . import generative, mmlu, report

    if a.save_every < 1:
        raise ValueError(f"--save-every must be >= 1, got {a.save_every}")
    questions, dev, leave_one_out, notes = load_questions(a)
    out_path = Path(a.out)
    config = _run_config(a, leave_one_out)
    items = _previous_items(out_path, config, a.resume)
    model, tokenizer = load_model_and_tokenizer(a.model, a.backend)
    total = sum(len(v) for v in questions.values())
    if a.generate:
        it = generative.iter_generative(model, tokenizer, questions, a.max_new_tokens, start=len(items))
        convention = dict(style="0-shot chain of thought, chat template, greedy",
                          rule="the letter after the last 'best answer is '; none or not A-D: unparseable, wrong")
    else:
        it = mmlu.iter_items(model, tokenizer, questions, dev, a.shots, a.style, bos=not a.no_bos,
                             leave_one_out=leave_one_out, start=len(items))
        convention = mmlu.convention(a.style, a.shots, not a.no_bos, leave_one_out=leave_one_out)
    record = dict(version=RESULTS_VERSION, config=config, convention=convention, notes=notes, done=False,
                  resumed_from=len(items) if items else None, items=items)
    for line in notes:
        print(line, file=sys.stderr)
    if items:
        print(f"resuming {out_path}: {len(items)} of {total} questions already scored", file=sys.stderr)
    bar = None
    if not a.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=len(items), desc="mmlu", unit="q", dynamic_ncols=True)
    try:
        for item in it:
            items.append(item)
            if bar is not None:
                bar.update(1)
            if len(items) % a.save_every == 0:
                _write_json(out_path, record)
    except KeyboardInterrupt:
        _write_json(out_path, record)
        print(f"\ninterrupted: {len(items)} of {total} questions saved in {out_path}; continue with --resume",
              file=sys.stderr)
        return 130
    except Exception:
        _write_json(out_path, record)  # keep what is done; the error is reported by the caller
        raise
    finally:
        if bar is not None:
            bar.close()
    summary = report.summarize(items)
    record.update(done=True, micro=summary["micro"], macro=summary["macro"], micro_ci95=summary["micro_ci95"],
                  macro_ci95=summary["macro_ci95"], subjects=summary["subjects"])
    if a.generate:
        record["unparseable"] = sum(bool(it.get("unparseable")) for it in items)
    _write_json(out_path, record)
    how = convention["style"] if a.generate else \
        f"{a.style}, {a.shots}-shot, {'BOS' if not a.no_bos else 'no BOS'}"
    print(report.format_table(summary, title=f"MMLU ({how}): {a.model}"))
    if a.generate:
        print(f"unparseable replies (counted wrong): {record['unparseable']} of {len(items)}")
    print(f"results: {out_path}", file=sys.stderr)
    return 0


def cmd_robustness(a):
    from . import robustness

    questions, dev, leave_one_out, notes = load_questions(a)
    model, tokenizer = load_model_and_tokenizer(a.model, a.backend)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = robustness.robustness_report(model, tokenizer, questions, dev, a.shots, a.style,
                                       leave_one_out=leave_one_out, progress=not a.no_progress)
    _write_json(out / "robustness.json", dict(config=_run_config_robustness(a), notes=notes, **rep))
    robustness.plot_robustness(rep, out / "robustness.png")
    for family, values in rep.items():
        if family != "spread":
            cells = ", ".join(f"{k}: {v:.1%}" for k, v in values.items())
            print(f"{family:18s} {cells}   (spread {rep['spread'][family]:.1%})")
    print(f"results: {out / 'robustness.json'}, plot: {out / 'robustness.png'}", file=sys.stderr)
    return 0


def _run_config_robustness(a):
    return dict(model=os.path.abspath(a.model), data=a.data, shots=a.shots, subjects=a.subjects, limit=a.limit,
                style=a.style)


def main(argv=None) -> int:
    """`llama3np eval ...` from Python (tests) or `python -m`: the one command line, llama3np.cli.main,
    so the errors, warnings and exit codes are the same; argv starts with the sub-command."""
    from ..cli import main as llama3np_main

    return llama3np_main(argv)


if __name__ == "__main__":
    sys.exit(main())
