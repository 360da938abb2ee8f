"""The layout probe's inputs (probe.py): the batch with some examples changed, and the
batch one example larger."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.utils._pytree import tree_map


def perturbed(args, kwargs, examples: List[int], roll: bool = False) -> Optional[Tuple[tuple, dict]]:
    """The inputs with some examples of the primary input changed (None if they cannot be):
    noise added, token ids shifted by one, or (``roll``) each changed row of ids rotated by
    one position, which keeps every token of the row."""
    from vaultkern.core.patch import primary_input
    x = primary_input(args, kwargs)
    if x is None or x.shape[0] < 2 or x.dtype == torch.bool or (roll and (
            x.is_floating_point() or x.dim() < 2)):
        return None
    y = x.clone()
    if roll:
        y[examples] = y[examples].roll(1, dims=-1)
    elif x.is_floating_point():
        gen = torch.Generator(device="cpu").manual_seed(0)
        scale = float(torch.nan_to_num(x.float(), 0.0, 0.0, 0.0).std()) + 1.0
        y[examples] += (torch.randn(y[examples].shape, generator=gen) * scale).to(y)
    else:
        y[examples] = (y[examples] + 1) % max(int(x.max()) + 1, 2)
    return tree_map(lambda t: y if t is x else t, (args, kwargs))


def example_sets(B: int) -> List[List[int]]:
    """The sets of examples changed one at a time: the first, the last, the odd and the
    even ones (each a proper, non-empty subset; repeats dropped)."""
    sets: List[List[int]] = []
    for candidate in ([0], [B - 1], list(range(1, B, 2)), list(range(0, B, 2))):
        if 0 < len(candidate) < B and candidate not in sets:
            sets.append(candidate)
    return sets


def grown_batch(args, kwargs, batch: int) -> Tuple[tuple, dict]:
    """The inputs with one more example: a copy of example 0 appended to every tensor
    whose dim 0 is the batch."""
    def grow(x):
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch:
            return torch.cat([x, x[:1]])
        return x
    return tree_map(grow, args), tree_map(grow, kwargs)
