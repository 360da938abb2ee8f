"""DP-SGD optimizer steps fused with the noise (DESIGN.md §4): one pass per parameter.

The private gradient of a parameter is  ĝ = (summed + std·ξ)·scale  (summed = Σ_i clip_i g_i,
std = σ·C, scale = 1/B̄, ξ ~ N(0, I) exactly :func:`vaultkern.ops.noise.noisy_scale`'s
ChaCha20 stream for the same (seed, step, offset)). The fused ops read the
clipped sum, form ĝ in registers and apply the update in place, so neither a noise
tensor nor ĝ is ever stored:

SGD (torch.optim.SGD, dampening 0, no Nesterov)::

    d = ĝ + weight_decay·θ;   buf = momentum·buf + d (if momentum);   θ -= lr·(buf or d)

AdamW (torch.optim.AdamW, decoupled weight decay; adam_step = t ≥ 1)::

    θ *= 1 - lr·weight_decay
    m = β1·m + (1-β1)·ĝ;   v = β2·v + (1-β2)·ĝ²
    θ -= lr/(1-β1ᵗ) · m / (√v / √(1-β2ᵗ) + eps)

Signatures (all tensors one shape, updated in place; arithmetic in fp32, each tensor
stored back in its own dtype)::

    noisy_sgd_(param, summed, std, scale, *, seed, step, offset=0, lr, weight_decay=0.0,
               momentum=0.0, momentum_buffer=None) -> None
    noisy_adamw_(param, summed, exp_avg, exp_avg_sq, std, scale, *, seed, step, offset=0,
                 lr, beta1, beta2, eps, weight_decay, adam_step) -> None

A fresh momentum buffer must start at zeros (then buf = d on the first step, as torch).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from vaultkern.backend import define_op
from vaultkern.ops._triton import interpreted, tl, triton
from vaultkern.ops.noise import noise_blocks, noise_tile, noisy_scale, step_key_tensor

noisy_sgd_ = define_op("noisy_sgd_", __doc__)
noisy_adamw_ = define_op("noisy_adamw_", __doc__)


# --- torch reference: noise by noisy_scale, then the update ------------------------------------

def sgd_update_(param, grad, *, lr, weight_decay=0.0, momentum=0.0, momentum_buffer=None) -> None:
    """θ -= lr·d with d = grad + wd·θ (through the momentum buffer if momentum > 0)."""
    d = grad.float() + weight_decay * param.float()
    if momentum:
        buf = momentum * momentum_buffer.float() + d
        momentum_buffer.copy_(buf)
        d = buf
    param.copy_(param.float() - lr * d)


def adamw_update_(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay,
                  adam_step) -> None:
    """The AdamW update of the module docstring, in fp32, written back in place."""
    g = grad.float()
    theta = param.float() * (1.0 - lr * weight_decay)
    m = beta1 * exp_avg.float() + (1.0 - beta1) * g
    v = beta2 * exp_avg_sq.float() + (1.0 - beta2) * g * g
    bias1, bias2 = 1.0 - beta1 ** adam_step, 1.0 - beta2 ** adam_step
    theta = theta - (lr / bias1) * m / (v.sqrt() / math.sqrt(bias2) + eps)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    param.copy_(theta)


@noisy_sgd_.register("torch")
def noisy_sgd_torch(param, summed, std, scale, *, seed, step, offset=0, lr, weight_decay=0.0,
                    momentum=0.0, momentum_buffer=None) -> None:
    noisy = noisy_scale(summed, std, scale, seed=seed, step=step, offset=offset, backend="torch")
    sgd_update_(param, noisy, lr=lr, weight_decay=weight_decay, momentum=momentum,
                momentum_buffer=momentum_buffer)


@noisy_adamw_.register("torch")
def noisy_adamw_torch(param, summed, exp_avg, exp_avg_sq, std, scale, *, seed, step, offset=0,
                      lr, beta1, beta2, eps, weight_decay, adam_step) -> None:
    noisy = noisy_scale(summed, std, scale, seed=seed, step=step, offset=offset, backend="torch")
    adamw_update_(param, noisy, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, adam_step=adam_step)


# --- Triton: one pass per parameter ------------------------------------------------------------

_BLOCKS = 1024 if interpreted() else 128  # ChaCha20 blocks (2 elements each) per program


@triton.jit
def _tile(summed_ptr, n, key_ptr, offset, std, scale, BLOCK: tl.constexpr):
    """(index, mask, ĝ in fp32) of this program's [BLOCK, 2] tile: ĝ = (summed + std·ξ)·scale
    in float64, rounded to summed's dtype (as noisy_scale), ξ exactly noisy_scale's stream."""
    first = offset // 2 + tl.program_id(0).to(tl.int64) * BLOCK
    idx, xi = noise_tile(key_ptr, first, offset, BLOCK)
    mask = (idx >= 0) & (idx < n)
    s = tl.load(summed_ptr + idx, mask=mask, other=0.0).to(tl.float64)
    g = ((s + std * xi) * scale).to(summed_ptr.dtype.element_ty).to(tl.float32)
    return idx, mask, g


@triton.jit
def _noisy_sgd_kernel(param_ptr, summed_ptr, buf_ptr, n, key_ptr, offset, std, scale, lr,
                      weight_decay, momentum, HAS_MOMENTUM: tl.constexpr, BLOCK: tl.constexpr):
    idx, mask, g = _tile(summed_ptr, n, key_ptr, offset, std, scale, BLOCK)
    theta = tl.load(param_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    d = g + weight_decay * theta
    if HAS_MOMENTUM:
        d = momentum * tl.load(buf_ptr + idx, mask=mask, other=0.0).to(tl.float32) + d
        tl.store(buf_ptr + idx, d.to(buf_ptr.dtype.element_ty), mask=mask)
    tl.store(param_ptr + idx, (theta - lr * d).to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noisy_adamw_kernel(param_ptr, summed_ptr, m_ptr, v_ptr, n, key_ptr, offset, std, scale, lr,
                        beta1, beta2, eps, weight_decay, step_size, inv_sqrt_bias2,
                        BLOCK: tl.constexpr):
    idx, mask, g = _tile(summed_ptr, n, key_ptr, offset, std, scale, BLOCK)
    theta = tl.load(param_ptr + idx, mask=mask, other=0.0).to(tl.float32) * (1.0 - lr * weight_decay)
    m = beta1 * tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * g
    v = beta2 * tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta2) * g * g
    theta = theta - step_size * m / (tl.sqrt(v) * inv_sqrt_bias2 + eps)
    tl.store(m_ptr + idx, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + idx, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(param_ptr + idx, theta.to(param_ptr.dtype.element_ty), mask=mask)


def _fusable(*tensors: Optional[torch.Tensor]) -> bool:
    """Contiguous, same shape, no float64: else the triton op runs the unfused path."""
    present = [t for t in tensors if t is not None]
    return all(t.is_contiguous() and t.shape == present[0].shape and t.dtype != torch.float64
               for t in present)


@noisy_sgd_.register("triton")
def noisy_sgd_triton(param, summed, std, scale, *, seed, step, offset=0, lr, weight_decay=0.0,
                     momentum=0.0, momentum_buffer=None, blocks_per_program: Optional[int] = None) -> None:
    """Fused kernel; non-contiguous / float64 tensors: triton noisy_scale + torch update."""
    buf = momentum_buffer if momentum else None
    if not _fusable(param, summed, buf):
        noisy = noisy_scale(summed, std, scale, seed=seed, step=step, offset=offset, backend="triton")
        return sgd_update_(param, noisy, lr=lr, weight_decay=weight_decay, momentum=momentum,
                           momentum_buffer=momentum_buffer)
    n = param.numel()
    if n == 0:
        return None
    block = blocks_per_program or _BLOCKS
    _noisy_sgd_kernel[(triton.cdiv(noise_blocks(n, offset), block),)](
        param, summed, buf if buf is not None else param, n,
        step_key_tensor(seed, step, param.device), int(offset), float(std), float(scale),
        float(lr), float(weight_decay), float(momentum), HAS_MOMENTUM=buf is not None, BLOCK=block)
    return None


@noisy_adamw_.register("triton")
def noisy_adamw_triton(param, summed, exp_avg, exp_avg_sq, std, scale, *, seed, step, offset=0,
                       lr, beta1, beta2, eps, weight_decay, adam_step,
                       blocks_per_program: Optional[int] = None) -> None:
    """Fused kernel; non-contiguous / float64 tensors: triton noisy_scale + torch update."""
    if not _fusable(param, summed, exp_avg, exp_avg_sq):
        noisy = noisy_scale(summed, std, scale, seed=seed, step=step, offset=offset, backend="triton")
        return adamw_update_(param, noisy, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2,
                             eps=eps, weight_decay=weight_decay, adam_step=adam_step)
    n = param.numel()
    if n == 0:
        return None
    block = blocks_per_program or _BLOCKS
    bias1, bias2 = 1.0 - beta1 ** adam_step, 1.0 - beta2 ** adam_step
    _noisy_adamw_kernel[(triton.cdiv(noise_blocks(n, offset), block),)](
        param, summed, exp_avg, exp_avg_sq, n, step_key_tensor(seed, step, param.device),
        int(offset), float(std), float(scale), float(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), float(lr / bias1), float(1.0 / math.sqrt(bias2)), BLOCK=block)
    return None
