"""Finite-difference gradient checking, for the tests and for students checking their own backward.

    num = numerical_grad(lambda: f(x), x)            # central differences, one entry at a time
    assert rel_error(analytic, num) < 1e-6          # float64 only: float32 cannot resolve 1e-6

Central differences (f(x+h) - f(x-h)) / 2h have error O(h^2); with h = 1e-5 in float64 the truncation
error and the rounding error (about eps_machine / h) are both near 1e-10, far below the 1e-6 we test.
"""
import numpy as np


def numerical_grad(f, x, h=1e-5, indices=None):
    """d f() / d x by central differences, perturbing x in place (and restoring it).

    f takes no arguments and returns a scalar computed from x. `indices` (an iterable of flat
    indices) limits the check to a sample of entries; the others are left as 0.
    """
    if x.dtype != np.float64:
        raise TypeError(f"gradient checks need float64, got {x.dtype}")
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous so that it can be perturbed in place")
    # BEGIN SOLUTION ex01
    for i in range(flat.size) if indices is None else indices:
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    # END SOLUTION
    return grad


def rel_error(a, b):
    """max |a - b| / max(|a|, |b|) over all entries: 0 for equal arrays, scale-free otherwise."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.max(np.abs(a), initial=0.0), np.max(np.abs(b), initial=0.0))
    return 0.0 if scale == 0 else float(np.max(np.abs(a - b)) / scale)
