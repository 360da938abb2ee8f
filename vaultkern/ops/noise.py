"""Gaussian noise for DP-SGD, fused with the 1/B̄ scaling (DESIGN.md §4).

    noisy_scale(summed, std, scale, seed=, step=, offset=) -> (summed + std·ξ)·scale
    secure_noisy_scale(summed, std, scale)                  -> the same, key from os.urandom

One generator for every path: ChaCha20 (RFC 8439, 256-bit key) in counter mode, 53-bit
uniforms, and each N(0, 1) sample the sum of four independent Box–Muller draws ÷ 2
(the floating-point mitigation; |ξ| ≤ 17.1, far beyond any δ: csrc/chacha20.h has the
argument). Reproducible and secure mode differ only in where the key comes from:

* reproducible: a 256-bit master key SHA-256(seed) (:func:`noise_key`; DPOptimizer draws
  a 256-bit seed from ``os.urandom`` unless one is given), the step's key derived from it
  by ChaCha20 (the step in the nonce), and element j of a parameter is sample offset + j
  of that step's stream: ξ depends only on (seed, step, offset + j), never on launch
  configuration, and counters never repeat across parameters (disjoint offsets) or steps
  (distinct keys);
* secure: a fresh key and nonce from ``os.urandom`` for every call.

Implementations of the one stream: the compiled extension (CPU, and CUDA when built with
it), a Triton kernel (CUDA tensors when the extension has no CUDA; also the generator of
the fused optimizer steps) and a torch reference (int64/float64 tensor arithmetic: slow,
the ground truth for tests). Cost on the 2-core CPU box: 3.1 M elements in 36 ms with the
extension's AVX-512 path (88 ms with its AVX2 path on the same Intel Xeon; 55 ms AVX2 and
172 ms scalar on the AMD EPYC of the fourth session; the earlier torch.randn stream, 24-bit
uniforms and a 32-bit seed, took 27 ms).
"""
from __future__ import annotations

import functools
import hashlib
import os

import torch

from vaultkern.backend import define_op, extension

noisy_scale = define_op("noisy_scale", __doc__, cuda_default="cpp")

# ---------------------------------------------------------------------------------------
# ChaCha20 in torch (the reference; csrc/chacha20.h is the same arithmetic)

_M32 = 0xFFFFFFFF
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_NOISE_DOMAIN = 0x31657369  # ASCII "ise1": nonce word 2 of the step-key derivation
_ROUNDS = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
           (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14))


def _rotl(x: torch.Tensor, n: int) -> torch.Tensor:
    return ((x << n) | (x >> (32 - n))) & _M32


def chacha20_blocks(key_words, nonce_words, index: torch.Tensor) -> torch.Tensor:
    """[n, 16] int64 words of blocks ``index`` (int64 [n]) of the (key, nonce) stream: the
    low 32 bits of an index are the RFC 8439 block counter, the high bits are added to nonce
    word 0 (csrc/chacha20.h, block_at)."""
    index = index.to(torch.int64)
    const = lambda w: torch.full_like(index, int(w) & _M32)  # noqa: E731
    state = ([const(w) for w in _SIGMA] + [const(w) for w in key_words]
             + [index & _M32, (int(nonce_words[0]) + (index >> 32)) & _M32,
                const(nonce_words[1]), const(nonce_words[2])])
    x = list(state)
    for _ in range(10):
        for a, b, c, d in _ROUNDS:
            x[a] = (x[a] + x[b]) & _M32
            x[d] = _rotl(x[d] ^ x[a], 16)
            x[c] = (x[c] + x[d]) & _M32
            x[b] = _rotl(x[b] ^ x[c], 12)
            x[a] = (x[a] + x[b]) & _M32
            x[d] = _rotl(x[d] ^ x[a], 8)
            x[c] = (x[c] + x[d]) & _M32
            x[b] = _rotl(x[b] ^ x[c], 7)
    return torch.stack([(x[i] + state[i]) & _M32 for i in range(16)], dim=-1)


def _uniform(lo: torch.Tensor, hi: torch.Tensor, open_zero: bool) -> torch.Tensor:
    bits = (hi << 21) | (lo >> 11)  # the top 53 bits of the 64-bit word hi:lo
    return (bits + 1 if open_zero else bits).to(torch.float64) * 2.0 ** -53


def gaussians_of_blocks(words: torch.Tensor) -> torch.Tensor:
    """[n, 2] float64: the two samples of each block (four pairs: cos halves, sin halves)."""
    w = words.view(-1, 4, 4)  # 4 Box–Muller pairs of 4 words each
    r = torch.sqrt(-2.0 * torch.log(_uniform(w[..., 0], w[..., 1], True)))
    theta = 2.0 * torch.pi * _uniform(w[..., 2], w[..., 3], False)
    return 0.5 * torch.stack([(r * torch.cos(theta)).sum(1), (r * torch.sin(theta)).sum(1)], -1)


def noise_key(seed: int) -> bytes:
    """The 256-bit master key of a reproducible seed (any int): SHA-256 of its decimal form."""
    return hashlib.sha256(f"vaultkern-noise-key-v2:{int(seed)}".encode()).digest()


def _words(key: bytes):
    return [int.from_bytes(key[4 * i: 4 * i + 4], "little") for i in range(len(key) // 4)]


@functools.lru_cache(maxsize=64)
def step_key(seed: int, step: int):
    """The 8 key words of step ``step``'s stream: block 0 of ChaCha20(master, nonce = (step,
    domain)), as csrc/chacha20.h derive_step_key."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    nonce = (step & _M32, (step >> 32) & _M32, _NOISE_DOMAIN)
    words = chacha20_blocks(_words(noise_key(seed)), nonce, torch.zeros(1, dtype=torch.int64))
    return tuple(int(v) for v in words[0, :8])


@noisy_scale.register("torch")
def noisy_scale_torch(summed: torch.Tensor, std: float, scale: float, *, seed: int, step: int,
                      offset: int = 0) -> torch.Tensor:
    n = summed.numel()
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    first, last = offset // 2, (offset + n - 1) // 2 if n else offset // 2 - 1
    blocks = torch.arange(first, last + 1, dtype=torch.int64, device=summed.device)
    xi = gaussians_of_blocks(chacha20_blocks(step_key(seed, step), (0, 0, 0), blocks))
    xi = xi.reshape(-1)[offset - 2 * first: offset - 2 * first + n].view(summed.shape)
    return ((summed.double() + std * xi) * scale).to(summed.dtype)


def _noisy_scale_cpp(fn, summed: torch.Tensor, std: float, scale: float, *, seed: int, step: int,
                     offset: int = 0) -> torch.Tensor:
    if summed.is_cuda and not _extension_has_cuda():  # the same stream, fused in Triton
        fallback = noisy_scale_triton if noisy_scale.available("triton") else noisy_scale_torch
        return fallback(summed, std, scale, seed=seed, step=step, offset=offset)
    key = torch.frombuffer(bytearray(noise_key(seed)), dtype=torch.uint8)
    return fn(summed, float(std), float(scale), key, int(step), int(offset))


@functools.lru_cache(maxsize=None)
def _extension_has_cuda() -> bool:
    ext = extension()
    return ext is not None and bool(ext.build_info()["cuda"])


noisy_scale.register_cpp("noisy_scale", _noisy_scale_cpp)


def noisy_scale_many(tensors, std: float, scale: float, *, seed: int, step: int, offsets,
                     backend=None) -> None:
    """In place: t <- noisy_scale(t, std, scale, seed, step, offset) for every tensor of a
    list, with its own offset (the DP optimizer's step)."""
    for t, offset in zip(tensors, offsets):
        if t.numel():
            t.copy_(noisy_scale(t, std, scale, seed=seed, step=step, offset=offset,
                                backend=backend))


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


# ---------------------------------------------------------------------------------------
# Triton: the same stream, fused with the scaling (and, in fused_optimizer, the update)
#
# One program handles BLOCK consecutive ChaCha20 blocks of the step's stream; block b
# holds samples 2b and 2b + 1, i.e. elements 2b - offset and 2b + 1 - offset of the
# tensor: a [BLOCK, 2] tile. The uniforms, Box–Muller and the noisy value are computed
# in float64 and rounded once to the output dtype, as the extension does, so ξ[j]
# depends on (seed, step, offset + j) only, never on the block size or the grid.
# ---------------------------------------------------------------------------------------
from vaultkern.ops._triton import interpreted, tl, triton  # noqa: E402

NOISE_BLOCKS = 1024 if interpreted() else 128  # ChaCha20 blocks (2 samples each) per program


@triton.jit
def _tl_rotl(x, n: tl.constexpr):
    return (x << n) | (x >> (32 - n))


@triton.jit
def _quarter_round(a, b, c, d):
    a = a + b
    d = _tl_rotl(d ^ a, 16)
    c = c + d
    b = _tl_rotl(b ^ c, 12)
    a = a + b
    d = _tl_rotl(d ^ a, 8)
    c = c + d
    b = _tl_rotl(b ^ c, 7)
    return a, b, c, d


@triton.jit
def _tl_uniform(lo, hi, OPEN_ZERO: tl.constexpr):
    bits = (hi.to(tl.uint64) << 21) | (lo.to(tl.uint64) >> 11)
    if OPEN_ZERO:
        bits = bits + 1
    return bits.to(tl.float64) * 1.1102230246251565e-16  # 2^-53


@triton.jit
def _tl_box_muller(w0, w1, w2, w3):
    r = tl.sqrt(-2.0 * tl.log(_tl_uniform(w0, w1, True)))
    theta = 6.283185307179586 * _tl_uniform(w2, w3, False)
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def gaussian_blocks(key_ptr, block):
    """The two samples (float64) of each ChaCha20 block ``block`` (int64) of the
    zero-nonce stream keyed by the 8 words at ``key_ptr`` (csrc/chacha20.h)."""
    lo = (block & 0xFFFFFFFF).to(tl.uint32)
    zero = lo * 0
    s0, s1, s2, s3 = zero + 0x61707865, zero + 0x3320646E, zero + 0x79622D32, zero + 0x6B206574
    s4 = zero + tl.load(key_ptr + 0).to(tl.uint32)
    s5 = zero + tl.load(key_ptr + 1).to(tl.uint32)
    s6 = zero + tl.load(key_ptr + 2).to(tl.uint32)
    s7 = zero + tl.load(key_ptr + 3).to(tl.uint32)
    s8 = zero + tl.load(key_ptr + 4).to(tl.uint32)
    s9 = zero + tl.load(key_ptr + 5).to(tl.uint32)
    s10 = zero + tl.load(key_ptr + 6).to(tl.uint32)
    s11 = zero + tl.load(key_ptr + 7).to(tl.uint32)
    s12, s13 = lo, (block >> 32).to(tl.uint32)
    x0, x1, x2, x3, x4, x5, x6, x7 = s0, s1, s2, s3, s4, s5, s6, s7
    x8, x9, x10, x11, x12, x13, x14, x15 = s8, s9, s10, s11, s12, s13, zero, zero
    for _ in range(10):
        x0, x4, x8, x12 = _quarter_round(x0, x4, x8, x12)
        x1, x5, x9, x13 = _quarter_round(x1, x5, x9, x13)
        x2, x6, x10, x14 = _quarter_round(x2, x6, x10, x14)
        x3, x7, x11, x15 = _quarter_round(x3, x7, x11, x15)
        x0, x5, x10, x15 = _quarter_round(x0, x5, x10, x15)
        x1, x6, x11, x12 = _quarter_round(x1, x6, x11, x12)
        x2, x7, x8, x13 = _quarter_round(x2, x7, x8, x13)
        x3, x4, x9, x14 = _quarter_round(x3, x4, x9, x14)
    c0, n0 = _tl_box_muller(x0 + s0, x1 + s1, x2 + s2, x3 + s3)
    c1, n1 = _tl_box_muller(x4 + s4, x5 + s5, x6 + s6, x7 + s7)
    c2, n2 = _tl_box_muller(x8 + s8, x9 + s9, x10 + s10, x11 + s11)
    c3, n3 = _tl_box_muller(x12 + s12, x13 + s13, x14, x15)
    return 0.5 * (c0 + c1 + c2 + c3), 0.5 * (n0 + n1 + n2 + n3)


@triton.jit
def noise_tile(key_ptr, first_block, offset, BLOCK: tl.constexpr):
    """(element index [BLOCK, 2], ξ float64 [BLOCK, 2]) for blocks first_block + [0, BLOCK)
    of a tensor whose element 0 is sample ``offset``; mask the index with 0 <= idx < n."""
    block = first_block + tl.arange(0, BLOCK).to(tl.int64)
    slot = tl.arange(0, 2)
    idx = 2 * block[:, None] + slot[None, :] - offset
    xi_cos, xi_sin = gaussian_blocks(key_ptr, block)
    return idx, tl.where(slot[None, :] == 0, xi_cos[:, None], xi_sin[:, None])


@triton.jit
def _noisy_scale_kernel(x_ptr, out_ptr, n, key_ptr, offset, std, scale, BLOCK: tl.constexpr):
    first = offset // 2 + tl.program_id(0).to(tl.int64) * BLOCK
    idx, xi = noise_tile(key_ptr, first, offset, BLOCK)
    mask = (idx >= 0) & (idx < n)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float64)
    tl.store(out_ptr + idx, ((x + std * xi) * scale).to(out_ptr.dtype.element_ty), mask=mask)


def noise_blocks(n: int, offset: int) -> int:
    """ChaCha20 blocks that elements [0, n) of a tensor at sample ``offset`` span."""
    return (offset + n - 1) // 2 - offset // 2 + 1 if n else 0


@functools.lru_cache(maxsize=64)
def step_key_tensor(seed: int, step: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(step_key(seed, step), dtype=torch.int64, device=device)


@noisy_scale.register("triton")
def noisy_scale_triton(summed: torch.Tensor, std: float, scale: float, *, seed: int, step: int,
                       offset: int = 0, blocks_per_program: int = None) -> torch.Tensor:
    """Fused ChaCha20 noise + scale (``blocks_per_program``: tests vary it)."""
    block = blocks_per_program or NOISE_BLOCKS
    flat = summed.contiguous().view(-1)
    out = torch.empty_like(flat)
    n = flat.numel()
    if n:
        grid = (triton.cdiv(noise_blocks(n, offset), block),)
        _noisy_scale_kernel[grid](flat, out, n, step_key_tensor(seed, step, flat.device),
                                  int(offset), float(std), float(scale), BLOCK=block)
    return out.view(summed.shape)
