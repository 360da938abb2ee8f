"""The output directory of ``python -m vaultkern finetune`` and how it is read back.

    OUT/model/              publishable, and nothing else: the weights in save_pretrained
                            format (the full model, or PEFT adapters), the tokenizer when the
                            base model had one, MODEL_CARD.md and model_card.json
    OUT/data.pt             private: the training and held-out rows (and planted canaries)
    OUT/private_report.json private: training and held-out losses, the audit's results

The release folder holds only what may be published, so ``push_to_hub`` / an upload of
``OUT/model`` as a whole can never carry the training data or the losses.

Nothing here downloads: every ``from_pretrained`` is ``local_files_only``.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import List, Optional, Tuple

import torch
from torch import nn

from vaultkern.data import ByteTokenizer
from vaultkern.models import IGNORE_INDEX

RELEASE_DIR = "model"
# any of these in a model directory means it ships its own tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_finetune_dir(run_dir: str) -> bool:
    return os.path.isdir(os.path.join(run_dir, RELEASE_DIR))


class HFTokens:
    """A Hugging Face tokenizer behind the byte tokenizer's interface (what packing and the
    audit call): ``encode(text, bos, eos)``, ``decode(ids)``, ``BOS``, ``EOS``, ``PAD``.

    PAD is -100: never a token id (a tokenizer's pad id is often its EOS, whose targets
    must count) and already the label every loss ignores. Models never see it: inputs map
    it to id 0, in positions whose outputs are ignored (rows are right-padded, attention
    is causal)."""

    PAD = IGNORE_INDEX

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # models without a BOS token (GPT-2) open a document with their EOS, as they were trained
        self.BOS = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.EOS = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.BOS] if bos and self.BOS is not None else []) + list(ids) + (
            [self.EOS] if eos and self.EOS is not None else [])

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=True)


def load_tokenizer(model_dir: str, vocab_size: int) -> Tuple[object, Optional[object], str]:
    """(tokenizer for packing and the audit, the Hugging Face tokenizer or None, description).

    The directory's own tokenizer when it has one; else vaultkern's byte tokenizer, which
    needs a vocabulary of at least 259 (bytes + BOS, EOS, PAD)."""
    if any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        tokens = HFTokens(hf)
        if tokens.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer of {model_dir!r} has {tokens.vocab_size} tokens but the "
                             f"model's embedding only {vocab_size} rows")
        return tokens, hf, f"the model's own ({type(hf).__name__}, {tokens.vocab_size} tokens)"
    if vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(
            f"{model_dir!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}) and its vocabulary of "
            f"{vocab_size} is too small for vaultkern's byte tokenizer (needs "
            f"{ByteTokenizer.vocab_size}); save a tokenizer into the model directory")
    return ByteTokenizer(), None, "vaultkern byte tokenizer (UTF-8 bytes 0-255, BOS 256, EOS 257)"


def vocabulary_size(model) -> int:
    return model.get_input_embeddings().num_embeddings


class LogitsOf(nn.Module):
    """A causal LM seen as the audit sees the reference decoder: ids [B, T] -> logits,
    with ``config.seq_len`` the row length it was trained on (PAD ids are mapped to 0)."""

    def __init__(self, lm: nn.Module, seq_len: int):
        super().__init__()
        self.lm = lm
        self.config = SimpleNamespace(seq_len=seq_len)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids.clamp(min=0)).logits


def load_release(run_dir: str, device) -> nn.Module:
    """The fine-tuned model of a finetune directory (full, or base + PEFT adapters), eval mode."""
    from transformers import AutoModelForCausalLM
    release = os.path.join(run_dir, RELEASE_DIR)
    if os.path.exists(os.path.join(release, "adapter_config.json")):
        from peft import PeftConfig, PeftModel
        base = PeftConfig.from_pretrained(release).base_model_name_or_path
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32),
            release, local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(release, local_files_only=True,
                                                     dtype=torch.float32)
    return model.to(device).eval()


def load_for_audit(run_dir: str, device):
    """(model as ids -> logits, tokenizer, packed data) of a finetune directory."""
    from vaultkern.data import PackedCorpus
    from vaultkern.run.rundir import DATA_FILE
    data = PackedCorpus.load(os.path.join(run_dir, DATA_FILE))
    lm = load_release(run_dir, device)
    tokenizer, _, _ = load_tokenizer(os.path.join(run_dir, RELEASE_DIR), vocabulary_size(lm))
    return LogitsOf(lm, data.seq_len).eval(), tokenizer, data
