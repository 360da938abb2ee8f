"""``python -m vaultkern finetune``: DP fine-tuning of a local Hugging Face causal LM.

    python -m vaultkern finetune --model DIR [--data FILE] --epsilon 8 --delta 1e-5 \\
        [--lora-r 8] --out OUT

* Model: a local directory in ``save_pretrained`` format; nothing is downloaded
  (HF_HUB_OFFLINE=1, every load ``local_files_only``). Tokenizer: the directory's own, or
  vaultkern's byte tokenizer when it has none (the vocabulary must hold 259 ids).
* Data: what ``train --data`` reads (:func:`vaultkern.data.read_documents`): a ``.txt``
  file whose documents are separated by blank lines (a line break alone stays inside a
  document), a ``.jsonl`` file with a ``"text"`` field, or a folder of those; without
  ``--data``, the built-in synthetic records with planted canaries. A document
  is held out when a stable hash of (--seed, its text) falls below --heldout-fraction.
* Rows: each document (BOS tokens EOS) gets rows of its own of at most --seq-len + 1
  tokens, never packed with another document (:mod:`vaultkern.data.packing`). The privacy
  unit is one row; the card gives k, the most rows one document spans, and the derived
  document-level ε.
* Training: :class:`vaultkern.hf.DPTrainer` (Poisson logical batches of expected size
  --batch-size in micro-batches of --physical-batch-size, σ calibrated to --epsilon).
* Output: see :mod:`vaultkern.run.hfdir` (OUT/model publishable; the rest private).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from vaultkern.models import IGNORE_INDEX
from vaultkern.run.budget import DEFAULT_DELTA, DEFAULT_EPSILON
from vaultkern.run.hfdir import LogitsOf, RELEASE_DIR, load_tokenizer, vocabulary_size

CANARY_REPETITIONS = (1, 4, 16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vaultkern finetune",
        description="Fine-tune a local Hugging Face causal LM with DP-SGD (vaultkern.hf.DPTrainer). "
                    "Writes OUT/model (weights or LoRA adapters, tokenizer, model card: publishable) "
                    "and, beside it, OUT/private_report.json and OUT/data.pt (private).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="local model directory (save_pretrained format)")
    g.add_argument("--data", default=None,
                   help=".txt (documents separated by blank lines), .jsonl (a 'text' field per line) "
                        "or a folder of those; default: the built-in synthetic records (with "
                        "canaries)")
    g.add_argument("--records", type=int, default=2000,
                   help="number of built-in synthetic records (ignored with --data)")
    g.add_argument("--out", required=True, help="output directory (must not hold a finetune run)")
    g.add_argument("--seq-len", type=int, default=128,
                   help="T: a row holds at most T + 1 tokens of one document (T predicted)")
    g.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="fraction of documents held out (never trained on) for evaluation and audit")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the held-out split, canaries, LoRA initialisation (public; never "
                        "used for DP randomness)")
    g.add_argument("--plant-canaries", action="store_true",
                   help="plant random canaries (1, 4, 16 repetitions) into the training documents "
                        "so that `python -m vaultkern audit` can measure their exposure")
    g.add_argument("--lora-r", type=int, default=None,
                   help="train PEFT LoRA adapters of this rank instead of all parameters")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2·r)")
    g.add_argument("--lora-targets", default="all-linear",
                   help="comma-separated module names for LoRA, or all-linear")
    g = p.add_argument_group("privacy")
    g.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                   help="target ε; σ is calibrated so that the planned steps spend at most this")
    g.add_argument("--delta", type=float, default=DEFAULT_DELTA,
                   help="target δ; must be below 1/N (N = number of training rows)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="C: per-row clipping bound")
    g.add_argument("--dp-seed", type=int, default=None,
                   help="seed the DP noise and Poisson sampling (reproducible, NOT private against "
                        "anyone who knows the seed; the card then says no formal guarantee holds)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64,
                   help="expected logical batch B̄ (Poisson: q = B̄/N); a multiple of "
                        "--physical-batch-size")
    g.add_argument("--physical-batch-size", type=int, default=8,
                   help="largest micro-batch run at once (memory)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="logical steps")
    length.add_argument("--epochs", type=float, default=None,
                        help="expected passes over the rows (default 1)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, linear decay (default 1e-3 with LoRA, 1e-4 without)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args) -> None:
    for name in ("seq_len", "batch_size", "physical_batch_size", "steps", "lora_r"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("epsilon", "max_grad_norm", "lr", "epochs", "lora_alpha"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.batch_size % min(args.physical_batch_size, args.batch_size):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of "
                         f"--physical-batch-size {args.physical_batch_size}: the Trainer's expected "
                         "batch is per_device_train_batch_size × gradient_accumulation_steps")
    for path in (os.path.join(args.out, RELEASE_DIR), os.path.join(args.out, "data.pt")):
        if os.path.exists(path):
            raise FileExistsError(f"{path!r} exists: choose another --out")


class RowCollator:
    """Rows right-padded with ``pad`` -> input_ids, attention_mask, labels (padding: -100),
    cut to the longest row of the micro-batch."""

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, rows) -> dict:
        rows = torch.stack(list(rows))
        real = rows != self.pad
        width = int(real.sum(1).max())
        rows, real = rows[:, :width], real[:, :width]
        return {"input_ids": rows.masked_fill(~real, 0), "attention_mask": real.long(),
                "labels": rows.masked_fill(~real, IGNORE_INDEX)}


def heldout_loss(lm, rows: torch.Tensor, pad: int, device):
    """Mean token cross-entropy (nats) on held-out rows (private), or None without rows."""
    from vaultkern.audit import sequence_losses
    if len(rows) == 0:
        return None
    was_training = lm.training
    total, tokens = sequence_losses(LogitsOf(lm, rows.shape[1] - 1).eval(), rows, device,
                                    pad_id=pad)
    lm.train(was_training)
    return float(total.sum() / tokens.sum())


def load_model(args, device):
    from transformers import AutoModelForCausalLM, set_seed
    # an absolute path: PEFT records it in adapter_config.json, where the audit finds the base
    path = os.path.abspath(args.model)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model {args.model!r}: no config.json (expected a directory "
                                "written by save_pretrained)")
    # fp32 master weights: the noise σ·C/B̄ is added to them, whatever dtype they were saved in
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and args.seq_len + 1 > positions:
        raise ValueError(f"--seq-len {args.seq_len}: rows of {args.seq_len + 1} tokens exceed the "
                         f"model's {positions} positions")
    set_seed(args.seed)  # LoRA's initialisation
    return path, model.to(device)


def add_lora(model, args):
    from peft import LoraConfig, get_peft_model
    targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r
    return get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=alpha, lora_dropout=0.0,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def build_data(args, tokenizer, out: str):
    from vaultkern.data import PackedCorpus, file_corpus
    from vaultkern.data.corpus import builtin_corpus
    from vaultkern.run.rundir import DATA_FILE
    if args.data is None:
        corpus = builtin_corpus(args.records, args.seed, args.heldout_fraction, CANARY_REPETITIONS)
    else:
        corpus = file_corpus(args.data, args.seed, args.heldout_fraction,
                             CANARY_REPETITIONS if args.plant_canaries else None)
    data = PackedCorpus.from_corpus(corpus, args.seq_len, tokenizer)
    if len(data.train_rows) == 0:
        raise ValueError(f"--data {args.data!r}: no training rows (all documents held out or empty)")
    data.save(os.path.join(out, DATA_FILE))  # private: the audit reads it
    return data


def training_arguments(args, device):
    from transformers import TrainingArguments
    physical = min(args.physical_batch_size, args.batch_size)
    length = ({"max_steps": args.steps} if args.steps is not None else
              {"num_train_epochs": args.epochs if args.epochs is not None else 1.0})
    return TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=physical,
        gradient_accumulation_steps=args.batch_size // physical, **length,
        learning_rate=args.lr if args.lr is not None else (1e-3 if args.lora_r else 1e-4),
        logging_steps=0.1,  # a tenth of the run: ε (about a second each) is computed per log
        save_strategy="no", eval_strategy="no",
        report_to="none",  # the logs hold training losses: they stay on this machine
        disable_tqdm=args.quiet, bf16=args.bf16, seed=args.seed, use_cpu=device.type == "cpu",
        gradient_checkpointing=args.gradient_checkpointing,
        # non-reentrant: gradients reach LoRA adapters behind frozen embeddings without
        # enable_input_require_grads
        gradient_checkpointing_kwargs={"use_reentrant": False})


def finetune(args) -> dict:
    """Train, save OUT/model with its card, write the private report; returns a summary."""
    from vaultkern.hf import DPTrainer
    from vaultkern.model_card import (canaries_note, packing_note, split_note,
                                      update_private_report)
    check_args(args)
    os.environ["HF_HUB_OFFLINE"] = "1"
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path, model = load_model(args, device)
    tokenizer, hf_tokenizer, tokenizer_note = load_tokenizer(path, vocabulary_size(model))
    os.makedirs(args.out, exist_ok=True)
    data = build_data(args, tokenizer, args.out)
    initial = heldout_loss(model, data.heldout_rows, tokenizer.PAD, device)
    if args.lora_r:
        model = add_lora(model, args)
    card_data = {  # public: no text, no losses; N and k are counted from the data (the card says)
        "source": data.description, "tokenizer": tokenizer_note, "seq_len": args.seq_len,
        "training_rows": len(data.train_rows), "max_rows_per_document": data.max_rows_per_document,
        "packing": packing_note(args.seq_len), "split": split_note(args.heldout_fraction),
        "canaries": canaries_note(data.canaries)}
    trainer = DPTrainer(
        model=model, args=training_arguments(args, device), train_dataset=list(data.train_rows),
        data_collator=RowCollator(tokenizer.PAD), processing_class=hf_tokenizer,
        target_epsilon=args.epsilon, target_delta=args.delta, max_grad_norm=args.max_grad_norm,
        dp_seed=args.dp_seed, card_data=card_data)
    result = trainer.train()
    eps = trainer.get_epsilon()
    if eps > args.epsilon * (1 + 1e-9):
        raise RuntimeError(f"ε={eps} exceeds the target {args.epsilon}: this is a bug; do not "
                           "release this model")
    release = os.path.join(args.out, RELEASE_DIR)
    trainer.save_model(release)  # weights (or adapters), tokenizer, model card
    from vaultkern.core.queries import bookkeeper
    final = heldout_loss(trainer.model, data.heldout_rows, tokenizer.PAD, device)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    private = {
        "steps_done": trainer.state.global_step, "train_loss": logged[-1] if logged else None,
        "train_loss_mean": result.training_loss, "initial_heldout_loss": initial,
        "heldout_loss": final, "heldout_perplexity": math.exp(final) if final is not None else None,
        "train_rows": len(data.train_rows), "heldout_rows": len(data.heldout_rows),
        "train_documents": data.num_train_documents, "heldout_documents": data.num_heldout_documents,
        "data_source": data.private_description, "base_model": path,
        "nonfinite_examples": bookkeeper(trainer.model).nonfinite_examples,
        "wall_time_s": round(time.time() - started, 1)}
    update_private_report(args.out, "training", private)
    heldout = "—" if final is None else f"{final:.4f}"
    print(f"done: {trainer.state.global_step} steps, ε = {eps:.3f} (δ = {args.delta:g}), held-out "
          f"loss {heldout}\npublishable: {release}\nprivate (do not publish): the rest of {args.out}")
    if trainer.dp.formal_guarantee is False:
        print("warning: --dp-seed: no formal guarantee holds for this model", file=sys.stderr)
    return {**private, "epsilon": eps, "out": args.out, "release": release}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        finetune(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
