"""The gradient-error picture: a heat map of analytic minus numeric gradient, saved as PNG.

A wrong backward usually leaves a pattern: one row off (a missing term for one position), every other
column (a pairing mistake in RoPE), a whole head (a grouped-query sum). The picture shows it at a glance.
"""
from pathlib import Path

import numpy as np


def as_matrix(a):
    """Any array as 2-D for display: (..., C) -> (prod(...), C); a vector becomes one row."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(1, -1)
    return a.reshape(-1, a.shape[-1])


def save_gradient_heatmap(analytic, numeric, path, title="gradient"):
    """Plot analytic - numeric (symmetric colour scale) beside |numeric|, write `path` (PNG), return it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..fileio import atomic_write_bytes

    diff = as_matrix(np.asarray(analytic, dtype=np.float64) - np.asarray(numeric, dtype=np.float64))
    ref = as_matrix(numeric)
    lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    im = axes[0].imshow(diff, cmap="RdBu_r", vmin=-lim or -1, vmax=lim or 1, aspect="auto", interpolation="nearest")
    axes[0].set_title(f"{title}: analytic - numeric")
    fig.colorbar(im, ax=axes[0])
    im = axes[1].imshow(np.abs(ref), cmap="viridis", aspect="auto", interpolation="nearest")
    axes[1].set_title("|numeric gradient|")
    fig.colorbar(im, ax=axes[1])
    for ax in axes:
        ax.set_xlabel("last axis")
        ax.set_ylabel("leading axes, flattened")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
