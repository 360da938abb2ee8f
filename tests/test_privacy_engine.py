"""PrivacyEngine end to end on a patched model: Opacus parity, accounting, resume."""
import copy
import math
import warnings

import dp_accounting as dpa
import opacus
import pytest
import torch
from torch import nn
from dp_accounting.pld import pld_privacy_accountant
from torch.utils.data import DataLoader, TensorDataset

from vaultkern.privacy import Accountant, PrivacyEngine
from vaultkern.privacy.accounting import epsilon_for
from vaultkern.privacy.sampling import is_empty_batch

DELTA = 1e-5
VOCAB, SEQ, N = 11, 5, 24


class TinyNet(nn.Module):
    """Embedding (mean over positions) -> Linear -> tanh -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6)
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.emb(ids).mean(1))))


def dataset(n=N):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=g),
                         torch.randint(0, 3, (n,), generator=g))


def direct_pld_epsilon(one_step_event, steps, grid=1e-4):
    """ε of `steps` compositions of an event, from dp-accounting itself."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
    return acc.compose(dpa.SelfComposedDpEvent(one_step_event, steps)).get_epsilon(DELTA)


def fresh_model():
    torch.manual_seed(1)
    return TinyNet()


def engine(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the secure_mode=False notice
        return PrivacyEngine(**kwargs)


def train(model, optimizer, loader, criterion, max_steps=None):
    steps = 0
    for ids, y in loader:
        if not is_empty_batch(ids):
            criterion(model(ids), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
        if max_steps is not None and steps == max_steps:
            break
    return steps


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
    lambda params: torch.optim.AdamW(params, lr=0.05),
], ids=["sgd", "adamw"])
def test_parity_with_opacus_hooks_mode(reduction, make_optimizer):
    loader = DataLoader(dataset(), batch_size=8)  # 3 fixed batches
    criterion = nn.CrossEntropyLoss(reduction=reduction)
    args = dict(data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.3,
                poisson_sampling=False, loss_reduction=reduction)
    results, start = [], [p.detach().clone() for p in fresh_model().parameters()]
    for make_private in ("opacus", "vaultkern"):
        model = fresh_model()
        optimizer = make_optimizer(model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if make_private == "opacus":
                private = opacus.PrivacyEngine(accountant="rdp").make_private(
                    module=model, optimizer=optimizer, **args)
            else:
                private = engine().make_private(module=model, optimizer=optimizer,
                                                allow_non_poisson=True, **args)
            assert train(*private, criterion) == 3  # (Opacus warns about its hooks)
        results.append([p.detach().clone() for p in model.parameters()])
    for theirs, ours, init in zip(*results, start):
        assert not torch.allclose(ours, init)  # training moved the parameters
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_plain_opacus_style_loop_grows_epsilon_as_accounted():
    model = fresh_model()
    eng = engine()
    model, optimizer, loader = eng.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset(), batch_size=6), noise_multiplier=1.2,
        max_grad_norm=1.0, seed=0)
    assert eng.get_epsilon(DELTA) == 0.0
    steps = train(model, optimizer, loader, nn.CrossEntropyLoss())
    assert steps == len(loader) == 4 and optimizer.steps_taken == 4
    assert eng.accountant.history[0][:3] == (1.2, 0.25, 4)
    assert eng.get_epsilon(DELTA) == pytest.approx(epsilon_for(1.2, 0.25, 4, DELTA), rel=1e-12)


@pytest.mark.parametrize("skip_empty", [True, False], ids=["loop-skips-empty", "unchanged-loop"])
def test_empty_poisson_batches_still_step_with_noise(skip_empty):
    """Empty Poisson batches are noise-only steps, whether the loop skips forward/backward on
    them or (the unchanged Opacus loop) runs 0 rows through them, adding nothing.

    N = 25, B = 5: B̄ = 5, so each step moves every element by σC/B̄·ξ = ξ/5 (SGD, lr=1,
    mean loss). Two passes = 10 steps x 149 elements = 1490 draws: the sample std has
    relative sd 1.8 %, the 10 % tolerance is 5.5 sd wide and catches a missing or extra
    1/B̄ (x5), a realised batch size (0: division by zero) or σ, C swapped for 1."""
    n, b = 25, 5
    model = fresh_model()
    eng = engine()
    model, optimizer, loader = eng.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(dataset(n), batch_size=b), noise_multiplier=1.0,
        max_grad_norm=1.0, seed=0)
    loader.batch_sampler.sample_rate = 1e-12  # every batch empty
    criterion = nn.CrossEntropyLoss()
    deltas, steps = [], 0
    for _ in range(2):
        for ids, y in loader:
            assert ids.shape[0] == 0
            before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
            if not skip_empty:
                criterion(model(ids), y).backward()
                assert all(p.grad is None or not p.grad.any() for p in model.parameters())
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            deltas.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - before)
    assert steps == 10 and eng.accountant.total_steps == 10
    deltas = torch.stack(deltas)
    assert (deltas != 0).all()  # noise reached every element at every step
    assert deltas.std().item() == pytest.approx(1.0 / b, rel=0.10)
    assert abs(deltas.mean().item()) < 6 * (1.0 / b) / math.sqrt(deltas.numel())


def run_resumable(model, seed, state=None, steps=3):
    eng = engine()
    model, optimizer, loader = eng.make_private(
        module=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.05),
        data_loader=DataLoader(dataset(), batch_size=6), noise_multiplier=0.8,
        max_grad_norm=0.5, seed=seed)
    if state is not None:
        eng.load_state_dict(state)
    done = 0
    while done < steps:  # crosses the end of a pass (4 steps per pass)
        done += train(model, optimizer, loader, nn.CrossEntropyLoss(), max_steps=steps - done)
    return eng


def test_resume_gives_identical_parameters_and_epsilon():
    uninterrupted = fresh_model()
    eng_a = run_resumable(uninterrupted, seed=42, steps=6)

    first_half = fresh_model()
    eng_b = run_resumable(first_half, seed=42, steps=3)
    checkpoint = copy.deepcopy({"model": first_half.state_dict(), "engine": eng_b.state_dict()})
    resumed = fresh_model()
    resumed.load_state_dict(checkpoint["model"])
    eng_c = run_resumable(resumed, seed=7, state=checkpoint["engine"], steps=3)

    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert eng_c.accountant.history == eng_a.accountant.history
    assert eng_c.get_epsilon(DELTA) == eng_a.get_epsilon(DELTA)


def test_make_private_with_epsilon_spends_the_target():
    # N = 25, B = 6: q = 0.24 (1/len(loader) = 0.2 would calibrate too little noise)
    model = fresh_model()
    eng = engine()
    model, optimizer, loader = eng.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset(25), batch_size=6), target_epsilon=3.0,
        target_delta=DELTA, epochs=2, max_grad_norm=1.0, seed=0)
    for _ in range(2):
        train(model, optimizer, loader, nn.CrossEntropyLoss())
    assert eng.accountant.total_steps == 10
    assert 0.99 * 3.0 <= eng.get_epsilon(DELTA) <= 3.0
    # the ε of what was done, from dp-accounting directly: 10 Poisson steps at q = 6/25
    sigma = optimizer.noise_multiplier
    spent = direct_pld_epsilon(dpa.PoissonSampledDpEvent(6 / 25, dpa.GaussianDpEvent(sigma)), 10)
    assert 0.99 * 3.0 <= spent <= 3.0


def test_micro_batches_match_whole_logical_batches():
    results = []
    for physical in (None, 2):
        model = fresh_model()
        eng = engine()
        model, optimizer, loader = eng.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=DataLoader(dataset(), batch_size=6), noise_multiplier=0.7,
            max_grad_norm=0.5, loss_reduction="sum", max_physical_batch_size=physical, seed=3)
        criterion = nn.CrossEntropyLoss(reduction="sum")
        micro_batches = 0
        for ids, y in loader:
            if not is_empty_batch(ids):
                assert physical is None or len(ids) <= physical
                criterion(model(ids), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            micro_batches += 1
        assert eng.accountant.total_steps == optimizer.steps_taken == len(loader) == 4
        if physical is not None:
            assert micro_batches > 4
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_truncated_poisson_training_is_accounted_as_truncated():
    n = 25  # B = 6: q = 6/25 = 0.24 (not 1/len(loader) = 0.2)
    model = fresh_model()
    eng = engine(accountant=Accountant("pld", pld_discretization=1e-3))
    model, optimizer, loader = eng.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset(n), batch_size=6), noise_multiplier=1.0,
        max_grad_norm=1.0, truncated_max_batch=8, loss_reduction="sum", seed=0)
    criterion = nn.CrossEntropyLoss(reduction="none")
    for (ids, y), weights in loader:
        assert ids.shape == (8, SEQ)
        (criterion(model(ids), y) * weights).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    (entry,) = eng.accountant.history
    assert entry.num_steps == 5 and entry.truncated_max_batch == 8 and entry.dataset_size == n
    assert entry.sample_rate == pytest.approx(6 / 25, rel=1e-12)
    # ε of 5 truncated-Poisson steps from dp-accounting directly, on the same PLD grid
    truncated = dpa.TruncatedSubsampledGaussianDpEvent(
        dataset_size=n, sampling_probability=6 / 25, truncated_batch_size=8, noise_multiplier=1.0)
    assert eng.get_epsilon(DELTA) == pytest.approx(direct_pld_epsilon(truncated, 5, grid=1e-3),
                                                   rel=1e-9)
    other = TinyNet()
    with pytest.raises(ValueError, match="PLD"):
        engine(accountant="rdp").make_private(
            module=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
            data_loader=DataLoader(dataset(), batch_size=6), noise_multiplier=1.0,
            max_grad_norm=1.0, truncated_max_batch=8)


def make_private_with(**overrides):
    model = TinyNet()
    args = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=DataLoader(dataset(), batch_size=6), noise_multiplier=1.0,
                max_grad_norm=1.0)
    args.update(overrides)
    eng = engine(secure_mode=overrides.pop("secure_mode", False))
    args.pop("secure_mode", None)
    return eng, eng.make_private(**args)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier=-1.0"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm=0.0"),
    (dict(max_grad_norm=-2), ValueError, "max_grad_norm=-2"),
    (dict(loss_reduction="none"), ValueError, "loss_reduction='none'"),
    (dict(poisson_sampling=False), ValueError, "allow_non_poisson=True"),
    (dict(secure_mode=True, seed=1), ValueError, "seed=1 with secure_mode"),
    (dict(optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)), ValueError,
     "not in the module"),
])
def test_bad_inputs_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        make_private_with(**overrides)


def test_non_poisson_needs_opt_in_and_warns_and_small_delta_is_checked():
    with pytest.warns(UserWarning, match="NOT a valid privacy guarantee"):
        eng, _ = make_private_with(poisson_sampling=False, allow_non_poisson=True)
    with pytest.warns(UserWarning, match="1/N"):
        eng.get_epsilon(0.1)
