"""User-level privacy: the privacy unit is a user, not a sequence (issue 16).

Two ways to bound what one user's many rows (one patient's notes, one customer's tickets)
can change, after Charles et al. 2024 ("Fine-tuning large language models with user-level
differential privacy"):

* **ULS** (user-level sampling, :class:`UserPoissonSampler`): every step each of the U
  users joins independently with probability q; a sampled user contributes at most k of
  its rows (a uniformly random subset of them when it has more, fresh every step). The
  rows of one user form one clipping group (``vaultkern.set_group_ids``): the engine clips
  the user's *summed* gradient to C, so one user changes the clipped sum by at most C, and
  the step is exactly a Poisson-sampled Gaussian over users (q, σ): the accountant's
  ordinary event, with U as the number of units and B̄ = q·U users as the divisor.
* **ELS** (example-level sampling, :func:`cap_rows_per_user`): rows are Poisson-sampled
  and clipped one by one as usual, after each user is cut to at most m rows of the
  dataset; the per-row guarantee then gives a per-user one by group privacy over m rows
  (``vaultkern.run.budget.document_epsilon``: the tight mixture-of-Gaussians bound for a
  group of m Poisson-sampled rows).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from vaultkern.privacy.sampling import PoissonBatchSampler


def dense_users(row_users: Sequence[int]) -> Tuple[np.ndarray, int]:
    """(user index in [0, U) of each row, U) for arbitrary user ids."""
    ids = np.asarray(row_users)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(f"row_users must be a non-empty 1-d sequence, got shape {ids.shape}")
    _, dense = np.unique(ids, return_inverse=True)
    return dense.astype(np.int64), int(dense.max()) + 1


class UserPoissonSampler(PoissonBatchSampler):
    """ULS: Poisson sampling of users at rate q, at most ``max_rows_per_user`` rows each.

    ``row_users[i]`` is the user of row i. Batches are index lists grouped by user (users in
    ascending order, each user's rows ascending); :meth:`group_ids` gives the clipping group
    of each index of a batch. Randomness, resume and state as :class:`PoissonBatchSampler`
    (the units are users): the Bernoulli decisions take stream words [0, U), the choice of a
    sampled user's rows the words U + (the user's first row in user order) onward.
    """

    def __init__(self, row_users: Sequence[int], sample_rate: float, steps: int,
                 max_rows_per_user: int, seed: Optional[int] = None, secure: bool = False):
        self.row_users, num_users = dense_users(row_users)
        super().__init__(num_users, sample_rate, steps, seed=seed, secure=secure)
        if int(max_rows_per_user) != max_rows_per_user or max_rows_per_user < 1:
            raise ValueError(f"max_rows_per_user={max_rows_per_user}: must be an integer >= 1")
        self.max_rows_per_user = int(max_rows_per_user)
        order = np.argsort(self.row_users, kind="stable")
        counts = np.bincount(self.row_users, minlength=num_users)
        self.first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.rows_of = np.split(order, np.cumsum(counts)[:-1])

    @property
    def num_users(self) -> int:
        return self.num_samples

    def sample_batch(self) -> List[int]:
        draw, self.draws = self.draws, self.draws + 1
        users = np.nonzero(self.stream.uniforms(draw, 0, self.num_users) < self.sample_rate)[0]
        chosen = []
        for u in users:
            rows = self.rows_of[u]
            if len(rows) > self.max_rows_per_user:
                keys = self.stream.uniforms(draw, self.num_users + int(self.first[u]), len(rows))
                rows = np.sort(rows[np.argsort(keys, kind="stable")[: self.max_rows_per_user]])
            chosen.extend(rows.tolist())
        return chosen

    def group_ids(self, indices: Sequence[int]) -> torch.Tensor:
        """The clipping group (user index) of each row of a batch: int64 [len(indices)]."""
        return torch.as_tensor(self.row_users[np.asarray(indices, dtype=np.int64)],
                               dtype=torch.int64)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "max_rows_per_user": self.max_rows_per_user}

    def load_state_dict(self, state: dict) -> None:
        if state.get("max_rows_per_user") != self.max_rows_per_user:
            raise ValueError(f"sampler state has max_rows_per_user="
                             f"{state.get('max_rows_per_user')!r} but this sampler has "
                             f"{self.max_rows_per_user}; it belongs to a different run")
        super().load_state_dict(state)


def group_microbatches(groups: torch.Tensor, max_rows: int) -> List[Tuple[int, int]]:
    """(start, end) of consecutive micro-batches of at most ``max_rows`` rows that never split
    a group (``groups`` sorted by group, as :class:`UserPoissonSampler` yields them): a user's
    clip needs all of its rows in one backward pass."""
    changes = (torch.nonzero(groups[1:] != groups[:-1]).flatten() + 1).tolist()
    bounds = [0] + changes + [len(groups)]
    chunks, start = [], 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a > max_rows:
            raise ValueError(f"user {int(groups[a])} has {b - a} rows in the batch, more than a "
                             f"micro-batch of {max_rows}: make max_rows_per_user <= the physical "
                             "batch size")
        if b - start > max_rows:
            chunks.append((start, a))
            start = a
    if len(groups):
        chunks.append((start, len(groups)))
    return chunks


def cap_rows_per_user(row_users: Sequence[int], max_rows: int, keys: Sequence[float]) -> np.ndarray:
    """ELS: indices of the rows kept when each user keeps at most ``max_rows`` of its rows,
    those of lowest ``keys`` (a per-row value that does not depend on other users' data,
    e.g. a hash of the row), ascending."""
    users, _ = dense_users(row_users)
    keys = np.asarray(keys, dtype=np.float64)
    order = np.lexsort((keys, users))  # by user, then key
    rank = np.empty(len(users), dtype=np.int64)
    sorted_users = users[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_users))[0] + 1]
    within = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    rank[order] = within
    return np.nonzero(rank < max_rows)[0]
