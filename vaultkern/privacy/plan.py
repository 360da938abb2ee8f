"""``python -m vaultkern plan``: noise multiplier and ε for a training plan.

Given a privacy target (ε, δ), the dataset size N, the expected batch size B̄
and the number of epochs, it calibrates the noise multiplier σ with
dp-accounting and prints the sampling rate q = B̄/N, the number of steps
(epochs × ⌈N/B̄⌉, the length of a DataLoader without drop_last), the
noise-batch ratio σ/B̄ (the std of the noise in the averaged gradient, in units
of the clipping norm C) and ε at a few points during training.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

from vaultkern.privacy.accounting import ACCOUNTANTS, calibrate_noise_multiplier, epsilon_for


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vaultkern plan",
        description="Calibrate the DP-SGD noise multiplier for a privacy target and show how "
                    "epsilon grows over training (Poisson sampling, add-or-remove-one "
                    "neighbours, dp-accounting).",
        epilog="example: python -m vaultkern plan --epsilon 2 --delta 1.1e-10 "
               "--dataset-size 13000000 --batch-size 524288 --epochs 1")
    parser.add_argument("--epsilon", type=float, required=True,
                        help="target epsilon at the end of training (> 0)")
    parser.add_argument("--delta", type=float, required=True,
                        help="target delta, in (0, 1); should be well below 1/dataset-size")
    parser.add_argument("--dataset-size", type=int, required=True,
                        help="N, the number of privacy units (examples / sequences)")
    parser.add_argument("--batch-size", type=int, required=True,
                        help="expected (logical) batch size B; sampling rate q = B/N")
    parser.add_argument("--epochs", type=float, required=True,
                        help="number of passes over the data; steps = round(epochs * ceil(N/B))")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="pld",
                        help="dp-accounting accountant: pld (tight, default) or rdp (looser)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="cap b for truncated Poisson sampling (fixed shapes); accounted "
                             "with TruncatedSubsampledGaussianDpEvent, pld only")
    parser.add_argument("--points", type=int, default=5,
                        help="number of rows in the epsilon-over-training table (default 5)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="relative tolerance of the calibrated epsilon (default 0.01)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    n, b = args.dataset_size, args.batch_size
    if n < 1:
        parser.error(f"--dataset-size {n}: must be >= 1")
    if not 1 <= b <= n:
        parser.error(f"--batch-size {b}: must lie in [1, dataset-size={n}]")
    if not args.epochs > 0:
        parser.error(f"--epochs {args.epochs}: must be > 0")
    if args.points < 1:
        parser.error(f"--points {args.points}: must be >= 1")
    q = b / n
    steps_per_epoch = math.ceil(n / b)
    steps = max(1, round(args.epochs * steps_per_epoch))
    truncation = dict(truncated_max_batch=args.max_batch_size,
                      dataset_size=n if args.max_batch_size is not None else None)
    try:
        sigma = calibrate_noise_multiplier(args.epsilon, args.delta, q, steps,
                                           accountant=args.accountant,
                                           epsilon_tolerance=args.tolerance, **truncation)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.delta >= 1.0 / n:
        print(f"warning: delta={args.delta:g} >= 1/N={1.0 / n:.3g}; use delta << 1/N",
              file=sys.stderr)

    print(f"accountant            {args.accountant}")
    print(f"target                epsilon={args.epsilon:g}, delta={args.delta:g}")
    print(f"dataset size N        {n}")
    print(f"expected batch B      {b}" + (f"  (truncated Poisson, cap {args.max_batch_size})"
                                          if args.max_batch_size is not None else ""))
    print(f"sampling rate q       {q:.6g}")
    print(f"steps                 {steps}  ({steps_per_epoch} per epoch)")
    print(f"noise multiplier σ    {sigma:.6g}")
    print(f"noise-batch ratio σ/B {sigma / b:.6g}")
    print()
    print(f"{'step':>10} {'epoch':>8} {'epsilon':>10}")
    marks = sorted({max(1, round(steps * k / args.points)) for k in range(1, args.points + 1)})
    for step in marks:
        eps = epsilon_for(sigma, q, step, args.delta, args.accountant, **truncation)
        print(f"{step:>10} {step / steps_per_epoch:>8.3f} {eps:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
