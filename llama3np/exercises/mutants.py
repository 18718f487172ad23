"""The correct softmax, RMSNorm and RoPE, and a bank of mutants (each a classic bug), for ex22.

Students write property tests in `student_properties.py`: functions named test_softmax_*,
test_rmsnorm_*, test_rope_* that take the implementation under test as their first argument
(`softmax`, `rmsnorm`, `rope`). The grader runs them on the correct implementation (they must pass)
and on every mutant: a mutant is caught when a test fails on it. Score: the fraction caught.

The implementations here are written from the definitions, independent of llama3np.ops (whose
functions are exercises themselves).
    softmax(x)                     over the last axis
    rmsnorm(x, weight, eps)        over the last axis
    rope(x, start_pos, theta)      x (B, T, n_heads, head_dim), Meta's interleaved pairs
"""
import numpy as np


# ---------------------------------------------------------------------------------------------------
# the correct implementations


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return z / np.sum(z, axis=-1, keepdims=True)


def rmsnorm(x, weight, eps=1e-5):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps) * weight


def _angles(T, hd, start_pos, theta, exponent=2.0):
    pos = np.arange(start_pos, start_pos + T, dtype=np.float64)
    return np.outer(pos, theta ** (-exponent * np.arange(hd // 2) / hd))  # (T, hd/2)


def _rotate_pairs(x, angles):
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[None, :, None, :]
    out = np.empty_like(x, dtype=np.float64)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def rope(x, start_pos=0, theta=10000.0):
    x = np.asarray(x, dtype=np.float64)
    return _rotate_pairs(x, _angles(x.shape[1], x.shape[-1], start_pos, theta))


# ---------------------------------------------------------------------------------------------------
# the mutants: name -> (function, what is wrong)


def _softmax_sign(x):
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(np.min(x, axis=-1, keepdims=True) - x)
    return z / np.sum(z, axis=-1, keepdims=True)


def _softmax_axis(x):
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(x - np.max(x, axis=0, keepdims=True))
    return z / np.sum(z, axis=0, keepdims=True)


def _softmax_no_max(x):
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.exp(np.asarray(x, dtype=np.float64))
        return z / np.sum(z, axis=-1, keepdims=True)


def _softmax_global_max(x):
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.exp(x - np.max(x))
        return z / np.sum(z, axis=-1, keepdims=True)


def _rmsnorm_no_eps(x, weight, eps=1e-5):
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True)) * weight


def _rmsnorm_axis(x, weight, eps=1e-5):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(np.square(x), axis=0, keepdims=True) + eps) * weight


def _rmsnorm_eps_outside(x, weight, eps=1e-5):
    x = np.asarray(x, dtype=np.float64)
    return x / (np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True)) + eps) * weight


def _rmsnorm_layernorm(x, weight, eps=1e-5):
    x = np.asarray(x, dtype=np.float64)
    c = x - np.mean(x, axis=-1, keepdims=True)
    return c / np.sqrt(np.mean(np.square(c), axis=-1, keepdims=True) + eps) * weight


def _rmsnorm_no_weight(x, weight, eps=1e-5):
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)


def _rope_off_by_one(x, start_pos=0, theta=10000.0):
    x = np.asarray(x, dtype=np.float64)
    return _rotate_pairs(x, _angles(x.shape[1], x.shape[-1], start_pos + 1, theta))


def _rope_sign(x, start_pos=0, theta=10000.0):
    x = np.asarray(x, dtype=np.float64)
    return _rotate_pairs(x, -_angles(x.shape[1], x.shape[-1], start_pos, theta))


def _rope_half_split(x, start_pos=0, theta=10000.0):
    x = np.asarray(x, dtype=np.float64)
    hd = x.shape[-1]
    a = _angles(x.shape[1], hd, start_pos, theta)[None, :, None, :]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]  # Hugging Face's rotate_half pairing
    return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x1 * np.sin(a) + x2 * np.cos(a)], axis=-1)


def _rope_frequency(x, start_pos=0, theta=10000.0):
    x = np.asarray(x, dtype=np.float64)
    return _rotate_pairs(x, _angles(x.shape[1], x.shape[-1], start_pos, theta, exponent=1.0))


CORRECT = {"softmax": softmax, "rmsnorm": rmsnorm, "rope": rope}

MUTANTS = {
    "softmax": {
        "sign": (_softmax_sign, "exp(-x): a flipped sign (still sums to 1)"),
        "axis": (_softmax_axis, "normalised over axis 0 instead of the last axis"),
        "no_max": (_softmax_no_max, "no max subtraction: overflows for large logits"),
        "global_max": (_softmax_global_max, "the max of the whole array, not of each row (underflow)"),
    },
    "rmsnorm": {
        "no_eps": (_rmsnorm_no_eps, "eps missing: a zero row gives nan"),
        "axis": (_rmsnorm_axis, "the mean over axis 0 instead of the last axis"),
        "eps_outside": (_rmsnorm_eps_outside, "eps added outside the square root"),
        "layernorm": (_rmsnorm_layernorm, "the mean subtracted (LayerNorm, not RMSNorm)"),
        "no_weight": (_rmsnorm_no_weight, "the weight is never applied"),
    },
    "rope": {
        "off_by_one": (_rope_off_by_one, "positions start at start_pos + 1 (off by one)"),
        "sign": (_rope_sign, "rotated by the negative angle"),
        "half_split": (_rope_half_split, "Hugging Face's half-split pairs instead of Meta's adjacent pairs"),
        "frequency": (_rope_frequency, "frequencies theta^(-i/hd) instead of theta^(-2i/hd)"),
    },
}


def student_tests(module, family):
    """The student's test functions for one family: every `test_<family>_*` in the module, in order."""
    return [getattr(module, n) for n in dir(module)
            if n.startswith(f"test_{family}") and callable(getattr(module, n))]


def run_student_tests(tests, impl, family):
    """Run each test with the implementation as its first argument; returns the first failure or None.
    A NotImplementedError (the stub) propagates: the exercise is not attempted."""
    for t in tests:
        try:
            t(**{family: impl})
        except NotImplementedError:
            raise
        except Exception as e:  # an assertion, or any error the mutant provokes: caught
            return f"{t.__name__}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
