"""ModelArgs: the shape of a Llama 3 model, with Meta's field names, and the published presets.

The field names are those of Meta's `llama_models/llama3/args.py` (`dim`, `n_layers`, `n_heads`, ...)
so that a `params.json` from Meta loads straight into `ModelArgs(**params)`. A few fields are ours:
`hidden_dim` (an explicit FFN width, as Hugging Face's `intermediate_size`), the RoPE scaling numbers
that Meta hard-codes in `apply_scaling`, and `tie_embeddings` (Llama 3.2 1B/3B reuse the embedding as
the output layer).
"""
import math
from dataclasses import dataclass, fields, replace
from typing import Optional

# Meta's Llama 3 tokenizer: 128,000 BPE tokens + 256 special tokens (the vocabulary of every Llama 3 model)
LLAMA3_VOCAB_SIZE = 128256

_POSITIVE_INTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                  "rope_original_max_seq_len")
_POSITIVE_FLOATS = ("norm_eps", "rope_theta", "rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value):
    """A finite number > 0 (an int or a float, not a bool): NaN, inf, 0 and negatives are not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None means n_heads (plain multi-head attention)
    vocab_size: int = LLAMA3_VOCAB_SIZE
    multiple_of: int = 256  # the SwiGLU width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1+: stretch the low RoPE frequencies (see rope.py)
    max_seq_len: int = 8192
    hidden_dim: Optional[int] = None  # explicit FFN width; None means Meta's formula
    rope_scale_factor: float = 8.0  # 8 for Llama 3.1/3.3, 32 for Llama 3.2 1B/3B
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192  # Llama 3.0's context, the reference for the scaling
    tie_embeddings: bool = False

    def __post_init__(self):
        # every value is checked here, so a bad one (rope_theta=nan, norm_eps=0) fails at construction with
        # its name, not later as a NaN loss that looks like a learning-rate problem
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive int, got {value!r}")
        for name in _POSITIVE_FLOATS:
            value = getattr(self, name)
            if not _is_positive_number(value):
                raise ValueError(f"ModelArgs.{name} must be a finite number > 0, got {value!r}")
        if self.ffn_dim_multiplier is not None and not _is_positive_number(self.ffn_dim_multiplier):
            raise ValueError(f"ModelArgs.ffn_dim_multiplier must be None or a finite number > 0, "
                             f"got {self.ffn_dim_multiplier!r}")
        if self.hidden_dim is not None and (not _is_int(self.hidden_dim) or self.hidden_dim <= 0):
            raise ValueError(f"ModelArgs.hidden_dim must be None or a positive int, got {self.hidden_dim!r}")
        for name in ("use_scaled_rope", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelArgs.{name} must be True or False, got {getattr(self, name)!r}")
        if self.use_scaled_rope and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            # Meta's apply_scaling divides by (high_freq_factor - low_freq_factor)
            raise ValueError(f"ModelArgs.rope_high_freq_factor ({self.rope_high_freq_factor}) must be above "
                             f"rope_low_freq_factor ({self.rope_low_freq_factor}) when use_scaled_rope is on")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}: "
                "grouped-query attention shares each kv head among n_heads // n_kv_heads query heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE rotates pairs of features")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """The SwiGLU width: `hidden_dim` if given, else Meta's `FeedForward.__init__` formula."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        # 4*dim as in a classic transformer, times 2/3 because SwiGLU has three matrices, not two
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Build from a dict such as Meta's params.json, ignoring keys we do not use."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def n_params(args: ModelArgs) -> int:
    """Number of parameters, counted from the shapes (tied embeddings are counted once)."""
    d, hd = args.dim, args.head_dim
    attention = d * args.n_heads * hd * 2 + d * args.n_kv_heads * hd * 2  # wq, wo ; wk, wv
    feed_forward = 3 * d * args.ffn_hidden_dim  # w1, w2, w3
    per_layer = attention + feed_forward + 2 * d  # + attention_norm, ffn_norm
    embeddings = args.vocab_size * d * (1 if args.tie_embeddings else 2)
    return args.n_layers * per_layer + embeddings + d  # + the final norm


# The published shapes (Meta's params.json files) and two small models for teaching and training here.
PRESETS = {
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                      multiple_of=1024, max_seq_len=8192),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                        multiple_of=1024, use_scaled_rope=True, rope_scale_factor=8.0, max_seq_len=131072),
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                       multiple_of=4096, max_seq_len=8192),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                          multiple_of=4096, use_scaled_rope=True, rope_scale_factor=8.0, max_seq_len=131072),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
                        multiple_of=256, use_scaled_rope=True, rope_scale_factor=32.0, max_seq_len=131072,
                        tie_embeddings=True),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0,
                        multiple_of=256, use_scaled_rope=True, rope_scale_factor=32.0, max_seq_len=131072,
                        tie_embeddings=True),
    # teaching sizes: trained from scratch on the CPU with a small BPE vocabulary
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=4096, hidden_dim=768,
                 max_seq_len=512),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=8192, hidden_dim=1536,
                  max_seq_len=1024),
}


def preset(name: str, **overrides) -> ModelArgs:
    """`preset("llama3.2-1b")` -> ModelArgs; keyword overrides replace fields (e.g. max_seq_len=2048)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return replace(ModelArgs(**PRESETS[name]), **overrides)
