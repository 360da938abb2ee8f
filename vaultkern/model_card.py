"""What a training run publishes and what it keeps: the model card and the private report.

``model_card.json`` / ``MODEL_CARD.md`` are publishable. They hold the guarantee exactly
as it was accounted (ε, δ, the privacy unit and what it gives a document, σ, C, q,
sampling, steps, accountant, where the randomness came from, whether a formal guarantee
holds), the configuration, and the data's public description. Two numbers come from the
data without noise and say so: N (training sequences; it sets q = B̄/N and is treated as
public) and k (the most sequences one document spans, needed for the document-level
statement). Secrets of planted canaries never go into the card.

``private_report.json`` sits beside the checkpoint and must not be published: training
and held-out losses, the number of examples dropped for a non-finite gradient, the
audit's results (computed on the training and held-out data), where the data came from.
None of it is covered by the guarantee.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from vaultkern._version import __version__

CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
PRIVATE_REPORT = "private_report.json"
PRIVATE_WARNING = ("PRIVATE: computed on the training and held-out data without differential "
                   "privacy. Do not publish; the model card is the publishable summary.")
NO_FORMAL_GUARANTEE = "No formal guarantee holds for this run"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(rows) -> list:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in rows]
    return lines


def render_markdown(card: dict) -> str:
    p, t, d, m = card["privacy"], card["training"], card["data"], card["model"]
    out = [f"# Model card: {card.get('name', 'vaultkern run')}", ""]
    if p["differentially_private"]:
        out += [f"Trained with differentially private SGD (DP-SGD) by vaultkern {card['vaultkern_version']}: "
                f"**(ε = {_fmt(p['epsilon'], 3)}, δ = {_fmt(p['delta'], 3)})-DP** with respect to "
                f"**{p['privacy_unit']}** ({p.get('neighbouring_datasets', 'add/remove one sequence')}).",
                ""]
        user = p.get("user_level") or {}
        # ELS: the unit asked for is the user; its ε belongs in the headline too
        if user.get("epsilon") is not None:
            out += [f"Per user (at most {user['k']} sequences each, by group privacy): "
                    f"**(ε = {_fmt(user['epsilon'], 3)}, δ = {_fmt(user['delta'], 3)})-DP** with "
                    "respect to adding or removing one user.", ""]
        if not p["formal_guarantee"]:
            out += [f"**{NO_FORMAL_GUARANTEE}:** " + " ".join(p["caveats"]), ""]
    else:
        out += ["**Not differentially private.** This model was trained without DP-SGD (`--no-dp`); "
                "it can memorise and reveal its training data.", ""]
    if not t["complete"]:
        out += [f"Training is incomplete: {t['steps_done']} of {t['steps_planned']} steps done "
                "(ε is for the steps done).", ""]
    out += ["## Privacy", ""]
    doc = p.get("document_level") or {}
    out += _table([
        ("differentially private", p["differentially_private"]),
        ("formal guarantee", p.get("formal_guarantee")),
        ("ε (epsilon)", p.get("epsilon")), ("δ (delta)", p.get("delta")),
        ("target ε", p.get("target_epsilon")),
        ("privacy unit", p["privacy_unit"]),
        ("derived: ε for one document (group of k sequences, same δ)", doc.get("epsilon")),
        *([("users (treated as public)", p.get("num_users")),
           ("user-level sampling", p.get("user_sampling")),
           ("derived: ε for one user (ELS: group of k sequences, same δ)",
            (p.get("user_level") or {}).get("epsilon"))] if p.get("user_sampling") else []),
        ("clipping bound C", p.get("max_grad_norm")),
        ("noise multiplier σ (noise std σ·C)", p.get("noise_multiplier")),
        ("sampling", p.get("sampling")), ("sample rate q = B̄/N", p.get("sample_rate")),
        ("expected batch size B̄", p.get("expected_batch_size")),
        ("N (privacy units: sequences, or users; treated as public)", p.get("dataset_size")),
        ("steps accounted", p.get("steps")),
        ("accountant", p.get("accountant")),
        ("noise and sampling randomness", p.get("randomness")),
        ("non-finite examples", p.get("non_finite_examples")),
        ("times resumed", p.get("resumes")),
    ])
    if doc.get("derivation"):
        out += ["", f"Document level: {doc['derivation']}"]
    out += ["", "What the guarantee does **not** cover: the rest of the run directory — `data.pt` "
            "(the training data), `ckpt.pt` (training state), `metrics.jsonl` and `training.png` "
            "(training losses) and `private_report.json` (losses, held-out and audit metrics, "
            "computed on private data without noise) — and any hyperparameter search done with "
            "the private data before this run. Publish only `model.pt` and this card.", ""]
    out += ["## Data", ""]
    out += _table([
        ("source", d["description"]), ("tokenizer", d["tokenizer"]),
        ("sequence length T", d["seq_len"]), ("training sequences N", d["train_sequences"]),
        ("most sequences one document spans (k)", d["max_sequences_per_document"]),
        ("packing", d["packing"]), ("held-out split", d["split"]),
        ("planted canaries", d.get("canaries_summary")),
    ])
    out += ["", "## Model and training", ""]
    out += _table([
        ("architecture", m["style"]), ("parameters", m["parameters"]),
        ("layers / d_model / heads / kv heads",
         " / ".join(str(m["config"][k]) for k in ("num_layers", "d_model", "num_heads", "num_kv_heads"))),
        ("optimizer", t["optimizer"]), ("learning rate", t["lr"]),
        ("steps done", t["steps_done"]), ("device", t["device"]),
    ])
    out += ["", "Evaluation and audit results are computed on private data (held-out documents, "
            "training sequences, planted canaries) and are kept in the run's private report, "
            "not on this card.", "", f"_Generated by vaultkern {card['vaultkern_version']}._", ""]
    return "\n".join(out)


def document_level(k: int, epsilon: Optional[float], delta: float, steps: int,
                   truncated: bool = False) -> dict:
    """The card's document-level entry: ε for a group of k rows (budget.document_epsilon)."""
    return {"k": k, "epsilon": epsilon, "delta": delta, "derivation": (
        "not derived for truncated Poisson sampling" if truncated else
        f"derived number, not the accounted guarantee: ε for any group of k = {k} "
        "sequences, from the mixture-of-Gaussians dominating pair for groups under "
        "Poisson sampling (Ganesh 2024, arXiv:2401.10294), composed over the "
        f"{steps} steps by dp-accounting's PLD accountant. k is computed from "
        "the training data and is not itself protected.")}


def row_privacy_unit(seq_len: int, k: int) -> str:
    return (f"one sequence of {seq_len} tokens; a document spans at most {k} sequences, so "
            f"a document-level guarantee follows by group privacy with k = {k}")


def canaries_note(canaries) -> str:
    return (f"{len(canaries)} canaries, repetitions {sorted({c.repetitions for c in canaries})}"
            if canaries else "none")


def packing_note(seq_len: int) -> str:
    T = seq_len
    return (f"each document (BOS text EOS) gets rows of its own: row j holds its tokens "
            f"[{T}j, {T}j + {T + 1}), the last row padded (ignored); documents are never packed "
            "together")


def split_note(heldout_fraction: float) -> str:
    return ("a document is held out when a hash of (seed, its text) falls below the held-out "
            f"fraction {heldout_fraction}")


def _privacy_section(args, plan: dict, run: dict, data) -> dict:
    """The card's privacy entries of a DP run (see training_card)."""
    T, k = data.seq_len, data.max_rows_per_document
    seeded = args.dp_seed is not None
    caveats = []
    if seeded:
        caveats.append("The noise and the Poisson sampling were seeded with --dp-seed: anyone who "
                       "knows the seed can recompute and remove the noise.")
    if plan["delta"] >= 1.0 / plan["num_train"]:
        caveats.append(f"δ = {plan['delta']:g} is not below 1/N = {1.0 / plan['num_train']:.3g} "
                       "(--allow-delta-above-1-over-n): publishing one random sequence in full "
                       "meets such a δ.")
    if any(r["forced"] for r in run["resumes"]):
        caveats.append("A checkpoint of this run was resumed more than once (--force-resume); ε "
                       "accounts for one continuation and holds only if every other "
                       "continuation's outputs were discarded.")
    cap = plan["max_batch_size"]
    section = {
        "differentially_private": True, "formal_guarantee": not caveats, "caveats": caveats,
        "epsilon": run["epsilon"], "delta": plan["delta"], "target_epsilon": plan["target_epsilon"],
        "privacy_unit": row_privacy_unit(T, k),
        "neighbouring_datasets": "add or remove one sequence",
        "document_level": document_level(k, run["document_epsilon"], plan["delta"], run["steps"],
                                         truncated=cap is not None),
        "dataset_size": plan["num_train"],
        "dataset_size_note": "N, the number of training sequences, sets q = B̄/N and is treated as "
                             "public (it is not protected by the guarantee)",
        "max_grad_norm": args.max_grad_norm, "noise_multiplier": plan["noise_multiplier"],
        "sample_rate": plan["sample_rate"], "expected_batch_size": plan["batch_size"],
        "sampling": ("Poisson" if cap is None else
                     f"truncated Poisson: at most {cap} rows, padded to {cap} with masked rows"),
        "max_batch_size": cap,
        "steps": run["steps"], "accountant": f"{args.accountant} (dp-accounting)",
        "secure_randomness": not seeded,
        "randomness": ("seeded with --dp-seed (reproducible; not private against anyone who "
                       "knows the seed)" if seeded else
                       "secure: ChaCha20 noise and Poisson sampling keyed from os.urandom"),
        "non_finite_examples": ("an example whose gradient norm is NaN/inf gets clip factor 0; "
                                "the step proceeds and is accounted; the count is private"),
        "resumes": len(run["resumes"]),
        "budget_note": plan["budget_note"] or None,
    }
    if run.get("user_level"):  # --privacy-unit user (vaultkern.run.users.card_entries)
        section.update(run["user_level"])
        if section.get("user_sampling") == "uls":
            section["document_level"] = None  # a user's guarantee covers all of its documents
    return section


def training_card(args, cfg, num_parameters: int, data, plan: dict, run: dict) -> dict:
    """The public card of a training run.

    ``args``: the train command's options; ``plan``: its Plan as a dict; ``data``: its
    PackedCorpus; ``run``: status, steps (done), epsilon, document_epsilon, resumes, device."""
    T = cfg.seq_len
    not_private = {"differentially_private": False, "formal_guarantee": False,
                   "privacy_unit": "none", "caveats": ["trained without DP (--no-dp)"]}
    return {
        "name": os.path.basename(os.path.abspath(args.out)),
        "vaultkern_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"style": cfg.style, "config": cfg.to_dict(), "parameters": num_parameters},
        "data": {"description": data.description, "tokenizer": "bytes (256) + BOS, EOS, PAD",
                 "seq_len": T, "train_sequences": len(data.train_rows),
                 "max_sequences_per_document": data.max_rows_per_document,
                 "canaries_summary": canaries_note(data.canaries),
                 "packing": packing_note(T), "split": split_note(args.heldout_fraction)},
        "privacy": _privacy_section(args, plan, run, data) if plan["dp"] else not_private,
        "training": {"optimizer": "AdamW (betas 0.9, 0.95), warm-up + cosine", "lr": args.lr,
                     "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
                     "batch_size": args.batch_size,
                     "max_physical_batch_size": args.max_physical_batch_size,
                     "steps_done": run["steps"], "steps_planned": plan["steps"],
                     "complete": run["status"] == "complete", "device": run["device"],
                     "data_parallel_ranks": run.get("ranks", 1),
                     "seed": args.seed},
    }


def _write_text(path: str, text: str) -> None:
    """Atomic: a reader never sees a half-written file."""
    with open(path + ".tmp", "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(path + ".tmp", path)


def write_model_card(run_dir: str, card: dict) -> None:
    _write_text(os.path.join(run_dir, CARD_JSON), json.dumps(card, indent=2, sort_keys=True))
    _write_text(os.path.join(run_dir, CARD_MD), render_markdown(card))


def read_model_card(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, CARD_JSON)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_private_report(run_dir: str) -> dict:
    path = os.path.join(run_dir, PRIVATE_REPORT)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def update_private_report(run_dir: str, section: str, values: dict) -> dict:
    """Replace one section ("training", "data", "audit") of the private report."""
    report = {**read_private_report(run_dir), "warning": PRIVATE_WARNING, section: values}
    _write_text(os.path.join(run_dir, PRIVATE_REPORT), json.dumps(report, indent=2, sort_keys=True))
    return report
