"""Poisson sampling across data-parallel ranks (issue 12).

Every rank draws the *same* global Poisson batch — each of the N examples joins with
probability q, from one ChaCha20 stream whose key all ranks share — and keeps its own
share of it (the sampled indices at positions rank, rank + W, ... of the ascending list).
So an example is on at most one rank per step, the union of the shares is exactly one
Poisson batch at rate q, and the accountant's event is the single-process one; the DDP
all-reduce of the clipped sums then gives the global clipped sum, divided by the global
expected batch B̄ = q·N.

The shared key: SHA-256 of a seed, the same on every rank; without one, rank 0 draws a
256-bit seed from ``os.urandom`` and broadcasts it (``secure=True`` then also keeps it
out of the sampler's state, so a resumed run continues with a new key).
"""
from __future__ import annotations

from typing import List, Optional

from vaultkern.core.distributed import is_distributed, shared_random_seed
from vaultkern.privacy.sampler_stream import SamplerStream
from vaultkern.privacy.sampling import PoissonBatchSampler


class DistributedPoissonBatchSampler(PoissonBatchSampler):
    """This rank's share of a global Poisson batch over ``num_samples`` examples."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int,
                 seed: Optional[int] = None, secure: bool = False,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        if rank is None or world_size is None:
            if not is_distributed():
                raise RuntimeError("DistributedPoissonBatchSampler needs an initialised process "
                                   "group, or rank= and world_size=")
            import torch.distributed as dist
            rank, world_size = dist.get_rank(), dist.get_world_size()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
        if secure and seed is not None:
            raise ValueError("secure=True keys the sampler from os.urandom; do not pass a seed")
        shared = shared_random_seed() if seed is None else int(seed)  # collective when seed is None
        super().__init__(num_samples, sample_rate, steps, seed=None if secure else shared,
                         secure=secure)
        if secure:  # the same os.urandom key on every rank, never saved
            self.stream = SamplerStream.from_seed(shared)
        self.rank, self.world_size = int(rank), int(world_size)

    def sample_batch(self) -> List[int]:
        return super().sample_batch()[self.rank::self.world_size]
