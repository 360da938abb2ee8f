"""Poisson sampling of logical batches, truncation, micro-batches (DESIGN.md §5).

Poisson sampling: at every step each of the N examples joins the batch
independently with probability q, so the batch size is Binomial(N, q) with
mean B̄ = q·N, and every example is eligible at every step. This - not
shuffle-and-chunk batching - is what the accountant's
``PoissonSampledDpEvent(q, ·)`` describes.

Truncated Poisson (fixed shapes): a sampled batch larger than the cap b is cut
to a uniformly random subset of b of its examples (the definition of
dp-accounting's ``TruncatedSubsampledGaussianDpEvent``), and every batch is
padded to exactly b rows; padding rows carry weight 0 and must contribute
nothing to the loss (multiply the per-example losses by the weights).

Empty batches. A Poisson batch can be empty. The batch sampler then yields an
empty index list and :func:`make_poisson_loader`'s collate function returns a
batch with the structure of a normal one whose tensors have 0 rows (same
trailing shape and dtype). A model patched by ``vaultkern.patch`` refuses a
0-row input, so the training loop skips forward/backward on such a batch
(test it with :func:`is_empty_batch`) but must still call
``optimizer.step()``, which adds noise to every parameter: skipping the step
would make the batch size observable.

Micro-batches of these batches: :mod:`vaultkern.privacy.micro_batches`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate

from vaultkern.privacy.sampler_stream import SamplerStream


class PoissonBatchSampler(Sampler[List[int]]):
    """Batch sampler yielding ``steps`` Poisson-sampled index lists per pass.

    Each index in ``range(num_samples)`` is in a batch independently with
    probability ``sample_rate``; empty batches are yielded as ``[]``.

    With ``max_batch_size`` (truncated Poisson) a batch above the cap is
    replaced by a uniformly random subset of ``max_batch_size`` of its indices;
    the sampler still yields unpadded lists (padding is the loader's job, see
    :func:`pad_to_max_batch`).

    Randomness: ChaCha20 with a 256-bit key, 53-bit uniforms, a fresh nonce per
    batch (:mod:`vaultkern.privacy.sampler_stream`). The key is SHA-256 of
    ``seed`` (reproducible), else drawn from ``os.urandom``. ``generator`` (a
    ``torch.Generator``, as Opacus' loaders take) is turned into a seed by one
    draw from it. ``secure=True`` keeps the ``os.urandom`` key out of the state:
    such a sampler cannot replay its order after a resume (a new key continues).

    Resume: :meth:`state_dict` holds the key (unless secure), the number of
    batches drawn so far (the nonce; never reused) and the position in the
    current pass; a sampler restored from it yields exactly the batches the
    saved one would have yielded next. A pass that is abandoned mid-way
    continues where it stopped on the next ``iter()``. With a multi-process
    DataLoader the sampler runs ahead of the training loop by the prefetched
    batches, so save its state at a point where the loader is not prefetching
    (e.g. the end of a pass) or with ``num_workers=0``.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int,
                 seed: Optional[int] = None, max_batch_size: Optional[int] = None,
                 secure: bool = False, generator: Optional[torch.Generator] = None):
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: must be an integer >= 1")
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate={sample_rate}: must lie in (0, 1]")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps={steps}: must be an integer >= 1")
        if max_batch_size is not None and (int(max_batch_size) != max_batch_size
                                           or max_batch_size < 1):
            raise ValueError(f"max_batch_size={max_batch_size}: must be an integer >= 1")
        if generator is not None:
            if seed is not None:
                raise ValueError("give seed or generator, not both")
            from vaultkern.privacy.opacus_compat import seed_of
            seed = seed_of(generator)
        if secure and seed is not None:
            raise ValueError("secure=True keys the sampler from os.urandom; do not pass a "
                             "seed or generator")
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.steps = int(steps)
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self.secure = bool(secure)
        self.stream = SamplerStream.fresh() if seed is None else SamplerStream.from_seed(seed)
        self.draws = 0     # batches drawn over the sampler's life: the next batch's nonce
        self.position = 0  # batches of the current pass already yielded

    def __len__(self) -> int:
        return self.steps

    def sample_batch(self) -> List[int]:
        """One Poisson (optionally truncated) batch of indices, ascending order
        unless truncated (then in random order)."""
        draw, self.draws = self.draws, self.draws + 1
        uniform = self.stream.uniforms(draw, 0, self.num_samples)
        chosen = np.nonzero(uniform < self.sample_rate)[0]
        if self.max_batch_size is not None and len(chosen) > self.max_batch_size:
            keys = self.stream.uniforms(draw, self.num_samples, len(chosen))
            chosen = chosen[np.argsort(keys, kind="stable")[: self.max_batch_size]]
        return chosen.tolist()

    def __iter__(self) -> Iterator[List[int]]:
        while self.position < self.steps:
            batch = self.sample_batch()
            self.position += 1
            yield batch
        self.position = 0

    def state_dict(self) -> dict:
        return {
            "position": self.position, "draws": self.draws,
            "key": None if self.secure else self.stream.key.hex(),
            "num_samples": self.num_samples, "sample_rate": self.sample_rate,
            "steps": self.steps, "max_batch_size": self.max_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if "draws" not in state:
            raise ValueError("this sampler state comes from a vaultkern before the ChaCha20 "
                             "sampler (it holds a torch generator state); it cannot be resumed")
        for key in ("num_samples", "sample_rate", "steps", "max_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has "
                    f"{getattr(self, key)!r}; it belongs to a different run")
        if not 0 <= state["position"] <= self.steps:
            raise ValueError(
                f"sampler state position={state['position']} outside [0, {self.steps}]")
        if state["key"] is not None:
            if self.secure:
                raise ValueError("cannot load a reproducible sampler's key into a secure "
                                 "(os.urandom) sampler")
            self.stream = SamplerStream(bytes.fromhex(state["key"]))
        self.draws, self.position = int(state["draws"]), int(state["position"])


def split_microbatches(indices: Sequence[int], max_physical_batch_size: int) -> List[List[int]]:
    """Consecutive chunks of at most ``max_physical_batch_size`` indices.

    Always at least one chunk (``[[]]`` for an empty logical batch), so that a
    loop over the chunks reaches the optimizer step of every logical batch.
    """
    if int(max_physical_batch_size) != max_physical_batch_size or max_physical_batch_size < 1:
        raise ValueError(
            f"max_physical_batch_size={max_physical_batch_size}: must be an integer >= 1")
    m = int(max_physical_batch_size)
    indices = list(indices)
    if not indices:
        return [[]]
    return [indices[i:i + m] for i in range(0, len(indices), m)]


def pad_to_max_batch(indices: Sequence[int], max_batch_size: int,
                     pad_index: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad a (truncated) Poisson batch to exactly ``max_batch_size`` rows.

    Returns ``(padded_indices, weights)``: int64 indices of length
    ``max_batch_size`` (real ones first, then ``pad_index``) and float32
    weights, 1 for real rows and 0 for padding. Multiply per-example losses by
    the weights so padding rows have zero gradient and zero norm.
    """
    indices = list(indices)
    if len(indices) > max_batch_size:
        raise ValueError(
            f"batch of {len(indices)} indices exceeds max_batch_size={max_batch_size}; "
            "truncate it first (PoissonBatchSampler(max_batch_size=...))")
    padded = torch.full((max_batch_size,), int(pad_index), dtype=torch.int64)
    padded[: len(indices)] = torch.as_tensor(indices, dtype=torch.int64)
    weights = torch.zeros(max_batch_size, dtype=torch.float32)
    weights[: len(indices)] = 1.0
    return padded, weights


def truncated_poisson_batch(num_samples: int, sample_rate: float, max_batch_size: int,
                            seed: Optional[int] = None,
                            pad_index: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """One truncated-Poisson batch, padded: ``(indices[max_batch_size], weights)``."""
    sampler = PoissonBatchSampler(num_samples, sample_rate, 1, seed=seed,
                                  max_batch_size=max_batch_size)
    return pad_to_max_batch(sampler.sample_batch(), max_batch_size, pad_index)


# ----------------------------------------------------------------------------
# Collation of empty and padded batches


def _empty_like_batch(example_batch: Any) -> Any:
    """The same structure with every tensor/array/list cut to 0 rows."""
    if isinstance(example_batch, torch.Tensor):
        return example_batch[:0]
    if isinstance(example_batch, np.ndarray):
        return example_batch[:0]
    if isinstance(example_batch, dict):
        return type(example_batch)({k: _empty_like_batch(v) for k, v in example_batch.items()})
    if isinstance(example_batch, tuple) and hasattr(example_batch, "_fields"):
        return type(example_batch)(*(_empty_like_batch(v) for v in example_batch))
    if isinstance(example_batch, (list, tuple)):
        return type(example_batch)(_empty_like_batch(v) for v in example_batch)
    return example_batch


def is_empty_batch(batch: Any) -> bool:
    """True when the first tensor found in ``batch`` has 0 rows."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] == 0 if batch.dim() > 0 else False
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, (torch.Tensor, dict, list, tuple)):
                return is_empty_batch(item)
    return False


class EmptySafeCollate:
    """Wraps a collate function so that an empty index list gives a 0-row batch.

    The 0-row batch is made by collating one example (``dataset[0]``) and
    cutting every tensor in it to 0 rows, so it has the right structure,
    trailing shapes and dtypes.
    """

    def __init__(self, collate_fn: Callable, dataset):
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, items: List[Any]) -> Any:
        if len(items) == 0:
            return _empty_like_batch(self.collate_fn([self.dataset[0]]))
        return self.collate_fn(items)


class _PaddedBatchSampler(Sampler[List[int]]):
    """Turns truncated Poisson index lists into fixed-length lists where the
    padding rows are marked by ``-1 - pad_index`` (a negative index)."""

    def __init__(self, sampler: PoissonBatchSampler, pad_index: int = 0):
        self.sampler = sampler
        self.pad_index = pad_index

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[List[int]]:
        cap = self.sampler.max_batch_size
        for batch in self.sampler:
            yield list(batch) + [-1 - self.pad_index] * (cap - len(batch))


class _PaddingAwareDataset(torch.utils.data.Dataset):
    """``dataset[i]`` for i >= 0, and a padding row (weight 0) for i < 0."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index < 0:
            return self.dataset[-1 - index], 0.0
        return self.dataset[index], 1.0


class WeightedCollate:
    """Collates ``(example, weight)`` items into ``(batch, weights)``."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, items: List[Tuple[Any, float]]) -> Tuple[Any, torch.Tensor]:
        examples = [example for example, _ in items]
        weights = torch.tensor([weight for _, weight in items], dtype=torch.float32)
        return self.collate_fn(examples), weights


def _loader_kwargs(data_loader: DataLoader) -> dict:
    return dict(num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
                timeout=data_loader.timeout, worker_init_fn=data_loader.worker_init_fn,
                multiprocessing_context=data_loader.multiprocessing_context,
                persistent_workers=data_loader.persistent_workers)


def expected_batch_size_of(data_loader: DataLoader) -> float:
    """B̄ of a loader: its ``batch_size``, else N / len(loader)."""
    if data_loader.batch_size is not None:
        return float(data_loader.batch_size)
    return len(data_loader.dataset) / len(data_loader)


def make_poisson_loader(data_loader: DataLoader, seed: Optional[int] = None,
                        truncated_poisson: bool = False, max_batch_size: Optional[int] = None,
                        secure: bool = False, pad_index: int = 0,
                        generator: Optional[torch.Generator] = None,
                        sampler: Optional[PoissonBatchSampler] = None) -> DataLoader:
    """A DataLoader over the same dataset and collate_fn with Poisson batches.

    q = B̄ / N (B̄ = ``data_loader.batch_size``, or N / len(loader) when the loader
    was built from a batch sampler), ``steps = len(data_loader)`` batches per pass.
    Empty batches are collated to 0-row batches (:class:`EmptySafeCollate`).

    ``truncated_poisson=True`` with ``max_batch_size=b``: batches above b are
    truncated to a random subset of b, and every batch is padded to b rows; the
    loader then yields ``(batch, weights)`` with ``weights[i] = 0`` on padding
    rows (copies of ``dataset[pad_index]``). The sampler is reachable as
    ``loader.batch_sampler`` (or ``loader.batch_sampler.sampler`` when padded)
    and :func:`poisson_sampler_of` finds it in both cases. ``seed`` (or a
    ``generator``) makes the batches reproducible (:class:`PoissonBatchSampler`);
    ``sampler`` is one already built for this loader (the DP assembly's).
    """
    dataset = data_loader.dataset
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("the data loader's dataset is empty")
    expected = expected_batch_size_of(data_loader)
    # a distributed sampler's batch is global: each rank's loader holds 1/W of it
    sample_rate = expected * getattr(sampler, "world_size", 1) / num_samples
    if sample_rate > 1.0:
        raise ValueError(f"batch size {expected} exceeds the dataset size {num_samples}")
    if truncated_poisson:
        if max_batch_size is None:
            raise ValueError("truncated_poisson=True needs max_batch_size (the cap b)")
        if max_batch_size < expected:
            raise ValueError(
                f"max_batch_size={max_batch_size} is below the expected batch size {expected}; "
                "most batches would be truncated")
    elif max_batch_size is not None:
        raise ValueError(
            f"max_batch_size={max_batch_size} is only used with truncated_poisson=True")
    cap = max_batch_size if truncated_poisson else None
    row_users = getattr(sampler, "row_users", None)  # user-level: the units are users
    if row_users is not None:
        if len(row_users) != num_samples:
            raise ValueError(f"the user sampler has {len(row_users)} rows, the dataset "
                             f"{num_samples}")
        num_samples = sampler.num_users
        sample_rate = expected / num_samples
    if sampler is None:
        sampler = PoissonBatchSampler(num_samples, sample_rate, len(data_loader), seed=seed,
                                      max_batch_size=cap, secure=secure, generator=generator)
    elif (sampler.num_samples, sampler.sample_rate, sampler.steps, sampler.max_batch_size) != \
            (num_samples, sample_rate, len(data_loader), cap):
        raise ValueError(f"the sampler (N={sampler.num_samples}, q={sampler.sample_rate}, "
                         f"steps={sampler.steps}, cap={sampler.max_batch_size}) does not match "
                         f"the loader (N={num_samples}, q={sample_rate}, "
                         f"steps={len(data_loader)}, cap={cap})")
    collate = data_loader.collate_fn or default_collate
    if truncated_poisson:
        return DataLoader(_PaddingAwareDataset(dataset),
                          batch_sampler=_PaddedBatchSampler(sampler, pad_index),
                          collate_fn=WeightedCollate(collate), **_loader_kwargs(data_loader))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=EmptySafeCollate(collate, dataset),
                      **_loader_kwargs(data_loader))


def poisson_sampler_of(data_loader) -> Optional[PoissonBatchSampler]:
    """The PoissonBatchSampler behind a loader made here, else None."""
    batch_sampler = getattr(data_loader, "batch_sampler", None)
    while batch_sampler is not None and not isinstance(batch_sampler, PoissonBatchSampler):
        batch_sampler = getattr(batch_sampler, "sampler", None)
    return batch_sampler
