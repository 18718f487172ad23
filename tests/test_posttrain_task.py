"""The story task (instructions with an exact checker) and the chat data (masks, bad input)."""
import json
import random

import pytest

from llama3np.data import stories as S
from llama3np.posttrain import story_task as T
from llama3np.posttrain.data import preference_example, read_jsonl, reply_rows, sft_example


def test_forced_stories_meet_every_demand_and_parse_completely():
    for i, ins in enumerate(T.instructions(30, seed=1)):
        story = T.write_story(ins.demands, seed=i)
        features, complete = T.parse(story)
        assert complete, story
        assert all(T.check(ins.demands, story)), (ins.text, story)
        assert len(S.derivations(story, limit=2)) == 1  # still exactly one story of the grammar


def test_no_demands_is_the_plain_story_and_forcing_is_a_minimal_edit():
    assert T.write_story((), 5) == S.sample_story(5)[0]
    ins = T.instructions(1, seed=3)[0]
    free, _ = T.parse(T.write_story((), 7))
    forced, _ = T.parse(T.write_story(ins.demands, 7))
    # the features no demand touches keep their values (the adjective is decided by no demand)
    assert free["adjective"] == forced["adjective"] and free["family"] == forced["family"]


def test_checker_counts_only_features_written_before_a_slip():
    ins = T.Instruction("", (("name", ("girl", "Lily")), ("ending", "lesson")))
    story = T.write_story(ins.demands, 0)
    assert T.check(ins.demands, story) == (True, True)
    cut = story[:story.index(".") + 1] + " Blah blah."  # a slip right after the first sentence
    assert T.check(ins.demands, cut) == (True, False)
    assert T.score(ins.demands, "not a story") == 0.0


def test_instruction_text_names_each_demand():
    ins = T.make_instruction(random.Random(0), n_demands=3)
    assert ins.text.startswith("Write a story.") and ins.text.count("The ") >= 3
    assert len({k for k, _ in ins.demands}) == 3
    assert sum(k in T.PLOT_OF for k, _ in ins.demands) <= 1  # one plot per story


@pytest.fixture(scope="module")
def fmt():
    from llama3np.data import train_bpe
    from llama3np.tokenizer import ChatFormat

    texts, _ = S.corpus(200, seed=0)
    return ChatFormat(train_bpe("\n\n".join(texts), 600))


def test_sft_mask_covers_assistant_replies_and_their_eot_only(fmt):
    tok = fmt.tokenizer
    ids, mask = sft_example(fmt, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once"}])
    assert ids == fmt.encode_dialog_prompt([{"role": "user", "content": "Hi"}]) + tok.encode("Once", bos=False, eos=False) + [tok.eot_id]
    n_reply = len(tok.encode("Once", bos=False, eos=False)) + 1
    assert mask == [0] * (len(ids) - n_reply) + [1] * n_reply


def test_bad_input_is_named(fmt, tmp_path):
    with pytest.raises(ValueError, match="unknown role"):
        sft_example(fmt, [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}])
    with pytest.raises(ValueError, match="assistant turn is empty"):
        sft_example(fmt, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}])
    with pytest.raises(ValueError, match="max_seq_len"):
        sft_example(fmt, [{"role": "user", "content": "x " * 50}, {"role": "assistant", "content": "y"}], 20)
    with pytest.raises(ValueError, match="same text"):
        preference_example(fmt, {"prompt": "p", "chosen": "a b", "rejected": " a b "})
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": []}) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)


def test_reply_rows_mask_the_eot_for_dpo(fmt):
    pair = preference_example(fmt, {"prompt": "p", "chosen": "Once upon", "rejected": [{"role": "assistant", "content": "The end"}]})
    tokens, mask = reply_rows([pair.prompt, pair.prompt], [pair.chosen, pair.rejected])
    assert mask[0].sum() == len(pair.chosen) - 1 and mask[1].sum() == len(pair.rejected) - 1
    assert not mask[0, :len(pair.prompt)].any()
    _, with_eot = reply_rows([pair.prompt], [pair.chosen], mask_eot=False)
    assert with_eot[0].sum() == len(pair.chosen)


def split_series(doc):
    parts = doc.split("\n\nOnce upon a time")
    return [parts[0]] + ["Once upon a time" + p for p in parts[1:]]


def test_series_documents_are_grammar_stories_that_share_the_first_storys_features():
    """A series is 2-3 complete stories of the grammar; the second keeps each feature of the first (as the
    checker reads it) with probability 0.7, so the stories before tell what comes next."""
    kept = []
    for seed in range(40):
        texts = split_series(T.series_document(seed))
        assert 2 <= len(texts) <= 3
        assert all(T.parse(t)[1] for t in texts), texts  # each a whole story of the grammar
        first, second = T.demands_of(texts[0]), set(T.demands_of(texts[1]))
        assert {k for k, _ in first} >= {"name", "home", "hobby", "ending"}
        kept += [d in second for d in first]
    assert 0.6 < sum(kept) / len(kept) < 1.0  # 0.7, plus features a free choice repeats by chance


def test_synopsis_documents_name_features_the_story_then_has():
    """A synopsis line, a blank line, a whole story of the grammar that has every feature the synopsis names."""
    named = []
    for seed in range(30):
        head, story = T.synopsis_document(seed).split("\n\n", 1)
        assert head.startswith("A story about ") and T.parse(story)[1]
        features = T.demands_of(story)
        said = [d for d in features if _says(head, d)]
        assert said and head == T.synopsis(said), (head, features)  # it names these of the story's, nothing else
        named.append(len(said))
    assert max(named) > min(named)  # 1 to 5 features named, not always the same number


def _says(head, demand):
    kind, value = demand
    return (f"named {value[1]}" if kind == "name" else f"a {value}." if kind == "ending" else value) in head


def test_pretraining_documents_mix_and_bad_fractions():
    docs = T.pretraining_documents(60, seed=1, series_fraction=0.25, synopsis_fraction=0.5)
    n_syn = sum(d.startswith("A story about ") for d in docs)
    n_series = sum(d.count("Once upon a time") > 1 for d in docs)
    assert 15 < n_syn < 45 and 5 < n_series < 25
    with pytest.raises(ValueError, match="sum <= 1"):
        T.pretraining_documents(3, seed=0, series_fraction=0.6, synopsis_fraction=0.6)


def test_restricted_kinds_draw_their_plots_every_time_and_n_demands_is_checked():
    ins = T.instructions(40, seed=3, kinds=("home", "pet"))
    assert all({k for k, _ in i.demands} == {"home", "pet"} for i in ins)  # pet was drawn 1 time in 4 before
    assert {len(i.demands) for i in T.instructions(40, seed=3, sizes=(4, 5))} == {4, 5}
    with pytest.raises(ValueError, match="n_demands must be 1 to 5"):
        T.make_instruction(random.Random(0), n_demands=6)


def test_demands_of_reads_back_what_was_forced():
    for i, ins in enumerate(T.instructions(20, seed=5)):
        assert set(ins.demands) <= set(T.demands_of(T.write_story(ins.demands, seed=i)))


def test_instructions_restricted_to_some_kinds_and_the_default_unchanged():
    # every kind allowed draws exactly the default instructions (the restriction costs no random draws)
    assert T.instructions(20, seed=2) == T.instructions(20, seed=2, kinds=T.DEMAND_KINDS)
    for ins in T.instructions(30, seed=2, kinds=("home", "hobby", "ending")):
        assert {k for k, _ in ins.demands} <= {"home", "hobby", "ending"} and len(ins.demands) >= 2
    with pytest.raises(ValueError, match="subset of"):
        T.instructions(1, seed=0, kinds=("home", "colour"))


def test_checker_pairs_rank_the_policys_replies_and_never_pair_ties():
    from llama3np.posttrain.demo import checker_pairs

    rm_pairs, dpo_pairs = checker_pairs([[1], [2]], [[[10], [11], [12]], [[20], [21]]], [[0.5, 1.0, 0.5], [0.5, 0.5]])
    assert rm_pairs == [([1], [11], [10]), ([1], [11], [12])]  # 1.0 > each 0.5; the tied prompt gives none
    assert dpo_pairs == [([1], [11], [10])]  # best vs worst (the first reply of score 0.5)


def test_minimal_pairs_share_every_decision_but_the_demands(fmt):
    """The RM's minimal edits: one seed per instruction, all demands forced > one dropped > none; the better
    reply always meets more demands, and the two texts share the hero's adjective and family (free decisions)."""
    from llama3np.posttrain.demo import minimal_pairs

    ins = T.instructions(6, seed=4)
    pairs = minimal_pairs(fmt, ins, seed=0)
    assert pairs
    by_prompt = {tuple(fmt.encode_dialog_prompt([{"role": "user", "content": i.text}])): i for i in ins}
    for prompt, better, worse in pairs:
        demands = by_prompt[tuple(prompt)].demands
        b, w = (fmt.tokenizer.decode(r[:-1]) for r in (better, worse))
        assert T.score(demands, b) > T.score(demands, w)
        fb, fw = T.parse(b)[0], T.parse(w)[0]
        assert fb["adjective"] == fw["adjective"] and fb["family"] == fw["family"]


def test_wrong_value_is_another_option_of_the_same_kind():
    rng = random.Random(0)
    for kind in T.DEMAND_KINDS:
        value = ("girl", S.GIRLS[0]) if kind == "name" else T.values_of(kind)[0]
        for _ in range(20):
            w = T.wrong_value(kind, value, rng)
            assert w != value
            assert (w[0] == "girl" and w[1] in S.GIRLS) if kind == "name" else w in T.values_of(kind)
    with pytest.raises(ValueError, match="unknown demand kind 'plot'"):
        T.values_of("plot")
    with pytest.raises(ValueError, match="gender 'girl' or 'boy'"):
        T.values_of("name")


def _pairs_by_prompt(fmt, ins, pairs):
    by_prompt = {tuple(fmt.encode_dialog_prompt([{"role": "user", "content": i.text}])): i for i in ins}
    for prompt, better, worse in pairs:
        yield by_prompt[tuple(prompt)].demands, fmt.tokenizer.decode(better[:-1]), fmt.tokenizer.decode(worse[:-1])


def test_wrong_value_pairs_differ_in_one_demanded_value_only(fmt):
    """The worse story is the better one's seed with one demand's decision made the wrong way: the same plot,
    the same free decisions, one demand fewer met."""
    from llama3np.posttrain.demo import wrong_value_pairs

    ins = T.instructions(12, seed=6)
    pairs = wrong_value_pairs(fmt, ins, seed=1)
    assert len(pairs) == len(ins)  # a wrong value always costs its demand
    for demands, b, w in _pairs_by_prompt(fmt, ins, pairs):
        mb, mw = T.check(demands, b), T.check(demands, w)
        assert all(mb) and sum(mw) == len(demands) - 1
        fb, fw = T.parse(b)[0], T.parse(w)[0]
        assert fb["plot"] == fw["plot"] and fb["adjective"] == fw["adjective"] and fb["family"] == fw["family"]


def test_slip_pairs_cost_demands_and_keep_the_rest(fmt):
    """A slip (tokens dropped, repeated or replaced at one place) that the checker sees: the slipped story scores
    lower than the same story without it, and differs from it at one place only."""
    from llama3np.posttrain.demo import slip, slip_pairs

    rng = random.Random(0)
    ids = list(range(10, 40)) + [99]
    for _ in range(50):
        s = slip(ids, rng)
        assert s[-1] == 99 and s != ids
        i = next(k for k, (a, b) in enumerate(zip(ids, s)) if a != b)  # where it slipped
        assert 1 <= i and -3 <= len(s) - len(ids) <= 6 and s[:i] == ids[:i]
        # one place: after the first difference, the rest is the original's rest (a drop or a swap) or the
        # original from a few tokens back (a repeat)
        assert s[i + 1:] == ids[i + 1:] or any(s[i:] == ids[j:] for j in range(i - 6, i + 4) if j >= 0)
    ins = T.instructions(12, seed=7)
    pairs = slip_pairs(fmt, ins, seed=2)
    assert len(pairs) > len(ins)  # 2 slips a story, most of them cost a demand
    for demands, b, w in _pairs_by_prompt(fmt, ins, pairs):
        assert T.score(demands, b) == 1 > T.score(demands, w) and not T.parse(w)[1]


def test_sft_demonstrations_with_an_annotators_error_rate(fmt):
    """wrong_fraction 0: every demonstration meets every demand; otherwise about that fraction of them has exactly
    one demand's value wrong (and the same story seed: only that decision differs), the rest are unchanged."""
    from llama3np.posttrain.demo import sft_examples

    ins = T.instructions(300, seed=8, sizes=(2, 3, 4))
    text = lambda ex: fmt.tokenizer.decode([t for t, m in zip(*ex) if m][:-1])  # the reply, without <|eot_id|>
    clean = sft_examples(fmt, ins, seed=3)
    noisy = sft_examples(fmt, ins, seed=3, wrong_fraction=0.4)
    assert all(T.score(i.demands, text(ex)) == 1 for i, ex in zip(ins, clean))
    wrong = 0
    for i, c, n in zip(ins, clean, noisy):
        met = T.check(i.demands, text(n))
        if c == n:
            assert all(met)
        else:
            wrong += 1
            assert sum(met) == len(met) - 1 and T.parse(text(n))[0]["plot"] == T.parse(text(c))[0]["plot"]
    assert 0.3 < wrong / len(ins) < 0.5  # 120 expected, sd ~8.5
