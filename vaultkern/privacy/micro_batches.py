"""Physical micro-batches of Poisson logical batches (Opacus' BatchMemoryManager).

:class:`MicroBatchLoader` splits each logical batch of a Poisson loader into micro-batches
of at most ``max_physical_batch_size`` rows and tells the
:class:`~vaultkern.privacy.optimizer.DPOptimizer` which micro-batch ends a logical batch:
``optimizer.step()`` after the others only accumulates, after the last one it adds noise
once and updates. For a user-level sampler a user's rows stay in one micro-batch and each
micro-batch's group ids are set on the model before it is yielded.
:class:`StepCheckedLoader` is the private loader without micro-batches.
"""
from __future__ import annotations

import collections
from typing import Iterator, List

from torch.utils.data import DataLoader, Sampler

from vaultkern.privacy.sampling import _loader_kwargs, split_microbatches


class _MicroBatchSampler(Sampler[List[int]]):
    """Splits each logical batch of ``logical`` into micro-batches and records,
    in order, whether each micro-batch is the last of its logical batch."""

    def __init__(self, logical: Sampler, max_physical_batch_size: int):
        self.logical = logical
        self.max_physical_batch_size = int(max_physical_batch_size)
        self.ends_logical: collections.deque = collections.deque()
        self.groups: collections.deque = collections.deque()  # user-level: each chunk's users

    @property
    def sampler(self):
        return self.logical

    def __len__(self) -> int:
        return len(self.logical)  # logical batches; micro-batch count is random

    def __iter__(self) -> Iterator[List[int]]:
        self.ends_logical.clear()
        self.groups.clear()
        group_ids = getattr(self.logical, "group_ids", None)  # a UserPoissonSampler
        for batch in self.logical:
            if group_ids is None:
                chunks, groups = split_microbatches(batch, self.max_physical_batch_size), None
            else:  # a user's rows stay in one micro-batch: they are clipped together
                from vaultkern.privacy.user_sampling import group_microbatches
                groups = group_ids(batch)
                spans = group_microbatches(groups, self.max_physical_batch_size) or [(0, 0)]
                chunks = [batch[a:b] for a, b in spans]
            for k, chunk in enumerate(chunks):
                self.ends_logical.append(k == len(chunks) - 1)
                self.groups.append(None if groups is None else groups[spans[k][0]:spans[k][1]])
                yield chunk


class MicroBatchLoader:
    """Iterable of physical micro-batches that signals logical-step boundaries.

    Before yielding each micro-batch it calls
    ``optimizer.signal_skip_step(do_skip=not last)``: ``optimizer.step()`` after
    a micro-batch that does not end its logical batch only keeps accumulating
    clipped gradients; after the last one it adds noise and updates. The flags
    follow the order in which batches come out of the DataLoader, so this is
    exact with worker prefetching too. ``len()`` is the number of logical
    batches.
    """

    def __init__(self, data_loader: DataLoader, max_physical_batch_size: int, optimizer,
                 module=None):
        if int(max_physical_batch_size) != max_physical_batch_size or max_physical_batch_size < 1:
            raise ValueError(
                f"max_physical_batch_size={max_physical_batch_size}: must be an integer >= 1")
        if data_loader.batch_sampler is None:
            raise ValueError("MicroBatchLoader needs a loader with a batch sampler")
        self.original_loader = data_loader
        self.optimizer, self.module = optimizer, module  # module: gets each chunk's group ids
        self.max_physical_batch_size = int(max_physical_batch_size)
        self._micro = _MicroBatchSampler(data_loader.batch_sampler, max_physical_batch_size)
        self.loader = DataLoader(data_loader.dataset, batch_sampler=self._micro,
                                 collate_fn=data_loader.collate_fn,
                                 **_loader_kwargs(data_loader))

    @property
    def dataset(self):
        return self.original_loader.dataset

    @property
    def batch_sampler(self):
        return self._micro

    def __len__(self) -> int:
        return len(self.original_loader)

    def __iter__(self):
        first = True
        for batch in self.loader:
            last, groups = self._micro.ends_logical.popleft(), self._micro.groups.popleft()
            if groups is not None:
                from vaultkern.core import set_group_ids
                set_group_ids(self.module, groups.to(next(self.module.parameters()).device))
            if first and hasattr(self.optimizer, "note_sampled_batch"):  # (any optimizer works)
                self.optimizer.note_sampled_batch()
            self.optimizer.signal_skip_step(do_skip=not last)
            first = last
            yield batch


class StepCheckedLoader:
    """The private loader as users iterate it: tells the optimizer of each batch it yields, so
    that a step over several sampled batches is refused (DPOptimizer.pre_step). Everything
    else is the wrapped loader's."""

    def __init__(self, data_loader, optimizer):
        self.data_loader, self.optimizer = data_loader, optimizer

    def __getattr__(self, name):
        return getattr(self.__dict__["data_loader"], name)

    def __len__(self) -> int:
        return len(self.data_loader)

    def __iter__(self):
        for batch in self.data_loader:
            self.optimizer.note_sampled_batch()
            yield batch


class BatchMemoryManager:
    """Context manager giving a :class:`MicroBatchLoader` (Opacus' name and use)::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=32,
                                optimizer=optimizer) as micro_loader:
            for x, y in micro_loader:
                loss_fn(model(x), y).backward()
                optimizer.step()          # real step only after a logical batch
                optimizer.zero_grad()     # kept gradients until then
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer):
        self.micro_loader = MicroBatchLoader(data_loader, max_physical_batch_size, optimizer)

    def __enter__(self) -> MicroBatchLoader:
        return self.micro_loader

    def __exit__(self, *exc) -> None:
        self.micro_loader.optimizer.signal_skip_step(do_skip=False)
