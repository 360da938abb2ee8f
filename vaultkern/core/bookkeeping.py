"""Book-Keeping: turn one backward pass into the exactly clipped gradient sum.

During ``loss.backward()`` every patched layer hands over gradient forms
(:mod:`vaultkern.core.grad_forms`) instead of computing weight gradients. A
callback queued on the autograd engine runs when the backward pass ends and

1. groups the forms by parameter (a tied or reused parameter has several),
2. takes per-example squared norms  ‖g_i‖² = Σ_params Σ_u Σ_v ⟨G_i^u, G_i^v⟩,
3. clip_i = min(1, C / (‖g_i‖ + 1e-6)),
4. adds Σ_i clip_i g_i to each ``p.grad`` (one matmul per linear use),

then frees everything it kept (DESIGN.md §1-3).

The callback belongs to the *outermost* backward pass that reaches the model:
the model's outputs carry a node that queues it (and a forward recomputed
inside a backward, as checkpointing does, queues it on the backward that runs
the recomputation), so the nested backward passes of reentrant checkpointing
report their uses and clipping runs once, over the whole model.

An example whose norm is NaN/inf gets clip factor 0 (its rows are zeroed in
the kept tensors, so nothing of it reaches p.grad) and is counted in
``nonfinite_examples``; rows masked out by ``set_row_mask`` (padding) get 0 too.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from vaultkern.core import grad_forms
from vaultkern.core.errors import BatchLayoutError, NonFiniteGradientError
from vaultkern.core.grad_forms import GradForm
from vaultkern.core.site import Site

CLIP_EPS = 1e-6
NONFINITE_POLICIES = ("drop", "raise")


class _Use:
    __slots__ = ("site", "form", "forward_id")

    def __init__(self, site: Site, form: GradForm, forward_id: int):
        self.site, self.form, self.forward_id = site, form, forward_id


class BookKeeper:
    """Per patched model: collects gradient forms during backward, clips at its end."""

    def __init__(self, max_grad_norm: float, loss_reduction: str, allow_multiple_forwards: bool = False,
                 allow_empty_batch: bool = False, nonfinite: str = "drop"):
        self.max_grad_norm = float(max_grad_norm)
        self.loss_reduction = loss_reduction
        self.allow_multiple_forwards = allow_multiple_forwards
        self.allow_empty_batch = allow_empty_batch
        self.nonfinite = nonfinite
        self.nonfinite_examples = 0   # cumulative count of examples dropped as NaN/inf (private)
        self.last_norms: Optional[torch.Tensor] = None
        self.row_mask: Optional[torch.Tensor] = None   # for the next backward (set_row_mask)
        self.after_write = None  # DDP's bucket sync (vaultkern.core.distributed), if any
        self._uses: "OrderedDict[int, Tuple[nn.Parameter, List[_Use]]]" = OrderedDict()
        self._callback_queued = False

    def __getstate__(self):  # a copy starts with nothing pending
        state = dict(self.__dict__)
        state["_uses"], state["_callback_queued"] = OrderedDict(), False
        return state

    # -- during backward -------------------------------------------------------------------
    def queue(self) -> None:
        """Clip when the backward pass running now ends (called from its outermost level)."""
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True

    def add(self, site: Site, forms: Dict[nn.Parameter, GradForm], forward_id: int) -> None:
        self.queue()  # normally queued already by the model's output node
        for param, form in forms.items():
            entry = self._uses.setdefault(id(param), (param, []))
            entry[1].append(_Use(site, form, forward_id))

    def reset(self) -> None:
        self._uses.clear()
        self._callback_queued = False

    # -- when backward ends -------------------------------------------------------------------
    def _finish(self) -> None:
        groups = list(self._uses.values())
        self.reset()
        try:
            with torch.no_grad():
                self._clip_and_write(groups)
                if self.after_write is not None:
                    self.after_write.resolve()
        except BaseException as exc:
            if self.after_write is not None:  # DDP waits on these: fail them, do not hang
                self.after_write.resolve(exc)
            raise
        finally:
            groups.clear()

    def _check_layout(self, groups) -> int:
        batch_of: Dict[Site, int] = {}
        forward_ids = set()
        for _, uses in groups:
            for u in uses:
                batch_of.setdefault(u.site, u.form.batch)
                forward_ids.add(u.forward_id)
        sizes = set(batch_of.values())
        if len(sizes) > 1:
            first = next(iter(batch_of.values()))
            odd = [f"{site.describe()}: {v}" for site, v in batch_of.items() if v != first]
            raise BatchLayoutError(
                f"vaultkern: {odd[0]} examples, but other layers of the same backward pass had "
                f"{first} (dim 0 of their inputs must index examples); one backward pass covers "
                "forwards of different batch sizes.")
        if len(forward_ids) > 1 and not self.allow_multiple_forwards:
            raise BatchLayoutError(
                "vaultkern: one backward pass covers several forward passes of the patched "
                "model; rows of different forwards may be different examples, so per-example "
                "clipping would be wrong. Call backward after each forward (gradients "
                "accumulate), or patch with allow_multiple_forwards=True if row i of every "
                "forward is the same example.")
        return sizes.pop()

    def _clip_and_write(self, groups) -> None:
        if not groups:
            return
        batch = self._check_layout(groups)
        any64 = any(_form_dtype(u.form) == torch.float64 for _, uses in groups for u in uses)
        acc = torch.float64 if any64 else torch.float32
        # Small parameters used once (biases, norm weights, generic modules): their
        # per-example gradients form one [B, n] matrix, so one reduction gives all their
        # norms and one vector-matrix product all their clipped sums.
        small = [(p, uses[0].form) for p, uses in groups
                 if len(uses) == 1 and isinstance(uses[0].form, grad_forms.Materialized)]
        small_ids = {id(p) for p, _ in small}
        rest = [(p, uses) for p, uses in groups if id(p) not in small_ids]
        norm_sq = torch.zeros(batch, dtype=acc, device=_form_device(groups[0][1][0].form))
        if small:
            stacked = torch.cat([f.per_example.reshape(batch, p.numel()).to(acc) for p, f in small], 1)
            norm_sq += stacked.square().sum(1)
        # Self terms of the other uses (fused across layers that share an input), then the
        # cross terms of parameters used more than once.
        if rest:
            self_terms, _ = grad_forms.summed_self_norms_sq([u.form for _, uses in rest for u in uses])
            norm_sq += self_terms.to(acc)
        for param, uses in rest:
            for i, u in enumerate(uses):
                for v in uses[i + 1:]:
                    norm_sq += 2 * grad_forms.cross(u.form, v.form).to(acc)

        # "mean": the loss was averaged over the batch, per-example grads are B·(what we saw).
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        norms = norm_sq.clamp(min=0).sqrt() * scale
        clip = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0) * scale
        mask, self.row_mask = self.row_mask, None
        if mask is not None:
            if mask.shape != (batch,):
                raise BatchLayoutError(f"vaultkern: set_row_mask got a mask of shape "
                                       f"{tuple(mask.shape)} for a batch of {batch} examples")
            clip = clip * mask.to(device=clip.device, dtype=clip.dtype)
        # Every clipped sum is queued before the one host-device synchronisation (which
        # examples are not finite), so on a GPU the host never waits in the middle of the work.
        totals = _clipped_totals(small, stacked if small else None, rest, clip, acc)
        nonfinite = ~torch.isfinite(norms)
        counted = nonfinite if mask is None else nonfinite & mask.to(nonfinite.device, torch.bool)
        n_zero, n_bad = (int(n) for n in torch.stack([nonfinite.sum(), counted.sum()]).tolist())
        if n_bad and self.nonfinite == "raise":
            rows = counted.nonzero().flatten().tolist()[:10]
            raise NonFiniteGradientError(
                f"vaultkern: non-finite per-example gradient norm for examples {rows} "
                f"(layers: {', '.join(self._nonfinite_layers(groups)[:5])}); is the loss "
                "NaN/inf? No gradient was written for this backward pass.")
        if n_zero:  # clip factor 0 and rows zeroed in the kept tensors (0·NaN is still NaN)
            self.nonfinite_examples += n_bad
            clip = torch.where(nonfinite, torch.zeros_like(clip), clip)
            keep = ~nonfinite
            small = [(p, grad_forms.zero_rows(f, keep)) for p, f in small]
            rest = [(p, [_Use(u.site, grad_forms.zero_rows(u.form, keep), u.forward_id) for u in uses])
                    for p, uses in rest]
            stacked = torch.cat([f.per_example.reshape(batch, p.numel()).to(acc) for p, f in small],
                                1) if small else None
            totals = _clipped_totals(small, stacked, rest, clip, acc)
        if mask is not None:  # padding rows: reported norm 0, whatever their content
            norms = torch.where(mask.to(device=norms.device, dtype=torch.bool), norms,
                                torch.zeros_like(norms))
        self.last_norms = norms.detach()
        for param, total in totals:
            _accumulate(param, total)

    @staticmethod
    def _nonfinite_layers(groups) -> List[str]:
        """Layers whose kept tensors hold NaN/inf (for the error message)."""
        bad = set()
        for _, uses in groups:
            for u in uses:
                f = u.form
                tensors = [f.per_example] if isinstance(f, grad_forms.Materialized) else (
                    [f.right] if f.one_hot else [f.left, f.right])
                if not all(bool(torch.isfinite(t).all()) for t in tensors):
                    bad.add(u.site.describe())
        return sorted(bad)


def _clipped_totals(small, stacked, rest, clip, acc) -> List[Tuple[nn.Parameter, torch.Tensor]]:
    """Σ_i clip_i g_i for every parameter."""
    totals: List[Tuple[nn.Parameter, torch.Tensor]] = []
    if small:
        sums = (clip.to(acc) @ stacked).split([p.numel() for p, _ in small])
        totals += [(param, total.view(param.shape)) for (param, _), total in zip(small, sums)]
    # One GEMM per layer: stacking same-shape layers into one batched GEMM saved launches
    # but its copies cost more GPU time than it saved (bench/NOTES.md, stacking A/B).
    for param, uses in rest:
        total = None
        for u in uses:
            g = grad_forms.clipped_sum(u.form, clip, param.shape)
            total = g if total is None else total + g
        totals.append((param, total))
    return totals


def _accumulate(param: nn.Parameter, total: torch.Tensor) -> None:
    """param.grad += total (created if None), in the parameter's dtype."""
    if total.dtype != param.dtype:
        total = total.to(param.dtype)
    if param.grad is None:
        param.grad = total
    else:
        param.grad.add_(total)


def _form_device(form: GradForm) -> torch.device:
    return form.per_example.device if isinstance(form, grad_forms.Materialized) else form.right.device


def _form_dtype(form: GradForm) -> torch.dtype:
    if isinstance(form, grad_forms.Factored):
        return form.right.dtype
    return form.per_example.dtype
