"""Data curation, one idea at a time: words, filters (datatrove's reasons), dedups, MinHash's statistics,
NSFW, token KL, the fastText-style classifier (gradient check, AUROC), SemDeDup. Generated data only."""
import math

import numpy as np
import pytest

from llama3np.data.curation import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                    GopherRepetitionFilter, NSFWFilter, minhash_clusters)
from llama3np.data.curation import exact_dedup, line_dedup, minhash, semdedup, token_kl, webcorpus
from llama3np.data.curation.fasttext_classifier import (FastTextClassifier, auroc, bag_backward, bag_forward,
                                                        logistic_loss)
from llama3np.data.curation.text import count_sentences, simplify_text, split_into_words
from llama3np.gradcheck import numerical_grad, rel_error

JUNK = ("boilerplate", "spam", "log", "code", "lorem", "repeated_lines", "token_noise")


# --- words and sentences ---------------------------------------------------------------------------
def test_words_split_punctuation_and_clitics_like_spacy():
    assert split_into_words("Don't stop... it's 3.5 well-known (x)!") == \
        ("Do", "n't", "stop", "...", "it", "'s", "3.5", "well", "-", "known", "(", "x", ")", "!")


def test_a_sentence_ends_at_a_terminal_followed_by_a_word_not_at_an_ellipsis():
    assert count_sentences('He said "hi." Then left. Wait... what') == 3
    assert count_sentences("") == 0


def test_simplify_text_lowercases_drops_punctuation_digits_and_accents():
    assert simplify_text("Café,  12 Rue!\n3.5 «ok»") == "cafe 0 rue 0 ok"


# --- heuristic filters: datatrove's reasons on documents built to trip one rule --------------------
def _prose(n_sentences=12, seed=0):
    rng = np.random.default_rng(seed)
    return "\n".join(webcorpus.sentence(rng) for _ in range(n_sentences))


@pytest.mark.parametrize("text, reason", [
    ("the cat and the dog", "gopher_short_doc"),
    (" ".join(["a to be of it"] * 30), "gopher_below_avg_threshold"),
    (" ".join(["extraordinarily"] * 60), "gopher_above_avg_threshold"),
    (" ".join(f"#tag{i} the word and" for i in range(30)), "gopher_too_many_hashes"),
    ("\n".join(f"- the item number and thing {i}" for i in range(20)), "gopher_too_many_bullets"),
    ("\n".join(f"the story of and more {i}..." for i in range(20)), "gopher_too_many_ellipsis"),
    (" ".join(f"{1000 + i} {2000 + i} {3000 + i} the and" for i in range(40)), "gopher_below_alpha_threshold"),
    (" ".join(["house garden window river mountain"] * 20), "gopher_enough_stop_words"),
])
def test_gopher_quality_gives_datatrove_reasons(text, reason):
    assert GopherQualityFilter()(text) == (False, reason)


def test_gopher_quality_keeps_prose():
    assert GopherQualityFilter()(_prose()) == (True, None)


def test_gopher_alpha_on_whitespace_words_spares_punctuation_dense_prose():
    text = " ".join(["Indeed, madam; truly, madam: farewell, madam!"] * 20) + " the and of to"
    assert GopherQualityFilter()(text) == (False, "gopher_below_alpha_threshold")
    assert GopherQualityFilter(alpha_words="whitespace")(text) == (True, None)


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("same paragraph here\n\nsame paragraph here\n\nsame paragraph here\n\nother one", "dup_para_frac"),
    ("\n".join(["same line here"] * 5 + ["a", "b", "c", "d", "e", "f", "g"]), "dup_line_frac"),
    (" ".join(["buy now"] * 50), "top_2_gram"),
])
def test_gopher_repetition_gives_datatrove_reasons(text, reason):
    assert GopherRepetitionFilter()(text) == (False, reason)


def test_duplicated_ngram_fraction_counts_repeated_coverage():
    words = [f"w{i}" for i in range(40)]
    text = " ".join(words + words[:20])  # the first 20 words again
    assert GopherRepetitionFilter()(text)[1] == "duplicated_5_n_grams"
    assert GopherRepetitionFilter()(" ".join(words)) == (True, None)


@pytest.mark.parametrize("text, reason", [
    (_prose() + "\nLorem ipsum dolor sit amet, consectetur.", "lorem_ipsum"),
    (_prose() + "\nfunction f(x) { return x; }.", "curly_bracket"),
    ("One two three four.\nFive six seven eight.", "too_few_sentences"),
])
def test_c4_quality_gives_datatrove_reasons(text, reason):
    assert C4QualityFilter()(text) == (False, reason)


def test_c4_drops_javascript_cookie_and_unpunctuated_lines_but_keeps_the_page():
    text = _prose() + "\nPlease enable JavaScript to view this.\nThis site uses cookies for ads.\nMenu Home About"
    keep, reason, cleaned = C4QualityFilter().clean(text)
    assert (keep, reason) == (True, None)
    assert "JavaScript" not in cleaned and "cookies" not in cleaned and "Menu" not in cleaned
    assert cleaned.count("\n") == 11


@pytest.mark.parametrize("text, reason", [
    ("   \n  ", "empty"),
    ("\n".join(f"the long line number {i} without a stop at the end" for i in range(10)), "line_punct_ratio"),
    ("\n".join(f"Short line {i}." for i in range(10)), "short_line_ratio"),
    ("\n".join([_prose(3), "This same sentence is here twice, sadly.", "This same sentence is here twice, sadly."]),
     "char_dup_ratio"),
    ("\n".join(f"Item {i} is a line longer than thirty characters." for i in range(5)) + "\n" * 20,
     "list_ratio"),
])
def test_fineweb_quality_gives_datatrove_reasons(text, reason):
    assert FineWebQualityFilter()(text) == (False, reason)


# --- exact, URL and line dedup ---------------------------------------------------------------------
def test_text_hash_equal_up_to_case_spacing_punctuation():
    assert exact_dedup.text_hash("Hello,   World! 12") == exact_dedup.text_hash("hello world 99.")
    assert exact_dedup.text_hash("hello world") != exact_dedup.text_hash("hello there")


@pytest.mark.parametrize("a, b", [
    ("HTTP://www.Example.com:80/a/?b=2&a=1&utm_source=x#top", "http://example.com/a?a=1&b=2"),
    ("https://example.com/path/", "https://example.com/path"),
    ("https://example.com:8443/x", "https://example.com:8443/x"),
])
def test_normalize_url(a, b):
    assert exact_dedup.normalize_url(a) == b


def test_first_occurrences_keep_the_first_and_ignore_empty_keys():
    assert exact_dedup.first_occurrences(["a", "b", "a", "", "", "b"]).tolist() == [True, True, False, True, True, False]
    keys = np.array([7, 0, 7, 0, 3], dtype=np.uint64)  # hashed keys; 0 counts as a key when has_key says so
    assert exact_dedup.first_occurrences(keys).tolist() == [True, True, False, True, True]
    assert exact_dedup.first_occurrences(keys, np.ones(5, bool)).tolist() == [True, True, False, False, True]


def test_line_seen_in_more_than_max_count_documents_is_removed_in_its_bucket_only():
    banner = "Subscribe to our newsletter today!"
    texts = [f"Unique line {'abcdefgh'[i]}.\n{banner}" for i in range(8)]
    out, removed = line_dedup.dedup_lines(texts, max_count=6)
    assert all(banner not in t for t in out) and removed == [1] * 8
    out, removed = line_dedup.dedup_lines_in_buckets(texts, bucket_size=4, max_count=6)
    assert all(banner in t for t in out) and removed == [0] * 8  # 4 per bucket: under the limit


# --- MinHash ---------------------------------------------------------------------------------------
def test_minhash_clusters_groups_copies_and_near_copies_only():
    rng = np.random.default_rng(0)
    base = [webcorpus.prose(rng) for _ in range(30)]
    texts = base + [base[3], webcorpus.near_duplicate(rng, base[7], 0.01), base[3].upper()]
    c = minhash_clusters(texts)
    assert c.dtype.kind == "i" and c.shape == (33,)
    assert c[30] == 3 and c[31] == 7 and c[32] == 3
    assert len(set(c[:30].tolist())) == 30  # the originals are all apart


def test_minhash_clusters_of_nothing_and_of_short_texts():
    assert minhash_clusters([]).shape == (0,)
    assert minhash_clusters(["", "", "a b"]).tolist() == [0, 0, 2]


def _binomial_central_95(k, n, p):
    """Is k inside the central 95% of Binomial(n, p)? (both tails >= 2.5%)"""
    pmf = [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]
    return sum(pmf[:k + 1]) >= 0.025 and sum(pmf[k:]) >= 0.025


def test_estimated_jaccard_within_3_sd_for_99_percent_of_pairs():
    rng = np.random.default_rng(0)
    within = []
    for j in (0.2, 0.5, 0.8, 0.95):
        h, off, j_exact = minhash.shingle_sets_with_jaccard(j, 150, 100, rng)
        sig = minhash.signatures_from_hashes(h, off)
        est = minhash.estimated_jaccard(sig[0::2], sig[1::2])
        within.append(np.abs(est - j_exact) <= 3 * np.sqrt(j_exact * (1 - j_exact) / sig.shape[1]))
    assert np.mean(np.concatenate(within)) >= 0.99


@pytest.mark.parametrize("j", [0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
def test_lsh_candidate_rate_follows_the_s_curve(j):
    rng = np.random.default_rng(int(j * 100))
    h, off, j_exact = minhash.shingle_sets_with_jaccard(j, 300, 100, rng)
    keys = minhash.band_keys(minhash.signatures_from_hashes(h, off))
    k = int(np.any(keys[0::2] == keys[1::2], axis=1).sum())
    assert _binomial_central_95(k, 300, float(minhash.candidate_probability(j_exact)))


def test_candidate_pairs_list_every_pair_of_a_small_group_once_and_keep_a_large_group_connected():
    sig = np.zeros((7, 4), np.uint64)
    sig[:3] = [1, 2, 3, 4]  # a group of 3 in both bands
    sig[3] = [9, 9, 9, 9]
    sig[4:] = [[5, 6, 0, 0], [5, 6, 1, 1], [7, 7, 1, 1]]  # 4-5 share band 0, 5-6 share band 1
    assert minhash.candidate_pairs(sig, 2, 2).tolist() == [[0, 1], [0, 2], [1, 2], [4, 5], [5, 6]]
    big = np.ones((50, 4), np.uint64)  # 50 copies, windows of 8: linked by overlapping windows
    e = minhash.candidate_pairs(big, 2, 2, window=8)
    assert len(e) < 50 * 8 and minhash.union_find(50, e).tolist() == [0] * 50


def test_verification_drops_pairs_that_share_a_band_by_chance():
    """At J = 0.5 about 5% of pairs share one of 14 bands; their 112-row estimate (sd 0.047) is far
    below 0.75, so none is joined. At J = 0.9 every pair is."""
    rng = np.random.default_rng(0)
    h, off, _ = minhash.shingle_sets_with_jaccard(0.5, 300, 100, rng)
    sig = minhash.signatures_from_hashes(h, off)
    assert len(minhash.candidate_pairs(sig)) > 3  # the chance candidates exist...
    cl = minhash.clusters_from_signatures(sig)
    assert (cl == np.arange(600)).all()  # ...and are sent back
    h, off, _ = minhash.shingle_sets_with_jaccard(0.9, 300, 100, rng)
    cl = minhash.clusters_from_signatures(minhash.signatures_from_hashes(h, off))
    assert (cl[1::2] == np.arange(0, 600, 2)).all()


def test_union_find_joins_chains_to_their_smallest_member():
    edges = np.array([[3, 4], [4, 5], [0, 2], [2, 5], [6, 7]])
    assert minhash.union_find(9, edges).tolist() == [0, 1, 0, 0, 0, 0, 6, 6, 8]


# --- NSFW and token KL -----------------------------------------------------------------------------
def test_nsfw_counts_stand_in_words_and_phrases():
    f = NSFWFilter(words=["zorbly", "fleeb", "bad phrase"], max_count=3)
    assert f.count("Zorbly, fleeb! A bad phrase.") == 3
    assert f("Zorbly, fleeb! A bad phrase.") == (False, "nsfw_words")
    assert f("Zorbly once.") == (True, None)


def test_token_kl_removes_documents_salted_with_outlier_tokens():
    texts, labels = webcorpus.make_web_corpus(300, seed=1)
    prose = [t for t, k in zip(texts, labels) if k == "prose"]
    rng = np.random.default_rng(0)
    salted = [webcorpus.token_noise(rng, t) for t in prose[:15]]
    reference = [webcorpus.prose(rng) for _ in range(50)]
    keep, scores, thr = token_kl.token_kl_filter(prose + salted, reference_texts=reference)
    assert not keep[len(prose):].any()  # every salted page goes
    assert keep[:len(prose)].mean() >= 0.95  # nearly all prose stays


def test_token_kl_compares_a_document_with_clean_text_of_its_own_length():
    """The plug-in KL of a short document is biased up (its empirical entropy is at most log n): short
    clean pages score far above long ones. Divided by the KL of clean windows of the same length, both
    score about 1, and salted pages of either length stand out."""
    rng = np.random.default_rng(0)
    long = [webcorpus.prose(rng) for _ in range(60)]
    short = [" ".join(webcorpus.sentence(rng) for _ in range(3)) for _ in range(60)]  # ~40 tokens
    salted = [webcorpus.token_noise(rng, t) for t in long[:10] + short[:10]]
    reference = [webcorpus.prose(rng) for _ in range(50)]
    texts = long + short + salted
    _, raw, _ = token_kl.token_kl_filter(texts, reference_texts=reference, length_aware=False)
    keep, adj, _ = token_kl.token_kl_filter(texts, reference_texts=reference)
    assert np.median(raw[60:120]) > 1.2 * np.median(raw[:60])  # the bias: short clean text looks odd
    assert abs(np.median(adj[60:120]) / np.median(adj[:60]) - 1) < 0.1  # gone after the adjustment
    assert keep[:120].mean() >= 0.95 and not keep[120:].any()


# --- quality classifier (a) ------------------------------------------------------------------------
def test_bag_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    E, w, b = rng.standard_normal((50, 4)), rng.standard_normal(4), rng.standard_normal(1)
    ids = [np.array([1, 5, 5, 7]), np.array([2]), np.array([7, 9, 1])]
    y = np.array([1.0, 0.0, 1.0])

    def loss():
        return logistic_loss(bag_forward(ids, E, w, b)[0], y)[0]

    logits, cache = bag_forward(ids, E, w, b)
    _, dlogits = logistic_loss(logits, y)
    (rows, dE_rows), dw, db = bag_backward(dlogits, cache, w, 50)
    dE = np.zeros_like(E)
    dE[rows] = dE_rows
    assert rel_error(dE, numerical_grad(loss, E)) < 1e-6
    assert rel_error(dw, numerical_grad(loss, w)) < 1e-6
    assert rel_error(np.array([db]), numerical_grad(loss, b)) < 1e-6


def test_auroc_matches_its_definition():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([0.5, 0.5], [0, 1]) == 0.5


def test_fasttext_classifier_separates_reference_prose_from_junk_on_held_out_documents(tmp_path):
    texts, labels = webcorpus.make_web_corpus(700, seed=3)
    data = [(t, float(k == "prose")) for t, k in zip(texts, labels) if k == "prose" or k in JUNK]
    x, y = [t for t, _ in data], np.array([v for _, v in data])
    clf = FastTextClassifier(n_buckets=1 << 14, dim=8)
    history = clf.fit(x[:400], y[:400], epochs=3)
    assert history[-1] < history[0]
    assert auroc(clf.predict_proba(x[400:]), y[400:]) >= 0.90
    clf.save(tmp_path / "clf.npz")
    np.testing.assert_array_equal(FastTextClassifier.load(tmp_path / "clf.npz").predict_proba(x[400:410]),
                                  clf.predict_proba(x[400:410]))


# --- SemDeDup --------------------------------------------------------------------------------------
def _paraphrase(rng, text):
    """The same sentences in another order, with two words swapped for others."""
    sents = text.replace("\n\n", " ").split(". ")
    words = ". ".join(rng.permutation(sents)).split(" ")
    for i in rng.choice(len(words), size=2, replace=False):
        words[i] = webcorpus._pick(rng, webcorpus.ADVERBS)
    return " ".join(words)


def test_semdedup_finds_paraphrase_groups_and_removes_more_as_eps_grows():
    rng = np.random.default_rng(0)
    originals = [webcorpus.prose(rng, 2) for _ in range(60)]
    groups = [[o] + [_paraphrase(rng, o) for _ in range(2)] for o in originals[:20]]
    texts = [t for g in groups for t in g] + originals[20:]
    emb = semdedup.tfidf_embeddings(texts)
    keep = semdedup.semdedup(emb, eps=0.2, seed=0)  # paraphrases: cosine 0.82-0.95; unrelated: < 0.4
    found = [not keep[3 * g + 1] and not keep[3 * g + 2] for g in range(20)]
    assert np.mean(found) >= 0.9
    assert keep[60:].mean() >= 0.9  # the documents without paraphrases mostly stay
    removed = [int((~semdedup.semdedup(emb, eps=e, seed=0)).sum()) for e in (0.01, 0.05, 0.15, 0.3, 0.5)]
    assert removed == sorted(removed)


# --- the real sources' readers (pure functions, no real text needed) ------------------------------
def test_verses_join_until_a_sentence_ends_and_a_short_tail_joins_the_last_document():
    from llama3np.data.curation.sources import chunk, verses_to_sentences

    assert verses_to_sentences(["And he said,", "Go; and", "they went.", "Amen!", "So it was"]) == \
        ["And he said, Go; and they went.", "Amen!", "So it was"]
    assert chunk(["a b c d", "e f g h", "i"], words=4) == ["a b c d", "e f g h\ni"]  # 1 < 4 // 2 words: joins
    assert chunk(["a b c d", "e f"], words=4) == ["a b c d", "e f"]


def test_scoring_counts_each_reason_precision_and_weights_it_per_kind(tmp_path):
    from llama3np.data.curation.evaluate import format_tables, score_run
    from llama3np.data.curation.writers import write_jsonl
    from llama3np.data.curation import Document

    def doc(i, stage=None, reason=None):
        return Document(id=i, text="x", metadata={} if stage is None else {"removed_by": stage, "reason": reason})

    (tmp_path / "kept").mkdir(), (tmp_path / "removed").mkdir()
    write_jsonl(tmp_path / "kept" / "kept_00000.jsonl", [doc("p1"), doc("p2"), doc("s3")])
    write_jsonl(tmp_path / "removed" / "removed_00000.jsonl",
                [doc("p3", "f", "r1"), doc("s1", "f", "r1"), doc("s2", "g", "r2"), doc("l1", "g", "r2")])
    labels = {"p1": "prose", "p2": "prose", "p3": "prose", "s1": "spam", "s2": "spam", "s3": "spam", "l1": "log"}
    score = score_run(tmp_path, labels)
    assert score["precision"] == 3 / 4
    assert score["precision_by_reason"] == {"f/r1": 0.5, "g/r2": 1.0}
    assert score["recall"]["spam"] == pytest.approx(2 / 3) and score["recall"]["prose"] == pytest.approx(1 / 3)
    assert score["precision_by_kind"] == {"spam": (0.5 + 1.0) / 2, "log": 1.0}  # spam: one each by r1 and r2
    assert "f/r1" in format_tables(score)
