"""Book-Keeping's clipped gradient sum, formed once after the backward pass.

Linear-type weights (G_i = Σ_t L_it ⊗ R_it, rows × cols):

    clipped_linear_grad(left [B,T,rows], right [B,T,cols], clip [B]) -> [rows, cols]
        = Σ_i clip_i Σ_t left_it ⊗ right_it        (one matmul, clip folded into rows)

For nn.Linear left = output grads g, right = inputs a; for GPT-2's Conv1D left =
inputs, right = output grads.

Embedding tables:

    clipped_embedding_grad(ids [B,T], g [B,T,d], clip [B], num_embeddings) -> [V, d]
        rows ids[i,t] += clip_i g_it   (ids < 0 skipped)

Results are fp32 (fp64 for fp64 inputs); the caller casts to the parameter dtype.
"""
from __future__ import annotations

import torch

from vaultkern.backend import acc_dtype, define_op

# On an H100 the Triton matmul below reached 0.36-0.59x of cuBLAS for decoder shapes
# (bench/results/kernels-2026-11-22-nvidia-h100-80gb-hbm3.txt), so CUDA tensors use the
# torch path (cuBLAS on a scaled copy of the narrower factor) unless triton is forced.
clipped_linear_grad = define_op("clipped_linear_grad", __doc__, cuda_default="torch")
clipped_embedding_grad = define_op("clipped_embedding_grad", __doc__)
clipped_embedding_grad.register_cpp("clipped_embedding_grad")


@clipped_linear_grad.register("torch")
def clipped_linear_grad_torch(left, right, clip) -> torch.Tensor:
    low = left.dtype in (torch.float16, torch.bfloat16) and right.dtype == left.dtype
    dtype = left.dtype if low else acc_dtype(left)
    left, right = _as(left, dtype), _as(right, dtype)
    scale = _as(clip, dtype).view(-1, *([1] * (left.dim() - 1)))
    # Σ_i c_i L_iᵀ R_i: fold c into whichever factor is narrower (the smaller copy; for an
    # LM head that is the d-wide input, not the V-wide output gradient).
    if left.shape[-1] <= right.shape[-1]:
        left = left * scale
    else:
        right = right * scale
    lhs, rhs = left.reshape(-1, left.shape[-1]).t(), right.reshape(-1, right.shape[-1])
    if low and left.is_cuda and _MM_OUT_DTYPE[0]:
        try:  # bf16/fp16 operands, fp32 result straight from the GEMM (no separate cast)
            return torch.mm(lhs, rhs, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=) for this case
            _MM_OUT_DTYPE[0] = False
    return _as(lhs @ rhs, acc_dtype(left))


_MM_OUT_DTYPE = [True]  # set False once torch.mm(out_dtype=) is found missing


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


@clipped_embedding_grad.register("torch")
def clipped_embedding_grad_torch(ids, g, clip, num_embeddings: int) -> torch.Tensor:
    acc = acc_dtype(g)
    valid = ids >= 0
    scaled = g.to(acc) * clip.to(acc).view(-1, 1, 1)
    out = torch.zeros(num_embeddings, g.shape[-1], dtype=acc, device=g.device)
    out.index_add_(0, ids[valid], scaled[valid])
    return out


# ----------------------------------------------------------------------------
# Triton implementations
#
# clipped_linear_grad is one matmul, out = Lᵀ diag(c) R, with the reduction
# running over the flattened n = (example, position) dimension. The clip
# factor of row n, clip[n // T], is applied to the left tile as it is loaded
# (in registers, cast back to the operand dtype as the reference does), so no
# scaled copy of `left` is ever written. When the output has fewer tiles than
# the GPU has SMs, the reduction is split into SPLITS slices whose fp32
# partial products are summed by torch (split-K; deterministic).
#
# clipped_embedding_grad scatters clip_i·g_it into row ids[i, t] with fp32
# atomic adds (the same non-deterministic summation order as index_add_ on a
# GPU) and avoids the reference's scaled copy and boolean-mask gathers.
# ----------------------------------------------------------------------------
from vaultkern.ops._triton import (  # noqa: E402
    as_dtype, common_dtype, configs, dot_precision, interpreted, launch, sm_count, tl, triton,
    tuned, uses_reference)

_MATMUL_CONFIGS = configs(
    gpu=[dict(BLOCK_R=128, BLOCK_C=128, BLOCK_K=64, num_warps=8, num_stages=3),
         dict(BLOCK_R=128, BLOCK_C=256, BLOCK_K=64, num_warps=8, num_stages=3),
         dict(BLOCK_R=128, BLOCK_C=128, BLOCK_K=32, num_warps=4, num_stages=4),
         dict(BLOCK_R=64, BLOCK_C=128, BLOCK_K=64, num_warps=4, num_stages=4),
         dict(BLOCK_R=128, BLOCK_C=64, BLOCK_K=32, num_warps=4, num_stages=4)],
    interpreter=dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=16))
_GROUP_R = 8  # output row tiles walked together, so neighbouring programs share L2


@triton.autotune(configs=tuned(_MATMUL_CONFIGS), key=["R", "C", "K", "SPLITS"])
@triton.jit
def _clipped_matmul_kernel(left_ptr, right_ptr, clip_ptr, out_ptr,
                           T, K, R, C, SPLITS,
                           slb, slt, slr, srb, srt, src, sos, sor,
                           PRECISION: tl.constexpr, GROUP_R: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_r = tl.cdiv(R, BLOCK_R)
    n_c = tl.cdiv(C, BLOCK_C)
    per_group = GROUP_R * n_c
    first_r = (pid // per_group) * GROUP_R
    group_rows = tl.minimum(n_r - first_r, GROUP_R)
    tile_r = first_r + (pid % per_group) % group_rows
    tile_c = (pid % per_group) // group_rows
    r = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)

    chunk = tl.cdiv(tl.cdiv(K, SPLITS), BLOCK_K) * BLOCK_K
    k_lo = split.to(tl.int64) * chunk
    k_hi = tl.minimum(k_lo + chunk, K)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        n = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        valid = n < k_hi
        example = n // T
        t = n - example * T
        weight = tl.load(clip_ptr + example, mask=valid, other=0.0)
        lhs = tl.load(left_ptr + example[:, None] * slb + t[:, None] * slt + r[None, :] * slr,
                      mask=valid[:, None] & (r[None, :] < R), other=0.0)
        lhs = (lhs.to(tl.float32) * weight[:, None]).to(left_ptr.dtype.element_ty)
        rhs = tl.load(right_ptr + example[:, None] * srb + t[:, None] * srt + c[None, :] * src,
                      mask=valid[:, None] & (c[None, :] < C), other=0.0)
        acc = tl.dot(tl.trans(lhs), rhs, acc, input_precision=PRECISION)
    tl.store(out_ptr + split * sos + r[:, None] * sor + c[None, :], acc,
             mask=(r[:, None] < R) & (c[None, :] < C))


def default_splits(rows: int, cols: int, reduction: int, sms: int) -> int:
    """Split-K factor: enough slices to give every SM an output tile (≤ 16).

    Output tiles are counted at 128×128; each slice keeps ≥ 256 reduction rows.
    """
    tiles = triton.cdiv(rows, 128) * triton.cdiv(cols, 128)
    return max(1, min(triton.cdiv(sms, tiles), reduction // 256, 16))


def clipped_linear_grad_triton_splits(left, right, clip, splits=None, config=None) -> torch.Tensor:
    """The Triton clipped matmul; ``splits`` (split-K factor) and ``config`` (one of
    _MATMUL_CONFIGS) override the automatic choices (tests use them)."""
    dtype = common_dtype(left, right)
    left, right = as_dtype(left, dtype), as_dtype(right, dtype)
    B, T, R = left.shape
    C = right.shape[-1]
    K = B * T
    if splits is None:
        splits = 1 if interpreted() else default_splits(R, C, K, sm_count(left))
    out = torch.empty(splits, R, C, dtype=torch.float32, device=left.device)
    if K == 0:
        return out.zero_().sum(0)
    clip32 = clip.to(torch.float32).contiguous()

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]) * triton.cdiv(C, meta["BLOCK_C"]), splits)
    launch(_clipped_matmul_kernel, grid,
           (left, right, clip32, out, T, K, R, C, splits,
            *left.stride(), *right.stride(), out.stride(0), out.stride(1)),
           dict(PRECISION=dot_precision(dtype), GROUP_R=_GROUP_R), config)
    return out[0] if splits == 1 else out.sum(0)


@clipped_linear_grad.register("triton")
def clipped_linear_grad_triton(left, right, clip) -> torch.Tensor:
    """Clip folded into the matmul's left operand; float64 uses the torch reference."""
    if uses_reference(left, right):
        return clipped_linear_grad_torch(left, right, clip)
    return clipped_linear_grad_triton_splits(left, right, clip)


_SCATTER_BLOCK_N = 32
_SCATTER_BLOCK_D = 16 if interpreted() else 128


@triton.jit
def _clipped_rows_kernel(ids_ptr, g_ptr, clip_ptr, out_ptr, N, T, D,
                         sib, sit, sgb, sgt, sgd, sov,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    valid = n < N
    example = n // T
    t = n - example * T
    row = tl.load(ids_ptr + example * sib + t * sit, mask=valid, other=-1).to(tl.int64)
    weight = tl.load(clip_ptr + example, mask=valid, other=0.0)
    keep = (row[:, None] >= 0) & (d[None, :] < D)
    values = tl.load(g_ptr + example[:, None] * sgb + t[:, None] * sgt + d[None, :] * sgd,
                     mask=keep, other=0.0).to(tl.float32) * weight[:, None]
    tl.atomic_add(out_ptr + row[:, None] * sov + d[None, :], values, mask=keep)


@clipped_embedding_grad.register("triton")
def clipped_embedding_grad_triton(ids, g, clip, num_embeddings: int) -> torch.Tensor:
    """Atomic scatter of clip_i·g_it into fp32 rows; float64 uses the torch reference."""
    if uses_reference(g):
        return clipped_embedding_grad_torch(ids, g, clip, num_embeddings)
    B, T = ids.shape
    D = g.shape[-1]
    out = torch.zeros(num_embeddings, D, dtype=torch.float32, device=g.device)
    if B * T == 0:
        return out
    clip32 = clip.to(torch.float32).contiguous()
    grid = (triton.cdiv(B * T, _SCATTER_BLOCK_N), triton.cdiv(D, _SCATTER_BLOCK_D))
    _clipped_rows_kernel[grid](ids, g, clip32, out, B * T, T, D, *ids.stride(), *g.stride(),
                               out.stride(0), BLOCK_N=_SCATTER_BLOCK_N, BLOCK_D=_SCATTER_BLOCK_D)
    return out
