"""Packing documents into training rows, one document per row group.

A document becomes ``BOS tokens EOS`` (L tokens; bytes with the byte tokenizer) and
gets rows of its own: row j holds its tokens [j·T, j·T + T + 1), so consecutive rows
of a document share one token and every token after BOS is predicted exactly once;
the last row is padded with PAD, whose targets are ignored. Documents are never packed
together. That is what makes the privacy unit mean something: adding or
removing one document adds or removes exactly its own ⌈(L − 1)/T⌉ rows and
leaves every other row as it was (with concatenate-and-cut packing one short
document shifted every later row). A row-level guarantee then covers a
document by group privacy with k = the most rows a document spans.

Rows are grouped by document in the order of a hash of the document's text, so
the packed rows do not depend on the order of the input list and the rows of
D ∪ {d} are those of D with d's rows inserted in one place.
"""
from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple

import numpy as np
import torch

from vaultkern.data.tokenizer import ByteTokenizer
from vaultkern.models.decoder import IGNORE_INDEX


def document_tokens(document: str, tokenizer: ByteTokenizer = ByteTokenizer()) -> np.ndarray:
    """``BOS tokens EOS`` as int64 (any tokenizer with the byte tokenizer's ``encode``)."""
    return np.asarray(tokenizer.encode(document, bos=True, eos=True), dtype=np.int64)


def rows_of_document(document: str, seq_len: int,
                     tokenizer: ByteTokenizer = ByteTokenizer()) -> np.ndarray:
    """The rows [⌈(L − 1)/T⌉, T + 1] of one document (none if it has fewer than 2 tokens)."""
    tokens = document_tokens(document, tokenizer)
    num_rows = max(0, -(-(len(tokens) - 1) // seq_len))
    rows = np.full((num_rows, seq_len + 1), tokenizer.PAD, dtype=np.int64)
    for j in range(num_rows):
        piece = tokens[j * seq_len: j * seq_len + seq_len + 1]
        rows[j, :len(piece)] = piece
    return rows


def document_order_key(document: str) -> bytes:
    """Content-only sort key: a document's place never depends on the other documents."""
    return hashlib.sha256(document.encode("utf-8")).digest()


def pack_documents(documents: Sequence[str], seq_len: int,
                   tokenizer: ByteTokenizer = ByteTokenizer()) -> Tuple[torch.Tensor, List[int]]:
    """(rows [N, seq_len + 1] int64, rows per document in row order).

    Documents appear in :func:`document_order_key` order; duplicates are kept (each copy is
    a document of its own)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ordered = sorted(documents, key=document_order_key)
    parts = [rows_of_document(doc, seq_len, tokenizer) for doc in ordered]
    counts = [len(p) for p in parts]
    if not parts:
        return torch.zeros(0, seq_len + 1, dtype=torch.int64), counts
    return torch.from_numpy(np.concatenate(parts)), counts


def inputs_and_targets(rows: torch.Tensor,
                       pad_id: int = ByteTokenizer.PAD) -> Tuple[torch.Tensor, torch.Tensor]:
    """Model inputs rows[:, :-1] and next-token targets rows[:, 1:] (PAD targets -> -100)."""
    inputs = rows[:, :-1]
    targets = rows[:, 1:].clone()
    targets[targets == pad_id] = IGNORE_INDEX
    return inputs, targets


def row_owners(documents: Sequence[str], owners: Sequence[int], counts: Sequence[int]) -> np.ndarray:
    """The owner (e.g. user) of each row of ``pack_documents(documents, ...)``, given the rows
    per document it returned: documents in the same order, ties (identical documents, hence
    identical rows and counts) broken by owner."""
    if len(owners) != len(documents) or len(counts) != len(documents):
        raise ValueError(f"{len(owners)} owners and {len(counts)} counts for {len(documents)} "
                         "documents")
    order = sorted(range(len(documents)), key=lambda i: (document_order_key(documents[i]), owners[i]))
    return np.repeat(np.asarray([owners[i] for i in order], dtype=np.int64), counts)
