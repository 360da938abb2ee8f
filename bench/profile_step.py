"""Where a vaultkern DP step spends its time: torch.profiler over a few steps.

    python bench/profile_step.py [--model gpt2-small] [--batch 8] [--steps 3]

Prints the top ops by device (CUDA) time and by CPU time, for the non-private and the
vaultkern step of the same model and batch (bf16 autocast on CUDA).
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import vaultkern as vk
from vaultkern.models import Decoder, get_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = get_config(args.model)
    base = Decoder(cfg).to(dev)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len + 1), device=dev)

    def step(model):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none").sum(1)
        loss.sum().backward()
        model.zero_grad(set_to_none=True)

    for name in ("nondp", "vaultkern"):
        model = copy.deepcopy(base)
        if name == "vaultkern":
            vk.patch(model, max_grad_norm=1.0)
        for _ in range(3):
            step(model)
        if dev == "cuda":
            torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(args.steps):
                step(model)
            if dev == "cuda":
                torch.cuda.synchronize()
        key = "device_time_total" if dev == "cuda" else "cpu_time_total"
        print(f"\n===== {name}: {args.model} B={args.batch} T={cfg.seq_len}, {args.steps} steps =====")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
