"""`python -m vaultkern finetune` end to end on the built-in data, then `audit` on its output
(a tiny Llama saved with save_pretrained to a temp dir; nothing downloaded)."""
import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from vaultkern import audit  # noqa: E402
from vaultkern.model_card import CARD_JSON  # noqa: E402
from vaultkern.run import finetune  # noqa: E402
from vaultkern.run.hfdir import RELEASE_DIR  # noqa: E402

PRIVATE_KEYS = {"train_loss", "train_loss_mean", "heldout_loss", "heldout_perplexity",
                "initial_heldout_loss", "nonfinite_examples", "data_source", "base_model"}


def tiny_llama_dir(path):
    """A Llama whose vocabulary holds the byte tokenizer's 259 ids (no tokenizer files)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def walk_keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from walk_keys(v)


@pytest.mark.parametrize("lora", [True, False])
def test_finetune_then_audit(tmp_path, lora):
    model_dir = tiny_llama_dir(str(tmp_path / "base"))
    out = str(tmp_path / "out")
    argv = ["--model", model_dir, "--out", out, "--records", "120", "--seq-len", "32",
            "--batch-size", "8", "--physical-batch-size", "4", "--steps", "3",
            "--epsilon", "8", "--delta", "1e-4", "--quiet"]
    if lora:
        argv += ["--lora-r", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = finetune.finetune(finetune.build_parser().parse_args(argv))
    assert summary["steps_done"] == 3
    assert 0 < summary["epsilon"] <= 8.0

    release = os.path.join(out, RELEASE_DIR)
    with open(os.path.join(release, CARD_JSON)) as f:
        card = json.load(f)
    privacy = card["privacy"]
    assert privacy["formal_guarantee"] and privacy["epsilon"] == pytest.approx(summary["epsilon"])
    assert privacy["steps"] == 3 and privacy["delta"] == 1e-4
    assert privacy["document_level"]["k"] == card["data"]["max_rows_per_document"] >= 1
    assert not PRIVATE_KEYS & set(walk_keys(card)), "private numbers on the public card"
    with open(os.path.join(out, "private_report.json")) as f:
        report = json.load(f)
    assert report["training"]["heldout_loss"] > 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = audit.audit_run(out, device="cpu", num_candidates=100, max_sequences=64,
                                 memorization_samples=16, quiet=True)
    assert result["epsilon"] == pytest.approx(summary["epsilon"])
    assert result["canaries"] and all(0 <= c["exposure"] <= 7 for c in result["canaries"])
    assert result["heldout_perplexity"] > 1
