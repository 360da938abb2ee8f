"""Rules for attention calls that read trainable parameters.

``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) takes ``[T, B, E]``: its
examples are in dim 1, so the generic path runs on a batch-first wrapper.
``F.scaled_dot_product_attention`` with an additive mask derived from parameters (T5's
position bias under sdpa) runs once, as it is, with the mask behind a capture node.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from vaultkern.backend import acc_dtype
from vaultkern.core.errors import BatchLayoutError
from vaultkern.core.handlers import (_bind, _captured, _sum_to_shape, generic_consumption,
                                     pull_back)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def scaled_dot_product_attention(cap, func, args, kwargs):
    """F.scaled_dot_product_attention whose additive mask is derived from parameters (T5's
    position bias under sdpa): the mask goes in broadcast to the batch behind a capture node,
    so attention itself (its dropout too, which no per-example recomputation could redraw)
    runs once, as it is, and the mask's per-example gradients come from its backward."""
    a = dict(zip(_SDPA_ARGS, args), **kwargs)
    entry = cap.lookup(a.get("attn_mask"))
    q = a.get("query")
    if (entry is None or entry.rows is not None or not isinstance(q, torch.Tensor)
            or any(cap.lookup(a.get(k)) is not None for k in ("query", "key", "value"))):
        return NotImplemented
    mask = entry.value.detach()
    if mask.dim() > q.dim():
        return NotImplemented
    mask = mask.reshape((1,) * (q.dim() - mask.dim()) + tuple(mask.shape))
    if mask.shape[0] != 1:
        return NotImplemented
    B, shape = cap.batch, tuple(entry.value.shape)

    def attention_mask(saved, g):
        return pull_back(entry, _sum_to_shape(g.to(acc_dtype(g)), B, shape))

    a["attn_mask"] = _captured(cap, mask.expand(q.shape[0], *mask.shape[1:]), [],
                               list(entry.roots), attention_mask)
    return func(**a)


def multi_head_attention(cap, func, args, kwargs):
    """F.multi_head_attention_forward takes [T, B, E]: vmap over dim 1 by handing the generic
    path a batch-first wrapper (masks of shape [T, S] are shared, [B·H, T, S] per example)."""
    a = _bind(func, args, kwargs)
    if a["query"].dim() != 3:
        return NotImplemented
    for n in ("query", "key", "value"):
        entry = cap.lookup(a[n])
        if entry is not None:
            a[n] = _learned_input(cap, entry, n)
    leaves, spec = tree_flatten(((), a))
    names = _leaf_names(a)
    entries = [cap.lookup(x) for x in leaves]
    batched = []
    for x, e, n in zip(leaves, entries, names):
        batched.append(e is None and isinstance(x, torch.Tensor) and (
            n in ("query", "key", "value", "key_padding_mask") or (n == "attn_mask" and x.dim() == 3)))
    for n in ("query", "key", "value"):
        i = names.index(n)
        leaves[i] = leaves[i].transpose(0, 1)
    out = generic_consumption(cap, _mha_batch_first, leaves, entries, spec, batched)
    attn, weights = out
    return attn.transpose(0, 1), weights


def example_major_inputs(cap, func, args, kwargs, leaves):
    """The layout check compares query, key and value by dim 1, where their examples are."""
    return [x.transpose(0, 1) for x in args[:3] if isinstance(x, torch.Tensor) and x.dim() == 3]


def _learned_input(cap, entry, name: str) -> torch.Tensor:
    """A query (key, value) computed from parameters alone, [k, B, E] (a learned query
    repeated to the batch: attention pooling, DETR's object queries), goes in as data behind
    a capture node: example i reads its column i only, so its gradient there, pulled back
    through the value's recomputation, is example i's gradient of the parameters."""
    B, shape = cap.batch, tuple(entry.value.shape)
    if entry.rows is not None or len(shape) != 3 or shape[1] != B:
        raise BatchLayoutError(
            f"vaultkern: the {name} of multi_head_attention_forward in {cap.site().describe()} "
            f"is computed from trainable parameters alone with shape {shape}, not [T, {B}, E] "
            "(one column per example); per-example gradients cannot be attributed.")
    examples = torch.arange(B)

    def learned_attention_input(saved, g):
        per_example = g.new_zeros((B,) + shape)
        per_example[examples, :, examples] = g.transpose(0, 1)
        return pull_back(entry, per_example)

    return _captured(cap, entry.value.detach(), [], list(entry.roots), learned_attention_input)


def _mha_batch_first(**a):
    for n in ("query", "key", "value"):
        a[n] = a[n].transpose(0, 1)
    attn, weights = F.multi_head_attention_forward(**a)
    return attn.transpose(0, 1), weights


def _leaf_names(d: dict) -> List[str]:
    names = []
    for k, v in d.items():
        names += [k] * len(tree_flatten(v)[0])
    return names
