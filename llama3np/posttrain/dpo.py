"""Direct preference optimisation (Rafailov et al. 2023), as in Llama 3 (section 4.1.4).

    loss = mean_b -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))  +  nll_coef * NLL(chosen)

pi and ref are sequence log-probs of the reply tokens only: Llama 3 masks the formatting tokens (headers,
end-of-turn) out of both the chosen and the rejected sums, because they are shared by both replies and
pushing them apart destabilises training (the end-of-turn probability drifts). The NLL term (coefficient
0.2 in Llama 3, TRL's `rpo_alpha`) is the mean cross-entropy over every masked chosen token of the batch;
it keeps the chosen log-probs from falling while the margin grows. The reference log-probs are computed
once, before training, and stored with the data (`reference_logps`).

One forward for the whole batch (TRL's "concatenated forward"): the chosen rows then the rejected rows,
right-padded to one length.
"""
import numpy as np

from . import losses
from .logprobs import check_batch, concat_rows, forward_logits, sequence_logps


def dpo_loss_and_grads(model, chosen, chosen_mask, rejected, rejected_mask, ref_chosen_logps,
                       ref_rejected_logps, beta=0.1, nll_coef=0.0, label_smoothing=0.0, loss_type="sigmoid"):
    """-> (loss, grads keyed like model.params, metrics with TRL's names).

    chosen, rejected (B, Tc), (B, Tr) ints; masks of the same shapes select the reply tokens whose log-probs
    count (mask[:, 0] is ignored); ref_*_logps (B,) the reference model's sums over the same masks.
    """
    chosen, chosen_mask = check_batch(model, chosen, chosen_mask, "chosen")
    rejected, rejected_mask = check_batch(model, rejected, rejected_mask, "rejected")
    B = chosen.shape[0]
    if rejected.shape[0] != B:
        raise ValueError(f"chosen has {B} rows but rejected has {rejected.shape[0]}: one pair per row")
    ref_c = np.asarray(ref_chosen_logps, dtype=np.float64)
    ref_r = np.asarray(ref_rejected_logps, dtype=np.float64)
    if ref_c.shape != (B,) or ref_r.shape != (B,):
        raise ValueError(f"ref_chosen_logps and ref_rejected_logps must have shape ({B},), got {ref_c.shape} "
                         f"and {ref_r.shape}")
    tokens, mask = concat_rows(chosen, chosen_mask, rejected, rejected_mask)
    logits = forward_logits(model, tokens, keep=True)  # (2B, T, V)
    logp, lp_cache = losses.token_logps_forward(logits, tokens)  # (2B, T)
    w = mask.astype(logp.dtype)
    w[:, 0] = 0  # nothing predicts the first token
    logps = (logp * w).sum(-1)  # (2B,)
    pi_c, pi_r = logps[:B], logps[B:]
    loss, dpo_cache = losses.dpo_forward(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing, loss_type)
    dpi_c, dpi_r = losses.dpo_backward(1.0, dpo_cache)
    dlogp = np.concatenate([dpi_c, dpi_r])[:, None] * w  # d loss / d logp per token
    metrics = losses.dpo_metrics(pi_c, pi_r, ref_c, ref_r, beta)
    n_chosen = w[:B].sum()
    if n_chosen == 0:
        raise ValueError("chosen_mask selects no tokens after position 0: nothing to score")
    nll = float(-(logp[:B] * w[:B]).sum() / n_chosen)
    metrics["nll_loss"] = nll
    if nll_coef:
        loss += nll_coef * nll
        dlogp[:B] -= nll_coef * w[:B] / n_chosen
    grads = model.backward(losses.token_logps_backward(dlogp, lp_cache))
    metrics["loss"] = float(loss)
    return float(loss), grads, metrics


def reference_logps(ref_model, chosen, chosen_mask, rejected, rejected_mask, policy=None):
    """The reference model's sequence log-probs of both replies, computed once and stored with the data.

    With `policy`, the two vocabularies must agree (a log-prob of token id 7 means nothing otherwise).
    """
    if policy is not None and policy.args.vocab_size != ref_model.args.vocab_size:
        raise ValueError(f"the reference model's vocabulary ({ref_model.args.vocab_size} ids) differs from the "
                         f"policy's ({policy.args.vocab_size}): they must share one tokenizer")
    return sequence_logps(ref_model, chosen, chosen_mask), sequence_logps(ref_model, rejected, rejected_mask)
