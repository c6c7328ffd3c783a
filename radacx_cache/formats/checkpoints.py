"""The fine-tuned network (vision tower + linear head) and its checkpoints, read without unpickling."""
from __future__ import annotations

from pathlib import Path

import torch


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a checkpoint from another config, ...)."""


class Classifier(torch.nn.Module):
    """The model's vision tower + a randomly initialised linear head on its embedding."""

    def __init__(self, visual: torch.nn.Module, embed_dim: int, n_classes: int):
        super().__init__()
        self.visual = visual
        self.head = torch.nn.Linear(embed_dim, n_classes)

    def features(self, x):
        """What the head reads."""
        return self.visual(x)

    def forward(self, x):
        return self.head(self.features(x))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, never unpickling code (a planted file cannot run anything)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"{path}: not a checkpoint this tool wrote, or damaged ({type(exc).__name__}: "
                            f"{str(exc)[:300]}). Delete it to train from the start.") from None
