"""PrivacyEngine plumbing pinned by behaviour (issue 18).

Every dataset here has N not divisible by the batch size B: with N = k·B the two
plausible sampling rates B/N and 1/len(loader) coincide, and a sampler or accountant
using the wrong one passes. Expected values come from hand arithmetic (q = B/N,
update = clipped sum / B), dp-accounting called directly and the float64
per-example oracle of tests/oracle.py, never from the engine's own bookkeeping.
"""
import math
import warnings

import dp_accounting as dpa
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import pld_privacy_accountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oracle import oracle
from vaultkern.privacy import PrivacyEngine
from vaultkern.privacy.sampling import PoissonBatchSampler, is_empty_batch

DELTA = 1e-5
VOCAB, SEQ = 11, 5


class Net(nn.Module):
    """Embedding (mean over positions) -> Linear -> tanh -> Linear; `width` sizes fc1."""

    def __init__(self, d=6, width=8):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.fc1 = nn.Linear(d, width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.emb(ids).mean(1))))


def dataset(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=g),
                         torch.randint(0, 3, (n,), generator=g))


def quiet_engine():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the secure_mode=False notice
        return PrivacyEngine()


def per_example_ce(model, batch):
    ids, y = batch
    return F.cross_entropy(model(ids), y, reduction="none")


def direct_pld_epsilon(sigma, q, steps, grid=1e-4):
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
    return acc.compose(event).get_epsilon(DELTA)


def test_engine_samples_and_accounts_q_equal_to_batch_over_n():
    """N = 25, B = 6: q = 0.24, while 1/len(loader) = 1/5 = 0.20 (a 17 % error)."""
    n, b = 25, 6
    q = b / n
    torch.manual_seed(0)
    model = Net()
    eng = quiet_engine()
    model, optimizer, loader = eng.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset(n), batch_size=b), noise_multiplier=1.1,
        max_grad_norm=1.0, seed=11)
    assert len(loader) == 5
    # Sampling: over P passes the total number of rows drawn is Binomial(P·len·N, q).
    # 1600 passes = 8000 batches: mean 48000, sd sqrt(48000·0.76) = 191. A 5 % error in q
    # moves the total by 2400 = 12.6 sd, so |z| < 5 keeps a margin of 7.6 sd either way.
    passes, total, batches = 1600, 0, 0
    for _ in range(passes):
        for ids, _ in loader:
            total += len(ids)
            batches += 1
    mean = batches * n * q
    z = (total - mean) / math.sqrt(mean * (1 - q))
    assert abs(z) < 5, (total, mean, z)
    # Accounting: a few real steps; the history must hold q = 6/25 and the ε of that q.
    criterion = nn.CrossEntropyLoss()
    steps = 0
    for ids, y in loader:
        if not is_empty_batch(ids):
            criterion(model(ids), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    assert steps == 5 and eng.accountant.total_steps == 5
    (entry,) = eng.accountant.history
    assert (entry.noise_multiplier, entry.num_steps) == (1.1, 5)
    assert entry.sample_rate == pytest.approx(q, rel=1e-12)
    assert entry.truncated_max_batch is None
    assert eng.get_epsilon(DELTA) == pytest.approx(direct_pld_epsilon(1.1, q, 5), rel=1e-9)


def first_logical_step(model, optimizer, loader, loss_fn):
    """Run micro-batches until the optimizer takes its first noised step; the rows used."""
    rows = []
    for ids, y in loader:
        if not is_empty_batch(ids):
            rows.append((ids, y))
            loss_fn(model(ids), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if optimizer.steps_taken == 1:
            break
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


def short_batch_seed(n, b, norms=None, clip=None):
    """The first seed whose engine run starts with a batch of 3 to b - 2 rows (its sampler is
    seeded by the engine's seed: the same seed, the same batches), with some of them above
    and some below ``clip`` when per-example ``norms`` are given."""
    def fits(seed):
        first = PoissonBatchSampler(n, b / n, 1, seed=seed).sample_batch()
        mixed = norms is None or ((norms[first] > clip * 1.01).any()
                                  and (norms[first] < clip * 0.99).any())
        return 3 <= len(first) <= b - 2 and bool(mixed)
    return next(s for s in range(1000) if fits(s))


def make_engine_run(n, b, sigma, clip, reduction, physical, seed, **sizes):
    """A float64 Net made private: (unpatched reference copy, model, optimizer, loader)."""
    torch.manual_seed(3)
    model = Net(**sizes).double()
    reference = Net(**sizes).double()
    reference.load_state_dict(model.state_dict())
    model, optimizer, loader = quiet_engine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(dataset(n), batch_size=b), noise_multiplier=sigma,
        max_grad_norm=clip, loss_reduction=reduction, max_physical_batch_size=physical,
        seed=seed)
    return reference, model, optimizer, loader


@pytest.mark.parametrize("physical", [None, 2], ids=["one-backward", "micro-batches-of-2"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_step_update_is_oracle_clipped_sum_over_expected_batch(reduction, physical):
    """σ = 0, a batch shorter than B̄ = 8, C at the median per-example norm: the update of
    SGD(lr=1) is exactly -Σ_i clip_i g_i / 8 for a mean loss (DESIGN.md §1), whatever |S|
    is. A summed loss gets the sum itself (Opacus' convention, DPOptimizer docstring)."""
    n, b = 30, 8
    torch.manual_seed(3)
    probe = Net().double()
    _, all_norms = oracle(probe, dataset(n).tensors, per_example_ce, float("inf"))
    clip = float(all_norms.median())
    reference, model, optimizer, loader = make_engine_run(n, b, 0.0, clip, reduction, physical,
                                                          seed=short_batch_seed(n, b, all_norms,
                                                                                clip))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    criterion = nn.CrossEntropyLoss(reduction=reduction)
    ids, y = first_logical_step(model, optimizer, loader, criterion)
    # the premises that make this test bite: a short batch, some examples clipped, some not
    assert 0 < len(ids) < b, len(ids)
    sums, norms = oracle(reference, (ids, y), per_example_ce, clip)
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any(), (norms, clip)
    divisor = b if reduction == "mean" else 1
    for name, param in model.named_parameters():
        update = before[name] - param.detach()
        torch.testing.assert_close(update, sums[name] / divisor, rtol=1e-9, atol=1e-12)


def test_noise_of_one_engine_step_has_std_sigma_c_over_expected_batch():
    """Same seed, same short batch, σ = 1.3 and σ = 0: the difference of the two updates is
    the noise alone, σ·C·ξ/B̄ with B̄ = 8 (hand arithmetic), over ~0.5 M parameter elements.

    The sample std of n = 5.1e5 normal draws has relative sd 1/sqrt(2n) = 0.1 %: a 1 %
    tolerance is 10 sd wide, and a 2 % error lands 10 sd outside it (dividing by the
    realised |S| = 6 instead of 8 would be a 33 % error)."""
    n, b, sigma, clip = 30, 8, 1.3, 0.4
    updates = []
    for noise in (0.0, sigma):
        _, model, optimizer, loader = make_engine_run(n, b, noise, clip, "mean", None,
                                                      seed=short_batch_seed(n, b), d=500,
                                                      width=1000)
        before = [p.detach().clone() for p in model.parameters()]
        ids, _ = first_logical_step(model, optimizer, loader, nn.CrossEntropyLoss())
        assert 0 < len(ids) < b
        updates.append(torch.cat([(p0 - p.detach()).flatten()
                                  for p0, p in zip(before, model.parameters())]))
    noise = (updates[1] - updates[0]) * b / (sigma * clip)  # should be N(0, 1)
    count = noise.numel()
    assert count > 500_000
    assert noise.std().item() == pytest.approx(1.0, rel=0.01)
    assert abs(noise.mean().item()) < 6 / math.sqrt(count)
