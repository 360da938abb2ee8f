"""Per-layer clipping of one linear-type weight in one op: norms, clip factors and the
clipped sum from the per-example gradients, each formed once.

For example i with G_i = Σ_t left_it ⊗ right_it (rows × cols; nn.Linear: left = output
grads, right = inputs)::

    per_layer_clipped_linear_grad(left [B,T,rows], right [B,T,cols], threshold, scale, eps)
        -> (total [rows, cols], norm_sq [B])
    norm_sq_i = ‖G_i‖²
    clip_i    = min(1, threshold / (scale·‖G_i‖ + eps)) · scale, and 0 where norm_sq_i
                is not finite (that example's G_i is left out of the sum, NaN included)
    total     = Σ_i clip_i G_i

``scale`` is the factor that turns the backward's G_i into the loss's per-example
gradient (B for a mean loss, 1 for a sum). Results are fp32 (fp64 for fp64 inputs).

Cost: one per-example gradient GEMM (the FLOPs of the non-private weight gradient)
instead of a norm pass and a second, clip-weighted GEMM; the price is a transient
[b, rows, cols] fp32 tensor per chunk of b examples (batch_chunks bounds it). Nothing
crosses layers, so chunking over examples is exact.
"""
from __future__ import annotations

import torch

from vaultkern.backend import acc_dtype, define_op
from vaultkern.ops._chunk import batch_chunks

per_layer_clipped_linear_grad = define_op("per_layer_clipped_linear_grad", __doc__)


def clip_factors(norm_sq: torch.Tensor, threshold: float, scale: float, eps: float) -> torch.Tensor:
    """clip_i of the docstring, 0 where ‖G_i‖² is not finite."""
    norms = norm_sq.clamp(min=0).sqrt() * scale
    clip = (threshold / (norms + eps)).clamp(max=1.0) * scale
    return torch.where(torch.isfinite(norm_sq), clip, torch.zeros((), dtype=clip.dtype,
                                                                  device=clip.device))


@per_layer_clipped_linear_grad.register("torch")
def per_layer_clipped_linear_grad_torch(left, right, threshold: float, scale: float,
                                        eps: float):
    B, _, rows = left.shape
    cols = right.shape[-1]
    acc = acc_dtype(left)
    total = torch.zeros(rows, cols, dtype=acc, device=left.device)
    norm_sq = torch.empty(B, dtype=acc, device=left.device)
    for sl in batch_chunks(B, rows * cols):
        G = torch.bmm(left[sl].to(acc).transpose(1, 2), right[sl].to(acc))
        n = G.flatten(1).square().sum(1)
        norm_sq[sl] = n
        clip = clip_factors(n, threshold, scale, eps)
        finite = torch.isfinite(n)
        # 0·NaN is NaN: a non-finite example's gradient is dropped, not weighted by 0
        # (checked on the CPU, where it is free; an accelerator zeroes without asking)
        if G.device.type != "cpu" or not bool(finite.all()):
            G = torch.where(finite.view(-1, 1, 1), G, torch.zeros((), dtype=acc, device=G.device))
        total.add_(torch.tensordot(clip, G, dims=1))
    return total, norm_sq


# ----------------------------------------------------------------------------
# Triton implementation: two kernels per chunk of examples.
#
# 1. One program per (example, rows×cols tile) accumulates its tile of G_i over T
#    on chip (linear_norm's gradient_tile), stores it to the chunk's fp32 scratch
#    and writes the tile's squared sum to a [b, tiles] buffer (torch sums it per
#    example, deterministically, and turns the norms into clip factors).
# 2. One program per output tile walks the chunk's examples, adds clip_i times
#    their tile (skipping dropped examples, whose tiles may be NaN) and adds the
#    result to the output tile, which earlier chunks have filled.
# ----------------------------------------------------------------------------
from vaultkern.ops._triton import (  # noqa: E402
    as_dtype, common_dtype, dot_precision, interpreted, launch, tl, triton, tuned,
    uses_reference)
# the direct norm kernel's tiling and candidates: the same per-example gradient tiles
from vaultkern.ops.linear_norm import (  # noqa: E402
    DIRECT_CONFIGS as TILE_CONFIGS, example_tile, gradient_tile)
_SUM_BLOCK = 64 if interpreted() else 1024  # elements of the output per program


@triton.autotune(configs=tuned(TILE_CONFIGS), key=["T", "D", "P"])
@triton.jit
def _example_tiles_kernel(a_ptr, g_ptr, scratch_ptr, partial_ptr, T, D, P, partial_stride,
                          sab, sat, sad, sgb, sgt, sgp,
                          PRECISION: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    b, tile, p_idx, d_idx = example_tile(D, P, BLOCK_P, BLOCK_D)
    grad = gradient_tile(a_ptr + b * sab, g_ptr + b * sgb, sat, sad, sgt, sgp,
                          p_idx, d_idx, T, D, P, PRECISION, BLOCK_P, BLOCK_D, BLOCK_T)
    tl.store(scratch_ptr + b * P * D + p_idx[:, None] * D + d_idx[None, :], grad,
             mask=(p_idx[:, None] < P) & (d_idx[None, :] < D))
    tl.store(partial_ptr + b * partial_stride + tile, tl.sum(tl.sum(grad * grad, axis=1), axis=0))


@triton.jit
def _clipped_sum_kernel(scratch_ptr, clip_ptr, out_ptr, examples, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < n
    acc = tl.load(out_ptr + idx, mask=valid, other=0.0)
    for i in range(0, examples):
        weight = tl.load(clip_ptr + i)
        tile = tl.load(scratch_ptr + i * n + idx, mask=valid, other=0.0)
        acc += tl.where(weight != 0.0, weight * tile, 0.0)
    tl.store(out_ptr + idx, acc, mask=valid)


def per_layer_triton(left, right, threshold: float, scale: float, eps: float, config=None):
    """The two kernels over chunks of examples; ``config`` (one of TILE_CONFIGS) instead
    of autotuning the tile kernel."""
    dtype = common_dtype(left, right)
    g, a = as_dtype(left, dtype), as_dtype(right, dtype)
    B, T, P = g.shape
    D = a.shape[-1]
    total = torch.zeros(P, D, dtype=torch.float32, device=g.device)
    norm_sq = torch.zeros(B, dtype=torch.float32, device=g.device)
    if B * T * P * D == 0:
        return total, norm_sq

    def tiles(block_p, block_d):
        return triton.cdiv(P, block_p) * triton.cdiv(D, block_d)

    most = max(tiles(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_D"]) for c in TILE_CONFIGS)
    for sl in batch_chunks(B, P * D):
        b = sl.stop - sl.start
        scratch = torch.empty(b, P, D, dtype=torch.float32, device=g.device)
        partial = torch.empty(b, most, dtype=torch.float32, device=g.device)
        gc, ac = g[sl], a[sl]
        launch(_example_tiles_kernel, lambda meta: (b * tiles(meta["BLOCK_P"], meta["BLOCK_D"]),),
               (ac, gc, scratch, partial, T, D, P, partial.stride(0),
                *ac.stride(), *gc.stride()),
               dict(PRECISION=dot_precision(dtype)), config)
        n = partial.sum(1)
        norm_sq[sl] = n
        clip = clip_factors(n, threshold, scale, eps).contiguous()
        _clipped_sum_kernel[(triton.cdiv(P * D, _SUM_BLOCK),)](
            scratch, clip, total, b, P * D, BLOCK=_SUM_BLOCK)
    return total, norm_sq


@per_layer_clipped_linear_grad.register("triton")
def per_layer_clipped_linear_grad_triton(left, right, threshold: float, scale: float,
                                         eps: float):
    """float64 inputs use the torch reference."""
    if uses_reference(left, right):
        return per_layer_clipped_linear_grad_torch(left, right, threshold, scale, eps)
    return per_layer_triton(left, right, threshold, scale, eps)
