"""MMLU evaluation (llama3np.eval): the prompt byte for byte, scores of toy models known in advance, the
prefix cache changing nothing, the loaders and their errors, the generated story-world set.

The golden prompts are written out by hand from the two references' templates:
- lm-evaluation-harness, tasks/mmlu/default/_default_template_yaml: doc_to_text
  "{{question.strip()}}\\nA. {{choices[0]}}\\nB. ...\\nD. {{choices[3]}}\\nAnswer:", target_delimiter " ",
  fewshot_delimiter "\\n\\n", the subject's description "The following are multiple choice questions
  (with answers) about {subject with spaces}.\\n\\n", shots = the first k of dev;
- hendrycks/test evaluate.py: format_subject puts a space before every word (so "about  abstract
  algebra."), format_example does not strip the question and ends a shot with " {letter}\\n\\n".
"""
import csv
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import llama3np
from llama3np.eval import data, generative, mmlu, report, robustness, scoring, story_mmlu
from llama3np.tokenizer import Tokenizer

SHOT = {"question": "  What is 2 + 2?\n", "choices": ["3", "4", "5", "6"], "answer": 1}
QUESTION = {"question": "Find the order of Z_4.", "choices": ["1", "2", "3", "4"], "answer": 3}

GOLDEN_HARNESS = (
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
    "Find the order of Z_4.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
)
GOLDEN_ORIGINAL = (
    "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
    "  What is 2 + 2?\n\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
    "Find the order of Z_4.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
)


def byte_tokenizer():
    """256 byte tokens plus " A" " B" " C" " D" as single tokens (as in Llama 3's vocabulary), + specials."""
    ranks = {bytes([i]): i for i in range(256)}
    for j, letter in enumerate([b" A", b" B", b" C", b" D"]):
        ranks[letter] = 256 + j
    return Tokenizer.from_ranks(ranks, name="bytes+letters")


TOK = byte_tokenizer()
LETTER_IDS = [TOK.encode(" " + L, bos=False, eos=False)[0] for L in "ABCD"]


def tiny_model(dtype=np.float32, seed=0, max_seq_len=2048):
    args = llama3np.ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=TOK.n_words,
                              hidden_dim=32, max_seq_len=max_seq_len)
    return llama3np.Transformer(args, seed=seed, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# the prompt
def test_harness_prompt_is_byte_identical_to_the_golden_string():
    assert mmlu.format_prompt("abstract_algebra", [SHOT], QUESTION) == GOLDEN_HARNESS
    assert mmlu.format_prompt("abstract_algebra", [SHOT], QUESTION, style="harness") == GOLDEN_HARNESS


def test_original_prompt_is_byte_identical_to_the_golden_string_with_its_double_space():
    assert mmlu.format_prompt("abstract_algebra", [SHOT], QUESTION, style="original") == GOLDEN_ORIGINAL


def test_zero_shot_prompt_is_the_header_then_the_question():
    assert mmlu.format_prompt("high_school_us_history", [], QUESTION) == (
        "The following are multiple choice questions (with answers) about high school us history.\n\n"
        "Find the order of Z_4.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")


def test_the_question_answer_is_never_written_and_the_prompt_is_prefix_plus_question():
    for style in ("harness", "original", "cloze"):
        prompt = mmlu.format_prompt("anatomy", [SHOT, SHOT], QUESTION, style)
        prefix = mmlu.format_prefix("anatomy", [SHOT, SHOT], style)
        assert prompt.startswith(prefix)
        rest = prompt[len(prefix):]
        assert rest == mmlu.format_example(QUESTION, style, include_answer=False)
        assert "Answer: D" not in rest and not rest.endswith(" 4")
    assert mmlu.format_prompt("anatomy", [SHOT], QUESTION, "cloze") == "What is 2 + 2? 4\n\nFind the order of Z_4."


def test_other_label_sets_replace_the_letters_in_the_options_and_the_answers():
    p = mmlu.format_prompt("abstract_algebra", [SHOT], QUESTION, labels=("1", "2", "3", "4"))
    assert "\n1. 3\n2. 4\n3. 5\n4. 6\nAnswer: 2\n\n" in p and p.endswith("\n4. 4\nAnswer:")


def test_bad_questions_are_clear_errors():
    with pytest.raises(ValueError, match="answer"):
        mmlu.format_prompt("a", [], dict(QUESTION, answer=4))
    with pytest.raises(ValueError, match="choices"):
        mmlu.format_prompt("a", [], {"question": "q", "answer": 0})
    with pytest.raises(ValueError, match="style"):
        mmlu.format_prompt("a", [], QUESTION, style="helm")
    with pytest.raises(ValueError, match="labels"):
        mmlu.format_prompt("a", [], dict(QUESTION, choices=["1", "2", "3"], answer=0))


def test_llama3_tokenizer_encodes_the_answer_letters_as_one_token_after_answer_colon():
    """The continuation " A" after "Answer:" is the single token " A" (362) in Meta's vocabulary."""
    tok = Tokenizer.get_instance()
    ctx, conts = scoring.encode_choices(tok, "Question\nAnswer:", [" A", " B", " C", " D"])
    assert ctx[0] == tok.bos_id and [len(c) for c in conts] == [1, 1, 1, 1]
    assert tok.decode(conts[0]) == " A"
    _, digits = scoring.encode_choices(tok, "Answer:", [" 1"])
    assert len(digits[0]) == 2  # " 1" is " " + "1": summed over its two tokens


def test_encode_choices_moves_the_contexts_trailing_space_to_the_continuation_like_the_harness():
    ctx, conts = scoring.encode_choices(TOK, "Answer: ", ["A"], bos=False)
    assert TOK.decode(ctx) == "Answer:" and conts == [[LETTER_IDS[0]]]


# ----------------------------------------------------------------------------------------------------
# toy models with known scores
class ToyModel:
    """Logits from a rule instead of weights: `rule(text) -> logits (V,)` at the last position, where text
    is the whole sequence so far. Its "KV cache" holds the token ids themselves, in the layout of a real one
    (rows, 1, positions, 1), so a wrong reuse of cached positions or a wrong row copy shows in the scores."""

    def __init__(self, rule, max_seq_len=100_000):
        self.args = llama3np.ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=TOK.n_words, max_seq_len=max_seq_len)
        self.rule = rule

    def new_cache(self, batch_size, max_seq_len=None):
        max_seq_len = max_seq_len or self.args.max_seq_len
        ids = np.zeros((batch_size, 1, max_seq_len, 1), dtype=np.int64)
        return type("TokenCache", (), dict(cache_k=[ids], cache_v=[], batch_size=batch_size,
                                           max_seq_len=max_seq_len))()

    def forward(self, tokens, start_pos=0, cache=None):
        B, T = tokens.shape
        seq = tokens
        if cache is not None:
            ids = cache.cache_k[0]
            ids[:B, 0, start_pos:start_pos + T, 0] = tokens
            seq = ids[:B, 0, :start_pos + T, 0]
        out = np.zeros((B, T, self.args.vocab_size))
        for b in range(B):
            out[b, -1] = self.rule(TOK.decode([int(t) for t in seq[b] if t < 256 + 4]))
        return out


def letter_logits(index, strength=30.0):
    z = np.zeros(TOK.n_words)
    z[LETTER_IDS[index]] = strength
    return z


def small_set(n=8, seed=0):
    return story_mmlu.generate_split(n, 2, seed=seed, subjects=("story_remedies", "pronouns", "past_tense"))


def test_an_oracle_model_scores_exactly_100_percent():
    questions, dev = small_set()
    gold = {q["question"]: q["answer"] for items in questions.values() for q in items}

    def oracle(text):
        if not text.endswith("Answer:"):  # the k-shot prefix alone: nothing is read from it
            return np.zeros(TOK.n_words)
        found = max(gold, key=lambda k: text.rfind(k))  # the question the prompt ends with
        assert found in text
        return letter_logits(gold[found])

    r = mmlu.evaluate(ToyModel(oracle), TOK, questions, dev, k_shot=2)
    assert r["micro"] == 1.0 and r["macro"] == 1.0
    assert all(it["pred"] == it["answer"] for it in r["items"])


def test_a_model_that_always_prefers_D_scores_exactly_the_fraction_of_D_answers():
    questions, dev = small_set(n=7)
    questions["story_remedies"] = questions["story_remedies"][:5]  # uneven subjects: micro != macro
    r = mmlu.evaluate(ToyModel(lambda text: letter_logits(3)), TOK, questions, dev, k_shot=1)
    answers = [q["answer"] for items in questions.values() for q in items]
    assert r["micro"] == answers.count(3) / len(answers)
    for s, items in questions.items():
        assert r["subjects"][s]["accuracy"] == sum(q["answer"] == 3 for q in items) / len(items)
    assert r["macro"] == pytest.approx(np.mean([r["subjects"][s]["accuracy"] for s in questions]), abs=0)


def test_a_uniform_model_ties_and_the_tie_goes_to_the_first_letter():
    questions, dev = small_set()
    r = mmlu.evaluate(ToyModel(lambda text: np.zeros(TOK.n_words)), TOK, questions, dev, k_shot=2)
    assert all(it["pred"] == 0 for it in r["items"])
    assert all(it["logprobs"] == [-math.log(TOK.n_words)] * 4 for it in r["items"])
    answers = [q["answer"] for items in questions.values() for q in items]
    assert r["micro"] == answers.count(0) / len(answers)


def test_items_keep_the_order_of_the_questions_and_carry_the_documented_fields():
    questions, dev = small_set(n=4)
    r = mmlu.evaluate(ToyModel(lambda text: np.zeros(TOK.n_words)), TOK, questions, dev, k_shot=1)
    order = [(s, i) for s, items in questions.items() for i in range(len(items))]
    assert [(it["subject"], it["index"]) for it in r["items"]] == order
    for it, (s, i) in zip(r["items"], order):
        assert set(it) >= {"subject", "logprobs", "pred", "answer"} and len(it["logprobs"]) == 4
        assert it["answer"] == questions[s][i]["answer"] and isinstance(it["pred"], int)
    assert set(r) >= {"micro", "macro", "subjects", "items"}
    assert {s: v["n"] for s, v in r["subjects"].items()} == {s: 4 for s in questions}


def test_a_random_model_lands_within_two_sigma_of_chance_on_the_generated_set():
    questions, dev = story_mmlu.generate_split(20, 1, seed=3)  # 5 subjects x 20 (gold letters balanced)
    r = mmlu.evaluate(tiny_model(seed=1), TOK, questions, dev, k_shot=0)
    n = sum(len(v) for v in questions.values())
    sigma = math.sqrt(0.25 * 0.75 / n)
    assert abs(r["micro"] - 0.25) <= 2 * sigma, (r["micro"], sigma)


# ----------------------------------------------------------------------------------------------------
# the prefix cache is exact
@pytest.mark.parametrize("variant", ["harness", "original", "digits", "cloze", "no-bos", "leave-one-out"])
def test_prefix_caching_changes_no_log_likelihood_float64(variant):
    """Every item's four log-likelihoods equal those of a full recomputation per (prompt, choice), to 1e-12,
    including multi-token labels (" 1" is two tokens here), cloze continuations of many tokens, no BOS,
    and leave-one-out shots (prompts that share only part of the prefix)."""
    questions, dev = story_mmlu.generate_split(2, 2, seed=1, subjects=("story_remedies", "pronouns"))
    kw = dict(style="harness", k_shot=1)
    if variant == "original":
        kw["style"] = "original"
    elif variant == "digits":
        kw["labels"] = ("1", "2", "3", "4")
    elif variant == "cloze":
        kw["style"] = "cloze"
    elif variant == "no-bos":
        kw["bos"] = False
    elif variant == "leave-one-out":
        dev, kw["leave_one_out"], kw["k_shot"] = questions, True, 1
    model = tiny_model(np.float64)
    cached = mmlu.evaluate(model, TOK, questions, dev, **kw)
    full = mmlu.evaluate(model, TOK, questions, dev, use_cache=False, **kw)
    a = np.array([it["logprobs"] for it in cached["items"]])
    b = np.array([it["logprobs"] for it in full["items"]])
    assert a.shape == (4, 4) and np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    if variant == "leave-one-out":  # each question's shot is the other question
        assert [it["n_shots"] for it in cached["items"]] == [1, 1, 1, 1]
    assert [it["pred"] for it in cached["items"]] == [it["pred"] for it in full["items"]]


def test_the_k_shot_prefix_is_computed_once_per_subject():
    questions, dev = story_mmlu.generate_split(3, 2, seed=2, subjects=("story_remedies", "past_tense"))
    model = tiny_model()
    starts = []
    forward = model.forward

    def counting_forward(tokens, start_pos=0, cache=None, **kw):
        starts.append((start_pos, np.asarray(tokens).shape))
        return forward(tokens, start_pos, cache, **kw)

    model.forward = counting_forward
    mmlu.evaluate(model, TOK, questions, dev, k_shot=2)
    assert sum(1 for s, _ in starts if s == 0) == len(questions)  # one prefix forward per subject
    assert len(starts) == len(questions) + 6  # + one forward per question (single-token letters)


def test_prompts_sharing_only_part_of_what_the_cache_holds_are_exact_one_after_another():
    model = tiny_model(np.float64)
    prefix = list(range(1, 30))
    shared = scoring.PrefixCache(model, prefix, 64, rows=2)
    other = prefix[:10] + [99, 98, 97]  # diverges at position 10
    conts = [[LETTER_IDS[0], 5], [LETTER_IDS[1]]]
    got = shared.loglikelihoods(other, conts)
    want = [scoring.loglikelihood_full(model, other, c) for c in conts]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    again = prefix + [7, 8]
    np.testing.assert_allclose(shared.loglikelihoods(again, conts),
                               [scoring.loglikelihood_full(model, again, c) for c in conts], rtol=0, atol=1e-12)


def test_prompts_longer_than_the_context_use_fewer_shots_or_fail_clearly():
    questions, dev = story_mmlu.generate_split(2, 3, seed=1, subjects=("story_remedies",))
    model = tiny_model(max_seq_len=900)  # a byte per token: 3 shots of ~300 bytes do not fit
    r = mmlu.evaluate(model, TOK, questions, dev, k_shot=3)
    assert 0 < r["items"][0]["n_shots"] < 3
    with pytest.raises(ValueError, match="context"):
        mmlu.evaluate(model, TOK, questions, dev, k_shot=3, fit_shots=False)


def test_prompts_too_long_even_at_0_shot_keep_their_end_like_the_harness():
    questions, dev = story_mmlu.generate_split(2, 1, seed=1, subjects=("story_remedies",))
    model = tiny_model(np.float64, max_seq_len=120)  # the question alone is ~300 bytes
    r = mmlu.evaluate(model, TOK, questions, dev, k_shot=1)
    assert all(it["truncated"] and it["n_shots"] == 0 and it["n_tokens"] == 120 for it in r["items"])
    for it, q in zip(r["items"], questions["story_remedies"]):
        ctx, conts = scoring.encode_choices(TOK, mmlu.format_prompt("story_remedies", [], q), mmlu.continuations(q))
        want = [scoring.loglikelihood_full(model, ctx[-120:], c) for c in conts]  # the last 120 tokens
        np.testing.assert_allclose(it["logprobs"], want, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# accuracies and intervals
def test_wilson_interval_known_values_and_edges():
    lo, hi = report.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert report.wilson_interval(0, 10)[0] == 0.0 and report.wilson_interval(10, 10)[1] == 1.0
    assert report.wilson_interval(0, 0) == [0.0, 1.0]


def test_micro_weighs_questions_and_macro_weighs_subjects():
    items = [dict(subject="a", correct=True)] * 3 + [dict(subject="b", correct=False)]
    r = report.summarize(items)
    assert r["micro"] == 0.75 and r["macro"] == 0.5
    assert "micro (all questions)" in report.format_table(r)


# ----------------------------------------------------------------------------------------------------
# loaders
def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def test_hendrycks_csv_folder_reads_quotes_commas_and_newlines(tmp_path):
    (tmp_path / "data" / "dev").mkdir(parents=True)
    (tmp_path / "data" / "test").mkdir()
    write_csv(tmp_path / "data/dev/abstract_algebra_dev.csv", [["Shot, with a comma?", "1", "2", "3", "None", "D"]])
    write_csv(tmp_path / "data/test/abstract_algebra_test.csv",
              [['Line one\n"quoted" line two', "a", "b", "c", "d", "B"], ["Q2", "0", "1.0", "x", "y", "A"]])
    write_csv(tmp_path / "data/test/anatomy_test.csv", [["Q", "a", "b", "c", "d", "C"]])
    questions, dev = data.read_hendrycks(tmp_path)
    assert list(questions) == ["abstract_algebra", "anatomy"]
    assert questions["abstract_algebra"][0] == {"question": 'Line one\n"quoted" line two',
                                                "choices": ["a", "b", "c", "d"], "answer": 1}
    assert questions["abstract_algebra"][1]["choices"] == ["0", "1.0", "x", "y"]  # text stays text
    assert dev["abstract_algebra"][0]["choices"][3] == "None" and dev["abstract_algebra"][0]["answer"] == 3
    assert data.load(tmp_path / "data") == (questions, dev)


@pytest.mark.parametrize("row, message", [
    (["Q", "a", "b", "c", "A"], "row 2: 5 columns, expected 6"),
    (["Q", "a", "b", "c", "d", "E"], "row 2: answer 'E' is not one of A, B, C, D"),
])
def test_malformed_csv_rows_name_the_file_and_the_row(tmp_path, row, message):
    (tmp_path / "test").mkdir()
    path = tmp_path / "test" / "anatomy_test.csv"
    write_csv(path, [["Q", "a", "b", "c", "d", "A"], row])
    with pytest.raises(ValueError, match="anatomy_test.csv") as e:
        data.read_hendrycks(tmp_path)
    assert message in str(e.value)


def test_a_missing_folder_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="test/"):
        data.read_hendrycks(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load(tmp_path / "nope")


@pytest.fixture
def pa():
    return pytest.importorskip("pyarrow", reason="reading cais/mmlu parquet needs pyarrow: pip install pyarrow")


def write_parquet(pa, path, rows):
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_cais_mmlu_parquet_files_read_by_subject(tmp_path, pa):
    rows = [dict(question="Q1", subject="anatomy", choices=["a", "b", "c", "d"], answer=2),
            dict(question="Q2", subject="abstract_algebra", choices=["e", "f", "g", "h"], answer=0),
            dict(question="Q3", subject="anatomy", choices=["i", "j", "k", "l"], answer=3)]
    write_parquet(pa, tmp_path / "all" / "test-00000-of-00001.parquet", rows)
    write_parquet(pa, tmp_path / "all" / "dev-00000-of-00001.parquet", rows[:1])
    questions, dev = data.load(tmp_path)
    assert list(questions) == ["abstract_algebra", "anatomy"]
    assert questions["anatomy"] == [dict(question="Q1", choices=["a", "b", "c", "d"], answer=2),
                                    dict(question="Q3", choices=["i", "j", "k", "l"], answer=3)]
    assert dev == {"anatomy": questions["anatomy"][:1]}


@pytest.mark.parametrize("bad, message", [
    (dict(subject=""), "row 1: no subject"),
    (dict(answer=7), "row 1: answer 7 is not 0-3"),
    (dict(choices=["a", "b", "c"]), "row 1: choices"),
])
def test_malformed_parquet_rows_name_the_file_and_the_row(tmp_path, pa, bad, message):
    good = dict(question="Q", subject="anatomy", choices=["a", "b", "c", "d"], answer=0)
    path = tmp_path / "test-00000-of-00001.parquet"
    write_parquet(pa, path, [good, dict(good, **bad)])
    with pytest.raises(ValueError, match="test-00000-of-00001.parquet") as e:
        data.read_parquet(path)
    assert message in str(e.value)


def test_lm_eval_cot_questions_are_cleaned_281_four_option_items():
    pytest.importorskip("lm_eval", reason="the real MMLU dev questions ship in lm-eval: pip install --no-deps lm-eval")
    questions, defects = data.read_lm_eval_cot()
    assert len(questions) == 57 and sum(len(v) for v in questions.values()) == 281
    assert all(len(q["choices"]) == 4 and 0 <= q["answer"] < 4 for v in questions.values() for q in v)
    text = json.dumps(questions)
    assert "\\f" not in text.replace("\\\\f", "") and "\\r" not in text.replace("\\\\r", "")
    kinds = {(d["subject"], d["fix"]) for d in defects}
    assert ("college_chemistry", "dropped") in kinds and ("abstract_algebra", "leaked line removed") in kinds
    assert {"college_biology", "college_mathematics"} <= {d["subject"] for d in defects if "LaTeX" in d["defect"]}
    assert questions["abstract_algebra"][1]["question"] == "Find the characteristic of the ring 2Z."


def test_cot_parsing_on_a_hand_written_prompt_with_each_defect():
    text = ("\nThe following are multiple choice questions (with answers) about abstract algebra.\n\n"
            "Q: " + data.COT_LEAK + "Is $\frac{1}{2}$ small?\n(A) yes (B) no (C) maybe (D) never\n"
            "A: Let's think step by step. It is. The answer is (A).\n\n"
            "Q: Five?\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) 5\nA: Let's think step by step. The answer is (E).\n\n")
    questions, defects = data.parse_cot_prompts({"abstract_algebra": text})
    assert questions == {"abstract_algebra": [dict(question="Is $\\frac{1}{2}$ small?",
                                                   choices=["yes", "no", "maybe", "never"], answer=0,
                                                   reasoning="It is. The answer is (A).")]}
    assert len(defects) == 4


# ----------------------------------------------------------------------------------------------------
# the generated story-world set
def test_story_questions_continue_with_what_the_grammar_wrote_and_have_balanced_letters():
    questions = story_mmlu.generate(8, seed=5)
    assert list(questions) == list(story_mmlu.SUBJECTS)
    for subject, items in questions.items():
        assert sorted(q["answer"] for q in items) == [0, 0, 1, 1, 2, 2, 3, 3]
    for subject in story_mmlu.SUBJECTS:
        for seed in range(6):
            q = story_mmlu.make_question(subject, seed, gold_position=seed % 4)
            story = story_mmlu._story(seed, story_mmlu.PLOTS[subject])  # the story the question was cut from
            assert len(set(q["choices"])) == 4 and q["answer"] == seed % 4
            for j, choice in enumerate(q["choices"]):
                assert story.startswith(q["question"] + " " + choice) == (j == q["answer"]), (subject, choice)
    assert story_mmlu.generate(8, seed=5) == questions  # deterministic


def test_story_endings_questions_complete_to_whole_grammar_stories():
    """A story_endings question + its gold answer is a whole story of the grammar (exactly one derivation)."""
    from llama3np.data import stories

    for q in story_mmlu.generate(4, seed=2, subjects=("story_endings", "pronouns"))["story_endings"]:
        assert len(stories.derivations(q["question"] + " " + q["choices"][q["answer"]], limit=2)) == 1


# ----------------------------------------------------------------------------------------------------
# robustness and generative scoring
def test_rotations_and_gold_swaps_move_the_answer_with_its_choice():
    q = dict(question="q", choices=["a", "b", "c", "d"], answer=1)
    r = robustness.rotate(q, 1)
    assert r["choices"] == ["d", "a", "b", "c"] and r["answer"] == 2
    g = robustness.gold_at(q, 3)
    assert g["choices"] == ["a", "d", "c", "b"] and g["answer"] == 3


def test_robustness_report_of_an_always_D_model_and_its_plot(tmp_path):
    questions, dev = small_set(n=4)
    rep = robustness.robustness_report(ToyModel(lambda text: letter_logits(3)), TOK, questions, dev, k_shot=1)
    assert set(rep) == {"label_sets", "answer_order", "same_answer_shots", "spread"}
    assert rep["answer_order"]["+0"] == 0.25 and rep["same_answer_shots"]["all A"] == 0.25
    fig = robustness.plot_robustness(rep, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000 and len(fig.axes) == 3


def test_generative_answers_are_extracted_by_the_stated_rule():
    assert generative.extract_answer("## Step 1 ... The best answer is B.") == 1
    assert generative.extract_answer("The best answer is A. Wait: the best answer is D.") == 3
    assert generative.extract_answer("I think (C).") is None
    assert generative.extract_answer("The best answer is E.") is None
    msg = generative.format_cot_message(QUESTION)
    assert msg.startswith("Given the following question and four candidate answers (A, B, C and D), choose the "
                          "best answer.\n\nQuestion: Find the order of Z_4.\nA. 1\nB. 2\nC. 3\nD. 4\n\n")
    assert msg.endswith("\n\nLet's think step by step.")


def test_generative_mode_decodes_greedily_and_counts_unparseable_replies_as_wrong():
    questions = {"story_remedies": story_mmlu.generate(3, seed=4, subjects=("story_remedies",))["story_remedies"]}
    replies = iter([b"Step 1: think. The best answer is C.", b"I do not know.", b"The best answer is B."])

    class Replier(ToyModel):
        """Writes one fixed reply per question, a byte per step, then <|eot_id|>."""

        def __init__(self):
            super().__init__(rule=None)
            self.reply, self.pos = b"", 0

        def forward(self, tokens, start_pos=0, cache=None):
            if start_pos == 0:  # a new prompt
                self.reply, self.pos = next(replies), 0
            z = np.zeros((1, tokens.shape[1], self.args.vocab_size))
            nxt = self.reply[self.pos] if self.pos < len(self.reply) else TOK.eot_id
            z[0, -1, nxt] = 50.0
            self.pos += 1
            return z

    r = generative.evaluate_generative(Replier(), TOK, questions, max_new_tokens=60)
    assert [it["pred"] for it in r["items"]] == [2, None, 1]
    assert r["unparseable"] == 1 and r["items"][0]["reply"].endswith("The best answer is C.")
    gold = [q["answer"] for q in questions["story_remedies"]]
    assert r["micro"] == ((gold[0] == 2) + (gold[2] == 1)) / 3


MODEL64 = tiny_model(np.float64, seed=4, max_seq_len=256)


@given(prefix=st.lists(st.integers(0, 511), min_size=0, max_size=12),
       shared=st.integers(0, 12),
       tail=st.lists(st.integers(0, 511), min_size=1, max_size=6),
       conts=st.lists(st.lists(st.integers(0, 511), min_size=1, max_size=3), min_size=1, max_size=4))
def test_prefix_cache_equals_full_recomputation_for_any_prompts(prefix, shared, tail, conts):
    """Any prefix, any context sharing any part of it, any continuations (1-3 tokens): the cached
    log-likelihoods equal full recomputations to 1e-12 (float64), twice in a row, then for the prefix + 1 token."""
    cache = scoring.PrefixCache(MODEL64, prefix, 40, rows=4)
    context = prefix[:shared] + tail
    want = [scoring.loglikelihood_full(MODEL64, context, c) for c in conts]
    for _ in range(2):
        np.testing.assert_allclose(cache.loglikelihoods(context, conts), want, rtol=0, atol=1e-12)
    whole = prefix + [7]
    np.testing.assert_allclose(cache.loglikelihoods(whole, conts),
                               [scoring.loglikelihood_full(MODEL64, whole, c) for c in conts], rtol=0, atol=1e-12)
