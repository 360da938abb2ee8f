"""Training corpora: the built-in synthetic records or the user's text files.

A corpus is split by *document* into training and held-out parts (the
held-out part is never trained on; the audit uses it for perplexity and as
the non-member set of the membership-inference test), then packed into rows
(:mod:`vaultkern.data.packing`). Canaries are planted into the training part only.

The split is a stable per-document hash: a document is held out when the hash
of (seed, its text) falls below the held-out fraction. Whether a document is
held out therefore depends on that document alone, so adding or removing one
document never moves another across the split (a seeded shuffle of the list
did: one added document moved dozens). Identical documents land on the same side.

User data (``--data PATH``):
  * ``.txt``   — documents separated by one or more blank lines;
  * ``.jsonl`` — one JSON object per line with a ``"text"`` field;
  * a folder   — every .txt and .jsonl file under it, in sorted path order.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence

import torch

from vaultkern.data.packing import pack_documents, row_owners
from vaultkern.data.synthetic import (Canary, make_canaries, plant_canaries, synthetic_records,
                                      synthetic_user_records)
from vaultkern.data.tokenizer import ByteTokenizer

TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class Corpus:
    train_documents: List[str]
    heldout_documents: List[str]
    canaries: List[Canary] = field(default_factory=list)
    description: str = ""          # public: goes on the model card
    private_description: str = ""  # where the data came from (path, digest): private report only
    train_users: Optional[List[int]] = None  # user of each training document (user-level DP)


def read_documents(path: str) -> List[str]:
    """Documents from a .txt file, a .jsonl file, or a folder of those."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                       for name in names if name.endswith(TEXT_SUFFIXES))
        if not files:
            raise ValueError(f"folder {path!r} contains no .txt or .jsonl files")
        return [doc for f in files for doc in read_documents(f)]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if path.endswith(".txt"):
        return [doc.strip() for doc in re.split(r"\n\s*\n", content) if doc.strip()]
    if path.endswith(".jsonl"):
        docs = []
        for line_no, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{line_no}: expected an object with a string \"text\" field")
            docs.append(record["text"])
        return docs
    raise ValueError(f"--data {path!r}: expected a .txt or .jsonl file or a folder of them")


def heldout_score(document: str, seed: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, document)."""
    digest = hashlib.sha256(f"vaultkern-split-{seed}\x00".encode("utf-8") + document.encode("utf-8"))
    return int.from_bytes(digest.digest()[:8], "big") / 2.0 ** 64


def split_documents(documents: Sequence[str], heldout_fraction: float, seed: int):
    """(train, held-out): a document is held out when its :func:`heldout_score` is below
    ``heldout_fraction``. About that fraction is held out; small corpora may get none."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    train, heldout = [], []
    for doc in documents:
        (heldout if heldout_score(doc, seed) < heldout_fraction else train).append(doc)
    return train, heldout


def builtin_corpus(num_records: int = 2000, seed: int = 0, heldout_fraction: float = 0.1,
                   canary_repetitions: Sequence[int] = (1, 4, 16),
                   canaries_per_repetition: int = 2) -> Corpus:
    records = synthetic_records(num_records, seed)
    train, heldout = split_documents(records, heldout_fraction, seed)
    canaries = make_canaries(seed, canary_repetitions, canaries_per_repetition) if canary_repetitions else []
    train = plant_canaries(train, canaries, seed)
    planted = sum(c.repetitions for c in canaries)
    return Corpus(train, heldout, canaries,
                  f"built-in synthetic records ({num_records} records, seed {seed}, "
                  f"{len(canaries)} canaries planted {planted} times)")


def split_users(documents: Sequence[str], users: Sequence, heldout_fraction: float, seed: int,
                canaries: Sequence[Canary]):
    """(train documents, their users, held-out documents): a user is held out whole when the
    hash of (seed, user) falls below the fraction; each canary is planted ``repetitions``
    times into the records of one training user (so user-level DP must protect all of its
    copies at once)."""
    held = {u for u in set(users) if heldout_score(f"user {u}", seed) < heldout_fraction}
    train = [(d, u) for d, u in zip(documents, users) if u not in held]
    if not train:
        raise ValueError("every user was held out; lower the held-out fraction or add users")
    heldout = [d for d, u in zip(documents, users) if u in held]
    rng = random.Random(f"plant-users-{seed}")
    owners = sorted({u for _, u in train}, key=str)
    for canary in canaries:
        train += [(canary.text, rng.choice(owners))] * canary.repetitions
    return [d for d, _ in train], [u for _, u in train], heldout


def builtin_user_corpus(num_records: int = 2000, seed: int = 0, heldout_fraction: float = 0.1,
                        canary_repetitions: Sequence[int] = (1, 4, 16),
                        canaries_per_repetition: int = 2, records_per_user: float = 4.0) -> Corpus:
    """The built-in records with users (several records per user, split by user)."""
    records, users = synthetic_user_records(num_records, seed, records_per_user)
    canaries = make_canaries(seed, canary_repetitions, canaries_per_repetition) if canary_repetitions else []
    train, train_users, heldout = split_users(records, users, heldout_fraction, seed, canaries)
    planted = sum(c.repetitions for c in canaries)
    return Corpus(train, heldout, canaries,
                  f"built-in synthetic records with users ({num_records} records of "
                  f"{len(set(users))} users, about {records_per_user:g} each, seed {seed}; "
                  f"{len(canaries)} canaries planted {planted} times, each into one user's "
                  "records)", train_users=train_users)


def read_user_documents(path: str):
    """(documents, users) of a .jsonl file whose every line has "text" and "user" fields."""
    if not path.endswith(".jsonl"):
        raise ValueError(f"--privacy-unit user with --data {path!r}: user ids come from a .jsonl "
                         "file with a 'user' field on every line")
    documents, users = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str) \
                    or not isinstance(record.get("user"), (str, int)):
                raise ValueError(f"{path}:{line_no}: expected an object with a string \"text\" "
                                 "and a string or integer \"user\" field")
            documents.append(record["text"])
            users.append(str(record["user"]))
    return documents, users


def file_corpus(path: str, seed: int = 0, heldout_fraction: float = 0.1,
                canary_repetitions: Optional[Sequence[int]] = None,
                with_users: bool = False) -> Corpus:
    """The user's documents; canaries are planted only when canary_repetitions is given.
    ``with_users``: a .jsonl with a "user" field, split by user (:func:`split_users`)."""
    documents, users = read_user_documents(path) if with_users else (read_documents(path), None)
    if len(documents) < 2:
        raise ValueError(f"--data {path!r} holds {len(documents)} document(s); need at least 2 "
                         "(separate documents in a .txt file by blank lines)")
    digest = hashlib.sha256("\x00".join(documents).encode("utf-8")).hexdigest()[:16]
    canaries = make_canaries(seed, canary_repetitions) if canary_repetitions else []
    train_users = None
    if with_users:
        train, train_users, heldout = split_users(documents, users, heldout_fraction, seed, canaries)
    else:
        train, heldout = split_documents(documents, heldout_fraction, seed)
        train = plant_canaries(train, canaries, seed)
    planted = f", {len(canaries)} canaries planted" if canaries else ""
    # a path can name the data ("hiv_clinic_notes/") and a digest confirms a guess of it
    return Corpus(train, heldout, canaries, f"user documents (--data){planted}",
                  f"{os.path.abspath(path)} ({len(documents)} documents, sha256 {digest}…)",
                  train_users)


@dataclass
class PackedCorpus:
    """What training and the audit read: packed rows, held-out rows, canaries."""
    train_rows: torch.Tensor     # [N, seq_len + 1]
    heldout_rows: torch.Tensor   # [M, seq_len + 1]
    canaries: List[Canary]
    description: str             # public
    seq_len: int
    max_rows_per_document: int   # k: the most training rows one document spans
    num_train_documents: int
    num_heldout_documents: int
    private_description: str = ""
    train_row_users: Optional[torch.Tensor] = None  # [N] user of each training row (user-level)

    @classmethod
    def from_corpus(cls, corpus: Corpus, seq_len: int,
                    tokenizer: ByteTokenizer = ByteTokenizer()) -> "PackedCorpus":
        train_rows, per_document = pack_documents(corpus.train_documents, seq_len, tokenizer)
        heldout_rows, _ = pack_documents(corpus.heldout_documents, seq_len, tokenizer)
        users = None
        if corpus.train_users is not None:  # users as 0..U-1 (file ids may be strings)
            index = {u: i for i, u in enumerate(sorted(set(corpus.train_users), key=str))}
            users = torch.as_tensor(row_owners(corpus.train_documents,
                                               [index[u] for u in corpus.train_users],
                                               per_document))
        return cls(train_rows, heldout_rows, list(corpus.canaries), corpus.description, seq_len,
                   max(per_document, default=0), len(corpus.train_documents),
                   len(corpus.heldout_documents), corpus.private_description, users)

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        blob = {f.name: getattr(self, f.name) for f in fields(self)}
        blob.update(train_rows=self.train_rows.to(torch.int32),
                    heldout_rows=self.heldout_rows.to(torch.int32),
                    canaries=[c.to_dict() for c in self.canaries])
        torch.save(blob, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "PackedCorpus":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        blob.update(train_rows=blob["train_rows"].long(), heldout_rows=blob["heldout_rows"].long(),
                    canaries=[Canary(**c) for c in blob["canaries"]])
        return cls(**blob)
