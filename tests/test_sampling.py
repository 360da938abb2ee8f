"""Poisson / truncated Poisson batches, loaders, micro-batches."""
import collections
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, Dataset, TensorDataset

from vaultkern.privacy.micro_batches import BatchMemoryManager, MicroBatchLoader
from vaultkern.privacy.sampling import (
    PoissonBatchSampler, is_empty_batch, make_poisson_loader, pad_to_max_batch,
    poisson_sampler_of, split_microbatches, truncated_poisson_batch)


def test_batch_sizes_are_binomial_and_every_example_is_eligible():
    n, q, steps = 200, 0.05, 2000
    batches = list(PoissonBatchSampler(n, q, steps, seed=0))
    assert len(batches) == steps
    sizes = np.array([len(b) for b in batches])
    # chi-square of the batch-size histogram against Binomial(n, q), tail bins merged
    edges = [0, 5, 7, 8, 9, 10, 11, 12, 13, 15, n + 1]
    observed = np.histogram(sizes, bins=edges)[0]
    cdf = stats.binom.cdf(np.array(edges) - 1, n, q)
    expected = np.diff(cdf) * steps
    assert expected.min() > 5
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > 1e-3, (observed, expected)
    # each example is in each batch with probability q: its count is Binomial(steps, q)
    counts = np.bincount(np.concatenate([np.array(b, dtype=int) for b in batches]), minlength=n)
    assert counts.min() > 0
    chi2 = ((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum()
    assert stats.chi2.sf(chi2, n) > 1e-3
    # no duplicates within a batch, indices sorted and in range
    for b in batches[:50]:
        assert b == sorted(set(b)) and all(0 <= i < n for i in b)


def test_empty_batches_are_yielded_as_empty_lists():
    batches = list(PoissonBatchSampler(5, 0.01, 50, seed=1))
    assert len(batches) == 50 and sum(b == [] for b in batches) > 30


def test_resume_from_state_dict_continues_the_same_order():
    reference = list(PoissonBatchSampler(30, 0.2, 12, seed=7))
    sampler = PoissonBatchSampler(30, 0.2, 12, seed=7)
    it = iter(sampler)
    first = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    resumed = PoissonBatchSampler(30, 0.2, 12, seed=999)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert first + rest == reference
    # the next pass continues the random stream, it does not repeat the first
    assert list(resumed) != reference
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatchSampler(30, 0.3, 12).load_state_dict(state)


def test_secure_sampler_and_argument_errors():
    # os.urandom cannot be seeded, so the margin must make the outcome certain in practice:
    # the total over 2000 steps is Binomial(2e6, 0.1), mean 2e5, sd 424. |z| < 6 fails with
    # probability 2e-9; a 5 % error in q moves the total by 1e4 = 23.6 sd.
    n, q, steps = 1000, 0.1, 2000
    sizes = np.array([len(b) for b in PoissonBatchSampler(n, q, steps, secure=True)])
    mean, sd = steps * n * q, math.sqrt(steps * n * q * (1 - q))
    assert abs(sizes.sum() - mean) < 6 * sd, (sizes.sum(), mean)
    # and the sizes spread like Binomial(1000, 0.1) (variance 90), not a fixed batch:
    # the sample variance of 2000 draws has sd ~ 90·sqrt(2/2000) = 2.8
    assert 70 < sizes.var() < 110
    with pytest.raises(ValueError, match="seed or generator"):
        PoissonBatchSampler(10, 0.1, 2, seed=0, secure=True)
    with pytest.raises(ValueError, match="sample_rate=0"):
        PoissonBatchSampler(10, 0.0, 2)
    with pytest.raises(ValueError, match="num_samples=0"):
        PoissonBatchSampler(0, 0.5, 2)


def test_truncation_keeps_a_random_subset_of_the_sampled_batch():
    sampler = PoissonBatchSampler(100, 0.5, 300, seed=3, max_batch_size=10)
    batches = list(sampler)
    assert all(len(b) <= 10 for b in batches) and all(len(set(b)) == len(b) for b in batches)
    # were truncation "keep the first 10", indices above ~25 would (almost) never appear
    counts = collections.Counter(i for b in batches for i in b)
    assert min(counts[i] for i in range(100)) > 5


def test_pad_to_max_batch_and_truncated_helper():
    idx, w = pad_to_max_batch([4, 9], 5, pad_index=0)
    assert idx.tolist() == [4, 9, 0, 0, 0] and w.tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="exceeds max_batch_size=1"):
        pad_to_max_batch([1, 2], 1)
    # q = 0.5 of 50: P(fewer than 8 sampled) = P(Binomial(50, 0.5) < 8) = 2e-7, so the
    # batch is truncated to 8 distinct real rows, no padding
    idx, w = truncated_poisson_batch(50, 0.5, 8, seed=0)
    assert idx.shape == (8,) and w.tolist() == [1.0] * 8
    assert len(set(idx.tolist())) == 8 and all(0 <= i < 50 for i in idx.tolist())
    # q = 0.05 of 50, cap 3: the number of real rows is min(Binomial(50, 0.05), 3), padding
    # rows (pad_index, weight 0) fill the rest; chi-square against scipy's binomial
    draws, pad = 3000, 49
    counts = np.zeros(4)
    for k in range(draws):
        idx, w = truncated_poisson_batch(50, 0.05, 3, seed=1000 + k, pad_index=pad)
        real = int(w.sum())
        assert w[:real].eq(1).all() and w[real:].eq(0).all()
        assert idx[real:].eq(pad).all() and len(set(idx[:real].tolist())) == real
        counts[real] += 1
    pmf = stats.binom.pmf(np.arange(3), 50, 0.05)
    expected = np.append(pmf, 1 - pmf.sum()) * draws
    assert stats.chisquare(counts, expected).pvalue > 1e-4, (counts, expected)


def test_split_microbatches():
    assert split_microbatches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert split_microbatches([], 3) == [[]]
    with pytest.raises(ValueError, match="max_physical_batch_size=0"):
        split_microbatches([1], 0)


@pytest.mark.parametrize("n, b", [(50, 8), (103, 10)])
def test_poisson_loader_draws_batch_over_n_when_n_is_not_a_multiple(n, b):
    """The rows a Poisson loader yields, counted: their mean is B/N per example and step.

    (50, 8): 1/len(loader) = 1/7 would be 11 % low; (103, 10): 1/11 would be 6.4 % low.
    5000 batches: the total is Binomial(5000·N, q) with S·N·q = 40000 and 50000 and sd
    <= 211; a 5 % error in q moves it by >= 2000 = 10 sd, |z| < 5 leaves >= 5 sd either way.
    """
    q = b / n
    loader = make_poisson_loader(DataLoader(TensorDataset(torch.arange(n)), batch_size=b),
                                 generator=torch.Generator().manual_seed(n))  # Opacus-style
    batches, total, seen = 0, 0, np.zeros(n)
    while batches < 5000:
        for (ids,) in loader:
            total += len(ids)
            seen[ids.numpy()] += 1
            batches += 1
    mean = batches * n * q
    z = (total - mean) / math.sqrt(mean * (1 - q))
    assert abs(z) < 5, (total, mean, z)
    # every example, including those of the short last chunk of a fixed batching, is drawn
    # at the same rate: per-example counts are Binomial(batches, q), chi-square over N
    chi2 = ((seen - batches * q) ** 2 / (batches * q * (1 - q))).sum()
    assert stats.chi2.sf(chi2, n) > 1e-4


class DictDataset(Dataset):
    def __init__(self, n):
        self.x = torch.arange(n * 3, dtype=torch.float64).view(n, 3)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "id": torch.tensor(i)}


def test_poisson_loader_rate_length_and_empty_batches():
    # N = 42 is not a multiple of B = 4: q = 4/42 = 0.0952, while 1/len(loader) = 1/11
    data = TensorDataset(torch.randn(42, 3), torch.arange(42))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    poisson = make_poisson_loader(loader, seed=0)
    sampler = poisson_sampler_of(poisson)
    assert sampler.sample_rate == pytest.approx(4 / 42, rel=1e-12)
    assert len(poisson) == len(loader) == 11
    for x, y in poisson:
        assert x.shape[1:] == (3,) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(data.tensors[0][y], x)
        assert is_empty_batch((x, y)) == (len(y) == 0)
    # force empty batches: a tiny rate
    tiny = make_poisson_loader(DataLoader(DictDataset(50), batch_size=1), seed=0)
    tiny.batch_sampler.sample_rate = 1e-12
    batches = list(tiny)
    assert batches and all(is_empty_batch(b) for b in batches)
    assert batches[0]["x"].shape == (0, 3) and batches[0]["x"].dtype == torch.float64
    assert batches[0]["id"].shape == (0,)


def test_truncated_poisson_loader_yields_fixed_shapes_and_weights():
    data = TensorDataset(torch.arange(62, dtype=torch.float32).view(31, 2))
    loader = make_poisson_loader(DataLoader(data, batch_size=5), seed=2,
                                 truncated_poisson=True, max_batch_size=7)
    seen_padding = False
    for (x,), weights in loader:
        assert x.shape == (7, 2) and weights.shape == (7,)
        real = int(weights.sum())
        assert weights[:real].eq(1).all() and weights[real:].eq(0).all()
        seen_padding |= real < 7
    assert seen_padding
    assert poisson_sampler_of(loader).max_batch_size == 7
    assert poisson_sampler_of(loader).sample_rate == pytest.approx(5 / 31, rel=1e-12)
    with pytest.raises(ValueError, match="max_batch_size"):
        make_poisson_loader(DataLoader(data, batch_size=5), truncated_poisson=True)
    with pytest.raises(ValueError, match="max_batch_size=3"):
        make_poisson_loader(DataLoader(data, batch_size=5), truncated_poisson=True,
                            max_batch_size=3)


class RecordingOptimizer:
    def __init__(self):
        self.signals = []

    def signal_skip_step(self, do_skip=True):
        self.signals.append(do_skip)


def test_micro_batches_reassemble_logical_batches_and_signal_boundaries():
    data = TensorDataset(torch.arange(40))
    base = DataLoader(data, batch_size=10)
    logical = list(make_poisson_loader(base, seed=5))
    optimizer = RecordingOptimizer()
    with BatchMemoryManager(data_loader=make_poisson_loader(base, seed=5),
                            max_physical_batch_size=3, optimizer=optimizer) as micro:
        assert isinstance(micro, MicroBatchLoader) and len(micro) == len(base)
        chunks = [ids for (ids,) in micro]
    assert all(len(c) <= 3 for c in chunks)
    # a logical batch ends exactly where a signal says "do not skip"
    rebuilt, current = [], []
    for chunk, skip in zip(chunks, optimizer.signals):
        current.append(chunk)
        if not skip:
            rebuilt.append(torch.cat(current))
            current = []
    assert current == [] and len(rebuilt) == len(logical)
    for a, (b,) in zip(rebuilt, logical):
        assert torch.equal(a, b)
    assert optimizer.signals[-1] is False  # __exit__ leaves the optimizer stepping normally
