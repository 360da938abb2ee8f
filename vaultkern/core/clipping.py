"""From gradient forms to the clipped sum: norms, clip factors, Σ_u clip_u G_u.

A *unit* is what one clip factor applies to: an example (row of the batch), or with
group ids (``set_group_ids``, user-level privacy) all rows of one group, whose
gradients are summed before the norm is taken (DESIGN.md §11). Regrouping is exact
on the forms themselves: a group's factored form is its rows' positions laid end to
end (zero-padded to the largest group), its materialised form the sum of its rows.

Policies (``clipping=``):
  flat       one C for the whole gradient: clip_u = min(1, C / (‖g_u‖ + 1e-6));
  automatic  Bu et al.'s normalisation: clip_u = C / (‖g_u‖ + γ), γ = 0.01;
  per_layer  one C_k per parameter k (Σ_k C_k² = C²): each parameter's gradient
             clipped on its own; the total sensitivity is still sqrt(Σ_k C_k²).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from vaultkern.core import grad_forms
from vaultkern.core.grad_forms import Factored, GradForm, Materialized

CLIP_EPS = 1e-6
AUTOMATIC_GAMMA = 0.01
POLICIES = ("flat", "per_layer", "automatic")
# materialised gradients of parameters up to this size are concatenated into one [U, n]
# matrix (one reduction, one product); larger ones (MixOpt weights) are reduced in place
SMALL_PARAMETER = 1 << 16

Groups = List[Tuple[nn.Parameter, List[GradForm]]]


def factor(norms: torch.Tensor, threshold: float, automatic: bool) -> torch.Tensor:
    if automatic:
        return threshold / (norms + AUTOMATIC_GAMMA)
    return (threshold / (norms + CLIP_EPS)).clamp(max=1.0)


def zero_units(groups: Groups, keep: torch.Tensor) -> Groups:
    return [(p, [grad_forms.zero_rows(f, keep) for f in forms]) for p, forms in groups]


# --- regrouping rows into units ------------------------------------------------------------

def group_index(ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """(unit of each row, slot of each row within its unit, number of units, largest unit)."""
    _, unit = torch.unique(ids, return_inverse=True)
    units = int(unit.max()) + 1 if unit.numel() else 0
    order = torch.argsort(unit, stable=True)
    counts = torch.bincount(unit, minlength=units)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(unit)
    slot[order] = torch.arange(unit.numel(), device=unit.device) - starts[unit[order]]
    return unit, slot, units, int(counts.max()) if units else 0


def regroup(form: GradForm, unit, slot, units: int, width: int) -> GradForm:
    if isinstance(form, Materialized):
        m = form.per_example
        out = torch.zeros((units,) + tuple(m.shape[1:]), dtype=m.dtype, device=m.device)
        return Materialized(out.index_add_(0, unit.to(m.device), m))

    def lay_out(t, fill):
        out = torch.full((units, width) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        out[unit.to(t.device), slot.to(t.device)] = t
        return out.reshape(units, width * t.shape[1], *t.shape[2:])
    if form.one_hot:
        return Factored(lay_out(form.left, -1), lay_out(form.right, 0), one_hot=True,
                        rows=form.rows, mode=form.mode)
    return Factored(lay_out(form.left, 0), lay_out(form.right, 0), mode=form.mode,
                    input_side=form.input_side)


# --- norms -----------------------------------------------------------------------------------

def flat_norm_sq(groups: Groups, units: int, acc) -> Tuple[torch.Tensor, tuple]:
    """[U] squared norms over all parameters, with the fused paths of DESIGN.md §3
    (small materialised gradients as one matrix; layers sharing an input in one call).
    Returns the norms and the split (small, stacked, rest) that the sums reuse."""
    device = _device(groups[0][1][0])
    small = [(p, forms[0]) for p, forms in groups if len(forms) == 1 and isinstance(
        forms[0], Materialized) and p.numel() <= SMALL_PARAMETER]
    small_ids = {id(p) for p, _ in small}
    rest = [(p, forms) for p, forms in groups if id(p) not in small_ids]
    norm_sq = torch.zeros(units, dtype=acc, device=device)
    stacked = None
    if small:
        stacked = torch.cat([f.per_example.reshape(units, p.numel()).to(acc) for p, f in small], 1)
        norm_sq += stacked.square().sum(1)
    if rest:
        self_terms, _ = grad_forms.summed_self_norms_sq([f for _, forms in rest for f in forms])
        norm_sq += self_terms.to(acc)
    for _, forms in rest:
        norm_sq += _cross_terms(forms, acc)
    return norm_sq, (small, stacked, rest)


def per_parameter_norm_sq(groups: Groups, acc) -> List[torch.Tensor]:
    """[U] squared norm of each parameter's gradient on its own."""
    out = []
    for _, forms in groups:
        n = torch.stack([grad_forms.self_norm_sq(f).to(acc) for f in forms]).sum(0)
        out.append(n + _cross_terms(forms, acc))
    return out


def _cross_terms(forms: Sequence[GradForm], acc):
    total = 0
    for i, u in enumerate(forms):
        for v in forms[i + 1:]:
            total = total + 2 * grad_forms.cross(u, v).to(acc)
    return total


# --- sums ------------------------------------------------------------------------------------

def flat_totals(split: tuple, clip: torch.Tensor, acc) -> List[Tuple[nn.Parameter, Callable]]:
    """[(param, make)]: ``make()`` computes Σ_u clip_u G_u of that parameter (one clip vector
    for all), so a caller can form, write and free one parameter's sum at a time."""
    small, stacked, rest = split
    totals = []
    if small:
        sums = (clip.to(acc) @ stacked).split([p.numel() for p, _ in small])
        totals += [(param, functools.partial(total.view, param.shape))
                   for (param, _), total in zip(small, sums)]
    # One GEMM per layer: stacking same-shape layers into one batched GEMM saved launches
    # but its copies cost more GPU time than it saved (bench/NOTES.md, stacking A/B).
    totals += [(param, functools.partial(_summed, forms, clip, param)) for param, forms in rest]
    return totals


def per_parameter_totals(groups: Groups, clips: Sequence[torch.Tensor]):
    return [(param, functools.partial(_summed, forms, clip, param))
            for (param, forms), clip in zip(groups, clips)]


def _summed(forms, clip, param):
    total = None
    for f in forms:
        g = grad_forms.clipped_sum(f, clip, param.shape)
        total = g if total is None else total + g
    return total


def _device(form: GradForm) -> torch.device:
    return form.per_example.device if isinstance(form, Materialized) else form.right.device


def thresholds_for(params: Sequence[nn.Parameter], max_grad_norm) -> Optional[Dict[int, float]]:
    """{id(param): C_k} for per-layer clipping: a list (one per trainable parameter, in
    ``model.parameters()`` order) or one C split evenly as C/sqrt(P)."""
    if isinstance(max_grad_norm, (int, float)):
        each = float(max_grad_norm) / len(params) ** 0.5
        return {id(p): each for p in params}
    values = [float(c) for c in max_grad_norm]
    if len(values) != len(params):
        raise ValueError(f"vaultkern: per-layer clipping got {len(values)} thresholds for "
                         f"{len(params)} trainable parameters (one per parameter, in "
                         "model.parameters() order)")
    if not all(c > 0 for c in values):
        raise ValueError(f"vaultkern: per-layer thresholds must be > 0, got {values}")
    return {id(p): c for p, c in zip(params, values)}
