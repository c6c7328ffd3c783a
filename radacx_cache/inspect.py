"""``radacx inspect``: what is in a shard or feature file, and a montage of original vs masked."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np


def montage(path: str | Path, png: str | Path, n: int = 8) -> None:
    """Original (top) vs masked (bottom) images of the first ``n`` rows, with their targets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with h5py.File(path, "r") as f:
        n = min(n, f["original"].shape[0])
        original, masked = f["original"][:n], f["masked"][:n]
        targets = f["targets"][:n]
        names = json.loads(f.attrs["target_names"]) if isinstance(f.attrs["target_names"], str) \
            else list(f.attrs["target_names"])
    if n == 0:
        raise ValueError(f"{path}: no rows to show")
    fig, axes = plt.subplots(2, n, figsize=(2 * n, 4.4), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(original[i], cmap="gray", vmin=0, vmax=255)
        axes[1, i].imshow(masked[i])
        title = "\n".join(names[j] for j in np.flatnonzero(targets[i] > 0)) or "-"
        axes[0, i].set_title(title, fontsize=7)
        for ax in axes[:, i]:
            ax.axis("off")
    axes[0, 0].text(-10, 112, "original", rotation=90, va="center", ha="right", fontsize=8)
    axes[1, 0].text(-10, 112, "masked", rotation=90, va="center", ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def inspect_path(path: str | Path, png: str | Path | None = None, n: int = 8) -> str:
    path = Path(path)
    lines = [str(path)]
    with h5py.File(path, "r") as f:
        for key, value in sorted(f.attrs.items()):
            text = str(value)
            lines.append(f"  @{key} = {text[:120]}{'...' if len(text) > 120 else ''}")
        for key in f:
            ds = f[key]
            lines.append(f"  {key}: {ds.shape} {ds.dtype}")
        is_shard = "original" in f
    if png:
        if not is_shard:
            raise ValueError(f"{path}: --png needs a shard file (with original/masked images)")
        montage(path, png, n)
        lines.append(f"  montage written to {png}")
    return "\n".join(lines)
