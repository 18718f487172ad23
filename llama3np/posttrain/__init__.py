"""Post-training (Llama 3 paper, section 4): SFT, reward model, rejection sampling, DPO and PPO."""
