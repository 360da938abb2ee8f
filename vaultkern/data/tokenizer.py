"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then three specials.

Nothing to download and no unknown tokens: any text round-trips exactly.
"""
from __future__ import annotations

from typing import Iterable, List


class ByteTokenizer:
    BOS = 256
    EOS = 257
    PAD = 258
    vocab_size = 259

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = list(text.encode("utf-8"))
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids: Iterable[int], stop_at_eos: bool = False) -> str:
        """Bytes back to text; special tokens are dropped (or end the text, stop_at_eos)."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.EOS and stop_at_eos:
                break
            if 0 <= i < 256:
                out.append(i)
            elif not (self.BOS <= i <= self.PAD):
                raise ValueError(f"token id {i} is outside the byte vocabulary (0..{self.vocab_size - 1})")
        return out.decode("utf-8", errors="replace")
