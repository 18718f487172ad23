"""The model side of post-training: log-probabilities of given tokens, and ragged batches padded to one array.

    logps = sequence_logps(model, tokens, mask)      # (B,) sum of log p(token t | tokens < t) where mask
    tokens, mask = pad_right([ids0, ids1], [m0, m1]) # ragged lists -> (B, T) arrays, padding masked out

Right padding is harmless for a causal model: a pad token comes after every real token of its row, so no
real position can attend to it, and the mask keeps it out of every sum.
"""
import numpy as np

from . import losses


# Scoring without a gradient goes through the model SCORING_ROWS rows at a time: every row's numbers are its
# own either way (the same bits), but one forward over the 256 replies of an evaluation (51,000 positions,
# whose logits alone take 216 MB) took 3x as long as eight forwards of 32 rows.
SCORING_ROWS = 32


def check_batch(model, tokens, mask, name="tokens"):
    """tokens (B, T) ints inside the vocabulary and a mask of the same shape -> (int64 tokens, bool mask)."""
    tokens = np.asarray(tokens)
    if tokens.dtype.kind not in "iu" or tokens.ndim != 2 or tokens.size == 0:
        raise ValueError(f"{name} must be a non-empty (batch, seqlen) integer array, got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    V = model.args.vocab_size
    if tokens.min() < 0 or tokens.max() >= V:
        raise ValueError(f"{name} holds ids outside the model's vocabulary [0, {V}): min {tokens.min()}, "
                         f"max {tokens.max()}")
    mask = np.asarray(mask)
    if mask.shape != tokens.shape:
        raise ValueError(f"the mask of {name} has shape {mask.shape}, expected {tokens.shape} (the tokens' shape)")
    if mask.dtype.kind not in "biuf":
        raise TypeError(f"the mask of {name} must be boolean or 0/1, got dtype {mask.dtype}")
    return tokens.astype(np.int64, copy=False), mask.astype(bool)


def forward_logits(model, tokens, keep, doc_ids=None):
    """model.forward without a cache; keep=False holds no activations (scoring only). doc_ids (B, T): several
    examples packed in a row, each attending only to itself (document-masked attention)."""
    return model.forward(tokens, keep=keep, doc_ids=doc_ids)


def sequence_logps(model, tokens, mask):
    """tokens (B, T) ints, mask (B, T) -> (B,) float64: sum over t with mask[b, t] of log p(tokens[b, t] |
    tokens[b, :t]) under `model`. mask[:, 0] is ignored (nothing predicts the first token). No gradient."""
    tokens, mask = check_batch(model, tokens, mask)
    return _by_rows(lambda t, m: losses.sequence_logps_forward(forward_logits(model, t, keep=False), t, m)[0],
                    tokens, mask)


def token_logps(model, tokens):
    """(B, T) -> (B, T) float64 log p(tokens[:, t] | tokens[:, :t]) (0 at t = 0). No gradient."""
    tokens = check_batch(model, tokens, np.ones(np.shape(tokens), bool))[0]
    return _by_rows(lambda t: losses.token_logps_forward(forward_logits(model, t, keep=False), t)[0], tokens)


def _by_rows(score, *arrays):
    """score(*arrays) SCORING_ROWS rows at a time, the pieces stacked again, in float64."""
    n = len(arrays[0])
    return np.concatenate([score(*(a[i:i + SCORING_ROWS] for a in arrays)) for i in range(0, n, SCORING_ROWS)]
                          ).astype(np.float64)


def pad_right(seqs, masks=None, pad_id=0, length=None):
    """Lists of ids (and of 0/1 masks) -> tokens (B, T) int64 and mask (B, T) bool, padded on the right.

    Without masks every real token is selected. `length` pads to at least that many positions.
    """
    if len(seqs) == 0:
        raise ValueError("an empty batch")
    T = max(max(len(s) for s in seqs), length or 0)
    tokens = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=bool)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = s
        mask[b, :len(s)] = True if masks is None else np.asarray(masks[b], dtype=bool)
    return tokens, mask


def concat_rows(a, a_mask, b, b_mask, pad_id=0):
    """Stack two (B, Ta), (B, Tb) batches into one (2B, max(Ta, Tb)) batch: TRL's concatenated forward."""
    T = max(a.shape[1], b.shape[1])
    tokens = np.full((a.shape[0] + b.shape[0], T), pad_id, dtype=np.int64)
    mask = np.zeros(tokens.shape, dtype=bool)
    tokens[:a.shape[0], :a.shape[1]], mask[:a.shape[0], :a.shape[1]] = a, a_mask
    tokens[a.shape[0]:, :b.shape[1]], mask[a.shape[0]:, :b.shape[1]] = b, b_mask
    return tokens, mask


def clone_model(model):
    """A new Transformer with copies of the weights and the same tokenizer (reference, policy, value...)."""
    from ..model import Transformer

    out = Transformer(model.args, dtype=model.dtype, init=False)
    for name, p in out.params.items():
        p[...] = model.params[name]
    out.tokenizer = model.tokenizer
    return out
