"""Device, precision and distributed setup, shared by every stage that runs a model.

``World`` is read from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) once;
``init_distributed`` binds the device and creates the process group only when there are several
ranks, so a single-process run never touches ``torch.distributed``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype for ``precision`` (None: fp32). ``auto``: bf16 on a GPU that has it."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype):
    """bf16/fp16 autocast on the device, or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def init_distributed(device_name: str) -> tuple[World, torch.device]:
    """The world and this rank's device; under torchrun, also the process group (nccl/gloo)."""
    world = World.from_env()
    device = resolve_device(device_name)
    if world.distributed:
        if device.type == "cuda":
            device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def rng_state() -> dict:
    """RNG states as tensors (numpy's MT19937 key too), so the checkpoint needs no unpickling."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
