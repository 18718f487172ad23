"""llama3np: Llama 3 from scratch in NumPy, with a hand-written backward and a small C extension.

    import llama3np
    model = llama3np.Transformer(llama3np.ModelArgs(**llama3np.PRESETS["tiny"]))
    logits = model.forward(tokens)                       # (B, T) ints -> (B, T, vocab)
    loss, grads = model.loss_and_grads(tokens, targets)  # grads keyed like model.params

Where things live: args (ModelArgs, presets), ops (forward/backward pairs), model (Transformer),
tokenizer (Tokenizer, ChatFormat), bpe (a small BPE trainer), formats (load, save), backend and
kernels (the C extension), optim, data (the loader, the built-in stories), training, generation,
parallel (data, tensor and pipeline parallelism in real processes), cli.
"""
from .args import PRESETS, ModelArgs, n_params, preset
from .backend import get_backend, set_backend
from .model import KVCache, Transformer

# Names whose modules pull in heavier dependencies (tiktoken, matplotlib, ...) are imported on first use.
_LAZY = {
    "Tokenizer": "tokenizer",
    "ChatFormat": "tokenizer",
    "load": "formats",
    "save": "formats",
    "AdamW": "optim",
    "generate": "generation",
    "generate_stream": "generation",
}

__all__ = ["ModelArgs", "PRESETS", "preset", "n_params", "Transformer", "KVCache",
           "set_backend", "get_backend", *_LAZY]


def __dir__():
    """The lazy names too, so tab completion and dir(llama3np) list Tokenizer, load, save, generate, ..."""
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'llama3np' has no attribute {name!r}")
