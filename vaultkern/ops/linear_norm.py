"""Per-example squared Frobenius norm of a linear layer's weight gradient.

For one example with inputs ``a`` [T, d] and output gradients ``g`` [T, p] the
weight gradient is ``G = gᵀ a`` (p×d) and

    ‖G‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s)     "ghost"  ~ 2T²(d+p) flops, no p×d tensor
         = Σ_{p,d} (Σ_t g_tp a_td)²       "direct" ~ 2Tdp flops, no T×T tensor

Signature shared by every backend::

    linear_norm_sq(a [B,T,d], g [B,T,p], mode) -> [B] (fp32; fp64 for fp64 inputs)

``mode`` is "ghost" or "direct"; :func:`choose_linear_mode` picks by cost.
"""
from __future__ import annotations

import torch

from vaultkern.backend import acc_dtype, define_op
from vaultkern.ops._chunk import batch_chunks

linear_norm_sq = define_op("linear_norm_sq", __doc__)
linear_norm_sq.register_cpp("linear_norm_sq")


def choose_linear_mode(T: int, d: int, p: int) -> str:
    """The mixed rule of DESIGN.md §2: ghost when 2T² < d·p, else direct."""
    return "ghost" if 2 * T * T < d * p else "direct"


@linear_norm_sq.register("torch")
def linear_norm_sq_torch(a: torch.Tensor, g: torch.Tensor, mode: str = "ghost") -> torch.Tensor:
    B, T, d = a.shape
    p = g.shape[-1]
    acc = acc_dtype(a)
    out = torch.empty(B, dtype=acc, device=a.device)
    if mode == "ghost":
        for sl in batch_chunks(B, 2 * T * T):
            ac, gc = a[sl].to(acc), g[sl].to(acc)
            out[sl] = (torch.bmm(ac, ac.transpose(1, 2)) * torch.bmm(gc, gc.transpose(1, 2))).sum((1, 2))
    elif mode == "direct":
        for sl in batch_chunks(B, p * d):
            G = torch.bmm(g[sl].to(acc).transpose(1, 2), a[sl].to(acc))
            out[sl] = G.square().sum((1, 2))
    else:
        raise ValueError(f"linear_norm_sq: mode must be 'ghost' or 'direct', got {mode!r}")
    return out


# ----------------------------------------------------------------------------
# Triton implementation
#
# Two kernels serve both this op and linear_cross (two uses u, v of a weight):
#
# * ghost:  Σ_{t,s} (a1_t·a2_s)(g1_t·g2_s). One program per (tile pair, example)
#   forms a BLOCK_T×BLOCK_T tile of each Gram product on chip (tl.dot over d,
#   then over p), multiplies them elementwise and reduces to one number. The
#   T×T Gram matrices never reach memory. For a norm (u = v) the products are
#   symmetric, so only tile pairs i ≤ j run and i < j counts twice.
# * direct: Σ_{p,d} (g1ᵀa1)_{pd} (g2ᵀa2)_{pd}. One program per (p×d tile,
#   example) accumulates its tile of g1ᵀa1 over T on chip (and of g2ᵀa2 for a
#   cross term), squares / multiplies and reduces. The p×d per-example gradient
#   never reaches memory.
#
# The grid is 1-D over (example, tile) so that no axis limit caps the batch.
# Each program writes one partial sum to a [B, programs] buffer that torch sums
# per example. The buffer is sized for the tile candidate launching the most
# programs and cleared before every launch (zero_partial pre-hook), so slots the
# chosen configuration does not launch are 0.
# ----------------------------------------------------------------------------
from vaultkern.ops._triton import (  # noqa: E402
    as_dtype, common_dtype, configs, dot_precision, launch, num_tile_pairs, tile_pair, tl, triton,
    tuned, uses_reference, zero_partial)

_GHOST_CONFIGS = configs(
    gpu=[dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
         dict(BLOCK_T=64, BLOCK_K=32, num_warps=4, num_stages=4),
         dict(BLOCK_T=128, BLOCK_K=32, num_warps=8, num_stages=3),
         dict(BLOCK_T=128, BLOCK_K=64, num_warps=8, num_stages=3)],
    interpreter=dict(BLOCK_T=16, BLOCK_K=16), pre_hook=zero_partial)

DIRECT_CONFIGS = configs(
    gpu=[dict(BLOCK_P=128, BLOCK_D=128, BLOCK_T=32, num_warps=8, num_stages=3),
         dict(BLOCK_P=128, BLOCK_D=64, BLOCK_T=64, num_warps=4, num_stages=3),
         dict(BLOCK_P=64, BLOCK_D=128, BLOCK_T=64, num_warps=4, num_stages=3),
         dict(BLOCK_P=64, BLOCK_D=64, BLOCK_T=64, num_warps=4, num_stages=4)],
    interpreter=dict(BLOCK_P=16, BLOCK_D=16, BLOCK_T=16), pre_hook=zero_partial)


@triton.jit
def gram_tile(x_ptr, y_ptr, sxt, sxk, syt, syk, rows, cols, n_rows, n_cols, K, acc,
              PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + x[rows] @ y[cols]ᵀ for x [n_rows, K], y [n_cols, K], in BLOCK_K slices of K.

    Rows / columns past the end load as zeros, so they add nothing.
    """
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        x = tl.load(x_ptr + rows[:, None] * sxt + k[None, :] * sxk,
                    mask=(rows[:, None] < n_rows) & (k[None, :] < K), other=0.0)
        y = tl.load(y_ptr + cols[:, None] * syt + k[None, :] * syk,
                    mask=(cols[:, None] < n_cols) & (k[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@triton.autotune(configs=tuned(_GHOST_CONFIGS), key=["T1", "T2", "D", "P", "SYMMETRIC"])
@triton.jit
def _ghost_kernel(a1_ptr, g1_ptr, a2_ptr, g2_ptr, partial_ptr,
                  T1, T2, D, P, partial_stride,
                  sa1b, sa1t, sa1d, sg1b, sg1t, sg1p,
                  sa2b, sa2t, sa2d, sg2b, sg2t, sg2p,
                  SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    n1 = tl.cdiv(T1, BLOCK_T)
    n2 = tl.cdiv(T2, BLOCK_T)
    pairs = n1 * n2
    if SYMMETRIC:
        pairs = n1 * (n1 + 1) // 2
    pid = tl.program_id(0).to(tl.int64)
    b = pid // pairs
    pair = pid % pairs
    i, j = tile_pair(pair, n2, SYMMETRIC)
    rows = i * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = j * BLOCK_T + tl.arange(0, BLOCK_T)
    zero = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    gram_a = gram_tile(a1_ptr + b * sa1b, a2_ptr + b * sa2b, sa1t, sa1d, sa2t, sa2d,
                       rows, cols, T1, T2, D, zero, PRECISION, BLOCK_K)
    gram_g = gram_tile(g1_ptr + b * sg1b, g2_ptr + b * sg2b, sg1t, sg1p, sg2t, sg2p,
                       rows, cols, T1, T2, P, zero, PRECISION, BLOCK_K)
    total = tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0)
    if SYMMETRIC:
        total = tl.where(i == j, total, 2.0 * total)
    tl.store(partial_ptr + b * partial_stride + pair, total)


@triton.jit
def gradient_tile(a_ptr, g_ptr, sat, sad, sgt, sgp, p_idx, d_idx, T, D, P,
                   PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """The [p_idx, d_idx] tile of gᵀa = Σ_t g_t ⊗ a_t (fp32), T in BLOCK_T slices."""
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    tt = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tt
        g = tl.load(g_ptr + t[:, None] * sgt + p_idx[None, :] * sgp,
                    mask=(t[:, None] < T) & (p_idx[None, :] < P), other=0.0)
        a = tl.load(a_ptr + t[:, None] * sat + d_idx[None, :] * sad,
                    mask=(t[:, None] < T) & (d_idx[None, :] < D), other=0.0)
        acc = tl.dot(tl.trans(g), a, acc, input_precision=PRECISION)
    return acc


@triton.jit
def example_tile(D, P, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """(example, tile, row indices, column indices) of this program in a 1-D grid over
    (example, BLOCK_P×BLOCK_D tile of a P×D per-example gradient)."""
    n_d_tiles = tl.cdiv(D, BLOCK_D)
    tiles = tl.cdiv(P, BLOCK_P) * n_d_tiles
    pid = tl.program_id(0).to(tl.int64)
    b = pid // tiles
    tile = pid % tiles
    p_idx = (tile // n_d_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    d_idx = (tile % n_d_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    return b, tile, p_idx, d_idx


@triton.autotune(configs=tuned(DIRECT_CONFIGS), key=["T1", "T2", "D", "P", "SAME"])
@triton.jit
def _direct_kernel(a1_ptr, g1_ptr, a2_ptr, g2_ptr, partial_ptr,
                   T1, T2, D, P, partial_stride,
                   sa1b, sa1t, sa1d, sg1b, sg1t, sg1p,
                   sa2b, sa2t, sa2d, sg2b, sg2t, sg2p,
                   SAME: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    b, tile, p_idx, d_idx = example_tile(D, P, BLOCK_P, BLOCK_D)
    grad1 = gradient_tile(a1_ptr + b * sa1b, g1_ptr + b * sg1b, sa1t, sa1d, sg1t, sg1p,
                           p_idx, d_idx, T1, D, P, PRECISION, BLOCK_P, BLOCK_D, BLOCK_T)
    if SAME:
        grad2 = grad1
    else:
        grad2 = gradient_tile(a2_ptr + b * sa2b, g2_ptr + b * sg2b, sa2t, sa2d, sg2t, sg2p,
                               p_idx, d_idx, T2, D, P, PRECISION, BLOCK_P, BLOCK_D, BLOCK_T)
    total = tl.sum(tl.sum(grad1 * grad2, axis=1), axis=0)
    tl.store(partial_ptr + b * partial_stride + tile, total)


def _dot_operands(*tensors):
    """The operands in one dtype (mixed inputs promoted), and tl.dot's precision for it."""
    dtype = common_dtype(*tensors)
    return [as_dtype(t, dtype) for t in tensors], dot_precision(dtype)


def ghost_triton(a1, g1, a2, g2, symmetric: bool, config=None) -> torch.Tensor:
    """Σ_{t,s} (a1_t·a2_s)(g1_t·g2_s) per example by the ghost kernel -> fp32 [B].

    ``symmetric`` (a norm: a1 is a2 and g1 is g2) runs tile pairs i ≤ j only.
    ``config``: one of _GHOST_CONFIGS instead of autotuning.
    """
    (a1, g1, a2, g2), precision = _dot_operands(a1, g1, a2, g2)
    B, T1, D = a1.shape
    T2, P = a2.shape[1], g1.shape[2]

    def programs(block_t):
        return num_tile_pairs(triton.cdiv(T1, block_t), triton.cdiv(T2, block_t), symmetric)

    smallest = min(c.kwargs["BLOCK_T"] for c in _GHOST_CONFIGS)
    partial = torch.empty(B, programs(smallest), dtype=torch.float32, device=a1.device)
    if B * T1 * T2 == 0:
        return partial.zero_().sum(1)
    launch(_ghost_kernel, lambda meta: (B * programs(meta["BLOCK_T"]),),
           (a1, g1, a2, g2, partial, T1, T2, D, P, partial.stride(0),
            *a1.stride(), *g1.stride(), *a2.stride(), *g2.stride()),
           dict(SYMMETRIC=symmetric, PRECISION=precision), config)
    return partial.sum(1)


def direct_triton(a1, g1, a2, g2, same: bool, config=None) -> torch.Tensor:
    """Σ_{p,d} (g1ᵀa1)(g2ᵀa2) per example by the direct kernel -> fp32 [B].

    ``same`` (a norm: a1 is a2 and g1 is g2) forms each gradient tile once.
    ``config``: one of DIRECT_CONFIGS instead of autotuning.
    """
    (a1, g1, a2, g2), precision = _dot_operands(a1, g1, a2, g2)
    B, T1, D = a1.shape
    T2, P = a2.shape[1], g1.shape[2]

    def programs(block_p, block_d):
        return triton.cdiv(P, block_p) * triton.cdiv(D, block_d)

    most = max(programs(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_D"]) for c in DIRECT_CONFIGS)
    partial = torch.empty(B, most, dtype=torch.float32, device=a1.device)
    if B * T1 * T2 == 0:
        return partial.zero_().sum(1)
    launch(_direct_kernel, lambda meta: (B * programs(meta["BLOCK_P"], meta["BLOCK_D"]),),
           (a1, g1, a2, g2, partial, T1, T2, D, P, partial.stride(0),
            *a1.stride(), *g1.stride(), *a2.stride(), *g2.stride()),
           dict(SAME=same, PRECISION=precision), config)
    return partial.sum(1)


@linear_norm_sq.register("triton")
def linear_norm_sq_triton(a: torch.Tensor, g: torch.Tensor, mode: str = "ghost") -> torch.Tensor:
    """Triton kernels for both modes; float64 inputs use the torch reference."""
    if mode not in ("ghost", "direct"):
        raise ValueError(f"linear_norm_sq: mode must be 'ghost' or 'direct', got {mode!r}")
    if uses_reference(a, g):
        return linear_norm_sq_torch(a, g, mode)
    if a.shape[1] == 1:
        # One position: ‖g aᵀ‖² = ‖a‖²‖g‖², a row reduction with no matmul to tile.
        return (torch.linalg.vector_norm(a[:, 0], dim=-1, dtype=torch.float32).square()
                * torch.linalg.vector_norm(g[:, 0], dim=-1, dtype=torch.float32).square())
    if mode == "ghost":
        return ghost_triton(a, g, a, g, symmetric=True)
    return direct_triton(a, g, a, g, same=True)
