"""Model averaging (Llama 3, section 4.1.5: "we average models obtained from experiments using various
versions of data or hyperparameters at each RM, SFT, or DPO stage"; Wortsman et al. 2022, model soups).

    averaged = average_params([model_a.params, model_b.params], weights=[0.5, 0.5])

A weighted mean of the weights, name by name, accumulated in float64. It only makes sense for models
fine-tuned from one starting point (same shapes and, in practice, the same pre-trained weights).
"""
import numpy as np


def average_params(param_dicts, weights=None):
    """-> one params dict, the weighted mean (weights default to equal; they are normalised to sum 1)."""
    if not param_dicts:
        raise ValueError("no models to average")
    names = list(param_dicts[0])
    for i, p in enumerate(param_dicts[1:], start=1):
        if set(p) != set(names):
            raise ValueError(f"model {i} has other weights than model 0 (e.g. "
                             f"{sorted(set(p) ^ set(names))[:2]}): only models of one architecture average")
        for n in names:
            if p[n].shape != param_dicts[0][n].shape:
                raise ValueError(f"model {i}: {n!r} has shape {p[n].shape}, model 0 has {param_dicts[0][n].shape}")
    w = np.ones(len(param_dicts)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(param_dicts),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {len(param_dicts)} non-negative numbers with a positive sum, got {weights}")
    w = w / w.sum()
    out = {}
    for n in names:
        acc = np.zeros(param_dicts[0][n].shape, dtype=np.float64)
        for wi, p in zip(w, param_dicts):
            acc += wi * p[n]
        out[n] = acc.astype(param_dicts[0][n].dtype)
    return out


def average_models(models, weights=None):
    """A copy of models[0] holding the average of all their weights (tokenizer kept)."""
    from ..model import Transformer

    avg = average_params([m.params for m in models], weights)
    out = Transformer(models[0].args, dtype=models[0].dtype, init=False)
    for n, p in out.params.items():
        p[...] = avg[n]
    out.tokenizer = models[0].tokenizer
    return out
