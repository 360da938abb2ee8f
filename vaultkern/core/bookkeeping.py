"""Book-Keeping: turn one backward pass into the exactly clipped gradient sum.

During ``loss.backward()`` every patched layer hands over gradient forms
(:mod:`vaultkern.core.grad_forms`) instead of computing weight gradients. A
callback queued on the autograd engine runs when the backward pass ends and

1. groups the forms by parameter (a tied or reused parameter has several),
2. takes per-example squared norms  ‖g_i‖² = Σ_params Σ_u Σ_v ⟨G_i^u, G_i^v⟩,
3. clip_i = min(1, C / (‖g_i‖ + 1e-6)) (or per layer, or per group of rows:
   :mod:`vaultkern.core.clipping`),
4. adds Σ_i clip_i g_i to each ``p.grad`` (one matmul per linear use),

then frees everything it kept (DESIGN.md §1-3).

The callback belongs to the *outermost* backward pass that reaches the model:
the model's outputs carry a node that queues it (and a forward recomputed
inside a backward, as checkpointing does, queues it on the backward that runs
the recomputation), so the nested backward passes of reentrant checkpointing
report their uses and clipping runs once, over the whole model.

Per-layer clipping needs no norm over the whole model, so each parameter is
clipped inside the backward pass, as soon as the gradient of its last use
arrives (the forwards count the uses; a tied weight waits for its second), and
its forms are freed there: nothing is kept until the end. Where uses may be
still to come (a no-grad segment that reentrant checkpointing recomputes inside
the backward) or are counted twice (non-reentrant recomputation), the parameter
waits for the end as in flat clipping.

An example whose norm is NaN/inf gets clip factor 0 (its rows are zeroed in
the kept tensors, so nothing of it reaches p.grad) and is counted in
``nonfinite_examples``; rows masked out by ``set_row_mask`` (padding) get 0 too.
(Per-layer clipping inside the backward zeroes it in each parameter whose norm
is not finite, which for a NaN loss is every parameter; ``nonfinite="raise"``
must see every norm before writing, so it clips at the end.)
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from vaultkern import ops
from vaultkern.core import clipping, grad_forms
from vaultkern.core.errors import BatchLayoutError, NonFiniteGradientError
from vaultkern.core.grad_forms import GradForm
from vaultkern.core.site import Site

NONFINITE_POLICIES = ("drop", "raise")


class _Use:
    __slots__ = ("site", "form", "forward_id")

    def __init__(self, site: Site, form: GradForm, forward_id: int):
        self.site, self.form, self.forward_id = site, form, forward_id


class BookKeeper:
    """Per patched model: collects gradient forms during backward, clips at its end."""

    def __init__(self, max_grad_norm, loss_reduction: str, allow_multiple_forwards: bool = False,
                 allow_empty_batch: bool = False, nonfinite: str = "drop", clipping: str = "flat"):
        self.clipping = clipping
        # flat/automatic: C; per_layer: the list of C_k (or one C split evenly), resolved to
        # {id(param): C_k} by the patch state on its first forward (ids change on a copy)
        self.max_grad_norm = max_grad_norm if clipping == "per_layer" else float(max_grad_norm)
        self.thresholds: Dict[int, float] = {}
        self.loss_reduction = loss_reduction
        self.allow_multiple_forwards = allow_multiple_forwards
        self.allow_empty_batch = allow_empty_batch
        self.nonfinite = nonfinite
        self.nonfinite_examples = 0   # cumulative count of examples dropped as NaN/inf (private)
        self.last_norms: Optional[torch.Tensor] = None
        self.row_mask: Optional[torch.Tensor] = None   # for the next backward (set_row_mask)
        self.group_ids: Optional[torch.Tensor] = None  # for the next backward (set_group_ids)
        # where clipped sums go across ranks: DDP's bucket sync (core/distributed.py) or
        # FSDP2's reduce-scatter into the shards (core/sharded.py); None: into p.grad
        self.sync = None
        # MixOpt: bytes of per-example weight gradients a backward may keep instead of
        # factored forms (see handlers._linear_like); "used" resets with every backward
        self.per_example_budget = 0
        self._per_example_used = 0
        self._uses: "OrderedDict[int, Tuple[nn.Parameter, List[_Use]]]" = OrderedDict()
        self._callback_queued = False
        # per-layer clipping clips a parameter inside the backward pass, as soon as the
        # gradient of its last use arrives: uses counted in the forward passes, and what the
        # parameters clipped so far in this backward saw (their layout, Σ norm² as scaled
        # for last_norms, bad units)
        self._expected: Dict[int, int] = {}
        self._early: Optional[dict] = None
        self.wait_for_all = False  # set by a forward whose uses are not all counted yet
        self.per_layer_fused: Optional[bool] = None  # see _fuse_per_layer

    def __getstate__(self):  # a copy starts with nothing pending
        state = dict(self.__dict__)
        state["_uses"], state["_callback_queued"], state["thresholds"] = OrderedDict(), False, {}
        state["_expected"], state["_early"] = {}, None
        return state

    # -- during backward -------------------------------------------------------------------
    def queue(self) -> None:
        """Clip when the backward pass running now ends (called from its outermost level)."""
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True

    def expect(self, params) -> None:
        """A grad-enabled forward consumed each of ``params`` once more."""
        for key in {id(p) for p in params}:
            self._expected[key] = self._expected.get(key, 0) + 1

    def has_expected_uses(self) -> bool:
        """A grad-enabled forward consumed parameters that no backward has reached yet."""
        return bool(self._expected)

    def add(self, site: Site, forms: Dict[nn.Parameter, GradForm], forward_id: int) -> None:
        self.queue()  # normally queued already by the model's output node
        for param, form in forms.items():
            entry = self._uses.setdefault(id(param), (param, []))
            entry[1].append(_Use(site, form, forward_id))
            # Per-layer: the parameter's own norm needs all of its uses, and no more can come
            # once as many arrived as the forwards made (a recomputing checkpoint counts its
            # uses twice: those wait for the end). The "raise" policy needs every norm before
            # anything is written, so it waits too.
            if (self.clipping == "per_layer" and self.nonfinite == "drop"
                    and not self.wait_for_all and self._expected.get(id(param)) == len(entry[1])):
                del self._uses[id(param)]
                with torch.no_grad():
                    self._clip_early(entry)

    def reserve_per_example(self, nbytes: int) -> bool:
        """Room for ``nbytes`` more of per-example gradients in this backward?"""
        if self._per_example_used + nbytes > self.per_example_budget:
            return False
        self._per_example_used += nbytes
        return True

    def reset(self) -> None:
        self._uses.clear()
        self._callback_queued = False
        self._per_example_used = 0
        self._expected.clear()
        self._early = None
        self.wait_for_all = False

    # -- when backward ends -------------------------------------------------------------------
    def _finish(self) -> None:
        groups, early = list(self._uses.values()), self._early
        self.reset()
        try:
            with torch.no_grad():
                self._clip_and_write(groups, early)
                if self.sync is not None:
                    self.sync.resolve()
        except BaseException as exc:
            if self.sync is not None:  # DDP waits on these: fail them, do not hang
                self.sync.resolve(exc)
            raise
        finally:
            groups.clear()
            self.row_mask = self.group_ids = None  # they were for this backward

    def _check_layout(self, groups, early: Optional[dict] = None) -> int:
        """The rows of this backward (one batch size, one forward unless allowed), over
        ``groups`` and the parameters already clipped in it (``early``)."""
        batch_of: Dict[Site, int] = dict(early["batch_of"]) if early else {}
        forward_ids = set(early["forward_ids"]) if early else set()
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
        if early is not None:
            early["batch_of"], early["forward_ids"] = batch_of, forward_ids
        return sizes.pop()

    def _units(self, groups, rows: int):
        """(forms, units, accumulation dtype, scale): padding rows zeroed, rows regrouped
        into units when group ids are set."""
        mask, ids = self.row_mask, self.group_ids
        forms = [(p, [u.form for u in uses]) for p, uses in groups]
        any64 = any(_form_dtype(f) == torch.float64 for _, fs in forms for f in fs)
        acc = torch.float64 if any64 else torch.float32
        if mask is not None:  # padding rows: exactly 0, whatever the loss did with them
            _check_rows(mask, rows, "set_row_mask")
            forms = clipping.zero_units(forms, mask)
        units = rows
        if ids is not None:  # user-level units: each group's rows summed before clipping
            _check_rows(ids, rows, "set_group_ids")
            unit, slot, units, width = clipping.group_index(ids.to(torch.long))
            forms = [(p, [clipping.regroup(f, unit, slot, units, width) for f in fs])
                     for p, fs in forms]
        # "mean": the loss was averaged over the rows, per-row grads are rows·(what we saw).
        scale = float(rows) if self.loss_reduction == "mean" else 1.0
        return forms, units, acc, scale

    def _write(self, totals) -> None:
        write = accumulate if self.sync is None else self.sync.write
        for param, make_total in totals:
            write(param, make_total)

    def _clip_early(self, entry) -> None:
        """Per-layer clipping of one parameter during the backward pass (on a GPU nothing
        waits on the host): a unit whose norm is not finite is zeroed in this parameter's sum
        (a NaN loss makes every parameter's norm NaN), and counted once at the end."""
        if self._early is None:
            self._early = {"batch_of": {}, "forward_ids": set(), "norm_sq": None, "bad": None}
        early = self._early
        rows = self._check_layout([entry], early)
        forms, units, acc, scale = self._units([entry], rows)
        (param, param_forms), = forms
        threshold = self.thresholds[id(param)]
        if self._fuse_per_layer(param_forms):  # one per-example GEMM instead of two passes
            form = param_forms[0]
            total, part = ops.per_layer_clipped_linear_grad(form.left, form.right, threshold,
                                                            scale, clipping.CLIP_EPS)
            part = part.clamp(min=0)
            finite = torch.isfinite(part)
            self._write([(param, functools.partial(total.reshape, param.shape))])
        else:
            part = clipping.per_parameter_norm_sq(forms, acc)[0].clamp(min=0)
            finite = torch.isfinite(part)
            # on an accelerator, zeroing the rows unconditionally costs less than waiting
            # for the host to know; on the CPU the check is free and the zeroing is not
            if part.device.type != "cpu" or not bool(finite.all()):
                forms = clipping.zero_units(forms, finite)
            clip = clipping.factor(torch.where(finite, part, 0).sqrt() * scale, threshold,
                                   False) * scale
            self._write(clipping.per_parameter_totals(forms, [clip]))
        part = part * scale ** 2  # the norm the loss's per-example gradient has
        early["norm_sq"] = part if early["norm_sq"] is None else early["norm_sq"] + part
        early["bad"] = ~finite if early["bad"] is None else early["bad"] | ~finite

    def _fuse_per_layer(self, forms) -> bool:
        """Clip this parameter with per_layer_clipped_linear_grad? Only a single linear-type
        use qualifies; ``per_layer_fused`` None: on accelerators (on the 2-core CPU box the
        per-example GEMMs with K = T were no faster than a norm pass plus one GEMM with
        K = B·T, and 5 % slower on the Gemma-style model: bench/NOTES.md)."""
        if len(forms) != 1 or not isinstance(forms[0], grad_forms.Factored) or forms[0].one_hot:
            return False
        if self.per_layer_fused is None:
            return forms[0].right.device.type != "cpu"
        return self.per_layer_fused

    def _clip_and_write(self, groups, early: Optional[dict] = None) -> None:
        if not groups and not (early and early["norm_sq"] is not None):
            return
        norms = bad = None
        if groups:
            rows = self._check_layout(groups, early)
            forms, units, acc, scale = self._units(groups, rows)
            norms, totals = self._clip(forms, units, acc, scale)
            # Every clipped sum is queued before the one host-device synchronisation (which
            # units are not finite), so on a GPU the host never waits in the middle of the work.
            bad = ~torch.isfinite(norms)
            n_bad = int(bad.sum())
            if n_bad and self.nonfinite == "raise":
                which = bad.nonzero().flatten().tolist()[:10]
                raise NonFiniteGradientError(
                    f"vaultkern: non-finite per-example gradient norm for examples {which} "
                    f"(layers: {', '.join(self._nonfinite_layers(groups)[:5])}); is the loss "
                    "NaN/inf? No gradient was written for this backward pass.")
            if n_bad:  # clip factor 0: the unit's rows zeroed in the kept tensors (0·NaN is NaN)
                forms = clipping.zero_units(forms, ~bad)
                _, totals = self._clip(forms, units, acc, scale)
            self._write(totals)
        if early and early["norm_sq"] is not None:  # parameters clipped during the backward
            norms = (early["norm_sq"] + (0 if norms is None else norms ** 2)).sqrt()
            bad = early["bad"] if bad is None else bad | early["bad"]
        self.nonfinite_examples += int(bad.sum())
        self.last_norms = norms.detach()

    def _clip(self, forms, units: int, acc, scale: float):
        """(norms before clipping [U], [(param, Σ_u clip_u G_u)])."""
        automatic = self.clipping == "automatic"
        if self.clipping == "per_layer":
            parts = clipping.per_parameter_norm_sq(forms, acc)
            clips = [clipping.factor(n.clamp(min=0).sqrt() * scale, self.thresholds[id(p)],
                                     automatic) * scale for (p, _), n in zip(forms, parts)]
            norm_sq = torch.stack(parts).sum(0)
            return norm_sq.clamp(min=0).sqrt() * scale, clipping.per_parameter_totals(forms, clips)
        norm_sq, split = clipping.flat_norm_sq(forms, units, acc)
        norms = norm_sq.clamp(min=0).sqrt() * scale
        clip = clipping.factor(norms, self.max_grad_norm, automatic) * scale
        return norms, clipping.flat_totals(split, clip, acc)

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


def _check_rows(t: torch.Tensor, rows: int, what: str) -> None:
    if t.shape != (rows,):
        raise BatchLayoutError(f"vaultkern: {what} got shape {tuple(t.shape)} for a backward "
                               f"pass over {rows} rows (one value per row)")


def accumulate(param: nn.Parameter, make_total) -> None:
    """param.grad += make_total() (created if None), in the parameter's dtype."""
    total = make_total()
    if total.dtype != param.dtype:
        total = total.to(param.dtype)
    if param.grad is None:
        param.grad = total
    else:
        param.grad.add_(total)


def _form_dtype(form: GradForm) -> torch.dtype:
    if isinstance(form, grad_forms.Factored):
        return form.right.dtype
    return form.per_example.dtype
