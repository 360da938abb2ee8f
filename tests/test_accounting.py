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
    # PLD: 40 = 32 + 8 and 30 = 16 + 14 steps are composed in two parts each (pld.ANCHOR),
    # which moves ε in the 10th digit (both are pessimistic upper bounds)
    assert acc.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-12 if kind == "rdp" else 1e-9)
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
    # 20 = 16 + 4 steps, composed in two parts (pld.ANCHOR): equal to the 10th digit
    assert acc.get_epsilon(DELTA) == pytest.approx(direct_epsilon(event, grid=1e-3), rel=1e-9)
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
    with pytest.raises(ValueError, match="accountant='moments'"):
        Accountant("moments")


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


def test_pld_epsilon_depends_on_the_history_only_and_matches_dp_accounting_when_aligned():
    """ε after each step, asked at every step, at every 7th, or once for the whole history:
    bit for bit the same (a resumed run reports the uninterrupted run's ε); with entries of
    fewer than ANCHOR steps or a multiple of it, bit for bit dp-accounting's own."""
    from vaultkern.privacy.pld import ANCHOR
    grid = 1e-3  # fast; the caching is the same on every grid
    stepwise, sparse = Accountant("pld", grid), Accountant("pld", grid)
    seen = {}
    for n in range(1, 41):
        stepwise.step(1.1, 0.02)
        seen[n] = stepwise.get_epsilon(DELTA)
        sparse.step(1.1, 0.02)
        if n % 7 == 0:
            assert sparse.get_epsilon(DELTA) == seen[n]
    for n in (5, 2 * ANCHOR, 37):
        once = Accountant("pld", grid)
        once.step(1.1, 0.02, n)
        assert once.get_epsilon(DELTA) == seen[n]
    assert seen[5] == direct_epsilon(poisson_steps(1.1, 0.02, 5), grid=grid)
    assert seen[2 * ANCHOR] == direct_epsilon(poisson_steps(1.1, 0.02, 2 * ANCHOR), grid=grid)
    assert seen[37] == pytest.approx(direct_epsilon(poisson_steps(1.1, 0.02, 37), grid=grid),
                                     rel=1e-9)
    assert all(seen[n] < seen[n + 1] for n in range(1, 40))
    stepwise.step(0.0, 0.02)  # a step without noise: no finite ε
    assert stepwise.get_epsilon(DELTA) == math.inf


def test_pld_growing_history_costs_one_composition_per_call(monkeypatch):
    """What makes get_epsilon fast in a training loop (0.4-1.2 s per call before, measured on
    1000 steps): after the first call, one more step costs one composition of the kept prefix
    with a cached P^r and one ε query; a new P^H once every ANCHOR steps."""
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    from vaultkern.privacy.pld import ANCHOR
    acc = Accountant("pld", 1e-3)
    acc.step(1.0, 0.01, 1000)
    acc.get_epsilon(DELTA)
    for _ in range(ANCHOR):  # one pass over the remainders fills the cache of P^r
        acc.step(1.0, 0.01)
        acc.get_epsilon(DELTA)
    calls = {"compose": 0, "self_compose": 0}
    for name in calls:
        original = getattr(pld_lib.PrivacyLossDistribution, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(pld_lib.PrivacyLossDistribution, name, counted)
    for _ in range(ANCHOR):
        acc.step(1.0, 0.01)
        acc.get_epsilon(DELTA)
    assert calls == {"compose": ANCHOR, "self_compose": 1}  # the one new P^H (r = 0)
    acc.get_epsilon(DELTA)  # the same history again: cached
    assert calls["compose"] == ANCHOR


def test_opacus_accountant_names_and_calls():
    for kind in ("prv", "gdp"):
        with pytest.warns(UserWarning, match=f"accountant='{kind}'.*PLD"):
            assert Accountant(kind).mechanism() == "pld"
    rdp = Accountant("rdp")
    assert rdp.get_privacy_spent(delta=DELTA) == (0.0, 0.0)
    rdp.step(noise_multiplier=1.1, sample_rate=0.01)  # Opacus' keywords
    rdp.step(1.1, 0.01, 99)
    direct = rdp_privacy_accountant.RdpAccountant().compose(poisson_steps(1.1, 0.01, 100))
    eps, order = rdp.get_privacy_spent(delta=DELTA)
    assert (eps, order) == pytest.approx(direct.get_epsilon_and_optimal_order(DELTA), rel=1e-12)
    orders = [2, 4, 8, 16, 32]
    custom = rdp_privacy_accountant.RdpAccountant(orders).compose(poisson_steps(1.1, 0.01, 100))
    assert rdp.get_epsilon(DELTA, alphas=orders) == pytest.approx(custom.get_epsilon(DELTA),
                                                                 rel=1e-12)
    assert rdp.get_privacy_spent(delta=DELTA, alphas=orders)[1] in orders
    pld = Accountant("pld", 1e-3)
    pld.step(1.1, 0.01, 100)
    assert pld.get_epsilon(DELTA, eps_error=0.01, delta_error=1e-8) == pld.get_epsilon(DELTA)
    with pytest.raises(ValueError, match="get_privacy_spent.*'pld'"):
        pld.get_privacy_spent(delta=DELTA)
    with pytest.raises(ValueError, match="alphas"):
        pld.get_epsilon(DELTA, alphas=orders)
    with pytest.raises(ValueError, match="eps_error=0"):
        pld.get_epsilon(DELTA, eps_error=0)


def test_rdp_does_not_flood_the_log(caplog):
    """dp-accounting logs one line per RDP order whose series does not converge (small
    orders, large q); the order is just left out, so vaultkern drops those lines."""
    with caplog.at_level("WARNING"):
        assert math.isfinite(epsilon_for(1.0, 0.5, 100, DELTA, "rdp"))
        calibrate_noise_multiplier(200.0, DELTA, 0.5, 100, accountant="rdp")
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
    import logging
    assert not logging.getLogger("absl").filters  # the filter is only on while computing
