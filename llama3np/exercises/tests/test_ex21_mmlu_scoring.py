"""ex21: loglikelihood_full, MMLU's scoring: log P(continuation | context), the sum over its tokens.

The model is a bigram table (logits of position t = table[token t]), not the student's transformer.
"""
import numpy as np

from llama3np.eval.scoring import loglikelihood_full
from llama3np.exercises.fixtures import TableModel
from llama3np.exercises.testing import assert_close, load_fixture

FX = load_fixture("ex21")
MODEL = TableModel(FX["table"])
CONTEXT = [int(t) for t in FX["context"]]


def _logp(prev, nxt):
    row = FX["table"][prev]
    return row[nxt] - np.log(np.sum(np.exp(row - row.max()))) - row.max()


def test_one_token_choices_match_the_reference():
    """' A'-like one-token continuations: log P equals the reference (the logit row of the context's last token)."""
    for i in (0, 1):
        got = loglikelihood_full(MODEL, CONTEXT, [int(t) for t in FX[f"choice{i}"]])
        assert_close(got, FX[f"ll{i}"], f"log-likelihood of choice {i}", rtol=1e-12)


def test_multi_token_choices_sum_over_their_tokens():
    """Two- and three-token continuations: the sum of each token's log-probability given everything before it."""
    for i in (2, 3):
        cont = [int(t) for t in FX[f"choice{i}"]]
        got = loglikelihood_full(MODEL, CONTEXT, cont)
        assert_close(got, FX[f"ll{i}"], f"log-likelihood of choice {i}", rtol=1e-12)
        seq = CONTEXT + cont
        by_hand = sum(_logp(seq[len(CONTEXT) + j - 1], t) for j, t in enumerate(cont))
        assert_close(got, by_hand, f"choice {i} vs the sum of its tokens' log-probabilities", rtol=1e-12)


def test_the_answer_is_the_argmax_over_the_letters():
    """Scoring ' A' ... ' D' (tokens 3, 4, 10, 11 here) picks the letter the table favours after the prompt."""
    letters = [3, 4, 10, 11]
    scores = [loglikelihood_full(MODEL, CONTEXT, [t]) for t in letters]
    assert int(np.argmax(scores)) == int(np.argmax(FX["table"][CONTEXT[-1]][letters]))
