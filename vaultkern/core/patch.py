"""``vk.patch`` / ``vk.unpatch`` / ``vk.last_norms``: the one-call front door.

``patch`` changes no forward. It adds hooks: every module that owns trainable
parameters runs its own forward under the capture mode
(:mod:`vaultkern.core.capture`), which routes each call that consumes a
trainable parameter through a handler that records what per-example clipping
needs; the model's own hooks note the batch size, start a forward, check the
batch layout once (:mod:`vaultkern.core.probe`) and mark the outputs so that
clipping runs at the end of the outermost backward pass. After a patched
backward every trainable ``p.grad`` holds Σ_i clip_i g_i.

Everything ``patch`` attaches is a plain object (no closures), so a patched
model deep-copies into an independent patched model and pickles with
``torch.save``; the runtime tables are rebuilt on the copy's first forward.

Safety net: every trainable parameter also has a hook that raises if autograd
ever accumulates an ordinary (unclipped) gradient into it.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from vaultkern.core.bookkeeping import NONFINITE_POLICIES, BookKeeper
from vaultkern.core.clipping import POLICIES, thresholds_for
from vaultkern.core.capture import Capture, CaptureMode
from vaultkern.core import refusals, sharded
from vaultkern.core.errors import UnsupportedModuleError
from vaultkern.core.forward_hooks import (EnterCapture, ExitCapture, ModelEnd, ModelStart,
                                         RecomputeUnderCapture, UnclippedGradientGuard,
                                         clipped_by, foreign_gradient_hook, in_backward)
from vaultkern.core.queries import state_of
from vaultkern.core.site import Site

LOSS_REDUCTIONS = ("sum", "mean")
# MixOpt is opt-in: on the CPU bench it helped the Gemma-style decoder (1.36 -> 1.26x) and
# hurt the GPT-2-style one (1.31 -> 1.57x); not yet measured on a GPU
DEFAULT_PER_EXAMPLE_MEMORY = 0
LINEAR_MODES = (None, "ghost", "direct")
_BATCH_KWARGS = ("input_ids", "inputs_embeds", "input", "x", "hidden_states", "ids")


class _PatchState:
    """Everything a patched model carries (picklable; runtime tables rebuilt lazily)."""

    def __init__(self, model: nn.Module, bookkeeper: BookKeeper, linear_mode: Optional[str]):
        self.model = model
        self.bookkeeper = bookkeeper
        self.linear_mode = linear_mode
        self.sites: Dict[str, Site] = {}
        self.root_site = Site("", type(model).__name__, set())
        self.forward_id = 0
        self.batch = 0
        self.layout_checked = False
        self.ungrown: set = set()   # inputs that do not grow with the batch (probe.py)
        self.shared_tables: set = set()  # those of them with the same rows at every batch
        self.model_active = False   # inside the patched model's own forward
        # a derived value left the module that made it (T5 returns its position bias from
        # the relative-bias embedding): the capture stays on until the model's forward ends,
        # so that wherever the value meets the data it is captured
        self.held_open = False
        self.root_reads = False     # the model's own forward reads trainable parameters
        self.probing = False        # the layout check's forwards are running
        self.forward_grad = False   # the outermost forward running now records gradients
        self.generic_pending: List[str] = []
        self.bucket_sync = None     # set when the model runs inside DistributedDataParallel
        self.trainable: list = []   # [(name, parameter)] the readers were attached for
        self.is_sharded = False     # FSDP2 (known once the runtime is built)
        self.held: list = []  # the trainable parameters as an optimizer holds them
        self._runtime = None  # (capture, mode), built on first use

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_runtime"] = None
        return state

    # -- runtime --------------------------------------------------------------------------
    def runtime(self):
        if self._runtime is None:
            capture = Capture(self)
            params = trainable_parameters(self.model)
            if sharded.is_sharded(self.model):  # FSDP2: the layers read unsharded parameters
                sharded.check_supported(self.model)
                unsharded = sharded.unsharded_parameters(self.model)
                params = [(n, unsharded[id(p)]) for n, p in params]
                capture.stand_ins = sharded.held_parameters(self.model)
                self.is_sharded = True
                self.bookkeeper.sync = sharded.ShardSync(self.model)
                # every captured layer's output is a view (an identity node in front of it),
                # so FSDP would warn on each sharded module's output: a view is only unsafe
                # under an in-place op, which the README asks FSDP users not to do
                warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) "
                                        r"returned a view tensor", category=UserWarning)
            capture.track_parameters(params, self.model.buffers())
            if self.bookkeeper.clipping == "per_layer":
                self.bookkeeper.thresholds = thresholds_for(
                    [p for _, p in params], self.bookkeeper.max_grad_norm)
            # the parameters the optimizer holds carry it too (FSDP2's sharded ones): it
            # is how DPOptimizer knows their gradients are clipped sums
            held = trainable_parameters(self.model)
            if self.is_sharded:
                sharded_of = sharded.sharded_parameters(self.model)
                held = [(n, sharded_of[id(p)]) for n, p in held]
            # (without FSDP2 the held parameters are the ones the layers read)
            for name, p in params + (held if self.is_sharded else []):
                owner = clipped_by(p)
                if owner is None:
                    p.register_hook(UnclippedGradientGuard(name, self))
                elif owner is not self:
                    raise UnsupportedModuleError(
                        f"vaultkern: parameter '{name}' is trainable in two patched models: "
                        "each clips its own part of an example's gradient to C, so together "
                        "they let one example move the sum by more than C while the noise is "
                        "calibrated to C. Patch the one module that holds both, once.")
            self.held = held  # [(name, parameter)] as the optimizer holds them
            self._runtime = (capture, CaptureMode(capture))
        return self._runtime

    @property
    def capture(self) -> Capture:
        return self.runtime()[0]

    def enter(self, site: Site, args, kwargs) -> None:
        capture, mode = self.runtime()
        if not capture.site_stack and not self.held_open:
            if in_backward():       # a forward recomputed by checkpointing: clip at the end
                self.bookkeeper.queue()  # of the backward that recomputes it
            elif not self.model_active:  # a submodule called on its own
                if torch.is_grad_enabled():
                    self.follow_trainable(refit=False)
                self.start_forward(args, kwargs)
            mode.__enter__()
        capture.site_stack.append(site)

    def exit(self) -> None:
        capture, mode = self.runtime()
        if capture.site_stack:
            capture.site_stack.pop()
            if not capture.site_stack and not self.held_open:
                mode.__exit__(None, None, None)
                if not self.model_active:
                    capture.forget_derived()

    def hold_open_for(self, output) -> None:
        """Keep the capture on for the rest of the model's forward if ``output`` (a site's,
        looked at one level deep) holds a derived value."""
        capture = self.runtime()[0]
        if self.held_open or not self.model_active or len(capture.site_stack) != 1 or (
                len(capture.tracked) == len(capture.params)):
            return
        values = output.values() if isinstance(output, dict) else (
            output if isinstance(output, (tuple, list)) else (output,))
        if any(capture.lookup(v) is not None and id(v) not in capture.params for v in values):
            self.held_open = True

    def release(self) -> None:
        """The model's forward ended: a capture held open closes."""
        if self.held_open:
            self.held_open = False
            capture, mode = self.runtime()
            if not capture.site_stack:
                mode.__exit__(None, None, None)

    def note_generic(self, what: str) -> None:
        self.generic_pending.append(what)

    def follow_trainable(self, refit: bool = True) -> None:
        """Re-attach the readers if the model's trainable parameters changed since the last
        forward: a parameter frozen or unfrozen, a module added or replaced, parameters
        re-assigned (``load_state_dict(assign=True)``, re-tying, PEFT's ``set_adapter``).
        Without this a newly trainable parameter would get an ordinary gradient and a newly
        frozen one a clipped gradient that the optimizer, which noises trainable parameters
        only, applies without noise. Tensors that are not ``nn.Parameter`` swapped in for
        one call (``torch.func.functional_call``) are left to ``Capture.check_owned``, which
        refuses them. ``refit=False`` (a submodule called on its own, whose hooks are
        already running) refuses a change instead."""
        now = trainable_parameters(self.model)
        for name, p in now:
            if (kind := foreign_gradient_hook(p)) is not None:
                raise UnsupportedModuleError(
                    f"vaultkern: parameter '{name}' has a gradient hook ({kind}), which vaultkern "
                    "cannot honour: each parameter gets its clipped per-example sum once, after "
                    "the backward, so the hook would see no per-example gradient (a mask or "
                    "projection meant before clipping would be lost: rows meant to stay frozen "
                    "would train) and an optimizer step inside the backward would take no or "
                    "unnoised gradients. Express it in the forward (multiply the weight by a mask, "
                    "or split the parameter into a frozen and a trainable part) or remove it.")
        if [n for n, _ in now] == [n for n, _ in self.trainable] and (
                # FSDP2 swaps its sharded and unsharded tensors in around every forward
                self.is_sharded or all(p is q for (_, p), (_, q) in zip(now, self.trainable))):
            return
        if not all(isinstance(p, nn.Parameter) for _, p in now):
            return
        if not refit:
            raise UnsupportedModuleError(
                "vaultkern: the model's trainable parameters changed since its last forward "
                f"({len(self.trainable)} trainable tensors before, {len(now)} now) and a "
                "submodule is called on its own: run the patched model's own forward once "
                "after freezing, unfreezing or replacing parameters, so that vaultkern "
                "attaches to the new set.")
        if self._runtime is not None and (self.bucket_sync is not None or self.is_sharded):
            raise UnsupportedModuleError(
                "vaultkern: the model's trainable parameters changed after it was wrapped in "
                f"{'FSDP2' if self.is_sharded else 'DistributedDataParallel'} "
                f"({len(self.trainable)} trainable tensors before, {len(now)} now), whose "
                "gradient reduction covers the parameters it was set up for. Freeze, unfreeze "
                "or replace parameters before vk.patch and wrapping.")
        detach_readers(self.model)
        self.sites.clear()
        self.root_site.owned.clear()
        self.root_reads = False
        for path, module, owned in _readers(self.model):
            add_reader(self, path, module, owned)
        self.trainable = now
        self._runtime = None
        self.layout_checked = False  # the new readers' layout is checked too

    def start_forward(self, args, kwargs) -> None:
        if self._runtime is not None:
            self._runtime[0].first_ids_shape = None
        bk = self.bookkeeper
        if bk._callback_queued or bk._uses:
            bk.reset()  # left over from a backward pass that failed part-way
        elif bk.has_expected_uses() and not bk.allow_multiple_forwards:
            # a second forward before any backward: if one backward covers both, the layout
            # check must refuse it before anything is written, so nothing is clipped early
            bk.wait_for_all = True
        self.forward_id += 1
        self.forward_grad = torch.is_grad_enabled()
        self.batch = _batch_of(args, kwargs, self.bookkeeper.allow_empty_batch)


def primary_input(args, kwargs) -> Optional[torch.Tensor]:
    """The input whose dim 0 is the batch: an ``input_ids``-like keyword, else the first
    tensor of at least one dimension among the positional arguments (inside lists, tuples
    and dicts too), else among the keyword arguments."""
    tensor = next((kwargs[k] for k in _BATCH_KWARGS if isinstance(kwargs.get(k), torch.Tensor)), None)
    for tree in (args, kwargs):
        if tensor is None:
            tensor = next((t for t in tree_flatten(tree)[0]
                           if isinstance(t, torch.Tensor) and t.dim() > 0), None)
    return tensor


def _batch_of(args, kwargs, allow_empty: bool) -> int:
    tensor = primary_input(args, kwargs)
    if tensor is None:
        raise ValueError("vaultkern: the patched model was called without a tensor whose dim 0 "
                         "holds the examples (e.g. input_ids of shape [B, T])")
    if tensor.shape[0] == 0 and not allow_empty:
        raise ValueError(
            "vaultkern: empty batch (0 rows). For an empty Poisson batch skip forward/backward and "
            "call optimizer.step() (noise only), or patch with allow_empty_batch=True.")
    return tensor.shape[0]


def trainable_parameters(model: nn.Module) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _readers(model: nn.Module):
    """[(path, module, owned trainable names)] of modules that own trainable parameters."""
    out = []
    unsupported = refusals.unsupported_modules()
    for path, module in model.named_modules():
        for cls, reason in unsupported.items():
            if isinstance(module, cls) and any(p.requires_grad for p in module.parameters()):
                raise UnsupportedModuleError(
                    f"vaultkern: module '{path or '<root>'}' ({type(module).__name__}) is not "
                    f"supported: {reason}")
        owned = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if owned:
            out.append((path, module, owned))
    return out


def patch(model: nn.Module, max_grad_norm: Union[float, Sequence[float]] = 1.0,
          loss_reduction: str = "sum", *, clipping: str = "flat",
          allow_multiple_forwards: bool = False, allow_empty_batch: bool = False,
          linear_mode: Optional[str] = None, nonfinite: str = "drop",
          per_example_memory: int = DEFAULT_PER_EXAMPLE_MEMORY) -> nn.Module:
    """Patch ``model`` in place for per-example clipping; returns the model.

    max_grad_norm: C, the clipping bound on each example's gradient norm over all
        trainable parameters jointly (``float('inf')`` disables clipping but still
        computes ``last_norms``).
    loss_reduction: "sum" if the loss is a sum of per-example losses, "mean" if it
        was averaged over the batch (per-example gradients are then those of the
        per-example losses, the Opacus convention).
    clipping: "flat" (one C for the whole gradient), "automatic" (g·C/(‖g‖ + 0.01)), or
        "per_layer": each trainable parameter clipped on its own to C_k, with
        ``max_grad_norm`` a list of C_k in ``model.parameters()`` order or one C split
        as C/sqrt(P); the noise must then be calibrated to sqrt(Σ C_k²).
    allow_multiple_forwards: accept one backward over several forwards, treating
        row i of every forward as the same example.
    allow_empty_batch: accept 0-row batches (an empty Poisson batch): backward then adds
        nothing to ``p.grad`` and the optimizer step adds noise only.
    linear_mode: "ghost" or "direct" forces how linear-layer norms are computed
        (default: the cheaper per layer).
    per_example_memory: bytes of per-example weight gradients one backward may keep
        ("MixOpt": one batched GEMM per linear layer, the cost of its weight gradient,
        replaces both the norm and the clipped-sum GEMM). Layers are served in backward
        order until the budget is spent, the rest use factored (ghost/direct) forms;
        ``vk.summary`` says which each got. 0 (the default) turns it off, as does
        ``linear_mode="ghost"``.
    nonfinite: "drop" (default): an example whose gradient norm is NaN/inf gets clip
        factor 0 and is counted in ``bookkeeper(model).nonfinite_examples``;
        "raise": raise NonFiniteGradientError and write nothing.
    """
    if getattr(model, "_vaultkern", None) is not None:
        raise RuntimeError("vaultkern: model is already patched; call vk.unpatch(model) first")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise RuntimeError(
            "vaultkern: patch the model before wrapping it in DistributedDataParallel: "
            "vk.patch(model); ddp = DistributedDataParallel(model) (DDP has already set up its "
            "gradient reduction for the unpatched model)")
    if sharded.is_sharded(model):
        sharded.check_supported(model)
    if clipping not in POLICIES:
        raise ValueError(f"vaultkern: clipping must be one of {POLICIES}, got {clipping!r}")
    if isinstance(max_grad_norm, (list, tuple)):
        if clipping != "per_layer":
            raise ValueError("vaultkern: a list of max_grad_norm (one per parameter) needs "
                             "clipping='per_layer'")
        thresholds_for([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    elif not (max_grad_norm > 0):
        raise ValueError(f"vaultkern: max_grad_norm must be > 0, got {max_grad_norm!r}")
    if loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"vaultkern: loss_reduction must be one of {LOSS_REDUCTIONS}, "
                         f"got {loss_reduction!r}")
    if linear_mode not in LINEAR_MODES:
        raise ValueError(f"vaultkern: linear_mode must be one of {LINEAR_MODES}, got {linear_mode!r}")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"vaultkern: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    readers = _readers(model)
    bookkeeper = BookKeeper(max_grad_norm, loss_reduction, allow_multiple_forwards,
                            allow_empty_batch, nonfinite, clipping)
    bookkeeper.per_example_budget = int(per_example_memory)
    state = _PatchState(model, bookkeeper, linear_mode)
    model.register_forward_pre_hook(ModelStart(state), with_kwargs=True)
    model.register_forward_hook(ModelEnd(state), with_kwargs=True, always_call=True)
    for path, module, owned in readers:
        add_reader(state, path, module, owned)
    state.trainable = trainable_parameters(model)
    model._vaultkern = state
    return model


def add_reader(state: _PatchState, path: str, module: nn.Module, owned) -> None:
    """Run ``module``'s forward under capture (it owns or reads trainable parameters)."""
    if module is state.model:
        state.root_reads = True
        state.root_site.owned |= set(owned)
        state.sites[state.root_site.path] = state.root_site
        return
    site = Site(path, type(module).__name__, set(owned))
    state.sites[site.path] = site
    module.register_forward_pre_hook(EnterCapture(state, site), with_kwargs=True, prepend=True)
    module.register_forward_hook(ExitCapture(state), with_kwargs=True, always_call=True)


def detach_readers(model: nn.Module, hook_types=(EnterCapture, ExitCapture)) -> None:
    """Remove the hooks of ``hook_types`` from every module, and the checkpointing wrappers."""
    for module in model.modules():
        checkpointing = getattr(module, "_gradient_checkpointing_func", None)
        if isinstance(checkpointing, RecomputeUnderCapture):
            module._gradient_checkpointing_func = checkpointing.checkpointing
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, hook_types)]:
                del hooks[key]
                for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                              "_forward_hooks_always_called"):
                    getattr(module, extra, {}).pop(key, None)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: no hooks, no state. Returns the model."""
    state_of(model)
    detach_readers(model, (EnterCapture, ExitCapture, ModelStart, ModelEnd))
    for p in model.parameters():
        hooks = p._backward_hooks or {}
        for key in [k for k, h in hooks.items() if isinstance(h, UnclippedGradientGuard)]:
            del hooks[key]
    del model._vaultkern
    return model
