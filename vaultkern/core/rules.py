"""The registry of layer rules: how each module class is patched.

A rule replaces a module's forward with one whose backward
  * returns the input gradient as usual,
  * computes **no** weight gradient, and
  * hands the book-keeper one gradient form per trainable parameter
    (see :mod:`vaultkern.core.grad_forms`).
The book-keeper then takes per-example norms over all parameters, clips, and
writes Σ_i clip_i g_i into ``p.grad`` once (DESIGN.md §3).

Built-in rules: nn.Linear, GPT-2 Conv1D (transformers, optional), nn.Embedding,
nn.LayerNorm, nn.RMSNorm, multi-head attention (generic, whole module), and any
other module with trainable parameters through the generic torch.func path.
Modules that mix examples (batch norm) are refused.

Register a rule for your own class with :func:`register_rule`.
"""
from __future__ import annotations

import contextlib
import math
import sys
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from vaultkern.backend import acc_dtype
from vaultkern.core.grad_forms import Factored, Materialized
from vaultkern.core.generic import GenericRule
from vaultkern.core.rule_base import LayerRule, UnsupportedModuleError
from vaultkern.core.site import LayerSite


# --- helpers -----------------------------------------------------------------------------

def _autocast_inputs(x: torch.Tensor, *tensors):
    """Apply autocast's cast by hand (the autograd functions run with autocast off)."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
        return True, cast(x), tuple(cast(t) for t in tensors)
    return False, x, tensors


def _positions(t: torch.Tensor, trailing: int = 1) -> int:
    """Product of the dims between the batch dim and the last ``trailing`` dims."""
    return math.prod(t.shape[1:t.dim() - trailing])


def _as_btf(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, ..., f] -> [B, T, f] (T = product of the middle dims; 1 for 2-D inputs)."""
    return t.reshape(batch, _positions(t), t.shape[-1])


# --- Linear and GPT-2 Conv1D ---------------------------------------------------------------

class _LinearFn(torch.autograd.Function):
    """y = x Wᵀ + b (or x W + b for Conv1D); backward keeps (x, g) instead of dW."""

    @staticmethod
    def forward(ctx, x, weight, bias, site, transposed, mode, forward_id):
        if transposed:
            y = x.matmul(weight) if bias is None else torch.addmm(
                bias, x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[-1])
        else:
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.site, ctx.transposed, ctx.mode, ctx.forward_id = site, transposed, mode, forward_id
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        site = ctx.site
        gx = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(weight.t() if ctx.transposed else weight)
        module = site.module
        B = x.shape[0]
        a, g = _as_btf(x, B), _as_btf(gy, B)
        forms = {}
        if site.trainable(module.weight):
            left, right = (a, g) if ctx.transposed else (g, a)
            forms[module.weight] = Factored(left, right, mode=ctx.mode,
                                            input_side="left" if ctx.transposed else "right")
        if ctx.has_bias and site.trainable(module.bias):
            # summed straight into fp32 (fp64 for fp64): no separate cast of a bf16 sum later
            forms[module.bias] = Materialized(g.sum(1, dtype=acc_dtype(g)))
        site.record(forms, ctx.forward_id)
        return gx, None, None, None, None, None, None


class LinearRule(LayerRule):
    """nn.Linear: ghost or direct norm chosen per layer by cost (override with ``mode``)."""

    name = "linear"
    transposed = False

    def __init__(self, mode: Optional[str] = None):
        self.mode = mode

    def forward(self, site: LayerSite, x):
        module = site.module
        site.check_batch(x)
        cast, x, (w, b) = _autocast_inputs(x, module.weight, module.bias)
        with torch.autocast(x.device.type, enabled=False) if cast else contextlib.nullcontext():
            return _LinearFn.apply(x, w, b, site, self.transposed, self.mode, site.forward_id())


class Conv1DRule(LinearRule):
    """Hugging Face GPT-2 Conv1D: y = x W + b with W of shape (d_in, d_out)."""

    name = "conv1d"
    transposed = True


# --- Embedding ------------------------------------------------------------------------

class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, site, padding_idx, forward_id):
        ctx.save_for_backward(ids)
        ctx.site, ctx.padding_idx, ctx.forward_id = site, padding_idx, forward_id
        ctx.num_embeddings = weight.shape[0]
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, gy):
        (ids,) = ctx.saved_tensors
        B = ids.shape[0]
        rows = ids.reshape(B, _positions(ids, 0))
        if ctx.padding_idx is not None:  # the padding row receives no gradient
            rows = rows.masked_fill(rows == ctx.padding_idx, -1)
        site = ctx.site
        form = Factored(rows, _as_btf(gy, B), one_hot=True, rows=ctx.num_embeddings)
        site.record({site.module.weight: form}, ctx.forward_id)
        return None, None, None, None, None


class EmbeddingRule(LayerRule):
    name = "embedding"

    def check(self, module: nn.Embedding, path: str) -> None:
        bad = []
        if module.max_norm is not None:
            bad.append("max_norm (renormalises the table in place during forward)")
        if module.scale_grad_by_freq:
            bad.append("scale_grad_by_freq (scales by counts over the whole batch, mixing examples)")
        if module.sparse:
            bad.append("sparse=True gradients")
        if bad:
            raise UnsupportedModuleError(
                f"vaultkern: nn.Embedding '{path}' uses {', '.join(bad)}, which per-example "
                "clipping does not support")

    def forward(self, site: LayerSite, ids):
        site.check_batch(ids)
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"vaultkern: {site.describe()} expects integer ids, got {ids.dtype}")
        m = site.module
        # Honour nn.Embedding's negative padding_idx convention (already normalised by torch).
        return _EmbeddingFn.apply(ids.long(), m.weight, site, m.padding_idx, site.forward_id())


# --- Norm layers --------------------------------------------------------------------------

class _CaptureFn(torch.autograd.Function):
    """Identity on ``out`` whose backward hands (saved input, output grad) to a callback.

    The trainable parameters are inputs only so that ``out`` requires grad even
    when nothing upstream does; their gradient is returned as None (the
    book-keeper writes p.grad).
    """

    @staticmethod
    def forward(ctx, on_backward, forward_id, x, out, *params):
        ctx.save_for_backward(x)
        ctx.on_backward, ctx.forward_id, ctx.n_params = on_backward, forward_id, len(params)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ctx.on_backward(x, g, ctx.forward_id)
        return (None, None, None, g) + (None,) * ctx.n_params


def layer_norm_hat(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


def rms_norm_hat(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, module.normalized_shape, None, module.eps)


def layer_norm_forward(module: nn.LayerNorm, x, weight, bias):
    return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)


def rms_norm_forward(module: nn.Module, x, weight, bias):
    return F.rms_norm(x, module.normalized_shape, weight, module.eps)


class AffineNormRule(LayerRule):
    """Norm layers y = x̂ ∘ (c + weight) + bias, x̂ from ``normalize(module, x)``.

    The per-example gradients are small (the normalised shape): weight
    Σ_t x̂_t ∘ g_t, bias Σ_t g_t, formed exactly in fp32 (fp64 for fp64).
    Works for nn.LayerNorm, nn.RMSNorm and Gemma's (1 + weight) RMSNorm alike,
    since the offset c does not change ∂y/∂weight.
    """

    name = "norm"

    def __init__(self, normalize: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 normalized_shape: Callable[[nn.Module], Tuple[int, ...]] = None,
                 functional: Optional[Callable] = None):
        """normalize(module, x) -> x̂; functional(module, x, weight, bias) -> y (optional:
        the module's forward with the given parameters; without it the module's own
        forward runs on detached parameters through torch.func.functional_call)."""
        self.normalize = normalize
        self.normalized_shape = normalized_shape or (lambda m: tuple(m.weight.shape))
        self.functional = functional

    def forward(self, site: LayerSite, x, *args, **kwargs):
        site.check_batch(x)
        m = site.module
        params = {n: p for n, p in (("weight", getattr(m, "weight", None)), ("bias", getattr(m, "bias", None)))
                  if site.trainable(p)}
        detached = {n: p.detach() for n, p in params.items()}
        if self.functional is not None and not args and not kwargs:
            weight = detached.get("weight", getattr(m, "weight", None))
            out = self.functional(m, x, weight, detached.get("bias", getattr(m, "bias", None)))
        else:
            with site.bypass():
                out = torch.func.functional_call(m, detached, (x,) + args, kwargs)

        def on_backward(x_saved, g, forward_id):
            B = x_saved.shape[0]
            k = len(self.normalized_shape(m))
            acc = torch.float64 if g.dtype == torch.float64 else torch.float32
            gg = g.to(acc).reshape(B, _positions(g, k), *g.shape[g.dim() - k:])
            forms = {}
            if "weight" in params:
                xhat = self.normalize(m, x_saved.to(acc)).reshape(gg.shape)
                forms[params["weight"]] = Materialized((xhat * gg).sum(1))
            if "bias" in params:
                forms[params["bias"]] = Materialized(gg.sum(1))
            site.record(forms, forward_id)

        return _CaptureFn.apply(on_backward, site.forward_id(), x, out, *params.values())


# --- the registry -----------------------------------------------------------------------

_REGISTRY: List[Tuple[Type[nn.Module], LayerRule]] = []
UNSUPPORTED: Dict[Type[nn.Module], str] = {
    nn.modules.batchnorm._BatchNorm: "batch norm mixes examples within a batch (its statistics "
                                      "are batch statistics); use LayerNorm/GroupNorm instead",
}


def register_rule(module_class: Type[nn.Module], rule: LayerRule) -> None:
    """Patch instances of ``module_class`` (and subclasses) with ``rule``.

    Later registrations take precedence over earlier ones.
    """
    _REGISTRY.insert(0, (module_class, rule))


def rule_for(module: nn.Module, path: str) -> Optional[LayerRule]:
    """The registered rule for ``module``, None if it should use the generic path."""
    for cls, reason in UNSUPPORTED.items():
        if isinstance(module, cls):
            raise UnsupportedModuleError(
                f"vaultkern: module '{path or '<root>'}' ({type(module).__name__}) is not "
                f"supported: {reason}")
    _register_transformers_if_loaded()
    # Exact class match first, then the most recently registered base class.
    for cls, rule in _REGISTRY:
        if type(module) is cls:
            return rule
    for cls, rule in _REGISTRY:
        if isinstance(module, cls):
            return rule
    return None


def _register_builtins() -> None:
    register_rule(nn.Linear, LinearRule())
    register_rule(nn.Embedding, EmbeddingRule())
    register_rule(nn.LayerNorm, AffineNormRule(layer_norm_hat, functional=layer_norm_forward))
    if hasattr(nn, "RMSNorm"):
        register_rule(nn.RMSNorm, AffineNormRule(rms_norm_hat, functional=rms_norm_forward))
    # MultiheadAttention reads its out_proj weights directly: treat it as one unit.
    register_rule(nn.MultiheadAttention, GenericRule(covers_subtree=True))


_transformers_registered = False


def _register_transformers_if_loaded() -> None:
    """GPT-2's Conv1D, without importing (or requiring) transformers ourselves."""
    global _transformers_registered
    utils = sys.modules.get("transformers.pytorch_utils")
    if _transformers_registered or utils is None or not hasattr(utils, "Conv1D"):
        return
    _transformers_registered = True
    register_rule(utils.Conv1D, Conv1DRule())


_register_builtins()
