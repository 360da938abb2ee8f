"""The hooks ``vk.patch`` attaches: to the model (a forward starts and ends; its outputs
start the backward pass that clips), to each module that reads trainable parameters (its
forward runs under the capture) and to each trainable parameter (an ordinary gradient
reaching it is refused). All are plain objects, so a patched model deep-copies and pickles.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional

import torch

from vaultkern.core import refusals
from vaultkern.core.distributed import attach_ddp
from vaultkern.core.errors import UnclippedGradientError
from vaultkern.core.site import Site

if TYPE_CHECKING:
    from vaultkern.core.patch import _PatchState


def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class UnclippedGradientGuard:
    """On every trainable parameter of a patched model: refuses an ordinary gradient, and
    says which patch (``owner``) clips the parameter's gradients."""

    def __init__(self, name: str, owner):
        self.name, self.owner = name, owner

    def __call__(self, grad):
        if grad is None:
            return
        raise UnclippedGradientError(
            f"vaultkern: parameter '{self.name}' received an ordinary (unclipped) gradient: it "
            "was read outside the forward of the patched model (e.g. by code that calls a "
            "submodule's weight after the model returned, or by a module vaultkern never saw), "
            "or inside a custom torch.autograd.Function, whose own backward vaultkern cannot "
            "split per example (e.g. PEFT's LoHa). Compute everything that uses trainable "
            "parameters inside the patched model's forward, with torch operations.")


def clipped_by(p: torch.Tensor):
    """The patch whose clipped sums ``p``'s gradients are, or None (no patched model owns it)."""
    return next((h.owner for h in (p._backward_hooks or {}).values()
                 if isinstance(h, UnclippedGradientGuard)), None)


def foreign_gradient_hook(p: torch.Tensor) -> Optional[str]:
    """How ``p`` carries a gradient hook that is not vaultkern's, or None."""
    if any(not isinstance(h, UnclippedGradientGuard) for h in (p._backward_hooks or {}).values()):
        return "register_hook"
    if getattr(p, "_post_accumulate_grad_hooks", None):
        return "register_post_accumulate_grad_hook"
    return None


class EnterCapture:
    """Forward pre-hook of a module that reads trainable parameters."""

    def __init__(self, state: _PatchState, site: Site):
        self.state, self.site = state, site

    def __call__(self, module, args, kwargs):
        if not self.state.probing:
            self.state.enter(self.site, args, kwargs)
            self.state.capture.check_owned(module, self.site)
            checkpointing = getattr(module, "_gradient_checkpointing_func", None)
            if checkpointing is not None and not isinstance(checkpointing, RecomputeUnderCapture):
                module._gradient_checkpointing_func = RecomputeUnderCapture(
                    checkpointing, self.state, self.site)
            if self.state.forward_grad and not torch.is_grad_enabled():
                # a part of a training forward without gradients (reentrant checkpointing):
                # its uses are made only when it is recomputed inside the backward pass, so
                # no parameter can be clipped before the end of that backward
                self.state.bookkeeper.wait_for_all = True


class RecomputeUnderCapture:
    """A Hugging Face layer's checkpointing function (transformers checkpoints the layer's
    ``forward``, not its call, so its hooks do not run again when the backward pass
    recomputes it): the recomputation runs under this site's capture, as the forward did,
    so the parameters the layer reads itself (Gemma 3n's AltUp coefficients) are captured
    both times. ``vk.unpatch`` puts the function back."""

    def __init__(self, checkpointing, state: _PatchState, site: Site):
        self.checkpointing, self.state, self.site = checkpointing, state, site

    def __call__(self, function, *args, **kwargs):
        return self.checkpointing(_Recomputed(function, self.state, self.site), *args, **kwargs)


class _Recomputed:
    def __init__(self, function, state: _PatchState, site: Site):
        self.function, self.state, self.site = function, state, site

    def __call__(self, *args, **kwargs):
        if not in_backward():  # the forward itself: its pre-hook already entered the site
            return self.function(*args, **kwargs)
        self.state.enter(self.site, args, kwargs)
        try:
            return self.function(*args, **kwargs)
        finally:
            self.state.exit()


class ExitCapture:
    def __init__(self, state: _PatchState):
        self.state = state

    def __call__(self, module, args, kwargs, output):
        if not self.state.probing:
            self.state.hold_open_for(output)
            self.state.exit()


class ModelStart:
    """Forward pre-hook of the patched model: a new forward (or a recomputation)."""

    def __init__(self, state: _PatchState):
        self.state = state

    def __call__(self, module, args, kwargs):
        st = self.state
        if st.probing:
            return
        if not in_backward():
            if torch.is_grad_enabled():
                refusals.check_model_loss(module, kwargs)
            attach_ddp(st)
            if torch.is_grad_enabled():
                st.follow_trainable()
            st.start_forward(args, kwargs)
            if not st.layout_checked and torch.is_grad_enabled():
                from vaultkern.core.probe import check_layout
                check_layout(st, module, args, kwargs)
        st.model_active = True
        if st.root_reads:
            st.enter(st.root_site, args, kwargs)
            st.capture.check_owned(module, st.root_site)


class ModelEnd:
    """Forward hook of the patched model: outputs start the backward that clips."""

    def __init__(self, state: _PatchState):
        self.state = state

    def __call__(self, module, args, kwargs, output):
        st = self.state
        if st.probing:
            return None
        if st.root_reads:
            st.exit()
        st.release()
        st.model_active = False
        capture = st.runtime()[0]
        if not capture.site_stack:
            capture.forget_derived()
        if st.generic_pending:
            warnings.warn(
                "vaultkern: these modules consume trainable parameters through calls without a "
                "dedicated rule; their per-example gradients come from torch.func (exact, but "
                "slower, and they are materialised): " + "; ".join(st.generic_pending),
                RuntimeWarning, stacklevel=2)
            st.generic_pending = []
        if torch.is_grad_enabled():
            return _mark_outputs(output, st.bookkeeper)
        return None


class _BackwardStart(torch.autograd.Function):
    """Identity on a model output; the first node the outermost backward runs."""

    @staticmethod
    def forward(ctx, bookkeeper, x):
        ctx.bookkeeper = bookkeeper
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.bookkeeper.queue()
        return None, g


def _mark_outputs(output, bookkeeper):
    if isinstance(output, torch.Tensor):
        return _BackwardStart.apply(bookkeeper, output) if output.requires_grad else output
    if isinstance(output, (tuple, list)) and type(output) in (tuple, list):
        return type(output)(_mark_outputs(o, bookkeeper) for o in output)
    if isinstance(output, dict):  # includes transformers' ModelOutput
        for k in list(output.keys()):
            v = output[k]
            if isinstance(v, torch.Tensor) and v.requires_grad:
                output[k] = _BackwardStart.apply(bookkeeper, v)
        return output
    return None
