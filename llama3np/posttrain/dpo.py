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
    logps = losses.masked_row_sums(logp, w)  # (2B,), as sequence_logps sums them
    pi_c, pi_r = logps[:B], logps[B:]
    loss, dpo_cache = losses.dpo_forward(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing, loss_type)
    dpi_c, dpi_r = losses.dpo_backward(1.0, dpo_cache)
    dlogp = np.concatenate([dpi_c, dpi_r])[:, None] * w  # d loss / d logp per token
    metrics = losses.dpo_metrics(pi_c, pi_r, ref_c, ref_r, beta)
    n_chosen = w[:B].sum()
    if nll_coef and n_chosen == 0:
        raise ValueError("chosen_mask selects no tokens after position 0: the NLL term is undefined")
    nll = float(-(logp[:B] * w[:B]).sum() / n_chosen) if n_chosen else float("nan")
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


def train_dpo(model, pairs, ref_logps, out, steps=100, batch_size=8, lr=1e-4, beta=0.1, nll_coef=0.2,
              seed=0, save_every=50, resume=False, progress=False, grad_clip=1.0, mask_eot=True,
              label_smoothing=0.0, loss_type="sigmoid"):
    """DPO on `pairs` [(prompt ids, chosen ids, rejected ids)] with the reference's log-probs
    `ref_logps` = (ref_chosen (N,), ref_rejected (N,)) computed once over the same masks (see `pair_rows`).
    Writes the run folder `out` (ref_logps.npz beside the checkpoints) -> log records."""
    from ..fileio import atomic_write
    from ..optim import AdamW
    from .stage import StageRun, run_steps, step_rng, update, warmup_lr

    if not pairs:
        raise ValueError("no preference pairs")
    ref_c, ref_r = (np.asarray(a, dtype=np.float64) for a in ref_logps)
    if ref_c.shape != (len(pairs),) or ref_r.shape != (len(pairs),):
        raise ValueError(f"ref_logps must be two arrays of shape ({len(pairs)},), one value per pair")
    run = StageRun(out, "dpo", dict(steps=steps, batch_size=batch_size, lr=lr, beta=beta, nll_coef=nll_coef,
                                    seed=seed, mask_eot=mask_eot, label_smoothing=label_smoothing,
                                    loss_type=loss_type, n_pairs=len(pairs)), resume=resume)
    atomic_write(run.dir / "ref_logps.npz", lambda f: np.savez(f, chosen=ref_c, rejected=ref_r))
    opt = AdamW(model.params, lr=lr, weight_decay=0.0)

    def step_fn(step):
        idx = step_rng(seed, step).integers(0, len(pairs), batch_size)
        (tc, mc), (tr, mr) = pair_rows([pairs[i] for i in idx], mask_eot)
        loss, grads, m = dpo_loss_and_grads(model, tc, mc, tr, mr, ref_c[idx], ref_r[idx], beta, nll_coef,
                                            label_smoothing, loss_type)
        m["grad_norm"] = update(opt, grads, warmup_lr(step, lr, steps), grad_clip)
        return m

    records = run_steps(run, steps, step_fn, model.params, opt, model.tokenizer, model.args, save_every, progress)
    run.plot(["loss", "rewards/margins", "rewards/accuracies", "logps/chosen"])
    return records


def pair_rows(pairs, mask_eot=True):
    """[(prompt, chosen, rejected)] -> ((chosen tokens, mask), (rejected tokens, mask)), reply-only masks."""
    from .data import reply_rows

    prompts = [p for p, _, _ in pairs]
    return (reply_rows(prompts, [c for _, c, _ in pairs], mask_eot),
            reply_rows(prompts, [r for _, _, r in pairs], mask_eot))


def pairs_reference_logps(ref_model, pairs, mask_eot=True, batch_size=32, policy=None):
    """The reference's sequence log-probs of every pair, in batches -> (chosen (N,), rejected (N,))."""
    out_c, out_r = [], []
    for i in range(0, len(pairs), batch_size):
        (tc, mc), (tr, mr) = pair_rows(pairs[i:i + batch_size], mask_eot)
        c, r = reference_logps(ref_model, tc, mc, tr, mr, policy)
        out_c.append(c)
        out_r.append(r)
    return np.concatenate(out_c), np.concatenate(out_r)


def preference_accuracy(model, pairs, ref_logps, mask_eot=True, batch_size=32):
    """Held-out DPO accuracy: the fraction of pairs whose implicit reward margin is > 0."""
    pc, pr = pairs_reference_logps(model, pairs, mask_eot, batch_size)
    return float(np.mean((pc - ref_logps[0]) > (pr - ref_logps[1])))
