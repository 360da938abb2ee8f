"""Cross terms of a tied embedding table (DESIGN.md §2, shared parameters).

Embedding ↔ LM head (the Gemma/GPT-2 tie). Embedding use: ids x [T1], output
grads e [T1, d]; head use (a linear layer with the same V×d weight): inputs
h [T2, d], output grads z [T2, V]:

    ⟨G_emb, G_head⟩ = Σ_{t,s} z_s[x_t] · (e_t·h_s)

Embedding ↔ embedding (one table looked up twice): Σ_{t,s} [x_t = y_s] (e_t·f_s).

Signatures::

    embedding_linear_cross(ids [B,T1], e [B,T1,d], h [B,T2,d], z [B,T2,V]) -> [B]
    embedding_cross(ids1 [B,T1], e1 [B,T1,d], ids2 [B,T2], e2 [B,T2,d]) -> [B]

Ids < 0 are ignored.
"""
from __future__ import annotations

import torch

from vaultkern.backend import acc_dtype, define_op
from vaultkern.ops._chunk import batch_chunks

embedding_linear_cross = define_op("embedding_linear_cross", __doc__)
embedding_linear_cross.register_cpp("embedding_linear_cross")
embedding_cross = define_op("embedding_cross", __doc__)


@embedding_linear_cross.register("torch")
def embedding_linear_cross_torch(ids, e, h, z) -> torch.Tensor:
    B, T1 = ids.shape
    T2 = h.shape[1]
    acc = acc_dtype(e)
    out = torch.empty(B, dtype=acc, device=e.device)
    for sl in batch_chunks(B, 2 * T1 * T2):
        x = ids[sl]
        valid = (x >= 0)
        # zx[b, s, t] = z[b, s, x[b, t]]
        zx = torch.gather(z[sl], 2, x.clamp(min=0).unsqueeze(1).expand(-1, T2, -1)).to(acc)
        zx = zx * valid.unsqueeze(1)
        eh = torch.bmm(e[sl].to(acc), h[sl].to(acc).transpose(1, 2))  # [b, T1, T2]
        out[sl] = (eh * zx.transpose(1, 2)).sum((1, 2))
    return out


@embedding_cross.register("torch")
def embedding_cross_torch(ids1, e1, ids2, e2) -> torch.Tensor:
    B, T1 = ids1.shape
    T2 = ids2.shape[1]
    acc = acc_dtype(e1)
    out = torch.empty(B, dtype=acc, device=e1.device)
    for sl in batch_chunks(B, 2 * T1 * T2):
        x, y = ids1[sl], ids2[sl]
        same = (x.unsqueeze(2) == y.unsqueeze(1)) & (x >= 0).unsqueeze(2) & (y >= 0).unsqueeze(1)
        ef = torch.bmm(e1[sl].to(acc), e2[sl].to(acc).transpose(1, 2))
        out[sl] = (ef * same).sum((1, 2))
    return out


# ----------------------------------------------------------------------------
# Triton implementations
#
# embedding_linear_cross: one program per (T1 tile, T2 tile, example) forms the
# BLOCK_T1×BLOCK_T2 tile of e·hᵀ by tl.dot over d, gathers the matching tile
# z[s, x_t] straight from z (one element per (t, s); ids < 0 gather nothing),
# multiplies and reduces. Neither the V×d gradients nor the T1×T2 gathered
# matrix reach memory; the gather is the kernel's memory traffic (T1·T2
# scattered reads of z per example).
#
# embedding_cross: the sorted matching-ids kernel of embedding_norm over all
# tile pairs of the two lookups.
# ----------------------------------------------------------------------------
from vaultkern.ops._triton import (  # noqa: E402
    as_dtype, common_dtype, configs, dot_precision, launch, tl, triton, tuned, uses_reference,
    zero_partial)
from vaultkern.ops.embedding_norm import matching_ids_triton  # noqa: E402
from vaultkern.ops.linear_norm import gram_tile  # noqa: E402

_HEAD_CONFIGS = configs(
    gpu=[dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=3),
         dict(BLOCK_T=128, BLOCK_K=32, num_warps=8, num_stages=3),
         dict(BLOCK_T=64, BLOCK_K=128, num_warps=4, num_stages=3)],
    interpreter=dict(BLOCK_T=16, BLOCK_K=16), pre_hook=zero_partial)


@triton.autotune(configs=tuned(_HEAD_CONFIGS), key=["T1", "T2", "D"])
@triton.jit
def _embedding_head_kernel(ids_ptr, e_ptr, h_ptr, z_ptr, partial_ptr,
                           T1, T2, D, partial_stride,
                           sib, sit, seb, s_et, sed, shb, sht, shd, szb, szt, szv,
                           PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    n2 = tl.cdiv(T2, BLOCK_T)
    tiles = tl.cdiv(T1, BLOCK_T) * n2
    pid = tl.program_id(0).to(tl.int64)
    b = pid // tiles
    tile = pid % tiles
    rows = (tile // n2) * BLOCK_T + tl.arange(0, BLOCK_T)   # positions t of the lookup
    cols = (tile % n2) * BLOCK_T + tl.arange(0, BLOCK_T)    # positions s of the head
    x = tl.load(ids_ptr + b * sib + rows * sit, mask=rows < T1, other=-1)
    dots = gram_tile(e_ptr + b * seb, h_ptr + b * shb, s_et, sed, sht, shd, rows, cols, T1, T2, D,
                     tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32), PRECISION, BLOCK_K)
    z = tl.load(z_ptr + b * szb + cols[None, :] * szt + x[:, None].to(tl.int64) * szv,
                mask=(x[:, None] >= 0) & (cols[None, :] < T2), other=0.0)
    total = tl.sum(tl.sum(dots * z.to(tl.float32), axis=1), axis=0)
    tl.store(partial_ptr + b * partial_stride + tile, total)


def embedding_head_triton(ids, e, h, z, config=None) -> torch.Tensor:
    """Σ_{t,s} z_s[x_t]·(e_t·h_s) per example by the tiled kernel -> fp32 [B].

    ``config``: one of _HEAD_CONFIGS instead of autotuning.
    """
    dtype = common_dtype(e, h)
    e, h = as_dtype(e, dtype), as_dtype(h, dtype)
    B, T1 = ids.shape
    T2, D = h.shape[1], e.shape[2]

    def programs(block_t):
        return triton.cdiv(T1, block_t) * triton.cdiv(T2, block_t)

    smallest = min(c.kwargs["BLOCK_T"] for c in _HEAD_CONFIGS)
    partial = torch.empty(B, programs(smallest), dtype=torch.float32, device=e.device)
    if B * T1 * T2 == 0:
        return partial.zero_().sum(1)
    launch(_embedding_head_kernel, lambda meta: (B * programs(meta["BLOCK_T"]),),
           (ids, e, h, z, partial, T1, T2, D, partial.stride(0),
            *ids.stride(), *e.stride(), *h.stride(), *z.stride()),
           dict(PRECISION=dot_precision(dtype)), config)
    return partial.sum(1)


@embedding_linear_cross.register("triton")
def embedding_linear_cross_triton(ids, e, h, z) -> torch.Tensor:
    """Tiled Triton kernel; float64 inputs use the torch reference."""
    if uses_reference(e, h, z):
        return embedding_linear_cross_torch(ids, e, h, z)
    return embedding_head_triton(ids, e, h, z)


@embedding_cross.register("triton")
def embedding_cross_triton(ids1, e1, ids2, e2) -> torch.Tensor:
    """Sorted matching-ids Triton kernel; float64 inputs use the torch reference."""
    if uses_reference(e1, e2):
        return embedding_cross_torch(ids1, e1, ids2, e2)
    return matching_ids_triton(ids1, e1, ids2, e2, symmetric=False)
