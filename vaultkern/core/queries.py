"""What a patched model reports and takes between backward passes: the last norms, the
book-keeper, row masks and group ids for the next backward, the captured modules."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from vaultkern.core.bookkeeping import BookKeeper
from vaultkern.core.site import Site


def state_of(model: nn.Module):
    state = getattr(model, "_vaultkern", None)
    if state is None:
        raise RuntimeError("vaultkern: model is not patched (call vk.patch(model, ...) first)")
    return state


def last_norms(model: nn.Module) -> Optional[torch.Tensor]:
    """[B] per-example gradient norms (before clipping) of the model's last backward."""
    return state_of(model).bookkeeper.last_norms


def bookkeeper(model: nn.Module) -> BookKeeper:
    return state_of(model).bookkeeper


def set_row_mask(model: nn.Module, mask: Optional[torch.Tensor]) -> None:
    """Rows where ``mask`` is False contribute exactly 0 to the next backward's clipped sum,
    whatever the loss does with them (padding rows of a fixed-shape batch)."""
    if mask is not None:
        mask = torch.as_tensor(mask).bool().flatten()
    state_of(model).bookkeeper.row_mask = mask


def set_group_ids(model: nn.Module, ids: Optional[torch.Tensor]) -> None:
    """Rows with the same id form one privacy unit for the next backward: the clipped
    quantity is their *summed* gradient (user-level DP); ``last_norms`` is then per group,
    in the order of the sorted ids. Groups need not be contiguous or equal in size."""
    if ids is not None:
        ids = torch.as_tensor(ids).flatten()
        if ids.is_floating_point():
            raise TypeError(f"vaultkern: group ids must be integers, got {ids.dtype}")
    state_of(model).bookkeeper.group_ids = ids


def patched_sites(model: nn.Module) -> List[Site]:
    """The modules that run under capture, with what they consumed so far."""
    return list(state_of(model).sites.values())


def summary(model: nn.Module) -> str:
    """One line per captured module: its trainable parameters and how they were consumed
    (known after the first forward; "generic" marks the slower torch.func path)."""
    state = state_of(model)
    lines = [f"vaultkern patch of {type(model).__name__}: C={state.bookkeeper.max_grad_norm}, "
             f"loss_reduction={state.bookkeeper.loss_reduction!r}"]
    for site in state.sites.values():
        how = ", ".join(sorted(site.kinds)) or "not run yet"
        lines.append(f"  {site.describe()}: {', '.join(sorted(site.owned)) or '(reads others)'} -> {how}")
    return "\n".join(lines)
