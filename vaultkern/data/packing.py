"""Packing documents into fixed-length training sequences.

Each document becomes ``BOS bytes EOS``; the documents are concatenated into
one stream and cut into rows of ``seq_len + 1`` tokens (the model reads the
first ``seq_len`` and predicts the last ``seq_len``). Rows do not overlap, so
one row = one privacy unit (sequence-level DP, as in VaultGemma); a document
may straddle two rows. The last row is padded with PAD, whose targets are
ignored.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from vaultkern.data.tokenizer import ByteTokenizer
from vaultkern.models.decoder import IGNORE_INDEX


def token_stream(documents: Sequence[str], tokenizer: ByteTokenizer = ByteTokenizer()) -> np.ndarray:
    """All documents as one int64 stream: BOS doc_1 EOS BOS doc_2 EOS ..."""
    parts: List[np.ndarray] = []
    bos = np.array([tokenizer.BOS], dtype=np.int64)
    eos = np.array([tokenizer.EOS], dtype=np.int64)
    for doc in documents:
        parts += [bos, np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int64), eos]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def pack_documents(documents: Sequence[str], seq_len: int,
                   tokenizer: ByteTokenizer = ByteTokenizer()) -> torch.Tensor:
    """Rows [N, seq_len + 1] of token ids (int64); the last row is PAD-filled if short."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stream = token_stream(documents, tokenizer)
    row_len = seq_len + 1
    num_rows = -(-len(stream) // row_len)
    padded = np.full(num_rows * row_len, tokenizer.PAD, dtype=np.int64)
    padded[: len(stream)] = stream
    rows = torch.from_numpy(padded).view(num_rows, row_len)
    if num_rows and len(stream) % row_len == 1:  # a last row with one real token predicts nothing
        rows = rows[:-1]
    return rows


def inputs_and_targets(rows: torch.Tensor,
                       pad_id: int = ByteTokenizer.PAD) -> Tuple[torch.Tensor, torch.Tensor]:
    """Model inputs rows[:, :-1] and next-token targets rows[:, 1:] (PAD targets -> -100)."""
    inputs = rows[:, :-1]
    targets = rows[:, 1:].clone()
    targets[targets == pad_id] = IGNORE_INDEX
    return inputs, targets
