"""The Poisson sampler's randomness: the noise's generator, ChaCha20 (issue 17).

Knowing the sampler's draws removes the amplification by sampling, so they come from the
same kind of stream as the noise (vaultkern/ops/noise.py): ChaCha20 with a 256-bit key,
53-bit uniforms. Reproducible and secure samplers differ only in where the key comes from
(SHA-256 of a seed, or ``os.urandom``). Batch ``draw`` of a sampler (counted over its whole
life, never reset by a new pass or a resume) reads the stream whose nonce is
(draw, SAMPLER_DOMAIN): uniform j is the top 53 bits of the little-endian 64-bit word j of
that stream, so no two batches, and no two uses within a batch (the Bernoulli decisions
take words [0, N), the truncation keys the words after them), share a word.

The compiled extension's ``chacha20_stream`` produces the bytes; without it a torch
reference of the same block function does (slower, identical output).
"""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from vaultkern.backend import extension

SAMPLER_DOMAIN = 0x706D6173  # ASCII "samp": nonce word 2, apart from the noise's streams
_WORDS_PER_BLOCK = 8          # 64-byte block = 8 uniforms


def sampler_key(seed: int) -> bytes:
    """The 256-bit key of a reproducible sampler seed (any int)."""
    return hashlib.sha256(f"vaultkern-sampler-key-v1:{int(seed)}".encode()).digest()


def _nonce(draw: int) -> bytes:
    if not 0 <= draw < 1 << 64:
        raise ValueError(f"draw {draw} outside [0, 2^64)")
    return (draw.to_bytes(8, "little") + SAMPLER_DOMAIN.to_bytes(4, "little"))


def _words_reference(key: bytes, nonce: bytes, first_block: int, blocks: int) -> np.ndarray:
    from vaultkern.ops.noise import chacha20_blocks
    key_words = [int.from_bytes(key[4 * i: 4 * i + 4], "little") for i in range(8)]
    nonce_words = [int.from_bytes(nonce[4 * i: 4 * i + 4], "little") for i in range(3)]
    index = torch.arange(first_block, first_block + blocks, dtype=torch.int64)
    words = chacha20_blocks(key_words, nonce_words, index)  # [blocks, 16] 32-bit words
    lo, hi = words[:, 0::2].numpy().astype(np.uint64), words[:, 1::2].numpy().astype(np.uint64)
    return (lo | (hi << np.uint64(32))).reshape(-1)


def _words(key: bytes, nonce: bytes, first_block: int, blocks: int, reference: bool) -> np.ndarray:
    ext = None if reference else extension()
    if ext is None or not hasattr(ext, "chacha20_stream"):
        return _words_reference(key, nonce, first_block, blocks)
    stream = ext.chacha20_stream(torch.frombuffer(bytearray(key), dtype=torch.uint8),
                                 torch.frombuffer(bytearray(nonce), dtype=torch.uint8),
                                 first_block, 64 * blocks)
    return stream.numpy().view("<u8").astype(np.uint64)


class SamplerStream:
    """Uniforms in [0, 1) (53 bits each) of batch ``draw``, words [start, start + count)."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError(f"a sampler key has 32 bytes, got {len(key)}")
        self.key = bytes(key)

    @classmethod
    def from_seed(cls, seed: int) -> "SamplerStream":
        return cls(sampler_key(seed))

    @classmethod
    def fresh(cls) -> "SamplerStream":
        return cls(os.urandom(32))

    def uniforms(self, draw: int, start: int, count: int, reference: bool = False) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=np.float64)
        first, last = start // _WORDS_PER_BLOCK, (start + count - 1) // _WORDS_PER_BLOCK
        words = _words(self.key, _nonce(int(draw)), first, last - first + 1, reference)
        words = words[start - first * _WORDS_PER_BLOCK:][:count]
        return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
