"""``python -m vaultkern bench``: vaultkern against Opacus and non-private training.

    python -m vaultkern bench --size cpu                 # ~3 min on 2 CPU cores
    python -m vaultkern bench --size gpu --out bench/results
    python -m vaultkern bench --size micro --providers nondp,vaultkern --models gemma

Writes ``<out>/<date>-<machine>-<size>.json`` (full results), ``.md`` (tables,
targets pass/miss) and ``.png`` (tokens/s relative to non-private training);
prints the markdown. Exit status 1 if the per-example norm cross-check fails or
non-private training / vaultkern errors; unsupported Opacus configurations are
recorded with their reason and do not fail the run. See bench/NOTES.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from vaultkern.benchmark.providers import OPTIMIZERS, PROVIDERS
from vaultkern.benchmark.specs import SIZES, TIES


def _csv(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    models = "; ".join(f"{s}: {', '.join(m.name for m in spec.models)}" for s, spec in SIZES.items())
    p = argparse.ArgumentParser(prog="python -m vaultkern bench",
                                description="Benchmark vaultkern against Opacus (hooks, ghost) "
                                            "and non-private training in one process.")
    p.add_argument("--size", choices=sorted(SIZES), default="cpu",
                   help="micro (test code paths), cpu (2 cores, ~3 min), gpu (T=1024, bf16)")
    p.add_argument("--out", default="bench/results", help="folder for the results files")
    p.add_argument("--providers", type=_csv, default=list(PROVIDERS),
                   help=f"comma-separated subset of {','.join(PROVIDERS)}")
    p.add_argument("--models", type=_csv, default=None, help=f"comma-separated ({models})")
    ties = p.add_mutually_exclusive_group()
    ties.add_argument("--tie", choices=("both",) + TIES, default="both",
                      help="embedding tie variants to run (default both: Opacus ghost refuses "
                           "tied weights and gets numbers from the untied variant)")
    ties.add_argument("--untie", action="store_true", help="only the untied variant")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--noise-multiplier", type=float, default=1.0, help="σ of every DP provider")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="C of every DP provider")
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default: per size)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: per size)")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model")
    p.add_argument("--device", default=None, help="override the size's device (cpu, cuda, cuda:1)")
    p.add_argument("--max-batch", choices=("auto", "all", "off"), default="auto",
                   help="largest-batch search on GPU: auto = gpt2-small only (time budget)")
    p.add_argument("--max-probes", type=int, default=8, help="one-step probes per provider")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; later configurations / probes are skipped (and recorded) "
                        "once spent")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="relative tolerance of the per-example norm cross-check")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); e.g. 1 on a machine "
                        "shared with other jobs, where spinning worker threads distort times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chart", action="store_true", help="skip the PNG")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    import torch
    from vaultkern.benchmark import harness, report

    if args.threads is not None:
        if args.threads < 1:
            print(f"vaultkern bench: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)

    ties = ("untied",) if args.untie else TIES if args.tie == "both" else (args.tie,)
    options = harness.RunOptions(
        size=args.size, providers=args.providers, models=args.models, ties=ties,
        optimizer=args.optimizer, lr=args.lr, noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm, steps=args.steps, warmup=args.warmup,
        batch=args.batch, device=args.device, max_batch=args.max_batch,
        max_probes=args.max_probes, time_budget_s=args.time_budget, crosscheck_tol=args.tol,
        seed=args.seed)
    try:
        bench = harness.Harness(options)
    except (ValueError, RuntimeError) as exc:
        print(f"vaultkern bench: {exc}", file=sys.stderr)
        return 2

    def finish(results, draw):
        results["targets"] = report.evaluate_targets(results)
        results["failures"] = report.check(results)
        results["ok"] = not results["failures"]
        return report.write(results, args.out, draw=draw)

    # the files are rewritten after every configuration, so a run cut short keeps its results
    results = bench.run(on_config=lambda partial: finish(partial, draw=False))
    paths = finish(results, draw=not args.no_chart)
    print(report.markdown(results))
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    if results["meta"].get("chart") and "png" not in paths and not args.no_chart:
        print(f"chart not drawn: {results['meta']['chart']}", file=sys.stderr)
    for failure in results["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 0 if results["ok"] else 1
