"""Model cards: ``model_card.json`` (machine-readable) and ``MODEL_CARD.md``.

The card states the privacy guarantee exactly as it was accounted (ε, δ,
privacy unit, clipping bound, noise, sampling rate, steps, accountant), what
data was used, and — once ``python -m vaultkern audit`` has run — what the
empirical audit measured. Secrets of planted canaries never go into the card.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

from vaultkern._version import __version__

CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _percent(rate) -> str:
    return "—" if rate is None else f"{rate:.1%}"


def _table(rows) -> list:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in rows]
    return lines


def render_markdown(card: dict) -> str:
    p, t, d, m = card["privacy"], card["training"], card["data"], card["model"]
    title = f"# Model card: {card.get('name', 'vaultkern run')}"
    out = [title, ""]
    if p["differentially_private"]:
        out += [f"Trained with differentially private SGD (DP-SGD) by vaultkern {card['vaultkern_version']}: "
                f"**(ε = {_fmt(p['epsilon'], 3)}, δ = {_fmt(p['delta'], 3)})-DP** with respect to "
                f"**{p['privacy_unit']}** (add/remove one unit).", ""]
    else:
        out += ["**Not differentially private.** This model was trained without DP-SGD (`--no-dp`); "
                "it can memorise and reveal its training data.", ""]
    if not t.get("complete", True):
        out += [f"Training is incomplete: {t['steps_done']} of {t['steps_planned']} steps done "
                "(ε is for the steps done).", ""]
    out += ["## Privacy", ""]
    out += _table([
        ("differentially private", p["differentially_private"]),
        ("ε (epsilon)", p.get("epsilon")), ("δ (delta)", p.get("delta")),
        ("target ε", p.get("target_epsilon")),
        ("privacy unit", p["privacy_unit"]),
        ("clipping bound C", p.get("max_grad_norm")),
        ("noise multiplier σ (noise std σ·C)", p.get("noise_multiplier")),
        ("sampling", p.get("sampling")), ("sample rate q", p.get("sample_rate")),
        ("expected batch size", p.get("expected_batch_size")),
        ("steps accounted", p.get("steps")),
        ("accountant", p.get("accountant")),
        ("secure noise generator", p.get("secure_mode")),
        ("noise and sampling randomness", p.get("dp_randomness")),
        ("rejected (non-finite) steps, still accounted", p.get("rejected_steps")),
    ])
    out += ["", "What the guarantee does **not** cover: the run directory's `data.pt` (a copy of the "
            "training sequences, kept for the audit), `metrics.jsonl` and `training.png` (non-private "
            "training losses), `ckpt.pt` (optimizer state), and any hyperparameter search done "
            "with the private data before this run. Publish only `model.pt` and this card.", ""]
    out += ["## Data", ""]
    out += _table([
        ("source", d["description"]), ("tokenizer", d["tokenizer"]),
        ("sequence length T", d["seq_len"]), ("training sequences", d["train_sequences"]),
        ("held-out sequences", d["heldout_sequences"]),
        ("planted canaries", d.get("canaries_summary")),
    ])
    out += ["", "## Model and training", ""]
    out += _table([
        ("architecture", m["style"]), ("parameters", m["parameters"]),
        ("layers / d_model / heads / kv heads",
         " / ".join(str(m["config"][k]) for k in ("num_layers", "d_model", "num_heads", "num_kv_heads"))),
        ("optimizer", t["optimizer"]), ("learning rate", t["lr"]),
        ("steps done", t["steps_done"]), ("device", t["device"]),
        ("held-out loss (nats/token)", t.get("heldout_loss")),
        ("held-out perplexity", t.get("heldout_perplexity")),
        ("wall time (s)", t.get("wall_time_s")),
    ])
    audit = card.get("audit")
    out += ["", "## Empirical privacy audit", ""]
    if not audit:
        out += ["Not audited yet: run `python -m vaultkern audit RUN_DIR`."]
    else:
        out += [audit.get("what_was_audited", ""), ""]
        out += _table([
            ("held-out perplexity", audit["heldout_perplexity"]),
            (f"memorisation: exact {audit['memorization']['suffix_len']}-token suffix match, train",
             _percent(audit["memorization"]["train_exact_match_rate"])),
            ("memorisation: same on held-out (baseline)",
             _percent(audit["memorization"]["heldout_exact_match_rate"])),
            ("membership inference AUC (loss threshold; 0.5 = chance)", audit["membership_inference"]["auc"]),
        ])
        if audit.get("canaries"):
            out += ["", "Canary exposure (log2 #candidates − log2 rank; "
                    f"maximum {_fmt(audit['canary_max_exposure'], 3)}, about 1 for a secret never seen):", "",
                    "| repetitions | mean exposure | extracted by greedy decoding |", "|---|---|---|"]
            by_reps = audit["canary_exposure_by_repetitions"]
            for reps, row in sorted(by_reps.items(), key=lambda kv: int(kv[0])):
                out.append(f"| {reps} | {_fmt(row['mean_exposure'], 3)} | "
                           f"{row['extracted']} of {row['count']} |")
    out += ["", f"_Generated by vaultkern {card['vaultkern_version']}._", ""]
    return "\n".join(out)


def training_card(args, cfg, num_parameters: int, data, plan: dict, summary: dict, device: str,
                  wall_time: float) -> dict:
    """The card of a training run (``args``: the train command's options, ``plan``: its Plan)."""
    dp, T = plan["dp"], cfg.seq_len
    canaries = data.canaries
    canary_summary = (f"{len(canaries)} canaries, repetitions "
                      f"{sorted({c.repetitions for c in canaries})}" if canaries else "none")
    heldout = summary["heldout_loss"]
    return {
        "name": os.path.basename(os.path.abspath(args.out)),
        "vaultkern_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"style": cfg.style, "config": cfg.to_dict(), "parameters": num_parameters},
        "data": {"description": data.description, "tokenizer": "bytes (256) + BOS, EOS, PAD",
                 "seq_len": T, "train_sequences": len(data.train_rows),
                 "heldout_sequences": len(data.heldout_rows), "canaries_summary": canary_summary,
                 "packing": "documents as BOS text EOS, concatenated and cut into non-overlapping "
                            f"rows of {T + 1} tokens ({T} positions); a document may span two rows"},
        "privacy": {
            "differentially_private": dp,
            "epsilon": summary["epsilon"], "delta": plan["delta"] if dp else None,
            "target_epsilon": plan["target_epsilon"],
            "privacy_unit": f"one packed sequence of {T} tokens" if dp else "none",
            "neighbouring_datasets": "add or remove one sequence" if dp else None,
            "max_grad_norm": args.max_grad_norm if dp else None,
            "noise_multiplier": plan["noise_multiplier"], "sample_rate": plan["sample_rate"],
            "expected_batch_size": plan["batch_size"],
            "sampling": "Poisson" if dp else "shuffled fixed-size batches (not private)",
            "steps": summary["step"] if dp else None,
            "accountant": f"{args.accountant} (dp-accounting)" if dp else None,
            "secure_mode": bool(args.secure_mode) if dp else None,
            "dp_randomness": (None if not dp else "os.urandom (ChaCha20 noise)" if args.secure_mode
                              else "fixed --dp-seed: NOT private against anyone who knows it"
                              if getattr(args, "dp_seed", None) is not None
                              else "seeded from os.urandom, seed kept only in the checkpoint"),
            "rejected_steps": summary["rejected_steps"],
            "budget_note": plan["budget_note"] or None,
        },
        "training": {"optimizer": "AdamW (betas 0.9, 0.95), warm-up + cosine", "lr": args.lr,
                     "batch_size": args.batch_size, "max_physical_batch_size": args.max_physical_batch_size,
                     "steps_done": summary["step"], "steps_planned": plan["steps"],
                     "complete": summary["status"] == "complete", "device": device,
                     "seed": args.seed, "train_loss": summary["train_loss"], "heldout_loss": heldout,
                     "heldout_perplexity": math.exp(heldout) if heldout is not None else None,
                     "wall_time_s": round(wall_time, 1)},
        "audit": None,
    }


def write_model_card(run_dir: str, card: dict) -> None:
    """Write both files atomically."""
    for name, text in ((CARD_JSON, json.dumps(card, indent=2, sort_keys=True)),
                       (CARD_MD, render_markdown(card))):
        path = os.path.join(run_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text + ("\n" if not text.endswith("\n") else ""))
        os.replace(path + ".tmp", path)


def read_model_card(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, CARD_JSON)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def add_audit(run_dir: str, audit: dict) -> dict:
    """Put the audit results into the run's card and rewrite it."""
    card = read_model_card(run_dir)
    if card is None:
        raise FileNotFoundError(f"{os.path.join(run_dir, CARD_JSON)} not found: "
                                f"is {run_dir!r} a training run?")
    card["audit"] = audit
    write_model_card(run_dir, card)
    return card
