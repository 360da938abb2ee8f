"""Cross term between two uses of one linear weight (tied or reused layers).

For one example with uses u=(a1 [T1,d], g1 [T1,p]) and v=(a2 [T2,d], g2 [T2,p]):

    ⟨g1ᵀa1, g2ᵀa2⟩ = Σ_{t,s} (a1_t·a2_s)(g1_t·g2_s)

Signature::

    linear_cross(a1 [B,T1,d], g1 [B,T1,p], a2 [B,T2,d], g2 [B,T2,p]) -> [B]
"""
from __future__ import annotations

import torch

from vaultkern.backend import acc_dtype, define_op
from vaultkern.ops._chunk import batch_chunks

linear_cross = define_op("linear_cross", __doc__)
linear_cross.register_cpp("linear_cross")


@linear_cross.register("torch")
def linear_cross_torch(a1, g1, a2, g2) -> torch.Tensor:
    B, T1, d = a1.shape
    T2, p = a2.shape[1], g1.shape[-1]
    acc = acc_dtype(a1)
    out = torch.empty(B, dtype=acc, device=a1.device)
    ghost = 2 * T1 * T2 < d * p
    for sl in batch_chunks(B, 2 * T1 * T2 if ghost else 2 * p * d):
        x1, y1, x2, y2 = (t[sl].to(acc) for t in (a1, g1, a2, g2))
        if ghost:
            out[sl] = (torch.bmm(x1, x2.transpose(1, 2)) * torch.bmm(y1, y2.transpose(1, 2))).sum((1, 2))
        else:
            out[sl] = (torch.bmm(y1.transpose(1, 2), x1) * torch.bmm(y2.transpose(1, 2), x2)).sum((1, 2))
    return out


# ----------------------------------------------------------------------------
# Triton implementation: the ghost and direct kernels of linear_norm, run on
# two different uses (all T1×T2 tile pairs; no symmetry to exploit). The form
# is chosen by the same cost rule as the reference: ghost costs ~2·T1·T2·(d+p)
# flops, direct ~2·(T1+T2)·d·p.
# ----------------------------------------------------------------------------
from vaultkern.ops._triton import uses_reference  # noqa: E402
from vaultkern.ops.linear_norm import direct_triton, ghost_triton  # noqa: E402


@linear_cross.register("triton")
def linear_cross_triton(a1, g1, a2, g2) -> torch.Tensor:
    """Triton ghost/direct cross term; float64 inputs use the torch reference."""
    if uses_reference(a1, g1, a2, g2):
        return linear_cross_torch(a1, g1, a2, g2)
    B, T1, d = a1.shape
    T2, p = a2.shape[1], g1.shape[-1]
    if 2 * T1 * T2 < d * p:
        return ghost_triton(a1, g1, a2, g2, symmetric=False)
    return direct_triton(a1, g1, a2, g2, same=False)
