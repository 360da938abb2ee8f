"""Sample text from a trained run: ``python -m vaultkern generate RUN_DIR --prompt "..."``."""
from __future__ import annotations

import argparse
import sys

import torch

from vaultkern.data import ByteTokenizer

tokenizer = ByteTokenizer()


@torch.no_grad()
def generate(model, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int = 0, seed: int = 0, device="cpu") -> str:
    """The continuation of ``prompt`` (greedy when temperature is 0); stops at EOS."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt, bos=True)], device=device)
    new = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.config.seq_len:])[0, -1].float()
        logits[tokenizer.BOS] = logits[tokenizer.PAD] = float("-inf")  # never emit these
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = float("-inf")
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if next_id == tokenizer.EOS:
            break
        new.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
    return tokenizer.decode(new)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vaultkern generate",
                                description="Sample a continuation of a prompt from a trained run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="run directory written by `python -m vaultkern train`")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens (bytes) to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--num-samples", type=int, default=1, help="number of continuations")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    return p


def main(argv=None) -> int:
    from vaultkern.run.rundir import load_model, resolve_device
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        model = load_model(args.run_dir, device)
        for i in range(args.num_samples):
            text = generate(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                            args.seed + i, device)
            if args.num_samples > 1:
                print(f"--- sample {i + 1}")
            print(args.prompt + text)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
