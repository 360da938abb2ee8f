"""`python -m vaultkern plan` on a compute budget: σ per row from dp-accounting's
calibration, the recommendation is the lowest σ/B̄ allowed, the PNG is written."""
import dp_accounting

from vaultkern.privacy import plan, planner

PROBLEM = planner.Problem(epsilon=4.0, delta=1e-5, dataset_size=999, tokens=999 * 64 * 6,
                          seq_len=64, min_steps=20)


def eps_dp_accounting(q, sigma, steps, delta):
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_sweep_rows_are_calibrated_and_best_is_lowest_ratio():
    rows = planner.sweep(PROBLEM, rows=4)
    assert len(rows) >= 4 and len({r.batch_size for r in rows}) == len(rows)
    for r in rows:
        assert r.tokens <= PROBLEM.tokens
        # σ meets the target (independently accounted) and is tight: 3 % less overshoots it
        assert eps_dp_accounting(r.sample_rate, r.noise_multiplier, r.steps, 1e-5) <= 4.0 * 1.001
        assert eps_dp_accounting(r.sample_rate, 0.97 * r.noise_multiplier, r.steps, 1e-5) > 4.0
    pick = planner.best(rows, PROBLEM.min_steps)
    allowed = [r for r in rows if r.steps >= PROBLEM.min_steps]
    assert pick.noise_batch_ratio == min(r.noise_batch_ratio for r in allowed)
    assert any(r.steps < PROBLEM.min_steps for r in rows) or pick.steps >= PROBLEM.min_steps


def test_plan_command_writes_the_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    rc = plan.main(["--epsilon", "4", "--delta", "1e-5", "--dataset-size", "999",
                    "--tokens", str(999 * 64 * 6), "--seq-len", "64", "--min-steps", "20",
                    "--rows", "3", "--plot", str(png), "--jobs", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and png.stat().st_size > 1000
    assert "PROXY" in out and "recommended" in out


def test_delta_above_one_over_n_is_refused(capsys):
    rc = plan.main(["--epsilon", "4", "--delta", "0.01", "--dataset-size", "500",
                    "--batch-size", "10", "--epochs", "1"])
    assert rc == 2 and "1/N" in capsys.readouterr().err


def test_the_demo_private_run_follows_the_planner():
    """make demo: the private run takes the planner's batch × steps for the demo's data at the
    non-private run's compute: a larger batch, fewer steps, at least the floor of 100."""
    from vaultkern.run.demo import (DEMO_COMMON, DEMO_EPSILON, DEMO_NON_PRIVATE,
                                    DEMO_PRIVATE_MIN_STEPS, planned_private_settings)
    private = planned_private_settings(DEMO_COMMON, DEMO_NON_PRIVATE, DEMO_EPSILON)
    budget = DEMO_NON_PRIVATE["batch_size"] * DEMO_NON_PRIVATE["steps"]
    assert private["batch_size"] * private["steps"] <= budget
    assert private["steps"] >= DEMO_PRIVATE_MIN_STEPS
    assert private["batch_size"] > DEMO_NON_PRIVATE["batch_size"]
