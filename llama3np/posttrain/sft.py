"""Supervised fine-tuning: the cross-entropy of the assistant's reply tokens, nothing else.

    loss = mean over reply tokens (mask) of -log p(token | everything before it)

The prompt's tokens are read (they condition the reply) but never predicted, so they get no gradient
through the loss: the model learns to answer, not to write instructions. Rows of different lengths
are right-padded; the mask keeps the padding out.
"""
import numpy as np

from ..optim import AdamW
from . import losses
from .logprobs import check_batch, forward_logits, pad_right
from .stage import StageRun, run_steps, step_rng, update, warmup_lr


def sft_loss_and_grads(model, tokens, mask, doc_ids=None):
    """tokens (B, T), mask (B, T) on the tokens to learn (mask[:, 0] ignored) -> (loss, grads).

    doc_ids (B, T): dialogs packed into one row, each a run of equal ids, attending only within itself (as
    Llama 3 packs pre-training documents); the first token of each packed dialog must be masked out (the
    logit before it belongs to the previous dialog)."""
    tokens, mask = check_batch(model, tokens, mask)
    if doc_ids is not None:
        doc_ids = np.asarray(doc_ids)
        starts = np.zeros(doc_ids.shape, dtype=bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        if np.any(mask & starts):
            raise ValueError("a packed dialog's first token is in the mask: nothing in its own dialog predicts it")
    logits = forward_logits(model, tokens, keep=True, doc_ids=doc_ids)
    loss, cache = losses.sft_cross_entropy_forward(logits, tokens, mask)
    return loss, model.backward(losses.sft_cross_entropy_backward(1.0, cache))


def train_sft(model, examples, out, steps=100, batch_size=8, lr=3e-4, seed=0, save_every=50, resume=False,
              progress=False, grad_clip=1.0, min_lr_ratio=0.1):
    """SFT on `examples` [(ids, mask), ...] for `steps` AdamW steps of `batch_size` rows drawn with
    replacement by (seed, step), the rate decaying (cosine) to min_lr_ratio x lr at the last step (1.0: flat).
    Writes the run folder `out`; returns the records of log.jsonl.

    Why decay: in the demo's SFT (1000 steps at 1e-3) the loss is flat from step ~200 on, the noise of the
    steps at full rate hiding what is left to learn. Copying a demanded value (a pet, an animal: one word of
    the instruction, written 40 tokens into the story) then stays half-learned: held-out score 0.76 at a flat
    rate, 0.85 decaying to 0.1 (greedy 0.82 -> 0.94), the same steps."""
    if not examples:
        raise ValueError("no SFT examples")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1] (1: a flat rate), got {min_lr_ratio}")
    run = StageRun(out, "sft", dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, n_examples=len(examples),
                                    min_lr_ratio=min_lr_ratio), resume=resume)
    opt = AdamW(model.params, lr=lr, weight_decay=0.0)

    def step_fn(step):
        idx = step_rng(seed, step).integers(0, len(examples), batch_size)
        tokens, mask = pad_right([examples[i][0] for i in idx], [examples[i][1] for i in idx])
        loss, grads = sft_loss_and_grads(model, tokens, mask)
        rate = warmup_lr(step, lr, steps, min_lr_ratio)
        norm = update(opt, grads, rate, grad_clip)
        return {"loss": loss, "grad_norm": norm, "lr": rate, "num_tokens": int(mask[:, 1:].sum())}

    records = run_steps(run, steps, step_fn, model.params, opt, model.tokenizer, model.args, save_every, progress)
    run.plot(["loss", "grad_norm", "lr"])
    return records
