"""``vk.patch`` / ``vk.unpatch`` / ``vk.last_norms``: the one-call front door.

``patch`` walks the model, picks a rule for every module that owns trainable
parameters (:mod:`vaultkern.core.rules`), and replaces that module's forward on
the instance (the class is untouched). After a patched backward every
trainable ``p.grad`` holds Σ_i clip_i g_i.

Safety net: every trainable parameter also gets a hook that fires if autograd
ever accumulates an ordinary (unclipped) gradient into it — which can only
happen if the parameter is used outside its patched module's forward — and
raises instead of silently training on unclipped gradients.
"""
from __future__ import annotations

import functools
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from vaultkern.core.bookkeeping import BookKeeper
from vaultkern.core.generic import GenericRule
from vaultkern.core.rules import LayerRule, rule_for
from vaultkern.core.site import LayerSite

LOSS_REDUCTIONS = ("sum", "mean")


class UnclippedGradientError(RuntimeError):
    """A trainable parameter received a gradient that bypassed per-example clipping."""


class _PatchState:
    def __init__(self, bookkeeper: BookKeeper):
        self.bookkeeper = bookkeeper
        self.sites: List[LayerSite] = []
        self.handles: list = []
        self.had_instance_forward: Dict[int, object] = {}


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _subtree_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _plan(model: nn.Module, rule_overrides) -> List[tuple]:
    """[(path, module, rule)] for every module whose parameters need a rule."""
    plan, covered = [], set()
    for path, module in model.named_modules():
        if any(path.startswith(c + ".") if c else path != "" for c in covered):
            continue  # inside a module whose rule handles its whole subtree
        rule = rule_overrides.get(path) if rule_overrides else None
        rule = rule or rule_for(module, path)
        if rule is not None and rule.covers_subtree:
            if _subtree_trainable(module):
                rule.check(module, path)
                plan.append((path, module, rule))
            covered.add(path)
            continue
        if not _owns_trainable(module):
            continue
        if rule is None:
            child_params = [n for n, p in module.named_parameters() if p.requires_grad and "." in n]
            if child_params:
                warnings.warn(
                    f"vaultkern: module '{path or '<root>'}' ({type(module).__name__}) owns "
                    "trainable parameters and also has submodules with parameters; it is handled "
                    "as one unit by the generic torch.func path (exact, but it materialises "
                    "per-example gradients of the whole subtree). Move its own parameters into a "
                    "submodule (e.g. nn.Embedding for learned positions) to avoid this.",
                    RuntimeWarning, stacklevel=3)
                rule = GenericRule(covers_subtree=True)
                covered.add(path)
            else:
                rule = GenericRule()
        rule.check(module, path)
        plan.append((path, module, rule))
    return plan


def _make_forward(site: LayerSite, rule: LayerRule):
    @functools.wraps(site.original_forward)
    def forward(*args, **kwargs):
        if site.bypassing:
            return site.original_forward(*args, **kwargs)
        return rule.forward(site, *args, **kwargs)
    return forward


def _guard_hook(name: str):
    def hook(grad: Optional[torch.Tensor]) -> None:
        if grad is None:  # patched uses hand autograd no gradient for the parameter
            return
        raise UnclippedGradientError(
            f"vaultkern: parameter '{name}' received an ordinary (unclipped) gradient: it is used "
            "outside the forward of the module that owns it (e.g. a weight read directly by "
            "another module, or a bare nn.Parameter used in a parent's forward). Register a rule "
            "for that module (vaultkern.register_rule) or restructure it.")
    return hook


def patch(model: nn.Module, max_grad_norm: float = 1.0, loss_reduction: str = "sum", *,
          allow_multiple_forwards: bool = False, allow_empty_batch: bool = False,
          rules: Optional[Dict[str, LayerRule]] = None) -> nn.Module:
    """Patch ``model`` in place for per-example clipping; returns the model.

    max_grad_norm: C, the clipping bound on each example's gradient norm over all
        trainable parameters jointly (``float('inf')`` disables clipping but still
        computes ``last_norms``).
    loss_reduction: "sum" if the loss is a sum of per-example losses, "mean" if it
        was averaged over the batch (per-example gradients are then those of the
        per-example losses, the Opacus convention).
    allow_multiple_forwards: accept one backward over several forwards, treating
        row i of every forward as the same example.
    allow_empty_batch: accept 0-row batches (an empty Poisson batch): backward then adds
        nothing to ``p.grad`` and the optimizer step adds noise only. Off by default, so an
        accidentally empty batch is an error; the PrivacyEngine turns it on, as Opacus does.
    rules: per-module-path rule overrides, e.g. {"lm_head": LinearRule(mode="direct")}.
    """
    if getattr(model, "_vaultkern", None) is not None:
        raise RuntimeError("vaultkern: model is already patched; call vk.unpatch(model) first")
    if not (max_grad_norm > 0):
        raise ValueError(f"vaultkern: max_grad_norm must be > 0, got {max_grad_norm!r}")
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"vaultkern: loss_reduction must be one of {LOSS_REDUCTIONS}, "
                         f"got {loss_reduction!r}")
    plan = _plan(model, rules)
    bookkeeper = BookKeeper(max_grad_norm, loss_reduction, allow_multiple_forwards, allow_empty_batch)
    state = _PatchState(bookkeeper)
    for path, module, rule in plan:
        if "forward" in module.__dict__:
            state.had_instance_forward[id(module)] = module.__dict__["forward"]
        site = LayerSite(bookkeeper, path, module, rule, module.forward)
        module.forward = _make_forward(site, rule)
        state.sites.append(site)

    def on_forward(_module, _args):
        if bookkeeper._callback_queued or bookkeeper._uses:
            bookkeeper.reset()  # left over from a backward pass that failed part-way
        bookkeeper.forward_id += 1
    state.handles.append(model.register_forward_pre_hook(on_forward))
    for name, p in model.named_parameters():
        if p.requires_grad:
            state.handles.append(p.register_hook(_guard_hook(name)))
    model._vaultkern = state
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original forwards, no hooks. Returns the model."""
    state: Optional[_PatchState] = getattr(model, "_vaultkern", None)
    if state is None:
        raise RuntimeError("vaultkern: model is not patched")
    for site in state.sites:
        previous = state.had_instance_forward.get(id(site.module))
        if previous is not None:
            site.module.forward = previous
        else:
            del site.module.forward
    for h in state.handles:
        h.remove()
    del model._vaultkern
    return model


def _state(model: nn.Module) -> _PatchState:
    state = getattr(model, "_vaultkern", None)
    if state is None:
        raise RuntimeError("vaultkern: model is not patched (call vk.patch(model, ...) first)")
    return state


def last_norms(model: nn.Module) -> Optional[torch.Tensor]:
    """[B] per-example gradient norms (before clipping) of the model's last backward."""
    return _state(model).bookkeeper.last_norms


def bookkeeper(model: nn.Module) -> BookKeeper:
    return _state(model).bookkeeper


def patched_sites(model: nn.Module) -> List[LayerSite]:
    """The patched modules with their rules (for inspection and tests)."""
    return list(_state(model).sites)
