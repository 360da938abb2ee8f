"""``make demo`` / ``python -m vaultkern train --demo``: the same data trained with and
without DP, both audited, the audits side by side (OUT/comparison.txt).

The comparison holds audit metrics on the (synthetic) training data: like the private
reports it is made from, it is not a publishable artefact of a run on real data.
"""
from __future__ import annotations

import os
import shutil

from vaultkern.run.rundir import CKPT_FILE

# 300 records give ~720 sequences of 64 tokens (a record spans 2-3). The non-private run
# takes 400 steps of 32 (~18 epochs, enough to single out the 16-times-repeated canaries).
# The private run gets the same compute (12,800 sequences) in the configuration that
# `python -m vaultkern plan` recommends for it (lowest σ/B̄ with at least 100 steps:
# 128 × 100 on this data), at a learning rate tuned for that batch (README, "the demo").
DEMO_COMMON = dict(config="tiny", num_records=300, max_physical_batch_size=32)
DEMO_NON_PRIVATE = dict(batch_size=32, steps=400, lr=3e-3)
DEMO_PRIVATE_LR = 3e-2
DEMO_PRIVATE_MIN_STEPS = 100
DEMO_EPSILON = 8.0


def _flags(settings: dict) -> list:
    return [x for key, value in settings.items() for x in (f"--{key.replace('_', '-')}", str(value))]


def planned_private_settings(common: dict, non_private: dict, epsilon: float) -> dict:
    """Batch size and steps of the private run: the planner's pick for the demo's data (N),
    privacy target and the non-private run's compute."""
    from vaultkern.models import get_config
    from vaultkern.privacy import planner
    from vaultkern.run.cli import build_parser
    from vaultkern.run.loop import build_data
    args = build_parser().parse_args(_flags(common))
    seq_len = get_config(args.config).seq_len
    problem = planner.Problem(
        epsilon=epsilon, delta=args.delta, dataset_size=len(build_data(args, seq_len).train_rows),
        tokens=non_private["batch_size"] * non_private["steps"] * seq_len, seq_len=seq_len,
        min_steps=min(DEMO_PRIVATE_MIN_STEPS, non_private["steps"]))
    with planner.quiet_dp_accounting():
        pick = planner.best(planner.sweep(problem), problem.min_steps)
    return dict(batch_size=pick.batch_size, steps=pick.steps, lr=DEMO_PRIVATE_LR)


def demo(out_dir: str = os.path.join("runs", "demo"), quiet: bool = False,
         epsilon: float = DEMO_EPSILON, **overrides) -> dict:
    """Train tiny with and without DP on the built-in data, audit both, print a comparison.
    ``overrides``: train options for both runs, e.g. steps=100 (given batch_size and steps,
    the private run does not consult the planner)."""
    from vaultkern.audit import audit_run, format_comparison
    from vaultkern.run.cli import build_parser, resolve_args
    from vaultkern.run.loop import train
    common = {**DEMO_COMMON, **{k: v for k, v in overrides.items() if k in DEMO_COMMON}}
    non_private = {**DEMO_NON_PRIVATE, **{k: v for k, v in overrides.items() if k in DEMO_NON_PRIVATE}}
    if "batch_size" in overrides and "steps" in overrides:
        private = dict(non_private)
    else:
        private = planned_private_settings(common, non_private, epsilon)
        print(f"== planner: private run with batch {private['batch_size']} x {private['steps']} "
              f"steps (same compute as {non_private['batch_size']} x {non_private['steps']})")
    rest = {k: v for k, v in overrides.items() if k not in DEMO_COMMON and k not in DEMO_NON_PRIVATE}
    results = {}
    runs = (("non-private", {**common, **non_private, **rest}, ["--no-dp"]),
            ("private", {**common, **private, **rest}, ["--epsilon", str(epsilon)]))
    for name, settings, extra in runs:
        run_dir = os.path.join(out_dir, "nodp" if name == "non-private" else "dp")
        if os.path.exists(os.path.join(run_dir, CKPT_FILE)):
            shutil.rmtree(run_dir)
        parser = build_parser()
        argv = _flags(settings) + extra + ["--out", run_dir] + (["--quiet"] if quiet else [])
        print(f"== {name} training ({run_dir})")
        train(resolve_args(parser, argv))
        results[name] = audit_run(run_dir, quiet=quiet)
    table = format_comparison(results)
    with open(os.path.join(out_dir, "comparison.txt"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    return results
