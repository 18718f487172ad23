"""Generative MMLU for chat models: 0-shot chain of thought, greedy decoding, the answer letter extracted.

Llama 3.1 Instruct reports MMLU 0-shot with chain of thought (Meta's `mmlu__0_shot__cot`). The prompt is
the user message of lm-evaluation-harness's reproduction of Meta's evaluation (tasks/llama3/instruct/
mmlu_cot), rendered with Llama 3's chat template (BOS, a user turn, the assistant header):

    Given the following question and four candidate answers (A, B, C and D), choose the best answer.
    Question: ... A. ... D. ...   (then the instructions, ending "Let's think step by step.")

The reply is decoded greedily until an end-of-turn token or max_new_tokens. Extraction rule (the
harness's `strict_match` filter): the letter after the LAST "best answer is " in the reply; a reply
without one, or with a letter other than A-D, is unparseable and counted as wrong (and reported).
"""
import re

from . import report
from .mmlu import LETTERS, check_question

COT_PROMPT = (
    "Given the following question and four candidate answers (A, B, C and D), choose the best answer.\n\n"
    "Question: {question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n\n"
    "- For simple problems:\nDirectly provide the answer with minimal explanation.\n\n"
    "- For complex problems:\nUse this step-by-step format:\n## Step 1: [Concise description]\n[Brief explanation]\n"
    "## Step 2: [Concise description]\n[Brief explanation]\n\n"
    "Regardless of the approach, always conclude with:\nThe best answer is [the_answer_letter].\n"
    "where the [the_answer_letter] is one of A, B, C or D.\n\nLet's think step by step."
)
ANSWER_PATTERN = re.compile(r"best answer is ([A-Z])")


def format_cot_message(question):
    """The user message for one question (its answer not written)."""
    check_question(question)
    if len(question["choices"]) != 4:
        raise ValueError(f"the 0-shot CoT prompt takes 4 choices, got {len(question['choices'])}")
    a, b, c, d = question["choices"]
    return COT_PROMPT.format(question=question["question"].strip(), a=a, b=b, c=c, d=d)


def extract_answer(reply):
    """The answer index 0-3 from a reply, or None if unparseable (see the module doc for the rule)."""
    found = ANSWER_PATTERN.findall(reply)
    if not found or found[-1] not in LETTERS:
        return None
    return LETTERS.index(found[-1])


def iter_generative(model, tokenizer, questions, max_new_tokens=512, start=0):
    """Yield one item per question: subject, index, reply, pred (None if unparseable), answer, correct."""
    from ..generation import generate
    from ..tokenizer import ChatFormat

    fmt = ChatFormat(tokenizer)
    index = 0
    for subject, items in questions.items():
        for i, q in enumerate(items):
            if index >= start:
                ids = fmt.encode_dialog_prompt([{"role": "user", "content": format_cot_message(q)}])
                room = model.args.max_seq_len - len(ids)
                if room <= 0:
                    raise ValueError(f"{subject} question {i}: the prompt ({len(ids)} tokens) does not fit the "
                                     f"model's context of {model.args.max_seq_len} tokens")
                out = generate(model, ids, min(max_new_tokens, room), temperature=0,
                               stop_tokens=tokenizer.stop_tokens)
                reply = tokenizer.decode(out)
                pred = extract_answer(reply)
                yield dict(subject=subject, index=i, reply=reply, pred=pred, answer=q["answer"],
                           correct=pred == q["answer"], unparseable=pred is None)
            index += 1


def evaluate_generative(model, tokenizer, questions, max_new_tokens=512):
    """Accuracy (unparseable replies count as wrong) and how many replies were unparseable."""
    items = list(iter_generative(model, tokenizer, questions, max_new_tokens))
    out = report.summarize(items)
    out["unparseable"] = sum(it["unparseable"] for it in items)
    return out
