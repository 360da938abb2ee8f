"""Accountant and calibration against dp-accounting computed directly."""
import math

import dp_accounting as dpa
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from vaultkern.privacy.accounting import Accountant, calibrate_noise_multiplier, epsilon_for

DELTA = 1e-5


def poisson_steps(sigma, q, steps):
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)


def direct_epsilon(event, kind="pld", delta=DELTA, grid=1e-4):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid) \
        if kind == "pld" else rdp_privacy_accountant.RdpAccountant()
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_epsilon_equals_dp_accounting_for_composed_event(kind):
    acc = Accountant(kind)
    for _ in range(40):
        acc.step(2.0, 0.05)
    acc.step(1.5, 0.02, num_steps=25)
    acc.step(1.5, 0.02, num_steps=5)
    assert [tuple(e)[:3] for e in acc.history] == [(2.0, 0.05, 40), (1.5, 0.02, 30)]
    expected = direct_epsilon(dpa.ComposedDpEvent(
        [poisson_steps(2.0, 0.05, 40), poisson_steps(1.5, 0.02, 30)]), kind)
    assert acc.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-12)
    assert acc.total_steps == 70


def test_epsilon_grows_with_steps_and_is_zero_before_any():
    acc = Accountant()
    assert acc.get_epsilon(DELTA) == 0.0
    acc.step(2.0, 0.05, 10)
    first = acc.get_epsilon(DELTA)
    acc.step(2.0, 0.05, 10)
    assert 0 < first < acc.get_epsilon(DELTA)


def test_rdp_is_an_upper_bound_on_pld():
    for sigma, q, steps in [(2.0, 0.05, 50), (1.5, 0.1, 20)]:
        pld = epsilon_for(sigma, q, steps, DELTA, "pld")
        rdp = epsilon_for(sigma, q, steps, DELTA, "rdp")
        assert rdp >= pld > 0


def test_truncated_poisson_uses_the_truncated_event():
    acc = Accountant("pld", pld_discretization=1e-3)  # the truncated PLD is slow at 1e-4
    acc.step(1.0, 0.05, num_steps=20, truncated_max_batch=8, dataset_size=100)
    event = dpa.SelfComposedDpEvent(dpa.TruncatedSubsampledGaussianDpEvent(
        dataset_size=100, sampling_probability=0.05, truncated_batch_size=8,
        noise_multiplier=1.0), 20)
    assert acc.get_epsilon(DELTA) == pytest.approx(direct_epsilon(event, grid=1e-3), rel=1e-12)
    # truncation is a different mechanism from plain Poisson: its epsilon differs
    assert acc.get_epsilon(DELTA) != pytest.approx(epsilon_for(1.0, 0.05, 20, DELTA), rel=1e-3)


def test_truncated_poisson_refused_by_rdp_and_needs_dataset_size():
    with pytest.raises(ValueError, match="PLD"):
        Accountant("rdp").step(1.0, 0.05, truncated_max_batch=8, dataset_size=100)
    with pytest.raises(ValueError, match="dataset_size"):
        Accountant("pld").step(1.0, 0.05, truncated_max_batch=8)


def test_state_dict_round_trip_gives_the_same_epsilon():
    acc = Accountant("pld", pld_discretization=1e-3)
    acc.step(1.2, 0.04, 30)
    acc.step(1.0, 0.04, 10, truncated_max_batch=12, dataset_size=200)
    state = acc.state_dict()
    fresh = Accountant("pld", pld_discretization=1e-3)
    fresh.load_state_dict(state)
    assert fresh.history == acc.history
    assert fresh.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    with pytest.raises(ValueError, match="kind"):
        Accountant("rdp").load_state_dict(state)
    with pytest.raises(ValueError, match="pld_discretization"):
        Accountant("pld").load_state_dict(state)


@pytest.mark.parametrize("bad, match", [
    (dict(noise_multiplier=-0.5, sample_rate=0.1), "noise_multiplier=-0.5"),
    (dict(noise_multiplier=1.0, sample_rate=1.5), "sample_rate=1.5"),
    (dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=-1), "num_steps=-1"),
])
def test_bad_steps_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        Accountant().step(**bad)


def test_bad_delta_and_kind():
    with pytest.raises(ValueError, match="delta=0"):
        Accountant().get_epsilon(0.0)
    with pytest.raises(ValueError, match="accountant='gdp'"):
        Accountant("gdp")


@pytest.mark.parametrize("kind, target, q, steps", [
    ("pld", 2.0, 0.05, 60), ("pld", 0.8, 0.02, 100),
    ("rdp", 3.0, 0.05, 40), ("rdp", 1.0, 0.01, 500),
])
def test_calibration_within_one_percent_below_target(kind, target, q, steps):
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, accountant=kind)
    eps = direct_epsilon(poisson_steps(sigma, q, steps), kind)
    assert 0.99 * target <= eps <= target


def test_calibration_truncated():
    trunc = dict(truncated_max_batch=10, dataset_size=30, pld_discretization=1e-3)
    sigma = calibrate_noise_multiplier(2.3, DELTA, 0.2, 5, **trunc)
    # checked with dp-accounting directly (not vaultkern's epsilon_for), on the same grid
    event = dpa.SelfComposedDpEvent(dpa.TruncatedSubsampledGaussianDpEvent(
        dataset_size=30, sampling_probability=0.2, truncated_batch_size=10,
        noise_multiplier=sigma), 5)
    assert 0.99 * 2.3 <= direct_epsilon(event, grid=1e-3) <= 2.3


def test_calibration_unreachable_and_bad_targets_raise():
    with pytest.raises(ValueError, match="cannot be reached"):
        calibrate_noise_multiplier(1e-6, 1e-10, 1.0, 1000, accountant="rdp")
    with pytest.raises(ValueError, match="target_epsilon=0"):
        calibrate_noise_multiplier(0.0, DELTA, 0.1, 10)
    with pytest.raises(ValueError, match="delta=0"):
        calibrate_noise_multiplier(1.0, 0.0, 0.1, 10)
    with pytest.raises(ValueError, match="steps=0"):
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 0)
    with pytest.raises(ValueError, match="sample_rate=0"):
        calibrate_noise_multiplier(1.0, DELTA, 0.0, 10)
    assert math.isfinite(calibrate_noise_multiplier(1.0, DELTA, 0.1, 10, accountant="rdp"))


def test_plan_command_prints_sigma_and_epsilon_table(capsys):
    from vaultkern.privacy import plan
    # N = 1010 is not a multiple of B = 50: q = 50/1010, ceil(1010/50) = 21 steps per epoch
    argv = ["--epsilon", "3", "--delta", "1e-5", "--dataset-size", "1010", "--batch-size", "50",
            "--epochs", "2", "--accountant", "rdp", "--points", "4"]
    assert plan.main(argv) == 0
    out = capsys.readouterr().out
    sigma = float(out.split("noise multiplier σ")[1].split()[0])
    assert f"sampling rate q       {50 / 1010:.6g}" in out
    # σ is printed to 6 digits (relative rounding <= 5e-6): ε moves by about as much
    eps = direct_epsilon(poisson_steps(sigma, 50 / 1010, 42), "rdp")
    assert 0.99 * 3 * (1 - 1e-4) <= eps <= 3 * (1 + 1e-4)
    assert "steps                 42  (21 per epoch)" in out
    assert f"noise-batch ratio σ/B {sigma / 50:.6g}" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2].isdigit()]
    assert [int(r[0]) for r in rows] == [10, 21, 32, 42]  # round(42·k/4), half to even
    assert [float(r[2]) for r in rows] == sorted(float(r[2]) for r in rows)
    with pytest.raises(SystemExit) as exc:
        plan.main(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--epsilon", "--delta", "--dataset-size", "--batch-size", "--epochs",
                 "--accountant", "--max-batch-size", "--points", "--tolerance"):
        assert flag in help_text
    assert plan.main(argv[:-4] + ["--epsilon", "0"]) == 2  # unreachable/bad target: exit 2
