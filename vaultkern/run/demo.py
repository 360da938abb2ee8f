"""``make demo`` / ``python -m vaultkern train --demo``: the same data trained with and
without DP, both audited, the audits side by side (OUT/comparison.txt).

The comparison holds audit metrics on the (synthetic) training data: like the private
reports it is made from, it is not a publishable artefact of a run on real data.
"""
from __future__ import annotations

import os
import shutil

from vaultkern.run.rundir import CKPT_FILE

# 300 records give ~730 sequences of 64 tokens (a record spans 2-3); 400 steps of 32 are ~17
# epochs, enough for the non-private model to single out the 16-times-repeated canaries
DEMO_SETTINGS = dict(config="tiny", num_records=300, batch_size=32, max_physical_batch_size=32,
                     steps=400, lr=3e-3)
DEMO_EPSILON = 8.0


def demo(out_dir: str = os.path.join("runs", "demo"), quiet: bool = False,
         epsilon: float = DEMO_EPSILON, **overrides) -> dict:
    """Train tiny with and without DP on the built-in data, audit both, print a comparison.
    ``overrides``: train options, e.g. steps=100."""
    from vaultkern.audit import audit_run, format_comparison
    from vaultkern.run.cli import build_parser, resolve_args
    from vaultkern.run.loop import train
    settings = {**DEMO_SETTINGS, **overrides}
    flags = []
    for key, value in settings.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    results = {}
    for name, extra in (("non-private", ["--no-dp"]), ("private", ["--epsilon", str(epsilon)])):
        run_dir = os.path.join(out_dir, "nodp" if name == "non-private" else "dp")
        if os.path.exists(os.path.join(run_dir, CKPT_FILE)):
            shutil.rmtree(run_dir)
        parser = build_parser()
        args = parser.parse_args(flags + extra + ["--out", run_dir] + (["--quiet"] if quiet else []))
        print(f"== {name} training ({run_dir})")
        train(resolve_args(args, parser))
        results[name] = audit_run(run_dir, quiet=quiet)
    table = format_comparison(results)
    with open(os.path.join(out_dir, "comparison.txt"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    return results
