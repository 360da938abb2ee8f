"""The generic path: exact per-example gradients of any module through torch.func.

For a module without a dedicated rule, the forward runs with its parameters
detached (so autograd computes only input gradients), and the backward of a
capture node computes, for every example i, the vector-Jacobian product of
that module alone:

    G_i = ∂⟨f(θ, x_i), g_i⟩ / ∂θ        (vmap over i of a vjp of f(θ, ·))

which is exact and works for any per-example module, but materialises one
gradient per example for the module's parameters — fine for small modules
(norms with unusual parameterisations, gates, scalars), slow for big ones.
Modules must be deterministic (no dropout inside) and must not mix examples.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from vaultkern.core.grad_forms import Materialized
from vaultkern.core.site import LayerSite
from vaultkern.core.rule_base import LayerRule


def _trainable_params(module: nn.Module, covers_subtree: bool) -> Dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=covers_subtree) if p.requires_grad}


class _GenericCaptureFn(torch.autograd.Function):
    """Identity on the outputs; backward hands their grads to ``on_backward``."""

    @staticmethod
    def forward(ctx, on_backward, n_outputs, *tensors):
        ctx.on_backward, ctx.n_outputs = on_backward, n_outputs
        ctx.n_rest = len(tensors) - n_outputs
        outs = tensors[:n_outputs]
        return tuple(o.view_as(o) for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.on_backward(grads)
        return (None, None) + tuple(grads) + (None,) * ctx.n_rest


def _batched(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def per_example_grads(site: LayerSite, params: Dict[str, torch.Tensor], args: Tuple, kwargs: Dict,
                      out_grads: Tuple[torch.Tensor, ...], single_output: bool, batch: int
                      ) -> Dict[str, torch.Tensor]:
    """{name: [B, *shape]} per-example gradients of the module's parameters."""
    module = site.module
    arg_dims = tuple(0 if _batched(a, batch) else None for a in args)
    kw_keys = sorted(kwargs)
    kw_vals = tuple(kwargs[k] for k in kw_keys)
    kw_dims = tuple(0 if _batched(v, batch) else None for v in kw_vals)

    def one_example(p, args_i, kw_i, grads_i):
        def f(p):
            a = tuple(x.unsqueeze(0) if d == 0 else x for x, d in zip(args_i, arg_dims))
            k = {key: (v.unsqueeze(0) if d == 0 else v) for key, v, d in zip(kw_keys, kw_i, kw_dims)}
            with site.bypass():
                out = functional_call(module, p, a, k)
            return (out,) if single_output else tuple(o for o in out if isinstance(o, torch.Tensor))
        _, pullback = vjp(f, p)
        return pullback(tuple(g.unsqueeze(0) for g in grads_i))[0]

    return vmap(one_example, in_dims=(None, arg_dims, kw_dims, 0))(params, args, kw_vals, out_grads)


class GenericRule(LayerRule):
    """Any module with trainable parameters, exactly, via torch.func."""

    name = "generic"

    def __init__(self, covers_subtree: bool = False):
        self.covers_subtree = covers_subtree

    def forward(self, site: LayerSite, *args, **kwargs):
        module = site.module
        params = _trainable_params(module, self.covers_subtree)
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None:
            first = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        batch = site.check_batch(first)
        detached = {n: p.detach() for n, p in params.items()}
        with site.bypass():
            out = functional_call(module, detached, args, kwargs)
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else tuple(o for o in out if isinstance(o, torch.Tensor))
        saved_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        saved_kwargs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        forward_id = site.forward_id()
        out_meta = [(o.shape, o.dtype, o.device) for o in outs]

        def on_backward(grads):
            grads = tuple(torch.zeros(m[0], dtype=m[1], device=m[2]) if g is None else g for m, g in zip(out_meta, grads))
            per_ex = per_example_grads(site, detached, saved_args, saved_kwargs, grads, single, batch)
            site.record({params[n]: Materialized(per_ex[n]) for n in params}, forward_id)

        captured = _GenericCaptureFn.apply(on_backward, len(outs), *outs, *params.values())
        if single:
            return captured[0]
        it = iter(captured)
        rebuilt = [next(it) if isinstance(o, torch.Tensor) else o for o in out]
        return type(out)(rebuilt) if isinstance(out, (tuple, list)) else rebuilt
