"""The reference training run (`python -m vaultkern train`) samples what it accounts.

Tested through the command line and the files the run writes (model_card.json, ckpt.pt's
accountant history and DPOptimizer state), plus one observation point that does not
depend on how train.py is organised: a global forward pre-hook (a public torch API)
records how many rows each training forward of the vaultkern Decoder receives. With
--max-physical-batch-size above any possible batch, every non-empty logical batch is one
forward, so those row counts are the Poisson batch sizes, and steps without a forward
are the empty batches.

Expected values: q = batch_size / N by hand (N from the model card), Binomial(N, q)
probabilities from scipy, ε from dp-accounting directly.
"""
import json
import math
from contextlib import contextmanager

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

import vaultkern.__main__ as cli
from train_setup import TINY32
from vaultkern.models import Decoder
from vaultkern.privacy import Accountant

pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def training_batch_sizes():
    """Rows of every training forward of a Decoder (grad enabled, train mode) while active."""
    sizes = []

    def hook(module, args):
        if isinstance(module, Decoder) and module.training and torch.is_grad_enabled():
            sizes.append(int(args[0].shape[0]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield sizes
    finally:
        handle.remove()


def train_cli(tmp_path, name, *flags):
    """`python -m vaultkern train ...` in-process; (run directory, batch sizes seen)."""
    config = tmp_path / "tiny32.toml"
    config.write_text(TINY32)
    out = tmp_path / name
    argv = ["train", "--config", str(config), "--num-records", "60", "--out", str(out),
            "--quiet", "--device", "cpu", "--dp-seed", "2024", "--accountant", "rdp",
            "--max-physical-batch-size", "100000", *map(str, flags)]
    with training_batch_sizes() as sizes:
        assert cli.main(argv) == 0
    return out, sizes


def saved_state(out):
    card = json.loads((out / "model_card.json").read_text())
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    accountant = Accountant("rdp")
    accountant.load_state_dict(ckpt["accountant"])
    return card, ckpt, accountant


def the_one_poisson_entry(accountant):
    """(q, σ, steps) of an accountant whose history is one run of plain Poisson steps."""
    composed = accountant.event()
    assert isinstance(composed, dpa.ComposedDpEvent) and len(composed.events) == 1
    steps = composed.events[0]
    assert isinstance(steps, dpa.SelfComposedDpEvent)
    one = steps.event
    assert isinstance(one, dpa.PoissonSampledDpEvent), one  # not truncated, not fixed batches
    assert isinstance(one.event, dpa.GaussianDpEvent)
    return one.sampling_probability, one.event.noise_multiplier, steps.count


def test_dp_run_draws_binomial_batches_at_the_accounted_rate(tmp_path):
    steps, batch, sigma = 40, 17, 1.0
    out, sizes = train_cli(tmp_path, "dp", "--batch-size", batch, "--steps", steps,
                           "--noise-multiplier", sigma, "--epsilon-every", steps)
    card, _, accountant = saved_state(out)
    n = card["data"]["train_sequences"]
    q = batch / n
    # premise: were N a multiple of B, B/N and 1/(steps per epoch) would coincide (if the
    # built-in data changes so that it is, pick another prime batch size)
    assert n % batch != 0, n
    acc_q, acc_sigma, acc_steps = the_one_poisson_entry(accountant)
    assert acc_q == pytest.approx(q, rel=1e-12) and (acc_sigma, acc_steps) == (sigma, steps)
    direct = rdp_privacy_accountant.RdpAccountant().compose(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    assert card["privacy"]["epsilon"] == pytest.approx(direct.get_epsilon(1e-6), rel=1e-9)

    # P(empty batch) = (1 - q)^N < 1e-6 here: every step is one forward of its whole batch
    assert len(sizes) == steps, sizes
    sizes = np.array(sizes)
    var = n * q * (1 - q)
    # the mean: total ~ Binomial(steps·N, q), sd 26; |z| < 5 catches q off by >= 20 %
    z = (sizes.sum() - steps * n * q) / math.sqrt(steps * var)
    assert abs(z) < 5, (sizes, z)
    # the spread: Σ (s - Nq)² / Var ~ χ²(steps) for Binomial sizes; fixed-size batches of B
    # give 0 (lower tail 0), shuffled chunks with a short remainder give one huge term
    dispersion = ((sizes - n * q) ** 2).sum() / var
    assert stats.chi2.cdf(dispersion, steps) > 1e-6 and stats.chi2.sf(dispersion, steps) > 1e-6
    # and the shape: counts in 4 bins of Binomial(N, q) (expected >= 7 each), chi-square
    edges = [0, 14, 17, 20, n + 1]
    observed = np.histogram(sizes, bins=edges)[0]
    expected = np.diff(stats.binom.cdf(np.array(edges) - 1, n, q)) * steps
    assert expected.min() >= 7, expected
    assert stats.chisquare(observed, expected).pvalue > 1e-4, (observed, expected)


def test_empty_poisson_batches_are_noised_steps_and_charged(tmp_path):
    """Expected batch 1: each batch is empty with probability (1 - 1/N)^N ≈ 0.37. An empty
    batch runs no forward, yet it is a step: noised (the DPOptimizer counts it) and charged."""
    steps = 12
    out, sizes = train_cli(tmp_path, "b1", "--batch-size", 1, "--steps", steps,
                           "--noise-multiplier", 1.0, "--epsilon-every", steps)
    card, ckpt, accountant = saved_state(out)
    n = card["data"]["train_sequences"]
    empty = steps - len(sizes)
    assert 1 <= empty < steps and all(s >= 1 for s in sizes), sizes
    assert ckpt["optimizer"]["vaultkern_dp"]["steps_taken"] == steps
    acc_q, _, acc_steps = the_one_poisson_entry(accountant)
    assert acc_steps == steps and acc_q == pytest.approx(1 / n, rel=1e-12)
    final = torch.load(out / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in final.values())
