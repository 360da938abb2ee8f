"""``train --privacy-unit user``: the rows, units and card entries of a user-level run.

* ULS (``--user-sampling uls``, the default): the units are users. Each step Poisson-
  samples users at q = batch_size / U; a sampled user contributes at most
  ``--max-rows-per-user`` k of its sequences and is clipped as one group
  (:mod:`vaultkern.privacy.user_sampling`). The guarantee is the accounted one, per user.
* ELS (``--user-sampling els``): each user keeps at most m = ``--max-rows-per-user`` of its
  sequences (those of lowest content hash: which rows a user keeps depends on that user's
  rows alone), then sequences are Poisson-sampled and clipped one by one. The accounted
  guarantee is per sequence; the per-user ε follows by group privacy over m sequences.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from vaultkern.privacy.user_sampling import cap_rows_per_user, dense_users


def user_sampling(args) -> Optional[str]:
    """"uls", "els", or None for a sequence-level run (also for runs saved before the flag)."""
    if getattr(args, "privacy_unit", "sequence") != "user":
        return None
    return args.user_sampling


@dataclass
class UserRows:
    row_users: Optional[np.ndarray]     # ULS: user index of each row; ELS: None
    units: int                          # N for the plan: users (ULS) or rows (ELS)
    num_users: int
    max_rows_per_user: int              # k (ULS: per step) or the largest count kept (ELS)


def row_hash(row: torch.Tensor) -> float:
    digest = hashlib.sha256(row.to(torch.int32).numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def user_rows(data, args) -> UserRows:
    """The units of a user-level run from a PackedCorpus with users (for ELS already capped
    by :func:`apply_els_cap` when the data was built)."""
    if data.train_row_users is None:
        raise ValueError("--privacy-unit user: this data has no users (the run directory's "
                         "data was packed without them)")
    users, num_users = dense_users(data.train_row_users.numpy())
    if args.user_sampling == "uls":
        return UserRows(users, num_users, num_users, args.max_rows_per_user)
    return UserRows(None, len(users), num_users, int(np.bincount(users).max()))


def apply_els_cap(data, args):
    """ELS: the training data *is* the capped rows (saved so, so that the audit's members are
    the rows trained on and a resume re-applies nothing new); other runs: unchanged."""
    if user_sampling(args) != "els" or data.train_row_users is None:
        return data
    users, _ = dense_users(data.train_row_users.numpy())
    kept = torch.as_tensor(cap_rows_per_user(users, args.max_rows_per_user,
                                             [row_hash(r) for r in data.train_rows]))
    data.train_rows, data.train_row_users = data.train_rows[kept], data.train_row_users[kept]
    return data


def privacy_unit(mode: str, seq_len: int, k: int) -> str:
    if mode == "uls":
        return (f"one user: all of their sequences of {seq_len} tokens (at most {k} of them "
                "used per step)")
    return (f"one sequence of {seq_len} tokens; a user has at most {k} sequences in the "
            f"training data, so the per-user guarantee follows by group privacy with k = {k}")


def card_entries(mode: str, users: UserRows, seq_len: int, user_epsilon: Optional[float],
                 delta: float) -> dict:
    """What the model card says of the user-level unit (merged into its privacy section)."""
    entries = {"privacy_unit": privacy_unit(mode, seq_len, users.max_rows_per_user),
               "user_sampling": mode, "num_users": users.num_users,
               "max_sequences_per_user": users.max_rows_per_user}
    if mode == "uls":
        entries.update(
            neighbouring_datasets="add or remove one user (all of their records)",
            sampling=(f"Poisson over users (ULS): each user joins a step with probability q and "
                      f"contributes at most {users.max_rows_per_user} of its sequences (a random "
                      "subset, fresh each step), whose summed gradient is clipped to C as one"),
            dataset_size_note="U, the number of training users, sets q = B̄/U and is treated as "
                              "public (it is not protected by the guarantee)")
    else:
        entries["user_level"] = {
            "k": users.max_rows_per_user, "epsilon": user_epsilon, "delta": delta,
            "derivation": "group privacy over the k sequences of one user (the mixture-of-"
                          "Gaussians bound for groups under Poisson sampling, Ganesh 2024, "
                          "composed by dp-accounting's PLD accountant); the per-user cap is "
                          "applied before training, so k holds for every user"}
    return entries
