"""Rules for the calls that look rows up in a trainable table: ``F.embedding`` and
``F.embedding_bag``. Both hand the book-keeper the one-hot factored form (token ids and
the gradient each looked-up row receives), so norms, cross terms with other uses of the
table (a tied head) and the clipped sum run through the embedding ops.

``F.embedding_bag`` sums (or averages) the rows of each bag: a bag's output gradient g_j
reaches every row it looked up, scaled by that token's weight in the bag (1 for "sum",
``per_sample_weights`` if given, 1/(tokens in the bag) for "mean"; ``padding_idx``
tokens take no part). Bags are examples, or k consecutive bags per example (the
examples' bags in example order, as dim 0 of any other layer input).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from vaultkern.backend import acc_dtype
from vaultkern.core.errors import BatchLayoutError, UnsupportedModuleError
from vaultkern.core.grad_forms import Factored
from vaultkern.core.handlers import _bind, _captured, by_example


def _refuse_unsupported_options(cap, a: dict, what: str) -> None:
    bad = [why for why, on in (("max_norm (renormalises the table in place)", a["max_norm"] is not None),
                               ("scale_grad_by_freq (mixes examples)", a["scale_grad_by_freq"]),
                               ("sparse gradients", a["sparse"])) if on]
    if bad:
        raise UnsupportedModuleError(
            f"vaultkern: the {what} in {cap.site().describe()} uses {', '.join(bad)}, which "
            "per-example clipping does not support")


def _padding_row(a: dict, table_rows: int):
    pad = a["padding_idx"]
    return pad + table_rows if pad is not None and pad < 0 else pad


def embedding(cap, func, args, kwargs):
    a = _bind(F.embedding, args, kwargs)
    ids, w = a["input"], a["weight"]
    e = cap.lookup(w)
    if cap.lookup(ids) is not None or e is None or e.alias is None or e.alias[1]:
        return NotImplemented
    _refuse_unsupported_options(cap, a, "embedding")
    if ids.dim() > 1 and not cap.is_batched(ids):  # a table of ids no example owns (T5's
        leaves, spec = tree_flatten((args, kwargs))  # [T, T] relative-position buckets):
        return cap.derive(func, leaves, [cap.lookup(x) for x in leaves], spec)  # a value
    if ids.dim() == 0 or not cap.is_batched(ids):  # of the table alone. Ids shared by every
        ids = ids.reshape(1, *ids.shape)           # example (positions arange(T)): one row
    B, first = cap.batch, cap.first_ids_shape
    if ids.shape[0] == 1 and first is not None and first[0] != B and first[1:] == ids.shape[1:]:
        # shared ids (a [1, T] position buffer) after token ids flattened k rows per example
        # (multiple choice's [B·choices, T]): one copy per row, so that they add to those rows
        ids = ids.expand(first)
    elif first is None and B and ids.shape[0] % B == 0:
        cap.first_ids_shape = ids.shape
    ids_b = cap.rows_for_batch(ids, "the token ids of an embedding")
    a["input"], a["weight"] = ids_b, e.value.detach()
    out = func(**a)
    root, table_rows = e.alias[0], w.shape[0]
    pad = _padding_row(a, table_rows)

    def embedding(saved, g):
        rows = saved[0].reshape(B, math.prod(saved[0].shape[1:]) * (saved[0].shape[0] // B if B else 1))
        if pad is not None:  # the padding row receives no gradient
            rows = rows.masked_fill(rows == pad, -1)
        return {root: Factored(rows.long(), by_example(g, B), one_hot=True, rows=table_rows)}

    return _captured(cap, out, [ids_b], [root], embedding)


def embedding_bag(cap, func, args, kwargs):
    a = _bind(F.embedding_bag, args, kwargs)
    ids, w, offsets, weights = a["input"], a["weight"], a["offsets"], a["per_sample_weights"]
    e = cap.lookup(w)
    if (e is None or e.alias is None or e.alias[1]
            or any(cap.lookup(t) is not None for t in (ids, offsets, weights))):
        return NotImplemented
    _refuse_unsupported_options(cap, a, "embedding bag")
    if a["mode"] == "max":
        if ids.dim() == 2:
            return NotImplemented  # one bag per row: the generic per-example path is exact
        raise UnsupportedModuleError(
            f"vaultkern: the embedding bag in {cap.site().describe()} uses mode='max' with "
            "offsets, which per-example clipping does not support; pass the bags as a 2-D "
            "[bags, length] input, or use mode='sum' or 'mean'")
    n_bags = ids.shape[0] if ids.dim() == 2 else offsets.shape[0] - int(a["include_last_offset"])
    B = cap.batch
    if B == 0 or n_bags % B:
        raise BatchLayoutError(
            f"vaultkern: the embedding bag in {cap.site().describe()} forms {n_bags} bags for a "
            f"batch of {B} examples: each example must own the same number of consecutive "
            "bags (dim 0 of the model's input holds the examples). Instead of one flat token "
            "list with offsets, give the model a [B, length] tensor (texts padded with the "
            "bag's padding_idx, which takes no part in a bag) and bag its rows.")
    table_rows = w.shape[0]
    with torch.no_grad():
        slots = _bag_slots(ids, offsets, weights, a["mode"], a["include_last_offset"],
                           _padding_row(a, table_rows), n_bags, B)
    a["weight"] = e.value.detach()
    out = func(**a)
    root = e.alias[0]

    def embedding_bag(saved, g):
        rows, bag, coef = saved
        acc = acc_dtype(g)
        return {root: Factored(rows, g.to(acc)[bag] * coef.to(acc).unsqueeze(-1), one_hot=True,
                               rows=table_rows)}

    return _captured(cap, out, list(slots), [root], embedding_bag)


def _bag_slots(ids, offsets, weights, mode: str, include_last: bool, pad, n_bags: int, B: int):
    """[B, P] per example, over its bags' tokens: the token id (-1: takes no part), its bag,
    and its weight in that bag's sum."""
    tokens = ids.reshape(-1)
    n = tokens.shape[0]
    position = torch.arange(n, device=ids.device)
    if ids.dim() == 2:
        bag = position // ids.shape[1]
        valid = torch.ones(n, dtype=torch.bool, device=ids.device)
    else:
        starts = offsets[:n_bags].long()
        ends = offsets[1:n_bags + 1].long() if include_last else torch.cat(
            [offsets[1:n_bags].long(), starts.new_full((1,), n)])
        # the last bag starting at or before each token (an empty bag starts where the next does)
        bag = (torch.searchsorted(starts, position, right=True) - 1).clamp(min=0)
        valid = (position >= starts[bag]) & (position < ends[bag])
    if pad is not None:
        valid &= tokens != pad
    if weights is not None:
        coef = weights.reshape(-1).detach()
    else:
        coef = torch.ones(n, dtype=torch.float64, device=ids.device)
    if mode == "mean":
        counts = torch.bincount(bag[valid], minlength=n_bags).clamp(min=1)
        coef = coef / counts[bag]
    example = bag // (n_bags // B)
    per_example = torch.bincount(example, minlength=B)
    width = int(per_example.max()) if n else 0
    slot = position - (per_example.cumsum(0) - per_example)[example]
    rows = torch.full((B, width), -1, dtype=torch.long, device=ids.device)
    rows[example, slot] = torch.where(valid, tokens.long(), -1)
    bags = torch.zeros((B, width), dtype=torch.long, device=ids.device)
    bags[example, slot] = bag
    coefs = torch.zeros((B, width), dtype=coef.dtype, device=ids.device)
    coefs[example, slot] = torch.where(valid, coef, 0)
    return rows, bags, coefs
