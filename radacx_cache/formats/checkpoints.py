"""Fine-tuning checkpoints (``last.pt``, ``best.pt``), read without unpickling; the network they hold is
``models.Classifier``."""
from __future__ import annotations

from pathlib import Path

import torch


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a checkpoint from another config, ...)."""


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, never unpickling code (a planted file cannot run anything)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"{path}: not a checkpoint this tool wrote, or damaged ({type(exc).__name__}: "
                            f"{str(exc)[:300]}). Delete it to train from the start.") from None
