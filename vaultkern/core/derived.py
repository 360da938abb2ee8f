"""Values derived from trainable parameters alone, before they meet the data.

``1.0 + self.weight.float()`` (Gemma's norm), ``self.weight.t()``, T5's position bias
looked up from a table of buckets, a CLS token expanded to the batch: the capture returns
such a value detached, behind a guard node, and remembers how to recompute it from its
parameters, so that the call that finally meets the data can pull per-example gradients
back to the parameters exactly (through the fast factored forms when the value is a
parameter up to a cast or a transpose, through its vector-Jacobian product otherwise).

A value that holds one copy per example (a parameter repeated to the batch) recomputes one
example's copy, so that each example's gradient flows through its own copy only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from vaultkern.core.errors import BatchLayoutError, UnclippedGradientError, UnsupportedModuleError


class Tracked:
    """A parameter, or a value derived from parameters only.

    roots: the parameters it depends on; ``recompute(*roots)`` rebuilds it.
    alias: (root, transposed) when the value is the root itself up to a dtype
        cast, a copy, or a 2-D transpose (gradients pass through unchanged), so
        the fast factored forms still apply.
    rows: None for a value every example shares whole; k when the value holds one copy per
        example (k rows each, example-major: a parameter repeated to the batch), and then
        ``recompute`` rebuilds one example's k rows.
    in_dim_1: the copies of such a value moved to dim 1 (``[k, B, d]``, tracked whole):
        only attention (which reads column i for example i) may consume it.
    """

    __slots__ = ("value", "handle", "roots", "recompute", "alias", "rows", "in_dim_1")

    def __init__(self, value: torch.Tensor, roots: Tuple[torch.Tensor, ...],
                 recompute: Callable[..., torch.Tensor],
                 alias: Optional[Tuple[torch.Tensor, bool]] = None,
                 handle: Optional[torch.Tensor] = None, rows: Optional[int] = None,
                 in_dim_1: bool = False):
        self.value, self.roots, self.recompute, self.alias = value, roots, recompute, alias
        self.rows, self.in_dim_1 = rows, in_dim_1
        self.handle = value if handle is None else handle  # the tensor user code holds


# Calls that give the same values (or a transposed view) of a parameter: gradients pass
# through unchanged, so a linear layer reading the result keeps the fast factored forms.
_CASTS = {torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16,
          torch.Tensor.double, torch.Tensor.type_as, torch.Tensor.contiguous, torch.Tensor.clone,
          torch.Tensor.type}
_TRANSPOSES = {torch.Tensor.t, torch.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__}
# Calls that may repeat a value along dim 0 (to the batch size: one copy per example).
_REPEATS = {torch.Tensor.expand, torch.Tensor.broadcast_to, torch.broadcast_to,
            torch.Tensor.repeat, torch.tile, torch.Tensor.tile}


class _DerivedGuard(torch.autograd.Function):
    """Identity that refuses to pass a gradient: marks a derived value's escape route."""

    @staticmethod
    def forward(ctx, value, names, *roots):  # the roots make the result require grad
        ctx.names = names
        return value.view_as(value)

    @staticmethod
    def backward(ctx, *grads):
        raise UnclippedGradientError(
            f"vaultkern: a value computed from parameter(s) {ctx.names} without any input that "
            "holds the examples in dim 0 reached the loss: either it met the data only later, "
            "outside the patched model (e.g. cached during one forward and read in another), or "
            "it was returned from a block under reentrant activation checkpointing (T5's "
            "position bias; use_reentrant=False is exact), or its input had no batch dimension "
            "where vaultkern expects one. Its gradient cannot be clipped per example. Compute "
            "it inside the forward from inputs whose dim 0 holds the examples (or one row "
            "shared by all).")


def carries_gradient(t: torch.Tensor) -> bool:
    """Real or complex floating point (FourierFT's spectrum goes through a complex ifft2)."""
    return t.is_floating_point() or t.is_complex()


def derive(cap, func, leaves, entries, spec):
    """A call on parameters (and constants) only: a derived value, no gradient yet."""
    for x, e in zip(leaves, entries):
        if e is None and isinstance(x, torch.Tensor) and x.requires_grad:
            cap.rows_for_batch(x, f"an input of {getattr(func, '__name__', func)}")
    values = [e.value.detach() if e is not None else x for x, e in zip(leaves, entries)]
    a, k = tree_unflatten(values, spec)
    out = func(*a, **k)
    if not isinstance(out, torch.Tensor):
        if any(isinstance(o, torch.Tensor) and carries_gradient(o) for o in tree_flatten(out)[0]):
            raise BatchLayoutError(
                f"vaultkern: {getattr(func, '__name__', func)} in {cap.site().describe()} "
                "computes several values from trainable parameters without any input whose "
                f"dim 0 holds the {cap.batch} examples; vaultkern cannot attribute them to "
                "examples.")
        return out  # shapes, sizes: no gradient to carry
    if not carries_gradient(out):
        return out  # comparisons, indices
    if out.layout != torch.strided:  # no per-example rule (nor torch.func) for sparse ones
        raise UnsupportedModuleError(
            f"vaultkern: {getattr(func, '__name__', func)} in {cap.site().describe()} makes a "
            "sparse tensor from trainable parameters: per-example gradients of sparse "
            "operations are not supported (PEFT's ShiRA and FRoD keep their trainable values "
            "in sparse matrices). Densify it (.to_dense()) or freeze the module.")
    used = [e for e in entries if e is not None]
    roots = tuple({id(r): r for e in used for r in e.roots}.values())
    alias = None
    if len(used) == 1 and used[0].alias is not None:
        root, transposed = used[0].alias
        if func in _CASTS and out.shape == used[0].value.shape:
            alias = (root, transposed)
        elif out.dim() == 2 and used[0].value.dim() == 2 and (
                func in _TRANSPOSES or func in (torch.Tensor.transpose, torch.transpose)):
            alias = (root, not transposed)

    def replay(*root_values, _entries=entries, _leaves=leaves, _spec=spec, _func=func,
               _roots=roots, _copies=1):
        """The call on the inputs' recomputed values: one example's copy of those that hold
        one per example, or (``_copies=B``) all of them."""
        by_id = dict(zip(map(id, _roots), root_values))
        vals = []
        for x, e in zip(_leaves, _entries):
            if e is None:
                vals.append(x)
            else:
                v = e.recompute(*[by_id[id(r)] for r in e.roots])
                vals.append(v.repeat(_copies, *[1] * (v.dim() - 1)) if e.rows is not None else v)
        a2, k2 = tree_unflatten(vals, _spec)
        return _func(*a2, **k2)

    in_dim_1 = _copies_to_dim_1(func, leaves, used, out)
    if in_dim_1:
        # nn.MultiheadAttention(batch_first=True) transposing a learned query repeated to the
        # batch: the copies move to dim 1 and the value is tracked whole, [k, B, d] (its
        # attention rule hands example i its column i; dispatch refuses any other reader)
        rows, recompute = None, _transposed_copies(used[0], cap.batch)
    else:
        recompute = replay
        rows, from_all = _rows_per_example(cap, func, leaves, used, out, recompute, roots)
        if from_all:  # one example's rows of the call on every example's copies
            def recompute(*root_values, _replay=replay, _rows=rows, _copies=cap.batch):
                return _replay(*root_values, _copies=_copies)[:_rows]
    if rows is not None and not any(e.rows is not None for e in used):
        whole = recompute  # the call that repeats the value to the batch: one example's rows

        def recompute(*root_values, _whole=whole, _rows=rows):
            return _whole(*root_values)[:_rows]

    names = [cap.param_name(r) for r in roots]
    recompute = under_forward_autocast(recompute)
    guarded = _DerivedGuard.apply(out, names, *roots)
    cap.tracked[id(guarded)] = Tracked(out, roots, recompute, alias, handle=guarded,
                                        rows=rows, in_dim_1=in_dim_1)
    return guarded


def _copies_to_dim_1(func, leaves, used, out) -> bool:
    """Is this ``x.transpose(0, 1)`` of a value holding one copy per example in dim 0?"""
    if func not in (torch.transpose, torch.Tensor.transpose) or len(used) != 1 or (
            used[0].rows is None or out.dim() < 2):
        return False
    dims = [x for x in leaves if isinstance(x, int) and not isinstance(x, bool)]
    return sorted(d % out.dim() for d in dims) == [0, 1]


def _transposed_copies(entry: Tracked, batch: int) -> Callable[..., torch.Tensor]:
    """Recomputes ``entry`` (one example's copy) for all examples, transposed to dim 1."""
    def recompute(*root_values):
        one = entry.recompute(*root_values)
        return one.repeat(batch, *[1] * (one.dim() - 1)).transpose(0, 1)
    return recompute


def _rows_per_example(cap, func, leaves, used, out, recompute, roots
                      ) -> Tuple[Optional[int], bool]:
    """(rows per example, from_all): rows if ``out`` holds one copy of a derived value per
    example (a CLS token ``cls.expand(B, -1, -1)``, DeBERTa-v2's position keys
    ``repeat(B, 1, 1)``, or a value computed from such copies), else None (a value shared
    by the whole batch); from_all: one example's copy must be cut from the call on all of
    them."""
    B, name = cap.batch, getattr(func, "__name__", repr(func))
    if any(e.rows is not None for e in used):
        if B and out.dim() and out.shape[0] % B == 0:
            rows, values = out.shape[0] // B, [r.detach() for r in roots]
            # what every example sees: the call on one copy, or, where its sizes name the
            # batch (PEFT Cartridge's .view(B, ...)), one example's rows of it on all copies
            for from_all in (False, True):
                try:
                    one = (recompute(*values, _copies=B)[:rows] if from_all
                           else recompute(*values))
                except RuntimeError:
                    continue
                if one.shape == (rows,) + out.shape[1:] and torch.equal(
                        one.repeat(B, *[1] * (out.dim() - 1)), out):
                    return rows, from_all
        raise BatchLayoutError(
            f"vaultkern: {name} in {cap.site().describe()} mixes the copies of a parameter "
            f"repeated to the {B} examples across examples (e.g. a sum over dim 0); "
            "per-example gradients cannot be formed. Combine it with the data first.")
    if func not in _REPEATS or not B or out.dim() == 0:
        return None, False
    source = next(x for x in leaves if isinstance(x, torch.Tensor))
    before = source.shape[0] if source.dim() == out.dim() else 1  # a new leading dim
    if before and out.shape[0] != before and out.shape[0] % (before * B) == 0:
        return out.shape[0] // B, False
    return None, False


def identity(p):
    return p


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state() -> tuple:
    return tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                 for d in _AUTOCAST_DEVICES)


def under_forward_autocast(fn: Callable) -> Callable:
    """``fn`` run under the autocast state of now (the forward) wherever it is called. The
    backward replays calls (a derived value's recompute, a generic call's vjp) where
    autocast is off: a matmul autocast to bf16 in the forward would run in float32 and meet
    the saved bf16 inputs (torch's dtype error, Mamba and Llama 4 under torch.autocast)."""
    state = _autocast_state()

    def replay(*args, **kwargs):
        now = _autocast_state()
        if now == state:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device, (on, dtype), current in zip(_AUTOCAST_DEVICES, state, now):
                if current != (on, dtype):
                    stack.enter_context(torch.autocast(device, dtype=dtype, enabled=on))
            return fn(*args, **kwargs)
    return replay
