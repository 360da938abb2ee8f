"""Bounded batching for the torch reference ops (keeps transient memory small)."""
from __future__ import annotations

from typing import Iterator

# Largest transient tensor (elements) a torch reference op forms per chunk.
CHUNK_ELEMENTS = 1 << 24


def batch_chunks(batch: int, elements_per_example: int) -> Iterator[slice]:
    """Slices over the batch so that chunk * elements_per_example <= CHUNK_ELEMENTS."""
    step = max(1, CHUNK_ELEMENTS // max(1, elements_per_example))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))
