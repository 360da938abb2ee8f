"""A batched matmul over a trainable 3-D weight, one matrix per head: ``torch.bmm(x, W)``,
``torch.baddbmm(bias, x, W)`` with ``W`` of shape ``[H, d_in, d_out]`` and ``x`` of shape
``[H, N, d_in]`` (RecurrentGemma's RG-LRU gates: per-head linear maps of ``[B·T]`` rows).

The matmul's batch dim is the weight's own head dim, which no example can own (a
parameter does not know the batch), so the examples' rows are in dim 1 of ``x``. The
layout check compares ``x`` by those rows, and the capture runs the generic per-example
path on a rows-first view of the call, as for ``nn.MultiheadAttention``'s ``[T, B, E]``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.utils._pytree import tree_flatten

from vaultkern.core.handlers import generic_consumption

# func -> (position of the rows operand, position of the weight)
_OPERANDS = {torch.bmm: (0, 1), torch.Tensor.bmm: (0, 1),
             torch.baddbmm: (1, 2), torch.Tensor.baddbmm: (1, 2)}
FUNCS = tuple(_OPERANDS)


def rows_operand(cap, func, args, kwargs) -> Optional[int]:
    """The position of the operand whose dim 1 holds the examples' rows, or None when the
    call is not a matmul of data with a trainable [H, d_in, d_out] parameter."""
    data_at, weight_at = _OPERANDS[func]
    if len(args) <= weight_at or kwargs.get("out") is not None:
        return None
    x, w = args[data_at], args[weight_at]
    if not (isinstance(w, torch.nn.Parameter) and id(w) in cap.params and w.dim() == 3
            and isinstance(x, torch.Tensor) and x.dim() == 3 and cap.lookup(x) is None):
        return None
    if data_at == 1:  # baddbmm's added term must not hold rows of its own
        bias, entry = args[0], cap.lookup(args[0])
        if isinstance(bias, torch.Tensor) and bias.dim() == 3 and (
                entry.in_dim_1 if entry is not None else bias.shape[1] != 1):
            return None
    return data_at


def example_major_inputs(cap, func, args, kwargs, leaves) -> Optional[List[torch.Tensor]]:
    """The call's inputs as the layout check compares them: the rows operand rows-first."""
    at = rows_operand(cap, func, args, kwargs)
    if at is None:
        return None
    x = args[at]
    return [t.transpose(0, 1) if t is x else t for t in cap.call_inputs(leaves)]


def head_matmul(cap, func, args, kwargs):
    at = rows_operand(cap, func, args, kwargs)
    if at is None:
        return NotImplemented
    rows_first = list(args)
    rows_first[at] = args[at].transpose(0, 1)
    leaves, spec = tree_flatten((tuple(rows_first), kwargs))
    entries = [cap.lookup(x) for x in leaves]
    batched = [x is rows_first[at] for x in leaves]
    call = _rows_first_baddbmm if at == 1 else _rows_first_bmm
    return generic_consumption(cap, call, leaves, entries, spec, batched).transpose(0, 1)


def _rows_first_bmm(x, w, **kwargs):
    return torch.bmm(x.transpose(0, 1), w, **kwargs).transpose(0, 1)


def _rows_first_baddbmm(bias, x, w, **kwargs):
    return torch.baddbmm(bias, x.transpose(0, 1), w, **kwargs).transpose(0, 1)


_rows_first_bmm.__name__, _rows_first_baddbmm.__name__ = "bmm", "baddbmm"  # in messages
