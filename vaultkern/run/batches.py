"""Logical batches of the training loop and their backward pass in micro-batches.

Truncated Poisson (--max-batch-size b): every logical batch has exactly b rows. Padding
rows are not copies of a record: they hold only PAD (every target ignored), and the
engine is told which rows are real (``vaultkern.set_row_mask``), so a padding row
contributes exactly 0 to the clipped sum whatever the loss function does with it.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Sequence, Tuple

import torch

from vaultkern.core import set_group_ids, set_row_mask
from vaultkern.data import ByteTokenizer, inputs_and_targets
from vaultkern.models import IGNORE_INDEX
from vaultkern.privacy.sampling import pad_to_max_batch
from vaultkern.privacy.user_sampling import group_microbatches
from vaultkern.run.ranks import sync_context


class ShuffledBatches:
    """Non-private batching: fixed-size batches from a fresh permutation each epoch."""

    def __init__(self, num_samples: int, batch_size: int, steps: int, seed: int):
        self.num_samples, self.batch_size, self.steps, self.seed = num_samples, batch_size, steps, seed
        self.step = 0

    def __iter__(self):
        per_epoch = max(1, self.num_samples // self.batch_size)
        while self.step < self.steps:
            epoch, i = divmod(self.step, per_epoch)
            perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))
            self.step += 1
            yield perm[i * self.batch_size:(i + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def logical_batch(rows: torch.Tensor, indices: Sequence[int], max_batch_size: Optional[int],
                  pad_id: int = ByteTokenizer.PAD) -> Tuple[torch.Tensor, torch.Tensor]:
    """(batch rows, real-row mask [bool]); with a cap, padded to exactly ``max_batch_size`` rows."""
    if max_batch_size is None:
        return rows[torch.as_tensor(list(indices), dtype=torch.long)], torch.ones(
            len(indices), dtype=torch.bool)
    padded, weights = pad_to_max_batch(indices, max_batch_size)
    real = weights > 0
    batch = rows[padded]  # a copy
    batch[~real] = pad_id
    return batch, real


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def backward_in_microbatches(model, batch: torch.Tensor, real: torch.Tensor, loss_fn: Callable,
                             max_physical_batch_size: int, device: torch.device,
                             scale: float = 1.0, mask_rows: bool = False,
                             groups: Optional[torch.Tensor] = None,
                             forward: Optional[torch.nn.Module] = None) -> Tuple[float, int]:
    """``(scale · Σ per-row losses).backward()`` per micro-batch; (loss sum, tokens) of the real rows.

    ``mask_rows``: tell the patched model which rows are real before each micro-batch, so
    padding rows contribute exactly 0 inside the engine. ``groups`` (user-level runs: the
    user of each row, rows grouped by user): micro-batches never split a user, and each
    user's summed gradient is clipped as one (``vaultkern.set_group_ids``). ``forward``
    (torchrun: DDP around ``model``): the forward goes through it, every micro-batch but the
    last under ``no_sync``, and an empty share still runs one 0-row backward, so that every
    rank joins the step's one all-reduce. The returned
    loss (private, for the metrics) leaves out rows whose loss is not finite; the engine
    drops their gradients."""
    m = max_physical_batch_size
    spans = ([(a, a + m) for a in range(0, len(batch), m)] if groups is None
             else group_microbatches(groups, m))
    forward = model if forward is None else forward
    if forward is not model and not spans:
        spans = [(0, 0)]
    loss_sum, tokens = 0.0, 0
    for k, (start, end) in enumerate(spans):
        chunk = batch[start:end]
        chunk_real = real[start:end].to(device)
        inputs, targets = (t.to(device) for t in inputs_and_targets(chunk))
        if mask_rows:
            set_row_mask(model, chunk_real)
        if groups is not None:
            set_group_ids(model, groups[start:end].to(device))
        with sync_context(forward, last=k == len(spans) - 1):
            with autocast_for(device):
                logits = forward(inputs)
            losses = loss_fn(logits, targets)
            (losses.sum() * scale).backward()
        counted = chunk_real & torch.isfinite(losses.detach())
        loss_sum += float(losses.detach()[counted].sum())
        tokens += int((targets[counted] != IGNORE_INDEX).sum())
    return loss_sum, tokens

