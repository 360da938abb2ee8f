"""The reference run under ``torchrun`` (data parallelism over N processes).

    torchrun --nproc_per_node 2 -m vaultkern train --config tiny --epsilon 8 --out runs/ddp

Every rank builds the same data, plan and initial model; the DP assembly then samples one
global Poisson batch per step from a key all ranks share (each rank trains on its share,
:mod:`vaultkern.privacy.distributed_sampling`), the patched model is wrapped in
DistributedDataParallel, which all-reduces the clipped sums once per step, and every rank
adds the same noise. ``--batch-size`` is the global expected batch. Rank 0 alone writes
the run directory (data, checkpoints, metrics, card, private report) and shows progress.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Tuple

import torch
from torch import nn


def start(device: torch.device) -> Tuple[int, int]:
    """(rank, world size): joins the process group that torchrun describes in the
    environment (gloo on CPU, NCCL on CUDA); (0, 1) when not launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def wrap(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """The module the forward goes through: the patched model, or DDP around it."""
    if world <= 1:
        return model
    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_context(forward: nn.Module, last: bool):
    """DDP reduces once per logical step: every micro-batch but the last runs under no_sync."""
    if isinstance(forward, nn.parallel.DistributedDataParallel) and not last:
        return forward.no_sync()
    return nullcontext()
