"""The torch calls that consume a trainable parameter, and what each hands the book-keeper.

Every handler computes the call's output exactly as the call itself would (the same
function on the same values, the parameter detached, so autograd forms only the
input gradient) and wraps it in an identity node whose backward records the
parameter's gradient *form* (:mod:`vaultkern.core.grad_forms`):

* ``F.linear``, ``matmul``/``mm`` with a weight on the right, ``addmm`` (GPT-2's
  Conv1D): factored forms (output grads, inputs) — ghost or direct norms;
* ``F.embedding``, ``F.embedding_bag``: token ids and the gradients of the rows they look
  up (one-hot factored form; :mod:`vaultkern.core.embedding_rules`);
* ``F.layer_norm``, ``F.rms_norm``: per-example gradients Σ_t x̂_t ∘ g_t, Σ_t g_t;
* ``*``, ``+``, ``-`` between data and a parameter (or a value derived from one:
  Llama's ``weight * h``, Gemma's ``h * (1.0 + weight.float())``): per-example
  sums of data ∘ g over each example's positions;
* anything else (``generic_consumption``): per-example vector-Jacobian products
  of that one call through ``torch.func`` (exact, slower; announced once).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from vaultkern.backend import acc_dtype
from vaultkern.core.derived import carries_gradient, under_forward_autocast
from vaultkern.core.errors import BatchLayoutError
from vaultkern.core.grad_forms import Factored, Materialized


class _Capture(torch.autograd.Function):
    """Identity on ``outs``; backward hands (saved, output grads) to ``on_backward``.

    The parameters are inputs only so that the outputs require grad even when no
    data input does (the first layer); they get no gradient from here.
    """

    @staticmethod
    def forward(ctx, on_backward, n_outs, n_saved, *tensors):
        outs, rest = tensors[:n_outs], tensors[n_outs:]
        ctx.save_for_backward(*rest[:n_saved])
        ctx.on_backward, ctx.n_rest = on_backward, len(rest)
        # An output returned as a view of its input (or declared modified in place) could
        # not be modified in place later, nor could a view of it (`h += residual` after a
        # Linear: Falcon, CTRL; Funnel's `attn[..., :n] *= mask` after an einsum, whose
        # result is a view of a temporary). A detached alias is a new output with this node
        # as its history, at no copy; it shares the input's version counter, so autograd
        # still sees an in-place change of either. Views of an input of this node (whose
        # base would not see their changes), leaves that require grad and repeats stay views.
        bases = {id(r._base if r._is_view() else r) for r in rest}
        fresh = [not (o._is_view() and id(o._base) in bases) and id(o) not in bases
                 and not (o.is_leaf and o.requires_grad) and all(o is not p for p in outs[:i])
                 for i, o in enumerate(outs)]
        return tuple(o.detach() if f else o.view_as(o) for o, f in zip(outs, fresh))

    @staticmethod
    def backward(ctx, *grads):
        ctx.on_backward(ctx.saved_tensors, grads)
        return (None, None, None) + grads + (None,) * ctx.n_rest


def _captured(cap, out: torch.Tensor, saved: List[torch.Tensor], roots, make_forms):
    """``out`` behind a capture node; in backward ``make_forms(saved, g)`` -> {param: form}."""
    site, forward_id = cap.site(), cap.state.forward_id
    site.kinds.add(make_forms.__name__.lstrip("_"))
    bookkeeper = cap.state.bookkeeper

    def on_backward(saved_tensors, grads):
        if grads[0] is not None:
            bookkeeper.add(site, make_forms(saved_tensors, grads[0]), forward_id)

    bookkeeper.expect(roots)
    return _Capture.apply(on_backward, 1, len(saved), out, *saved, *roots)[0]


def by_example(t: torch.Tensor, batch: int, trailing: int = 1) -> torch.Tensor:
    """[k·B, ..., f] -> [B, positions, f] (``trailing`` feature dims kept)."""
    feat = t.shape[t.dim() - trailing:]
    positions = (t.shape[0] // batch if batch else 1) * math.prod(t.shape[1:t.dim() - trailing])
    return t.reshape(batch, positions, *feat)


@functools.lru_cache(maxsize=None)
def _signature(func):
    return inspect.signature(func)


def _bind(func, args, kwargs) -> Dict[str, object]:
    bound = _signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _sub(cap, value):
    """The value a call sees: a tracked tensor's own (detached) value, data unchanged."""
    e = cap.lookup(value)
    return e.value.detach() if e is not None else value


# --- linear layers ---------------------------------------------------------------------------

def _linear_like(cap, func, args, kwargs, x, w, b, weight_on_right: bool):
    """y = x Wᵀ (+ b) (F.linear) or y = x W (+ b) (matmul, mm, addmm)."""
    ew = cap.lookup(w)
    eb = cap.lookup(b) if b is not None else None
    if (cap.lookup(x) is not None or ew is None or ew.alias is None or w.dim() != 2
            or x.dim() < 2 or (eb is not None and (eb.alias is None or eb.alias[1]))):
        return NotImplemented
    xb = cap.rows_for_batch(x, "the input of a linear layer")
    out = func(*[xb if a is x else _sub(cap, a) for a in args],
               **{k: xb if v is x else _sub(cap, v) for k, v in kwargs.items()})
    root, transposed = ew.alias
    standard = transposed == weight_on_right  # the root is [out, in]: G = Σ_t g_tᵀ a_t
    bias_root = eb.alias[0] if eb is not None else None
    B, mode, bookkeeper, site = cap.batch, cap.state.linear_mode, cap.state.bookkeeper, cap.site()

    def linear(saved, g):
        a = by_example(saved[0], B)
        g = by_example(g, B)
        if a.dtype != g.dtype:  # autocast cast the input for the matmul
            a = a.to(g.dtype)
        left, right = (g, a) if standard else (a, g)
        if mode != "ghost" and bookkeeper.reserve_per_example(B * root.numel() * _acc_size(g)):
            # MixOpt: the per-example gradients cost one batched GEMM (the weight gradient's
            # flops) and replace both the norm and the clipped-sum GEMM at the end
            forms = {root: Materialized(_per_example_outer(left, right))}
            site.kinds.add("linear:per-example")
        else:
            forms = {root: Factored(left, right, mode=mode, input_side="right" if standard else "left")}
        if bias_root is not None:
            forms[bias_root] = Materialized(g.sum(1, dtype=acc_dtype(g)))
        return forms

    roots = [r for r in (root, bias_root) if r is not None]
    return _captured(cap, out, [xb], roots, linear)


def _acc_size(t: torch.Tensor) -> int:
    return 8 if t.dtype == torch.float64 else 4


def _per_example_outer(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """[B, rows, cols]: Σ_t left_tᵀ right_t per example, accumulated in fp32 (fp64 for fp64)."""
    acc = acc_dtype(left)
    return torch.bmm(left.transpose(1, 2).to(acc), right.to(acc))


def _f_linear(cap, func, args, kwargs):
    a = dict(zip(("input", "weight", "bias"), args), **kwargs)  # a builtin: no signature
    return _linear_like(cap, func, args, kwargs, a["input"], a["weight"], a.get("bias"), False)


def _matmul(cap, func, args, kwargs):
    if len(args) != 2 or kwargs:
        return NotImplemented
    return _linear_like(cap, func, args, kwargs, args[0], args[1], None, True)


def _addmm(cap, func, args, kwargs):
    if len(args) != 3 or any(kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or set(kwargs) - {"beta", "alpha"}:
        return NotImplemented
    bias, x, w = args
    return _linear_like(cap, func, args, kwargs, x, w, bias, True)


# --- norms -----------------------------------------------------------------------------------

def _norm(cap, func, args, kwargs):
    a = _bind(func, args, kwargs)
    x, shape = a["input"], tuple(a["normalized_shape"])
    entries = {k: cap.lookup(a.get(k)) for k in ("weight", "bias")}
    if cap.lookup(x) is not None or any(e is not None and (e.alias is None or e.alias[1])
                                        for e in entries.values()):
        return NotImplemented
    xb = cap.rows_for_batch(x, "the input of a norm layer")
    a["input"] = xb
    for k, e in entries.items():
        if e is not None:
            a[k] = e.value.detach()
    out = func(**a)
    eps = a["eps"] if a["eps"] is not None else torch.finfo(x.dtype).eps  # rms_norm's default
    is_layer = func is F.layer_norm
    roots = {k: e.alias[0] for k, e in entries.items() if e is not None}
    B = cap.batch

    def norm(saved, g):
        acc = acc_dtype(g)
        gg = by_example(g.to(acc), B, len(shape))
        forms = {}
        if "weight" in roots:
            xs = saved[0].to(acc)
            xhat = F.layer_norm(xs, shape, None, None, eps) if is_layer else F.rms_norm(xs, shape, None, eps)
            forms[roots["weight"]] = Materialized((xhat.reshape(gg.shape) * gg).sum(1))
        if "bias" in roots:
            forms[roots["bias"]] = Materialized(gg.sum(1))
        return forms

    return _captured(cap, out, [xb], list(roots.values()), norm)


# --- elementwise with a parameter (scales, shifts, norm weights written out) -----------------

_FIRST_MINUS_SECOND = {torch.sub, torch.Tensor.sub, torch.Tensor.__sub__}
_SECOND_MINUS_FIRST = {torch.Tensor.__rsub__}
_PRODUCTS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}


def _elementwise(cap, func, args, kwargs):
    if len(args) != 2 or kwargs:
        return NotImplemented
    e0, e1 = cap.lookup(args[0]), cap.lookup(args[1])
    if (e0 is None) == (e1 is None) or (e0 or e1).rows is not None:
        return NotImplemented  # a copy per example: the generic path
    p_pos = 0 if e0 is not None else 1
    entry, data = (e0, args[1]) if p_pos == 0 else (e1, args[0])
    if not isinstance(data, torch.Tensor) or data.dim() < entry.value.dim():
        return NotImplemented
    db = cap.rows_for_batch(data, "a tensor multiplied with or added to a parameter")
    value = entry.value.detach()
    out = func(*((value, db) if p_pos == 0 else (db, value)))
    if out.shape[0] != db.shape[0] or out.dim() != db.dim():
        return NotImplemented
    sign = -1.0 if (func in _FIRST_MINUS_SECOND and p_pos == 1) or (
        func in _SECOND_MINUS_FIRST and p_pos == 0) else 1.0
    product = func in _PRODUCTS
    B, shape = cap.batch, tuple(entry.value.shape)

    def elementwise(saved, g):
        acc = acc_dtype(g)
        per_row = g.to(acc) * saved[0].to(acc) if product else g.to(acc) * sign
        return pull_back(entry, _sum_to_shape(per_row, B, shape))

    # a sum needs no activation (and saves none: checkpointing recomputes what it saved)
    return _captured(cap, out, [db] if product else [], list(entry.roots), elementwise)


def _sum_to_shape(t: torch.Tensor, B: int, shape: Tuple[int, ...]) -> torch.Tensor:
    """[k·B, *o] -> [B, *shape]: each example's sum over its rows and over the dims a
    parameter-derived operand of ``shape`` was broadcast along."""
    if B == 0:
        return t.new_zeros((0,) + shape)
    t = t.reshape(B, t.shape[0] // B, *t.shape[1:]).sum(1)
    inner = shape[1:] if len(shape) == t.dim() else shape  # a leading 1 met the rows
    lead = t.dim() - 1 - len(inner)
    if lead:
        t = t.sum(tuple(range(1, 1 + lead)))
    dims = [i + 1 for i, (s, n) in enumerate(zip(inner, t.shape[1:])) if s == 1 and n != 1]
    if dims:
        t = t.sum(dims, keepdim=True)
    return t.reshape((B,) + shape)


def pull_back(entry, per_example: torch.Tensor) -> Dict[torch.Tensor, Materialized]:
    """Per-example gradients of a derived value -> of its parameters (its vjp, per example)."""
    if entry.alias is not None and not entry.alias[1]:
        return {entry.alias[0]: Materialized(per_example)}
    roots = [r.detach() for r in entry.roots]

    def one(g_i):
        _, back = vjp(entry.recompute, *roots)
        return back(g_i.to(entry.value.dtype))

    grads = vmap(one)(per_example)
    return {r: Materialized(g) for r, g in zip(entry.roots, grads)}


# --- anything else ---------------------------------------------------------------------------


def generic_consumption(cap, func, leaves, entries, spec, batched: Optional[List[bool]] = None):
    """Per-example gradients of one call through torch.func: vmap over the examples of
    the vjp of that call alone. Exact for any call that keeps examples apart."""
    site, B = cap.site(), cap.batch
    name = getattr(func, "__name__", repr(func))
    kind = f"generic({name})"
    if kind not in site.kinds:
        site.kinds.add(kind)
        cap.state.note_generic(f"{site.describe()} via {name}")
    if batched is None:
        batched = [e is None and cap.is_batched(x) for x, e in zip(leaves, entries)]
    values = list(leaves)
    data_slots = []
    for i, (x, e, is_data) in enumerate(zip(leaves, entries, batched)):
        if e is not None:
            values[i] = e.value.detach()
        elif is_data:
            values[i] = cap.rows_for_batch(x, f"an input of {name}")
            data_slots.append(i)
    a, k = tree_unflatten(values, spec)
    out = func(*a, **k)
    out_leaves, out_spec = tree_flatten(out)
    grad_slots = [i for i, o in enumerate(out_leaves)
                  if isinstance(o, torch.Tensor) and carries_gradient(o)]
    for i in grad_slots:
        if B and (out_leaves[i].dim() == 0 or out_leaves[i].shape[0] % B):
            raise BatchLayoutError(
                f"vaultkern: {name} in {site.describe()} returns {tuple(out_leaves[i].shape)}, "
                f"whose dim 0 does not hold the {B} examples; per-example gradients of the "
                "parameters it reads cannot be formed.")
    roots = list({id(r): r for e in entries if e is not None for r in e.roots}.values())
    root_pos = {id(r): j for j, r in enumerate(roots)}
    replayed = under_forward_autocast(func)  # the backward replays it as the forward ran it

    def per_example_call(root_values, data_i):
        vals = list(leaves)
        for i, e in enumerate(entries):
            if e is not None:
                vals[i] = e.recompute(*[root_values[root_pos[id(r)]] for r in e.roots])
        for i, d in zip(data_slots, data_i):
            vals[i] = d
        a_i, k_i = tree_unflatten(vals, spec)
        o_leaves, _ = tree_flatten(replayed(*a_i, **k_i))
        return tuple(o_leaves[i] for i in grad_slots)

    def make_forms(saved, grads):
        data = [by_example(d, B, d.dim() - 1) for d in saved]
        gs = [by_example(g if g is not None else torch.zeros_like(out_leaves[i]), B,
                         out_leaves[i].dim() - 1) for g, i in zip(grads, grad_slots)]

        def one(data_i, g_i):
            _, back = vjp(lambda *r: per_example_call(r, data_i), *[r.detach() for r in roots])
            return back(tuple(g_i))

        per_ex = vmap(one)(tuple(data), tuple(gs))
        return {r: Materialized(g) for r, g in zip(roots, per_ex)}

    bookkeeper, forward_id = cap.state.bookkeeper, cap.state.forward_id

    def on_backward(saved_tensors, out_grads):
        if any(g is not None for g in out_grads):
            bookkeeper.add(site, make_forms(saved_tensors, out_grads), forward_id)

    outs = [out_leaves[i] for i in grad_slots]
    saved = [values[i] for i in data_slots]
    bookkeeper.expect(roots)
    captured = _Capture.apply(on_backward, len(outs), len(saved), *outs, *saved, *roots)
    for i, c in zip(grad_slots, captured):
        out_leaves[i] = c
    return tree_unflatten(out_leaves, out_spec)


def _instance_norm(cap, func, args, kwargs):
    """F.instance_norm in training with running statistics: the call updates them once; the
    per-example recomputations leave them alone (they do not change its output, which uses
    each input's own statistics, and torch.func refuses in-place updates of shared buffers)."""
    a = _bind(func, args, kwargs)
    if not a["use_input_stats"] or (a["running_mean"] is None and a["running_var"] is None):
        return NotImplemented
    with torch.no_grad():
        func(**{k: _sub(cap, v) for k, v in a.items()})
    a["running_mean"] = a["running_var"] = None
    leaves, spec = tree_flatten(((), a))
    return generic_consumption(cap, func, leaves, [cap.lookup(x) for x in leaves], spec)


from vaultkern.core import attention_rules, embedding_rules, head_matmul_rules  # noqa: E402

HANDLERS = {
    F.linear: _f_linear,
    torch.matmul: _matmul, torch.Tensor.matmul: _matmul, torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul, torch.Tensor.mm: _matmul,
    torch.addmm: _addmm,
    F.embedding: embedding_rules.embedding, F.embedding_bag: embedding_rules.embedding_bag,
    F.layer_norm: _norm, F.rms_norm: _norm,
    F.multi_head_attention_forward: attention_rules.multi_head_attention,
    F.scaled_dot_product_attention: attention_rules.scaled_dot_product_attention,
    F.instance_norm: _instance_norm,
}
for _f in head_matmul_rules.FUNCS:
    HANDLERS[_f] = head_matmul_rules.head_matmul
OWN_BATCH_DIMS = {F.multi_head_attention_forward, *head_matmul_rules.FUNCS}
# how the layout check sees the inputs of a call whose examples are not in dim 0
EXAMPLE_MAJOR_INPUTS = {F.multi_head_attention_forward: attention_rules.example_major_inputs,
                        **{f: head_matmul_rules.example_major_inputs
                           for f in head_matmul_rules.FUNCS}}
# ids without a batch dim (positions) are one row for all; bags are checked by their rule
SHARED_INPUTS = {F.embedding, F.embedding_bag}
for _f in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.add,
           torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.sub, torch.Tensor.sub,
           torch.Tensor.__sub__, torch.Tensor.__rsub__):
    HANDLERS[_f] = _elementwise
