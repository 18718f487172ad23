"""MMLU (Hendrycks et al., 2021): the k-shot prompt, byte for byte, and scoring by log-likelihood.

A question is a dict {"question": str, "choices": [4 str], "answer": int 0-3}. The prompt of
style="harness" is lm-evaluation-harness's default MMLU template (tasks/mmlu/default):

    The following are multiple choice questions (with answers) about abstract algebra.\\n\\n
    {shot question, stripped}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n      x k shots
    {question, stripped}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:

(the header is the task's `description`; each shot is doc_to_text + target_delimiter " " + the gold
choice + fewshot_delimiter "\\n\\n"; the shots are the first k of the dev split, `first_n`).
style="original" is hendrycks/test's evaluate.py (format_subject, format_example, gen_prompt): the same
shape, but the subject gets a leading space (so "about  abstract algebra." has two spaces) and questions
are not stripped. style="cloze" is for models that never learnt the lettered format (our story models):
no header, no letters, the question text continued by each choice's text (" " + choice), shots as
"{question} {gold choice}\\n\\n".

Scoring (the harness's convention): the prediction is the argmax over the four choices of
log P(" A" | prompt) ... log P(" D" | prompt), each the sum over the continuation's tokens; ties go to
the FIRST (lowest) letter, as np.argmax does. The prompt starts with BOS by default (as Meta's
evaluations do; the harness adds it only with add_bos_token=True): bos=False leaves it out.
"""
import numpy as np

from . import report
from .scoring import PrefixCache, encode_choices, loglikelihood_full

LETTERS = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"
STYLES = ("harness", "original", "cloze")


def check_question(q, where="question"):
    """A ValueError/TypeError naming `where` unless q is {"question": str, "choices": [str]*n, "answer": int}."""
    if not isinstance(q, dict):
        raise TypeError(f"{where} must be a dict with question/choices/answer, got {type(q).__name__}")
    for key in ("question", "choices", "answer"):
        if key not in q:
            raise ValueError(f"{where} has no {key!r} key (expected question, choices, answer)")
    if not isinstance(q["question"], str):
        raise TypeError(f"{where}: 'question' must be a str, got {type(q['question']).__name__}")
    choices = q["choices"]
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise TypeError(f"{where}: 'choices' must be a list of str, got {choices!r}")
    a = q["answer"]
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)) or not 0 <= a < len(choices):
        raise ValueError(f"{where}: 'answer' must be an int in [0, {len(choices)}), got {a!r}")


def format_subject(subject, style="harness"):
    """"abstract_algebra" -> "abstract algebra" (harness) or " abstract algebra" (original: every word
    gets a space in front, so the header reads "about  abstract algebra.")."""
    words = subject.split("_")
    if style == "original":
        return "".join(" " + w for w in words)
    return " ".join(words)


def _check_style(style):
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def format_example(q, style="harness", labels=LETTERS, include_answer=True):
    """One question as the template writes it; with include_answer its gold answer and the delimiter."""
    check_question(q)
    if style == "cloze":
        text = q["question"].strip()
        return f"{text} {q['choices'][q['answer']]}\n\n" if include_answer else text
    if len(q["choices"]) != len(labels):
        raise ValueError(f"{len(q['choices'])} choices but {len(labels)} labels {tuple(labels)}")
    text = q["question"].strip() if style == "harness" else q["question"]
    for label, choice in zip(labels, q["choices"]):
        text += f"\n{label}. {choice}"
    text += "\nAnswer:"
    return text + f" {labels[q['answer']]}\n\n" if include_answer else text


def format_prefix(subject, shots, style="harness", labels=LETTERS):
    """The part of the prompt shared by every question of a subject: the header and the k shots."""
    _check_style(style)
    head = "" if style == "cloze" else HEADER.format(format_subject(subject, style))
    return head + "".join(format_example(s, style, labels) for s in shots)


def format_prompt(subject, shots, question, style="harness", labels=LETTERS):
    """The whole k-shot prompt for `question` (its answer not written), ending in "Answer:" (or, for
    style="cloze", in the question's text). `shots` are question dicts with their answers shown."""
    _check_style(style)
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject must be a non-empty str such as 'abstract_algebra', got {subject!r}")
    return format_prefix(subject, shots, style, labels) + format_example(question, style, labels, include_answer=False)


def continuations(question, style="harness", labels=LETTERS):
    """What is scored after the prompt: " A" ... " D" (the label sets of the robustness report), or for
    style="cloze" each choice's own text."""
    if style == "cloze":
        return [" " + c for c in question["choices"]]
    return [" " + label for label in labels]


def select_shots(dev_items, question, k_shot, leave_one_out=False):
    """The first k of the dev items (the harness's `first_n`); with leave_one_out the question itself is
    skipped (for a set whose questions ARE its dev split, such as the harness's CoT prompts)."""
    pool = [d for d in dev_items if not (leave_one_out and d == question)]
    return pool[:k_shot]


# ----------------------------------------------------------------------------------------------------
def _subject_prompts(tokenizer, subject, items, dev_items, k_shot, style, labels, bos, leave_one_out):
    """-> (prefix ids, [(context ids, [continuation ids])], [number of shots]) for a subject's questions."""
    # the cache starts with the first prompt's header and shots: every prompt shares them (leave-one-out:
    # most of them; the cache then reuses whatever consecutive prompts share)
    first_shots = select_shots(dev_items, items[0], k_shot, leave_one_out) if items else []
    prefix_ids = tokenizer.encode(format_prefix(subject, first_shots, style, labels), bos=bos, eos=False)
    encoded, n_shots = [], []
    for q in items:
        shots = select_shots(dev_items, q, k_shot, leave_one_out)
        n_shots.append(len(shots))
        encoded.append(encode_choices(tokenizer, format_prompt(subject, shots, q, style, labels),
                                      continuations(q, style, labels), bos=bos))
    return prefix_ids, encoded, n_shots


def _check_inputs(questions, dev, k_shot, style):
    _check_style(style)
    if not isinstance(questions, dict):
        raise TypeError(f"questions must map subject -> list of question dicts, got {type(questions).__name__}")
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 0:
        raise ValueError(f"k_shot must be an int >= 0, got {k_shot!r}")
    for subject, items in questions.items():
        for i, q in enumerate(items):
            check_question(q, f"{subject} question {i}")
        if k_shot:
            if subject not in dev:
                raise ValueError(f"no dev questions for subject {subject!r} ({k_shot}-shot needs them)")
            for i, q in enumerate(dev[subject]):
                check_question(q, f"{subject} dev question {i}")


def _left_truncate(encoded, max_len):
    """Cut prompts from the left so that prompt + continuation - 1 fits max_len (lm-evaluation-harness's
    rule for over-long contexts) -> (encoded, indices of the cut ones)."""
    out, cut = [], set()
    for i, (ctx, conts) in enumerate(encoded):
        room = max_len - (max(map(len, conts)) - 1)
        if len(ctx) > room:
            ctx = ctx[len(ctx) - room:]
            cut.add(i)
        out.append((ctx, conts))
    return out, cut


def iter_items(model, tokenizer, questions, dev, k_shot=5, style="harness", *, labels=LETTERS, bos=True,
               use_cache=True, leave_one_out=False, fit_shots=True, start=0):
    """Yield one result dict per question, subject by subject in the dict's order (see `evaluate`).

    start: skip the first `start` items (to resume an interrupted run; the rest are the same numbers).
    fit_shots: if a subject's prompts do not fit the model's context, use fewer shots for that subject
    (hendrycks' rule: k - 1 until every prompt fits; the item records "n_shots"); if even 0-shot does not
    fit, keep the end of the prompt (the harness's left truncation; the item gets "truncated": True).
    fit_shots=False raises ValueError instead.
    """
    _check_inputs(questions, dev, k_shot, style)
    labels = tuple(labels)
    index = 0
    for subject, items in questions.items():
        if index + len(items) <= start:
            index += len(items)
            continue
        dev_items = list(dev.get(subject, [])) if k_shot else []
        k = min(k_shot, len(dev_items))
        while True:
            prefix_ids, encoded, n_shots = _subject_prompts(tokenizer, subject, items, dev_items, k, style, labels, bos,
                                                   leave_one_out)
            need = max((len(c) + max(map(len, conts)) - 1 for c, conts in encoded), default=0)
            if need <= model.args.max_seq_len or not fit_shots or k == 0:
                break
            k -= 1
        truncated = set()
        if need > model.args.max_seq_len:
            if not fit_shots:
                raise ValueError(f"{subject}: a {k}-shot prompt needs {need} positions; the model's context is "
                                 f"{model.args.max_seq_len} (max_seq_len)")
            # even 0-shot is too long: keep the END of the prompt, as the harness does (left truncation)
            encoded, truncated = _left_truncate(encoded, model.args.max_seq_len)
            need = model.args.max_seq_len
        shared = None
        if use_cache and encoded:
            multi = any(len(c) > 1 for _, conts in encoded for c in conts)
            rows = max(len(conts) for _, conts in encoded) if multi else 1
            shared = PrefixCache(model, prefix_ids, max(need, len(prefix_ids)), rows=rows)
        for i, (q, (ctx, conts)) in enumerate(zip(items, encoded)):
            if index >= start:
                if shared is not None:
                    lps = [float(x) for x in shared.loglikelihoods(ctx, conts)]
                else:
                    lps = [loglikelihood_full(model, ctx, c) for c in conts]
                pred = max(range(len(lps)), key=lambda j: (lps[j], -j))  # argmax, ties -> lowest letter
                item = dict(subject=subject, index=i, logprobs=lps, pred=pred, answer=int(q["answer"]),
                            correct=pred == int(q["answer"]), n_shots=n_shots[i], n_tokens=len(ctx))
                if i in truncated:
                    item["truncated"] = True  # its prompt lost its beginning to fit the context
                yield item
            index += 1


def evaluate(model, tokenizer, questions, dev, k_shot=5, style="harness", *, labels=LETTERS, bos=True,
             use_cache=True, leave_one_out=False, fit_shots=True, progress=False):
    """k-shot multiple-choice accuracy of `model` on `questions` (subject -> list of question dicts).

    dev: subject -> list of question dicts whose first k are the shots. Returns
        {"micro": accuracy over all questions, "macro": mean of the subjects' accuracies (Llama's reports),
         "micro_ci95", "macro_ci95": [lo, hi],
         "subjects": {subject: {"accuracy", "correct", "n", "ci95"}},
         "items": [{"subject", "index", "logprobs" (log P(" A"|prompt) ... log P(" D"|prompt)), "pred",
                    "answer", "correct", "n_shots", "n_tokens"}, ...] in the order of `questions`,
         "convention": how the prompt was written and scored}
    The prediction is the argmax of the four log-likelihoods, ties to the first letter. use_cache=False
    recomputes every (prompt, choice) in full, the harness's way (the reference for the cached path).
    """
    it = iter_items(model, tokenizer, questions, dev, k_shot, style, labels=labels, bos=bos,
                    use_cache=use_cache, leave_one_out=leave_one_out, fit_shots=fit_shots)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=sum(len(v) for v in questions.values()), desc="mmlu", unit="q")
    items = list(it)
    out = report.summarize(items)
    out["convention"] = convention(style, k_shot, bos, labels, leave_one_out)
    return out


def convention(style, k_shot, bos, labels=LETTERS, leave_one_out=False):
    """What a reader needs to compare this number with another: the prompt, the shots and the rule."""
    return dict(style=style, k_shot=k_shot, bos=bos, labels=list(labels), leave_one_out=leave_one_out,
                shots="first k of the dev split" + (", the question itself left out" if leave_one_out else ""),
                rule=("argmax over choices of log P(' ' + label | prompt) summed over the label's tokens; "
                      "ties -> first" if style != "cloze" else
                      "argmax over choices of log P(' ' + choice text | question) (unnormalised); ties -> first"))
