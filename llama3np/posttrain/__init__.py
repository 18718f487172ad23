"""Post-training (Llama 3 paper, section 4): SFT, reward model, rejection sampling, DPO and PPO, each with a
hand-written backward, on a story task whose truth is known.

    logps = sequence_logps(model, tokens, mask)                  # (B,) log p of the masked tokens
    loss, grads, metrics = dpo_loss_and_grads(model, chosen, chosen_mask, rejected, rejected_mask,
                                              ref_chosen_logps, ref_rejected_logps, beta=0.1, nll_coef=0.2)

Where things live: losses (forward/backward pairs), logprobs (the model side), story_task (instructions
with an exact checker), data (chat JSONL -> token rows), sft, reward_model, rejection_sampling, dpo, ppo,
averaging, stage (run folders), demo, cli.
"""
from .dpo import dpo_loss_and_grads
from .logprobs import sequence_logps

__all__ = ["sequence_logps", "dpo_loss_and_grads"]
