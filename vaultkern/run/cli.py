"""``python -m vaultkern train``: the command line of the reference training run.

The default run is a release run: noise and Poisson sampling draw from os.urandom
(ChaCha20 noise, DPOptimizer(secure_mode=True); a secure sampler), δ must be below 1/N,
and a checkpoint can be resumed once. Anything weaker is opt-in by a flag that says what
it does (--dp-seed, --allow-delta-above-1-over-n, --force-resume), and the model card
then says that no formal guarantee holds.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys

from vaultkern.run.budget import DEFAULT_DELTA, DEFAULT_EPSILON, DEFAULT_STEPS

# flags that may change when a run is resumed; all others must match the saved run
RESUMABLE_OVERRIDES = ("resume", "force_resume", "stop_after", "checkpoint_every", "log_every",
                       "epsilon_every", "device", "quiet")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vaultkern train",
        description="Train the reference decoder with DP-SGD (or without DP, --no-dp) and write a "
                    "run directory with checkpoints, metrics, a public model card and a private "
                    "report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--config", default="tiny",
                   help="model preset (tiny, tiny-gpt2, small, gpt2-small, gpt2-medium, gemma-1b) "
                        "or a .toml/.json file of DecoderConfig fields")
    g.add_argument("--seq-len", type=int, default=None,
                   help="override the config's sequence length T (tokens per training sequence)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="override the config's vocabulary size (the byte tokenizer needs >= 259; "
                        "a larger vocabulary only adds unused embedding rows)")
    g.add_argument("--data", default=None,
                   help="training text: a .txt file (documents separated by blank lines), a .jsonl "
                        "file with a 'text' field, or a folder of those; default: built-in synthetic "
                        "records with planted canaries. Each document gets rows of its own")
    g.add_argument("--num-records", type=int, default=2000,
                   help="number of built-in synthetic records (ignored with --data)")
    g.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="fraction of documents held out (never trained on) for evaluation and audit; "
                        "chosen per document by a stable hash")
    g.add_argument("--plant-canaries", action="store_true",
                   help="also plant random canaries (1, 4, 16 repetitions) into --data for the audit")
    g = p.add_argument_group("privacy")
    g.add_argument("--epsilon", type=float, default=None,
                   help=f"target ε; σ is calibrated to it (default {DEFAULT_EPSILON} when "
                        "--noise-multiplier is not given; with --noise-multiplier it is a budget that "
                        "stops training early)")
    g.add_argument("--delta", type=float, default=DEFAULT_DELTA,
                   help="target δ; must be below 1/N (N = number of training sequences)")
    g.add_argument("--allow-delta-above-1-over-n", action="store_true",
                   help="train even if δ >= 1/N; the model card then says that no formal guarantee "
                        "holds")
    g.add_argument("--noise-multiplier", type=float, default=None,
                   help="σ (noise std = σ·C) instead of calibrating it from --epsilon")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="C: per-sequence gradient clipping bound")
    g.add_argument("--accountant", choices=("pld", "rdp"), default="pld",
                   help="privacy accountant (dp-accounting)")
    g.add_argument("--max-batch-size", type=int, default=None,
                   help="truncated Poisson sampling: every logical batch has exactly this many rows "
                        "(a larger sample is cut to a random subset, a smaller one padded with "
                        "masked rows), accounted as such (PLD only); default: plain Poisson")
    g.add_argument("--dp-seed", type=int, default=None,
                   help="seed the DP noise and Poisson sampling with this number instead of drawing "
                        "them from os.urandom: the run becomes reproducible and NOT private against "
                        "anyone who knows the seed; the model card says that no formal guarantee "
                        "holds. For experiments only")
    g.add_argument("--privacy-unit", choices=("sequence", "user"), default="sequence",
                   help="what the guarantee protects: one training sequence, or one user (all of "
                        "their records: the built-in records get users, --data needs a .jsonl "
                        "with a 'user' field)")
    g.add_argument("--user-sampling", choices=("uls", "els"), default="uls",
                   help="with --privacy-unit user: 'uls' Poisson-samples users (q = batch_size / "
                        "number of users) and clips each sampled user's summed gradient; 'els' "
                        "samples sequences after capping each user's data, and derives the "
                        "per-user ε by group privacy")
    g.add_argument("--max-rows-per-user", type=int, default=4,
                   help="with --privacy-unit user: uls: at most this many of a sampled user's "
                        "sequences per step (a random subset; must not exceed "
                        "--max-physical-batch-size); els: at most this many sequences per user in "
                        "the training data")
    g.add_argument("--records-per-user", type=float, default=4.0,
                   help="with --privacy-unit user on the built-in data: mean records per user")
    g.add_argument("--no-dp", action="store_true",
                   help="train without differential privacy (shuffled batches, no clipping or noise)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64,
                   help="expected logical batch size (Poisson: q = batch_size / N); with "
                        "--privacy-unit user --user-sampling uls, expected users per step")
    g.add_argument("--max-physical-batch-size", type=int, default=32,
                   help="largest micro-batch run at once; a logical batch is split into micro-batches")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None,
                        help=f"number of logical steps (default {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=float, default=None,
                        help="expected passes over the data (steps = ceil(epochs · N / batch_size))")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps before cosine decay (default: 5%% of the steps)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (default runs/<config>-<dp|nodp>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint with its saved settings; a "
                        "checkpoint can be resumed once")
    g.add_argument("--force-resume", action="store_true",
                   help="with --resume: resume a checkpoint that was already resumed (only safe if "
                        "that continuation released nothing); the model card then says that no "
                        "formal guarantee holds")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the built-in data, the held-out split and the initialisation "
                        "(public: the model card records it; never used for DP randomness)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--checkpoint-every", type=int, default=100,
                   help="write ckpt.pt every N steps (also at the end and on Ctrl-C)")
    g.add_argument("--log-every", type=int, default=10, help="append to metrics.jsonl every N steps")
    g.add_argument("--epsilon-every", type=int, default=None,
                   help="also compute ε for the metrics every N steps (it costs ~1 s per call; "
                        "default: about 10 times per run)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after N steps in this invocation (checkpointed; continue with --resume)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--demo", action="store_true",
                   help="train tiny with and without DP on the built-in data, audit both, and print "
                        "them side by side (a few minutes on a laptop CPU) into --out (default "
                        "runs/demo); other flags are ignored")
    return p


def check_args(args) -> None:
    """Clear errors for values that make no sense, naming the flag and the value."""
    positive_ints = ("max_physical_batch_size", "log_every", "checkpoint_every", "num_records",
                     "epsilon_every", "stop_after", "seq_len", "vocab_size", "max_batch_size")
    for name in positive_ints:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("lr", "max_grad_norm", "epsilon", "epochs"):
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if (getattr(args, "warmup_steps", None) or 0) < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta must lie strictly between 0 and 1, got {args.delta}")
    if args.no_dp and (args.noise_multiplier is not None or args.epsilon is not None
                       or args.max_batch_size is not None or args.dp_seed is not None):
        raise ValueError("--no-dp trains without privacy; do not combine it with --epsilon, "
                         "--noise-multiplier, --max-batch-size or --dp-seed")
    if getattr(args, "privacy_unit", "sequence") == "user":
        if args.no_dp:
            raise ValueError("--privacy-unit user needs DP; drop --no-dp")
        if args.max_rows_per_user < 1:
            raise ValueError(f"--max-rows-per-user must be >= 1, got {args.max_rows_per_user}")
        if args.user_sampling == "uls" and args.max_rows_per_user > args.max_physical_batch_size:
            raise ValueError(f"--max-rows-per-user {args.max_rows_per_user} exceeds "
                             f"--max-physical-batch-size {args.max_physical_batch_size}: a user's "
                             "rows must fit in one micro-batch to be clipped together")
        if args.user_sampling == "uls" and args.max_batch_size is not None:
            raise ValueError("--max-batch-size (truncated Poisson) is not available with "
                             "--user-sampling uls (users are Poisson-sampled)")
    if args.force_resume and not args.resume:
        raise ValueError("--force-resume only makes sense with --resume")


def given_options(parser: argparse.ArgumentParser, argv) -> set:
    """The dests of the options written on the command line ``argv``, even at their default."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def resolve_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """``argv`` parsed; with --resume, the saved run's settings. A flag written on the command
    line that differs from the saved run is an error, also when it is written at its default
    (``--noise-multiplier 1.0`` against a run saved with 0.8 would otherwise be dropped)."""
    from vaultkern.run.rundir import load_checkpoint
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = os.path.join("runs", f"{os.path.splitext(os.path.basename(args.config))[0]}-"
                                        f"{'nodp' if args.no_dp else 'dp'}")
    if not args.resume:
        return args
    saved = load_checkpoint(args.out)["args"]
    for key in given_options(parser, argv) - set(RESUMABLE_OVERRIDES) - {"out"}:
        if getattr(args, key) != saved.get(key):
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)!r} differs from the "
                             f"resumed run's {saved.get(key)!r}; a resumed run keeps its "
                             "original settings")
    # the saved settings, over today's defaults for flags newer than the checkpoint; the
    # overrides (and --out) as given today
    merged = {**vars(args), **saved}
    merged.update({key: getattr(args, key) for key in (*RESUMABLE_OVERRIDES, "out")})
    return argparse.Namespace(**merged)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        from vaultkern.run.demo import demo
        demo(args.out or os.path.join("runs", "demo"), quiet=args.quiet)
        return 0
    from vaultkern.run.loop import train
    try:
        summary = train(resolve_args(parser, argv))
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if summary["status"] == "aborted" else 0


if __name__ == "__main__":
    sys.exit(main())
