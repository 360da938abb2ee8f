"""Data parallelism with DistributedDataParallel (DESIGN.md §10).

Each rank clips its own examples; the clipped sums are then summed over ranks,
and the optimizer adds noise once to the global sum (the same ξ on every rank).

vaultkern computes no autograd weight gradient, so DDP's reducer sees empty
gradients: left alone it would all-reduce zeros and copy them over the clipped
sums. Instead, the first forward through ``DistributedDataParallel`` registers
a communication hook: for each of DDP's buckets it returns a future that the
book-keeper completes at the end of the backward pass with the all-reduced
(summed, not averaged) clipped sums of that bucket's parameters; DDP then
writes them into ``p.grad`` as usual. Gradient accumulation under
``no_sync()`` accumulates the local clipped sums and reduces them once, on the
synchronising backward. One all-reduce per DDP bucket, not per parameter.
``find_unused_parameters=True`` and ``static_graph=True`` are refused (the first
keeps each rank's own sum, the second reduces before the sums exist).

FSDP2 (``fully_shard``) is :mod:`vaultkern.core.sharded`.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from vaultkern.core.bookkeeping import accumulate
from vaultkern.core.errors import UnsupportedModuleError


def is_distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks of the default process group (1 when not running distributed)."""
    if not is_distributed():
        return 1
    import torch.distributed as dist
    return dist.get_world_size()


def shared_random_seed() -> int:
    """A 256-bit seed from os.urandom (the noise's master key is SHA-256 of it: a full
    ChaCha20 key), rank 0's on every rank when running distributed, so that replicas draw
    the same noise without the user passing a seed."""
    seed = int.from_bytes(os.urandom(32), "little")
    if is_distributed():
        import torch.distributed as dist
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


class BucketSync:
    """The communication hook's state: DDP buckets waiting for their clipped sums."""

    def __init__(self, process_group):
        self.process_group = process_group
        self.pending: List[Tuple[List[torch.Tensor], torch.futures.Future]] = []

    def __getstate__(self):  # a copy is not attached to any DDP wrapper
        return {"process_group": None, "pending": []}

    write = staticmethod(accumulate)  # the local clipped sums go into p.grad first

    def resolve(self, error: Optional[BaseException] = None) -> None:
        """Complete every pending bucket (at the end of the backward pass)."""
        import torch.distributed as dist
        pending, self.pending = self.pending, []
        for params, future in pending:
            if error is not None:
                future.set_exception(error)
                continue
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in params])
            dist.all_reduce(flat, group=self.process_group)
            future.set_result(flat)


def _comm_hook(sync: BucketSync, bucket):  # (DDP checks a return annotation literally)
    future: torch.futures.Future = torch.futures.Future()
    sync.pending.append((list(bucket.parameters()), future))
    return future


def attach_ddp(state) -> None:
    """Called at the start of every forward of the patched model: hook into the DDP wrapper
    that is running it, once."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp = DDP._active_ddp_module
    if ddp is None or ddp.module is not state.model:
        return
    if state.bucket_sync is not None and getattr(ddp, "_vaultkern_attached", False):
        return
    for flag, why in (("find_unused_parameters", "it marks the parameters unused and keeps "
                       "each rank's own sum"), ("static_graph", "it reduces before the clipped sums exist")):
        if getattr(ddp, flag, False):
            raise UnsupportedModuleError(
                f"vaultkern: DistributedDataParallel({flag}=True) is not supported: {why}. "
                "Wrap the patched model with the defaults (every trainable parameter is used in "
                "every forward under vaultkern, so neither flag is needed).")
    if ddp._comm_hooks:
        raise UnsupportedModuleError(
            "vaultkern: this DistributedDataParallel wrapper already has a communication hook; "
            "vaultkern needs its own to sum the clipped gradients over ranks (DDP's default "
            "reduction would overwrite them with zeros). Remove the other hook.")
    sync = BucketSync(ddp.process_group)
    ddp.register_comm_hook(sync, _comm_hook)
    ddp._vaultkern_attached = True
    state.bucket_sync = sync
    state.bookkeeper.sync = sync

