"""The model card ``DPTrainer.save_model`` writes beside the weights (publishable only)."""
from __future__ import annotations

import json
import os

from vaultkern._version import __version__
from vaultkern.model_card import (CARD_JSON, CARD_MD, NO_FORMAL_GUARANTEE, _table, _write_text,
                                  document_level, row_privacy_unit)


def _document_level(trainer, steps: int, k: int) -> dict:
    """ε for one document of at most k rows, derived as the reference run derives it."""
    from vaultkern.run.budget import Plan, document_epsilon
    dp = trainer.dp
    plan = Plan(True, dp.dataset_size, dp.expected_batch_size, steps, steps, dp.sample_rate,
                dp.noise_multiplier, trainer.dp_target_epsilon, trainer.dp_delta,
                dp.truncated_max_batch)
    return document_level(k, document_epsilon(plan, steps, k), trainer.dp_delta, steps,
                          truncated=dp.truncated_max_batch is not None)


def trainer_card(trainer) -> dict:
    dp, args = trainer.dp, trainer.args
    steps = len(dp.accountant) and dp.accountant.total_steps
    data = dict(trainer.dp_card_data)
    k = data.get("max_rows_per_document")
    caveats = [] if dp.formal_guarantee else [
        "the noise and the Poisson sampling were seeded (dp_seed): whoever knows the seed can "
        "remove the noise."]
    config = getattr(trainer.model, "config", None)
    users = getattr(dp.sampler, "max_rows_per_user", None)  # ULS: the units are users
    card = {
        "name": getattr(config, "name_or_path", None) or type(trainer.model).__name__,
        "vaultkern_version": __version__,
        "privacy": {
            "differentially_private": True, "formal_guarantee": dp.formal_guarantee,
            "caveats": caveats, "epsilon": trainer.get_epsilon(), "delta": trainer.dp_delta,
            "target_epsilon": trainer.dp_target_epsilon,
            "privacy_unit": (
                f"one user (all of their examples; at most {users} used per step)" if users else
                row_privacy_unit(data["seq_len"], k) if k else
                "one training example (one row of the training dataset)"),
            "neighbouring_datasets": ("add or remove one user (all of their examples)" if users
                                      else "add or remove one example"),
            "max_grad_norm": dp.max_grad_norm, "noise_multiplier": dp.noise_multiplier,
            "sample_rate": dp.sample_rate, "expected_batch_size": dp.expected_batch_size,
            "dataset_size": dp.dataset_size,
            "dataset_size_note": f"N ({'users' if users else 'examples'}) is treated as public",
            "sampling": (f"Poisson over users (ULS): each user with probability q per step, at "
                         f"most {users} of its examples (a random subset), their summed gradient "
                         "clipped to C as one" if users else
                         "Poisson (each example independently with probability q per step)"),
            "steps": steps, "accountant": dp.accountant.kind,
            "randomness": "os.urandom (ChaCha20 noise, secure sampling)" if dp.secure
                          else "seeded (dp_seed): not private against whoever knows the seed",
        },
        "training": {
            "trainer": "vaultkern.hf.DPTrainer", "learning_rate": args.learning_rate,
            "physical_batch_size": trainer.dp_physical_batch, "steps_done": trainer.state.global_step,
            "steps_planned": trainer.dp_budget_steps, "bf16": bool(args.bf16),
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters()
                                        if p.requires_grad),
        },
    }
    if k and not users:
        card["privacy"]["document_level"] = _document_level(trainer, steps, k)
    if data:
        card["data"] = data
    return card


def render(card: dict) -> str:
    p, t = card["privacy"], card["training"]
    doc = p.get("document_level")
    out = [f"# Model card: {card['name']}", "",
           f"Fine-tuned with DP-SGD by vaultkern {card['vaultkern_version']} (`DPTrainer`): "
           f"**(ε = {p['epsilon']:.3g}, δ = {p['delta']:.3g})-DP** with respect to "
           f"**{p['privacy_unit']}** ({p['neighbouring_datasets']}).", ""]
    if not p["formal_guarantee"]:
        out += [f"**{NO_FORMAL_GUARANTEE}:** " + " ".join(p["caveats"]), ""]
    rows = [("ε (epsilon)", p["epsilon"]), ("δ (delta)", p["delta"]),
            ("target ε", p["target_epsilon"]), ("privacy unit", p["privacy_unit"])]
    if doc:
        rows.append(("derived: ε for one document (group of k rows, same δ)", doc["epsilon"]))
    rows += [
        ("clipping bound C", p["max_grad_norm"]),
        ("noise multiplier σ (noise std σ·C)", p["noise_multiplier"]), ("sampling", p["sampling"]),
        ("sample rate q = B̄/N", p["sample_rate"]), ("expected batch size B̄", p["expected_batch_size"]),
        ("N (training examples; treated as public)", p["dataset_size"]),
        ("steps accounted", p["steps"]), ("accountant", p["accountant"]),
        ("noise and sampling randomness", p["randomness"])]
    out += ["## Privacy", ""] + _table(rows)
    if doc:
        out += ["", f"Document level: {doc['derivation']}"]
    out += ["", "The guarantee covers the weights and this card only: not the Trainer's logs "
            "(training losses), its checkpoints, or anything computed on the training data "
            "without noise.", ""]
    if "data" in card:
        out += ["## Data", ""] + _table(list(card["data"].items())) + [""]
    out += ["## Training", ""] + _table(list(t.items()))
    return "\n".join(out) + "\n"


def write_trainer_card(trainer, out_dir: str) -> dict:
    card = trainer_card(trainer)
    os.makedirs(out_dir, exist_ok=True)
    _write_text(os.path.join(out_dir, CARD_JSON), json.dumps(card, indent=2, sort_keys=True))
    _write_text(os.path.join(out_dir, CARD_MD), render(card))
    return card
