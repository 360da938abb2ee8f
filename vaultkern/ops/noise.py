"""Gaussian noise for DP-SGD, fused with the 1/B̄ scaling (DESIGN.md §4).

    noisy_scale(summed, std, scale, seed=, step=, offset=) -> (summed + std·ξ)·scale

ξ ~ N(0, I), one draw per element. Reproducible mode: ξ[j] depends only on
(seed, step, offset + j), so results do not depend on launch configuration and
each parameter (its own ``offset``) and each step get independent noise.

Secure mode (``secure_noisy_scale``) draws ξ from a ChaCha20 (RFC 8439) stream
keyed from ``os.urandom`` in the compiled extension; it has no seed.
"""
from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from vaultkern.backend import acc_dtype, define_op, extension

noisy_scale = define_op("noisy_scale", __doc__)
noisy_scale.register_cpp("noisy_scale")


def derive_seed(seed: int, step: int, offset: int) -> int:
    """A 63-bit generator seed from (seed, step, offset), well mixed."""
    h = hashlib.blake2b(f"{seed}:{step}:{offset}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


@noisy_scale.register("torch")
def noisy_scale_torch(summed: torch.Tensor, std: float, scale: float, *, seed: int, step: int,
                      offset: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=summed.device)
    gen.manual_seed(derive_seed(seed, step, offset))
    acc = acc_dtype(summed)
    xi = torch.randn(summed.shape, generator=gen, dtype=acc, device=summed.device)
    return ((summed.to(acc) + std * xi) * scale).to(summed.dtype)


def secure_noisy_scale(summed: torch.Tensor, std: float, scale: float) -> torch.Tensor:
    """(summed + std·ξ)·scale with ξ from the extension's ChaCha20 Gaussian sampler."""
    ext = extension()
    if ext is None or not hasattr(ext, "secure_noisy_scale"):
        raise RuntimeError(
            "secure_mode=True needs the compiled extension vaultkern._C (ChaCha20 noise); "
            "build it with `pip install --no-build-isolation -e .`")
    key = torch.frombuffer(bytearray(os.urandom(32)), dtype=torch.uint8)
    nonce = torch.frombuffer(bytearray(os.urandom(12)), dtype=torch.uint8)
    return ext.secure_noisy_scale(summed, float(std), float(scale), key, nonce)


# ----------------------------------------------------------------------------
# Triton implementation (reproducible mode)
#
# One pass: read summed, add std·ξ generated in registers, scale, write; no
# noise tensor is ever stored. The generator is Philox-4x32-10 keyed by
# key = derive_seed(seed, step, offset) (64 bits), the counter-based generator
# Triton ships (tl.philox), called with an explicit 64-bit counter so the
# stream is the same on every Triton version:
#
#     (r0, r1, r2, r3) = philox(key, counter = q)       for quad q = j // 4
#     ξ[4q + 0], ξ[4q + 1] = Box–Muller(u(r0), u(r1))   (cos and sin halves)
#     ξ[4q + 2], ξ[4q + 3] = Box–Muller(u(r2), u(r3))
#     u(r) = (r + ½)·2⁻³² ∈ (0, 1]                       (r as fp32; |ξ| ≤ 6.8)
#
# so ξ[j] depends on (seed, step, offset, j) only, never on the block size or
# the grid, and one Philox call yields four normals. Like the torch reference,
# `offset` is a key: calls with different offsets give independent streams.
# The stream differs from the torch reference's (another generator).
# ----------------------------------------------------------------------------
from vaultkern.ops._triton import interpreted, tl, triton  # noqa: E402

_NOISE_QUADS = 4096 if interpreted() else 256  # 4·_NOISE_QUADS elements per program


@triton.jit
def _uniform_open(r):
    """uint32 -> fp32 in (0, 1]: (r + ½)·2⁻³² (rounds to 1 at the top; log stays ≤ 0)."""
    return (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10


@triton.jit
def _box_muller(r_radius, r_angle):
    radius = tl.sqrt(-2.0 * tl.log(_uniform_open(r_radius)))
    angle = 6.283185307179586 * _uniform_open(r_angle)
    return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def gaussian_quads(key, quad):
    """Four independent N(0, 1) fp32 blocks for the int64 counter block ``quad``."""
    lo = (quad & 0xFFFFFFFF).to(tl.uint32)
    hi = (quad >> 32).to(tl.uint32)
    zero = lo * 0
    r0, r1, r2, r3 = tl.philox(key, lo, hi, zero, zero)
    n0, n1 = _box_muller(r0, r1)
    n2, n3 = _box_muller(r2, r3)
    return n0, n1, n2, n3


@triton.jit
def gaussian_at(key, quad, lane, BLOCK_Q: tl.constexpr):
    """[BLOCK_Q, 4] tile of ξ: entry (q, k) is normal k of counter quad[q]."""
    n0, n1, n2, n3 = gaussian_quads(key, quad)
    k = lane[None, :]
    return tl.where(k == 0, n0[:, None],
                    tl.where(k == 1, n1[:, None], tl.where(k == 2, n2[:, None], n3[:, None])))


@triton.jit
def _noisy_scale_kernel(x_ptr, out_ptr, n, key, std, scale, BLOCK_Q: tl.constexpr):
    quad = tl.program_id(0).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    lane = tl.arange(0, 4)
    idx = quad[:, None] * 4 + lane[None, :]
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    xi = gaussian_at(key, quad, lane, BLOCK_Q)
    tl.store(out_ptr + idx, ((x + std * xi) * scale).to(out_ptr.dtype.element_ty), mask=mask)


def philox_key(seed: int, step: int, offset: int) -> int:
    """The 64-bit Philox key of one (seed, step, offset) stream (< 2⁶³, a signed int64)."""
    return derive_seed(seed, step, offset)


def noisy_scale_triton_blocks(summed: torch.Tensor, std: float, scale: float, *, seed: int,
                              step: int, offset: int = 0, block_quads: int = None) -> torch.Tensor:
    """The Triton noisy_scale with an explicit block size (tests vary it)."""
    block_quads = block_quads or _NOISE_QUADS
    flat = summed.contiguous().view(-1)
    out = torch.empty_like(flat)
    n = flat.numel()
    if n:
        grid = (triton.cdiv(n, 4 * block_quads),)
        _noisy_scale_kernel[grid](flat, out, n, philox_key(seed, step, offset), float(std),
                                  float(scale), BLOCK_Q=block_quads)
    return out.view(summed.shape)


@noisy_scale.register("triton")
def noisy_scale_triton(summed: torch.Tensor, std: float, scale: float, *, seed: int, step: int,
                       offset: int = 0) -> torch.Tensor:
    """Fused Philox noise + scale (fp32 arithmetic); float64 uses the torch reference."""
    if summed.dtype == torch.float64:
        return noisy_scale_torch(summed, std, scale, seed=seed, step=step, offset=offset)
    return noisy_scale_triton_blocks(summed, std, scale, seed=seed, step=step, offset=offset)


# ----------------------------------------------------------------------------
# Many tensors at once (the DP optimizer's step): in place, one launch per dtype
#
# noisy_scale_many(tensors, std, scale, seed=, step=, offsets=) sets every
# tensors[i] to noisy_scale(tensors[i], ..., offset=offsets[i]) — bit for bit
# the same values as one call per tensor with the same backend — but on CUDA
# it is one kernel launch over all tensors of a dtype instead of one launch
# (and its host overhead) per parameter. Each program handles BLOCK_Q quads of
# one tensor; a table maps program -> (tensor, first quad) and the tensors'
# addresses, Philox keys and sizes travel in one int64 table per call.
# ----------------------------------------------------------------------------
noisy_scale_many = define_op(
    "noisy_scale_many",
    "In place: t <- (t + std·ξ_t)·scale for every tensor t of a list, ξ_t exactly "
    "noisy_scale's stream with offset offsets[i] (CUDA: one launch per dtype).")


@noisy_scale_many.register("torch")
def noisy_scale_many_torch(tensors, std: float, scale: float, *, seed: int, step: int,
                           offsets) -> None:
    """One noisy_scale_torch per tensor. On the CPU the tensors are spread over
    torch.get_num_threads() Python threads, largest first: torch's normal generator is
    serial, and ATen ops release the GIL (2-core box, 3.1 M parameters: 27 -> 14.5 ms).
    Each tensor's values are exactly those of the serial loop."""
    def one(i):
        t = tensors[i]
        t.copy_(noisy_scale_torch(t, std, scale, seed=seed, step=step, offset=offsets[i]))

    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].numel())
    workers = torch.get_num_threads()
    if workers > 1 and len(tensors) > 1 and all(t.device.type == "cpu" for t in tensors):
        list(_cpu_pool(workers).map(one, order))  # list(): re-raises a worker's exception
    else:
        for i in order:
            one(i)


@functools.lru_cache(maxsize=None)
def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="vaultkern-noise")


@triton.jit
def _noisy_scale_many_kernel(meta_ptr, n_tensors, block_tensor_ptr, block_quad_ptr, std, scale,
                             BLOCK_Q: tl.constexpr, DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    first_quad = tl.load(block_quad_ptr + pid)
    ptr = tl.load(meta_ptr + t).to(tl.pointer_type(DTYPE))
    key = tl.load(meta_ptr + n_tensors + t)
    n = tl.load(meta_ptr + 2 * n_tensors + t)
    quad = first_quad + tl.arange(0, BLOCK_Q)
    lane = tl.arange(0, 4)
    idx = quad[:, None] * 4 + lane[None, :]
    mask = idx < n
    x = tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)
    xi = gaussian_at(key, quad, lane, BLOCK_Q)
    tl.store(ptr + idx, ((x + std * xi) * scale).to(DTYPE), mask=mask)


_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@functools.lru_cache(maxsize=16)
def _block_table(device: torch.device, sizes, block_quads: int):
    """(program -> tensor index, program -> first quad) on ``device``; depends only on sizes."""
    blocks_per_tensor = torch.tensor([triton.cdiv(n, 4 * block_quads) for n in sizes])
    tensor_of = torch.repeat_interleave(torch.arange(len(sizes)), blocks_per_tensor)
    first_block = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
    first_quad = (torch.arange(len(tensor_of)) - first_block[tensor_of]) * block_quads
    return tensor_of.to(device), first_quad.to(device)


@noisy_scale_many.register("triton")
def noisy_scale_many_triton(tensors, std: float, scale: float, *, seed: int, step: int,
                            offsets, block_quads: int = None) -> None:
    block_quads = block_quads or _NOISE_QUADS
    groups: dict = {}
    for t, offset in zip(tensors, offsets):
        if t.dtype in _TL_DTYPES and t.is_contiguous() and t.numel() > 0:
            groups.setdefault((t.device, t.dtype), []).append((t, offset))
        elif t.numel() > 0:  # float64 / non-contiguous: one call, same stream
            t.copy_(noisy_scale_triton(t.contiguous(), std, scale, seed=seed, step=step,
                                       offset=offset))
    for (device, dtype), items in groups.items():
        sizes = tuple(t.numel() for t, _ in items)
        tensor_of, first_quad = _block_table(device, sizes, block_quads)
        meta = torch.tensor([t.data_ptr() for t, _ in items]
                            + [philox_key(seed, step, offset) for _, offset in items]
                            + list(sizes), dtype=torch.int64)
        if device.type == "cuda":  # pinned: the upload does not wait for queued GPU work
            meta = meta.pin_memory()
        meta = meta.to(device, non_blocking=True)
        _noisy_scale_many_kernel[(len(tensor_of),)](
            meta, len(items), tensor_of, first_quad, float(std), float(scale),
            BLOCK_Q=block_quads, DTYPE=getattr(tl, _TL_DTYPES[dtype]))
