"""DP fine-tuning with DPTrainer vs the same transformers.Trainer without DP (issue 13's row).

    .venv/bin/python bench/trainer.py                 # CPU: small Llama from a config
    .venv/bin/python bench/trainer.py --device cuda --hidden 1024 --layers 8 --seq-len 512

Four providers on one model, data and TrainingArguments: ``trainer`` (non-private full
fine-tuning), ``dptrainer`` (DPTrainer, σ = 1, Poisson batches of expected size B̄ =
the Trainer's batch), and both again with a PEFT LoRA adapter (r = 8 on q/k/v/o). Each is
trained for ``--warmup + --steps`` steps, ``--repeats`` times, the providers interleaved
(after one discarded short run of each); the figure is rows (sequences) per second over
the measured steps, counted where the collator builds the batches (a Poisson step has
Binomial(N, q) rows, mean B̄), and the ratio is DP ÷ non-private of the same kind, median
over repeats. Writes
``bench/results/<date>-<machine>-trainer.{json,md}``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

PROVIDERS = ("trainer", "dptrainer", "trainer-lora", "dptrainer-lora")


class CountingCollate:
    """Pads a list of equal-length sequences, and records (time, rows) of every batch."""

    def __init__(self):
        self.events = []

    def __call__(self, items):
        ids = torch.tensor([x["input_ids"] for x in items], dtype=torch.long)
        self.events.append((time.perf_counter(), len(items)))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq_len,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def lora(model):
    import peft
    return peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0))


def run_provider(name: str, args, data, out_dir: str) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from vaultkern.hf import DPTrainer

    stamps = []

    class StepEnd(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    model = build_model(args)
    if name.endswith("lora"):
        model = lora(model)
    collate = CountingCollate()
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=1e-4, save_strategy="no",
        logging_steps=10**6, report_to=[], disable_tqdm=True, use_cpu=args.device == "cpu",
        bf16=args.bf16, dataloader_num_workers=0, seed=0)
    common = dict(model=model, args=targs, train_dataset=data, data_collator=collate,
                  callbacks=[StepEnd()])
    if name.startswith("dp"):
        trainer = DPTrainer(**common, noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=1.0)
    else:
        trainer = Trainer(**common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    start, end = stamps[args.warmup - 1], stamps[-1]
    rows = sum(r for t, r in collate.events if start < t <= end)
    return {"provider": name, "seconds": end - start, "rows": rows,
            "rows_per_s": rows / (end - start), "steps": len(stamps) - args.warmup}


def markdown(results: dict) -> str:
    meta, summary = results["meta"], results["summary"]
    lines = [f"# DPTrainer vs transformers.Trainer — {meta['machine']}", "",
             f"{meta['date']}, torch {meta['torch']}, transformers {meta['transformers']}, "
             f"peft {meta['peft']}, {meta['threads']} threads. Llama from a config: "
             f"{meta['model']}; B̄ = {meta['batch_size']} sequences, {meta['steps']} measured "
             f"steps after {meta['warmup']} warm-up, {meta['repeats']} repeats interleaved; "
             "DP: σ = 1, C = 1, Poisson batches.", "",
             "| provider | rows/s (median) | all repeats | DP ÷ non-private |", "|---|---|---|---|"]
    for name in PROVIDERS:
        s = summary[name]
        ratio = f"{s['ratio']:.2f}×" if "ratio" in s else ""
        runs = ", ".join(f"{r:.2f}" for r in s["all"])
        lines.append(f"| `{name}` | {s['median']:.2f} | {runs} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dataset-size", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    import peft
    import transformers

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, args.vocab, (args.seq_len,), generator=g).tolist()}
            for _ in range(args.dataset_size)]
    runs = {name: [] for name in PROVIDERS}
    scratch = tempfile.mkdtemp(prefix="vk-bench-trainer-")  # save_strategy="no": stays empty
    # one discarded short run of each provider first: lazy imports and first calls
    short = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1})
    for name in PROVIDERS:
        run_provider(name, short, data, scratch)
    for repeat in range(args.repeats):
        for name in PROVIDERS:
            r = run_provider(name, args, data, scratch)
            runs[name].append(r)
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {r['rows_per_s']:.2f} rows/s "
                  f"({r['rows']} rows in {r['seconds']:.1f} s)", file=sys.stderr)
    summary = {name: {"median": statistics.median(r["rows_per_s"] for r in rs),
                      "all": [r["rows_per_s"] for r in rs]} for name, rs in runs.items()}
    for dp, base in (("dptrainer", "trainer"), ("dptrainer-lora", "trainer-lora")):
        summary[dp]["ratio"] = summary[dp]["median"] / summary[base]["median"]
    from vaultkern.benchmark.machine import machine_meta
    meta = machine_meta(torch.device(args.device))
    meta.update(transformers=transformers.__version__, peft=peft.__version__,
                threads=torch.get_num_threads(), batch_size=args.batch_size,
                steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                model=f"{args.layers} layers, d={args.hidden}, V={args.vocab}, T={args.seq_len}"
                      f"{', bf16' if args.bf16 else ', fp32'}")
    results = {"meta": meta, "summary": summary, "runs": runs}
    machine = "".join(c if c.isalnum() else "-" for c in str(meta["machine"]).lower()).strip("-")
    machine = "-".join(w for w in machine.split("-") if w)[:40]
    stem = os.path.join(args.out, f"{dt.date.today().isoformat()}-{machine}-trainer")
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
