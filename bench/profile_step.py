"""Where a training step spends its time: the benchmark's own step, phase by phase.

    python bench/profile_step.py [--model gpt2-small] [--batch 8] [--steps 5]
                                 [--providers nondp,vaultkern] [--untie]
    python bench/profile_step.py --size cpu --model gpt2   # a benchmark size's model

For each provider (the same classes ``vaultkern bench`` times: same loss, optimizer,
precision) it prints

* the step time without any synchronisation (what the benchmark measures),
* the same step split into forward+loss / backward (vaultkern: incl. the book-keeping
  callback) / optimizer step (incl. DP noise), each phase closed by a device
  synchronisation, so a phase's time is host time or device time, whichever is longer,
* the host-only time of each phase (time until its last launch returned),
* torch.profiler's top operators by self CPU time and, on CUDA, by device time.

bf16 autocast on CUDA, fp32 on CPU.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from vaultkern.benchmark import providers as P
from vaultkern.benchmark.specs import SIZES
from vaultkern.models import Decoder, get_config


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _phases(prov, x, y, dev):
    """(host seconds, synchronised seconds) of forward+loss, backward, optimizer step."""
    host, synced = [], []

    def run(fn):
        _sync(dev)
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        _sync(dev)
        host.append(t1 - t0)
        synced.append(time.perf_counter() - t0)
        return out

    def fwd():
        with prov.autocast(x.device.type):
            return prov.loss(x, y)

    loss = run(fwd)
    run(loss.backward)

    def opt():
        prov.optimizer.step()
        prov.optimizer.zero_grad(set_to_none=True)

    run(opt)
    return host, synced


def _instrument_bookkeeping(totals):
    """Host time of the book-keeping callback and of its parts (no synchronisation: on a
    GPU this is the time the host spends issuing the work)."""
    from vaultkern.core import bookkeeping, grad_forms

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0
        return wrapper

    bookkeeping.BookKeeper._finish = timed(bookkeeping.BookKeeper._finish, "callback (all)")
    for name in ("summed_self_norms_sq", "clipped_sum", "cross"):
        setattr(grad_forms, name, timed(getattr(grad_forms, name), f"callback: {name}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-small",
                    help="a preset, or with --size the name of one of that size's models")
    ap.add_argument("--size", default=None, help="take --model (and its batch) from this "
                    "benchmark size (vaultkern bench --size)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--providers", default="nondp,vaultkern")
    ap.add_argument("--untie", action="store_true")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.size is not None:
        spec = SIZES[args.size].model(args.model)
        cfg, batch = spec.config(tied=not args.untie), spec.batch
    else:
        cfg, batch = get_config(args.model, tie_embeddings=not args.untie), 8
    args.batch = args.batch or batch
    base = Decoder(cfg).to(dev)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len + 1), device=dev)
    x, y = ids[:, :-1], ids[:, 1:]
    settings = P.StepSettings(autocast_dtype=torch.bfloat16 if dev == "cuda" else None)
    names = ("forward+loss", "backward", "optimizer")

    for name in args.providers.split(","):
        prov = P.build(name, copy.deepcopy(base), settings, args.batch)
        for _ in range(3):
            prov.step(x, y)
        _sync(dev)
        walls = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            prov.step(x, y)
            _sync(dev)
            walls.append(time.perf_counter() - t0)
        totals: dict = {}
        if name.startswith("vaultkern"):
            _instrument_bookkeeping(totals)
        split = [_phases(prov, x, y, dev) for _ in range(args.steps)]
        print(f"\n===== {name}: {args.model} ({'untied' if args.untie else 'tied'}) "
              f"B={args.batch} T={cfg.seq_len} on {dev} =====")
        print(f"step (as benchmarked, median of {args.steps}): "
              f"{1e3 * statistics.median(walls):.1f} ms")
        for i, phase in enumerate(names):
            h = statistics.median(s[0][i] for s in split)
            w = statistics.median(s[1][i] for s in split)
            print(f"  {phase:<13} synchronised {1e3 * w:7.1f} ms   host-only {1e3 * h:7.1f} ms")
        for key, seconds in totals.items():
            print(f"  host time in {key}: {1e3 * seconds / args.steps:.1f} ms per step")

        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                prov.step(x, y)
            _sync(dev)
        table = prof.key_averages()
        print(f"-- top operators by self CPU time ({args.steps} steps)")
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows,
                          max_name_column_width=55))
        if dev == "cuda":
            print(f"-- top operators by device time ({args.steps} steps)")
            print(table.table(sort_by="self_device_time_total", row_limit=args.rows,
                              max_name_column_width=55))
        del prov


if __name__ == "__main__":
    main()
