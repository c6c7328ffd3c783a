"""Training augmentation for radiographs, on the device (used by the fine-tune trainer)."""
from __future__ import annotations

import math

import torch


def augment(x: torch.Tensor, generator: torch.Generator, *, max_rotate_deg: float = 5.0,
            min_scale: float = 0.9, jitter: float = 0.1) -> torch.Tensor:
    """Radiograph-safe augmentation on the device: small crop-zoom, rotation, brightness/contrast."""
    b = x.shape[0]
    dev = x.device
    u = torch.rand(b, 4, generator=generator).to(dev)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_rotate_deg)
    scale = min_scale + (1 - min_scale) * u[:, 1]
    shift = (u[:, 2:4] * 2 - 1) * (1 - scale).unsqueeze(1)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, x.shape, align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    v = torch.rand(b, 2, generator=generator).to(dev)
    contrast = 1 + (v[:, 0] * 2 - 1) * jitter
    bright = (v[:, 1] * 2 - 1) * jitter
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast.view(-1, 1, 1, 1) + mean + bright.view(-1, 1, 1, 1)
