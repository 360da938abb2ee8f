"""Per-example squared norm of an embedding table's gradient.

For one example with token ids x [T] and output gradients g [T, d]:

    ‖G‖² = Σ_{t,s} [x_t = x_s] (g_t·g_s) = Σ_v ‖Σ_{t: x_t=v} g_t‖²

No V×d tensor is formed. Ids < 0 are ignored (padding_idx positions are mapped
to -1 by the layer rule, since their rows receive no gradient).

Signature::

    embedding_norm_sq(ids [B,T] int64, g [B,T,d]) -> [B]
"""
from __future__ import annotations

import torch

from vaultkern.backend import acc_dtype, define_op

embedding_norm_sq = define_op("embedding_norm_sq", __doc__)
embedding_norm_sq.register_cpp("embedding_norm_sq")


@embedding_norm_sq.register("torch")
def embedding_norm_sq_torch(ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    acc = acc_dtype(g)
    valid = ids >= 0
    # One row per distinct (example, token): sum the gradients landing on it.
    ex = torch.arange(B, device=ids.device).unsqueeze(1).expand(B, T)
    key = torch.stack([ex[valid], ids[valid]], dim=1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.zeros(uniq.shape[0], g.shape[-1], dtype=acc, device=g.device)
    rows.index_add_(0, inverse, g[valid].to(acc))
    out = torch.zeros(B, dtype=acc, device=g.device)
    out.index_add_(0, uniq[:, 0], rows.square().sum(1))
    return out


# ----------------------------------------------------------------------------
# Triton implementation
#
# Σ_{t,s} [x_t = y_s] (e_t·f_s) over tiles of positions, for a norm (y = x,
# f = e: tile pairs i ≤ j, i < j counted twice) and for embedding_cross (two
# lookups of one table: all tile pairs). Each program forms a BLOCK_T×BLOCK_T
# tile of e·fᵀ by tl.dot over d, keeps the entries whose ids match and reduces
# them; no V×d tensor and no T×T tensor reaches memory.
#
# The launcher first sorts each example's ids (the rows of e are read through
# the sort permutation). Equal ids are then adjacent, and a tile pair whose id
# ranges [first, last] do not overlap cannot match anywhere: its program exits
# after reading four ids. With few repeated tokens only the tiles near the
# diagonal do any arithmetic, so the cost falls from ~T²d towards ~T·BLOCK_T·d.
# Ids < 0 (ignored positions) sort first and never match.
# ----------------------------------------------------------------------------
from vaultkern.ops._triton import (  # noqa: E402
    as_dtype, common_dtype, configs, dot_precision, launch, num_tile_pairs, tile_pair, tl, triton,
    tuned, uses_reference, zero_partial)
from vaultkern.ops.linear_norm import gram_tile  # noqa: E402

_MATCH_CONFIGS = configs(
    gpu=[dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
         dict(BLOCK_T=128, BLOCK_K=32, num_warps=8, num_stages=3),
         dict(BLOCK_T=64, BLOCK_K=128, num_warps=4, num_stages=3)],
    interpreter=dict(BLOCK_T=16, BLOCK_K=16), pre_hook=zero_partial)


@triton.autotune(configs=tuned(_MATCH_CONFIGS), key=["T1", "T2", "D", "SYMMETRIC"])
@triton.jit
def _matching_ids_kernel(x1_ptr, perm1_ptr, e1_ptr, x2_ptr, perm2_ptr, e2_ptr, partial_ptr,
                         T1, T2, D, partial_stride,
                         sx1b, se1b, se1t, se1d, sx2b, se2b, se2t, se2d,
                         SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    # x*, perm*: sorted ids and their permutation, [B, T] contiguous along T.
    n1 = tl.cdiv(T1, BLOCK_T)
    n2 = tl.cdiv(T2, BLOCK_T)
    pairs = n1 * n2
    if SYMMETRIC:
        pairs = n1 * (n1 + 1) // 2
    pid = tl.program_id(0).to(tl.int64)
    b = pid // pairs
    pair = pid % pairs
    i, j = tile_pair(pair, n2, SYMMETRIC)
    x1_ptr += b * sx1b
    perm1_ptr += b * sx1b
    x2_ptr += b * sx2b
    perm2_ptr += b * sx2b
    first1 = tl.load(x1_ptr + i * BLOCK_T)
    last1 = tl.load(x1_ptr + tl.minimum(i * BLOCK_T + BLOCK_T, T1) - 1)
    first2 = tl.load(x2_ptr + j * BLOCK_T)
    last2 = tl.load(x2_ptr + tl.minimum(j * BLOCK_T + BLOCK_T, T2) - 1)
    if (last1 >= 0) & (last2 >= 0) & (first1 <= last2) & (first2 <= last1):
        rows = i * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = j * BLOCK_T + tl.arange(0, BLOCK_T)
        x = tl.load(x1_ptr + rows, mask=rows < T1, other=-1)
        y = tl.load(x2_ptr + cols, mask=cols < T2, other=-1)
        src_rows = tl.load(perm1_ptr + rows, mask=rows < T1, other=0)
        src_cols = tl.load(perm2_ptr + cols, mask=cols < T2, other=0)
        dots = gram_tile(e1_ptr + b * se1b, e2_ptr + b * se2b, se1t, se1d, se2t, se2d,
                         src_rows, src_cols, T1, T2, D,
                         tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32), PRECISION, BLOCK_K)
        match = (x[:, None] == y[None, :]) & (x[:, None] >= 0)
        total = tl.sum(tl.sum(tl.where(match, dots, 0.0), axis=1), axis=0)
        if SYMMETRIC:
            total = tl.where(i == j, total, 2.0 * total)
        tl.store(partial_ptr + b * partial_stride + pair, total)


def matching_ids_triton(ids1, e1, ids2, e2, symmetric: bool, config=None) -> torch.Tensor:
    """Σ_{t,s} [ids1_t = ids2_s ≥ 0] (e1_t·e2_s) per example -> fp32 [B].

    ``symmetric`` (a norm: ids2 is ids1, e2 is e1) sorts once and runs i ≤ j tiles.
    ``config``: one of _MATCH_CONFIGS instead of autotuning.
    """
    dtype = common_dtype(e1, e2)
    e1, e2 = as_dtype(e1, dtype), as_dtype(e2, dtype)
    B, T1 = ids1.shape
    T2, D = ids2.shape[1], e1.shape[2]
    x1, perm1 = torch.sort(ids1, dim=1)
    x2, perm2 = (x1, perm1) if symmetric else torch.sort(ids2, dim=1)

    def programs(block_t):
        return num_tile_pairs(triton.cdiv(T1, block_t), triton.cdiv(T2, block_t), symmetric)

    smallest = min(c.kwargs["BLOCK_T"] for c in _MATCH_CONFIGS)
    partial = torch.empty(B, programs(smallest), dtype=torch.float32, device=e1.device)
    if B * T1 * T2 == 0:
        return partial.zero_().sum(1)
    launch(_matching_ids_kernel, lambda meta: (B * programs(meta["BLOCK_T"]),),
           (x1, perm1, e1, x2, perm2, e2, partial, T1, T2, D, partial.stride(0),
            x1.stride(0), *e1.stride(), x2.stride(0), *e2.stride()),
           dict(SYMMETRIC=symmetric, PRECISION=dot_precision(dtype)), config)
    return partial.sum(1)


@embedding_norm_sq.register("triton")
def embedding_norm_sq_triton(ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Sorted-tile Triton kernel; float64 gradients use the torch reference."""
    if uses_reference(g):
        return embedding_norm_sq_torch(ids, g)
    return matching_ids_triton(ids, g, ids, g, symmetric=True)
