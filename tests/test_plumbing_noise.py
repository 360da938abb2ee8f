"""Secure-mode noise through its public entry points, by distribution (issue 18).

`vaultkern.ops.noise.secure_noisy_scale` and `DPOptimizer(secure_mode=True)` are keyed
from os.urandom, so these draws cannot be seeded: the margins are made so wide that the
outcome is fixed in practice. The generator underneath may change; only the distribution
(ξ ~ N(0, 1), output = (summed + std·ξ)·scale) is pinned, never bit patterns.

Margins, n = 2e6 draws: the sample std of n normals has relative sd 1/sqrt(2n) = 0.05 %,
so the 1 % tolerance is 20 sd wide (a false failure has probability < 1e-80) and a 2 %
error in the std lands 20 sd outside it. The sample mean has sd 1/sqrt(n) = 7e-4 (in
units of the std); |mean| < 6 sd fails with probability 2e-9.
"""
import functools
import math

import pytest
import torch
from scipy import stats
from torch import nn

from vaultkern.ops.noise import secure_noisy_scale
from vaultkern.privacy.optimizer import DPOptimizer

# the tests set the gradients of bare parameters by hand: no patched model owns them
bare_dp = functools.partial(DPOptimizer, require_patched=False)

N = 2_000_000


def assert_standard_normal(xi: torch.Tensor) -> None:
    """std 1 within 1 %, mean 0 within 6 sd, and the two-sided 2-sigma tail mass of N(0, 1)."""
    xi = xi.double()
    n = xi.numel()
    assert xi.std().item() == pytest.approx(1.0, rel=0.01)
    assert abs(xi.mean().item()) < 6 / math.sqrt(n)
    # P(|ξ| > 2) = 2Φ(-2) = 0.0455 (scipy); its count is Binomial(n, p): sd 295 at n = 2e6.
    # Heavier or lighter tails (a sum of draws not rescaled, a uniform) move it by thousands.
    p = 2 * stats.norm.sf(2.0)
    count = int((xi.abs() > 2).sum())
    assert abs(count - n * p) < 6 * math.sqrt(n * p * (1 - p)), (count, n * p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_secure_noisy_scale_has_std_times_scale(C, dtype):  # C: the extension must be built
    std, scale = 2.5, 0.125
    out = secure_noisy_scale(torch.zeros(N, dtype=dtype), std, scale)
    assert out.dtype == dtype and out.shape == (N,)
    assert_standard_normal(out / (std * scale))


def test_secure_noisy_scale_adds_the_sum_before_scaling(C):
    """(summed + std·ξ)·scale: the sum is scaled too, the noise is centred on it."""
    summed = torch.linspace(-3.0, 3.0, N, dtype=torch.float64)
    std, scale = 0.5, 4.0
    out = secure_noisy_scale(summed, std, scale)
    assert_standard_normal((out - summed * scale) / (std * scale))


def test_dp_optimizer_secure_noise_has_std_sigma_c_over_expected_batch(C):
    """SGD(lr=1) on a parameter with gradient g: update = (g + σ·C·ξ)/B̄; σ·C/B̄ by hand."""
    sigma, clip, expected_batch = 1.7, 0.6, 12.0
    p = nn.Parameter(torch.zeros(N, dtype=torch.float64))
    q = nn.Parameter(torch.zeros(1000, dtype=torch.float64))  # gets no gradient: noised too
    opt = bare_dp(torch.optim.SGD([p, q], lr=1.0), noise_multiplier=sigma,
                      max_grad_norm=clip, expected_batch_size=expected_batch, secure_mode=True)
    p.grad = torch.full((N,), 3.0, dtype=torch.float64)
    opt.step()
    update = -p.detach()
    assert_standard_normal((update - 3.0 / expected_batch) / (sigma * clip / expected_batch))
    # the small parameter: 1000 draws only, std within 25 % (sd of the sample std 2.2 %)
    assert (-q.detach()).std().item() == pytest.approx(sigma * clip / expected_batch, rel=0.25)


def test_default_noise_tails_and_no_repeated_streams():
    """The reproducible path's tails match a Gaussian's far past the old generator's cap
    (|ξ| <= 5.77 with 24-bit uniforms): 10^9 seeded draws (deterministic) beyond 5.8σ, and
    10^5 (step, parameter) streams that are all distinct."""
    import math

    from vaultkern import ops
    chunk, chunks, over = 1 << 25, 30, 0  # 30 · 2^25 ≈ 1.007e9 draws
    zeros = torch.zeros(chunk)
    for k in range(chunks):  # one stream, consecutive pieces (offset = position)
        xi = ops.noisy_scale(zeros, 1.0, 1.0, seed=2026, step=3, offset=k * chunk)
        over += int((xi.abs() > 5.8).sum())
    expected = chunks * chunk * math.erfc(5.8 / math.sqrt(2))  # ≈ 6.7
    assert over >= 1 and abs(over - expected) <= 5 * math.sqrt(expected) + 1, (over, expected)

    heads = set()
    tiny = torch.zeros(4, dtype=torch.float64)
    for step in range(1000):
        for parameter in range(100):
            heads.add(tuple(ops.noisy_scale(tiny, 1.0, 1.0, seed=7, step=step,
                                            offset=parameter * 1_000_003).tolist()))
    assert len(heads) == 100_000
