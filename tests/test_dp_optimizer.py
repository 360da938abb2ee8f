"""DPOptimizer: noise statistics, reproducibility, checks, state."""
import copy
import functools
import math

import pytest
import torch
from torch import nn

from vaultkern.backend import extension
from vaultkern.ops.noise import noisy_scale
from vaultkern.privacy.optimizer import DPOptimizer

# the tests set the gradients of bare parameters by hand: no patched model owns them
bare_dp = functools.partial(DPOptimizer, require_patched=False)

# 1e6 draws: the sample std has relative sd 1/sqrt(2e6) = 0.07 %, so a 1 % tolerance is
# 14 sd wide and a 2 % error in the std lands 14 sd outside it (seeded: deterministic too)
N_ELEMENTS = 1_000_000


def noise_after_one_step(sigma, clip, batch, reduction, seed=0):
    """The update of an SGD(lr=1) step on a parameter that got no gradient."""
    p = nn.Parameter(torch.zeros(N_ELEMENTS, dtype=torch.float64))
    opt = bare_dp(torch.optim.SGD([p], lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                      expected_batch_size=batch, loss_reduction=reduction, seed=seed)
    opt.step()
    return -p.detach()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_noise_has_std_sigma_c_over_expected_batch_and_zero_mean(reduction):
    sigma, clip, batch = 1.3, 0.7, 8.0
    update = noise_after_one_step(sigma, clip, batch, reduction)
    expected_std = {"mean": 1.3 * 0.7 / 8.0, "sum": 1.3 * 0.7}[reduction]  # σC/B̄, σC by hand
    assert update.std().item() == pytest.approx(expected_std, rel=0.01)
    assert abs(update.mean().item()) < 6 * expected_std / math.sqrt(N_ELEMENTS)


def test_noise_is_reproducible_per_seed_step_and_parameter():
    a = noise_after_one_step(1.0, 1.0, 4, "mean", seed=5)
    b = noise_after_one_step(1.0, 1.0, 4, "mean", seed=5)
    c = noise_after_one_step(1.0, 1.0, 4, "mean", seed=6)
    assert torch.equal(a, b) and not torch.allclose(a, c)

    p, r = nn.Parameter(torch.zeros(1000)), nn.Parameter(torch.zeros(1000))
    opt = bare_dp(torch.optim.SGD([p, r], lr=1.0), 2.0, 0.5, expected_batch_size=10, seed=1)
    opt.step()
    step0_p, step0_r = -p.detach().clone(), -r.detach().clone()
    assert not torch.allclose(step0_p, step0_r)  # parameters get independent noise
    # the documented formula: noisy_scale(0, σC, 1/B̄, seed, step, offset = elements before p)
    zeros = torch.zeros(1000)
    assert torch.equal(step0_r, noisy_scale(zeros, 1.0, 0.1, seed=1, step=0, offset=1000))
    opt.zero_grad()
    opt.step()
    step1_p = -p.detach() - step0_p
    assert not torch.allclose(step1_p, step0_p)  # a new step draws new noise
    assert opt.steps_taken == 2


def test_clipped_sum_is_noised_and_scaled():
    p = nn.Parameter(torch.zeros(3))
    opt = bare_dp(torch.optim.SGD([p], lr=1.0), 0.0, 1.0, expected_batch_size=4)
    p.grad = torch.tensor([4.0, -8.0, 2.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([-1.0, 2.0, -0.5]))


def test_every_trainable_parameter_gets_noise_frozen_ones_do_not():
    """σ = 1, C = 1, B̄ = 2: the used parameter moves by (1 + ξ)/2, the unused one (no grad)
    by ξ/2 - the same noise level, so an untouched parameter is indistinguishable."""
    n = 200_000  # sample std of n normals: relative sd 0.16 %; 3 % tolerance = 19 sd
    used, unused = nn.Parameter(torch.zeros(n)), nn.Parameter(torch.zeros(n))
    frozen = nn.Parameter(torch.zeros(50), requires_grad=False)
    opt = bare_dp(torch.optim.SGD([used, unused, frozen], lr=1.0), 1.0, 1.0,
                      expected_batch_size=2, seed=0)
    used.grad = torch.ones(n)
    opt.step()
    for moved, signal in ((-used.detach(), 0.5), (-unused.detach(), 0.0)):
        assert moved.std().item() == pytest.approx(0.5, rel=0.03)
        assert abs(moved.mean().item() - signal) < 6 * 0.5 / math.sqrt(n)
    assert frozen.grad is None and (frozen == 0).all()


def test_secure_mode_with_seed_is_an_error_and_secure_noise_needs_the_extension():
    p = nn.Parameter(torch.zeros(20_000))
    with pytest.raises(ValueError, match="seed=3 with secure_mode"):
        bare_dp(torch.optim.SGD([p], lr=1.0), 1.0, 1.0, 4, secure_mode=True, seed=3)
    opt = bare_dp(torch.optim.SGD([p], lr=1.0), 1.0, 1.0, 4, secure_mode=True)
    assert opt.seed is None and opt.state_dict()["vaultkern_dp"]["seed"] is None
    ext = extension()
    if ext is None or not hasattr(ext, "secure_noisy_scale"):
        with pytest.raises(RuntimeError, match="extension"):
            opt.step()
        assert (p == 0).all()
    else:
        opt.step()
        # σC/B̄ = 1/4; 2e4 unseeded draws: relative sd of the std 0.5 %, 3 % = 6 sd. The
        # 1 % check with 2e6 draws is tests/test_plumbing_noise.py.
        assert (-p).std().item() == pytest.approx(0.25, rel=0.03)


def test_non_finite_gradient_raises_and_changes_nothing():
    p, r = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    calls = []
    opt = bare_dp(torch.optim.SGD([p, r], lr=1.0), 1.0, 1.0, 2, seed=0)
    opt.attach_step_hook(lambda o: calls.append(o.steps_taken))
    p.grad = torch.ones(4)
    r.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(FloatingPointError, match=r"parameter 1 of shape \(4,\)"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and torch.equal(p.grad, torch.ones(4))
    assert opt.steps_taken == 0 and calls == []
    r.grad = torch.tensor([float("inf"), 0.0, 0.0, 0.0])
    with pytest.raises(FloatingPointError):
        opt.step()


def test_loss_scaling_with_grad_scaler_is_refused_and_changes_nothing():
    """A scaled loss scales every example's gradient before it is clipped, so the clipped
    update would be `scale` times too small; GradScaler(enabled=False) is fine."""
    p = nn.Parameter(torch.ones(4))
    opt = bare_dp(torch.optim.SGD([p], lr=1.0), 0.0, 1.0, 2, seed=0)
    for unscale_first in (False, True):
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(p.sum()).backward()
        if unscale_first:  # the usual clip_grad_norm_ recipe
            scaler.unscale_(opt)
        with pytest.raises(RuntimeError, match="GradScaler.*not supported"):
            scaler.step(opt)
        assert torch.equal(p.detach(), torch.ones(4)) and opt.steps_taken == 0
        opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scaler.scale(p.sum()).backward()
    scaler.step(opt)
    assert opt.steps_taken == 1 and torch.equal(p.detach(), torch.full((4,), 0.5))


def test_skipped_micro_steps_keep_accumulating():
    p = nn.Parameter(torch.zeros(2))
    opt = bare_dp(torch.optim.SGD([p], lr=1.0), 0.0, 1.0, expected_batch_size=2)
    calls = []
    opt.attach_step_hook(lambda o: calls.append(1))
    p.grad = torch.tensor([1.0, 2.0])
    opt.signal_skip_step(True)
    opt.step()
    opt.zero_grad()  # kept: the logical step is not over
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0])) and (p == 0).all() and calls == []
    p.grad += torch.tensor([1.0, 2.0])  # the next micro-batch's backward accumulates
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([-1.0, -2.0])) and calls == [1]
    opt.zero_grad()
    assert p.grad is None


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(0)
    init = torch.randn(30)

    def make():
        p = nn.Parameter(init.clone())
        return p, bare_dp(torch.optim.SGD([p], lr=0.1, momentum=0.9), 1.0, 1.0, 5,
                              seed=None)

    p, opt = make()
    for _ in range(2):
        p.grad = torch.ones(30)
        opt.step()
        opt.zero_grad()
    state = copy.deepcopy(opt.state_dict())  # as torch.save would: no shared buffers
    assert state["vaultkern_dp"]["steps_taken"] == 2 and state["vaultkern_dp"]["seed"] == opt.seed
    p2, opt2 = make()
    p2.data.copy_(p.data)
    opt2.load_state_dict(state)
    assert opt2.seed == opt.seed and opt2.steps_taken == 2
    for param, optimizer in ((p, opt), (p2, opt2)):
        param.grad = torch.ones(30)
        optimizer.step()
    assert torch.equal(p, p2)  # same noise (seed, step) and same momentum buffer


def test_works_with_lr_schedulers_and_closures():
    p = nn.Parameter(torch.zeros(3))
    opt = bare_dp(torch.optim.SGD([p], lr=1.0), 0.0, 1.0, 1, loss_reduction="sum")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)

    def closure():
        p.grad = torch.ones(3)
        return 7.0
    assert opt.step(closure) == 7.0
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(p.detach(), -torch.ones(3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(noise_multiplier=-1.0), "noise_multiplier=-1.0"),
    (dict(max_grad_norm=0.0), "max_grad_norm=0.0"),
    (dict(loss_reduction="avg"), "loss_reduction='avg'"),
    (dict(expected_batch_size=None), "expected_batch_size=None"),
    (dict(expected_batch_size=0), "expected_batch_size=0"),
])
def test_bad_arguments(kwargs, match):
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        bare_dp(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), **args)


def test_sum_reduction_needs_no_batch_size():
    p = nn.Parameter(torch.zeros(2))
    opt = bare_dp(torch.optim.SGD([p], lr=1.0), 0.0, 1.0, None, loss_reduction="sum")
    p.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([-3.0, -4.0]))


def test_cpu_noise_is_the_same_with_one_thread_or_several():
    """The CPU noise of many tensors runs on a thread pool; values must not depend on it."""
    from vaultkern import ops
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(n, generator=gen) for n in (5000, 3, 1200, 0, 77)]
    offsets = [0, 5000, 5003, 6203, 6203]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            tensors = [t.clone() for t in base]
            ops.noisy_scale_many(tensors, 0.5, 0.25, seed=4, step=1, offsets=offsets,
                                 backend="torch")
            results.append(tensors)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert not torch.equal(results[0][0], base[0])
