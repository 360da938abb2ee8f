"""Benchmark sizes: which models, batches, precisions and step counts each runs.

A *configuration* is one model spec with one embedding setting: ``tied``
(the models' default: input embedding shared with the LM head) or ``untied``
(separate LM head, e.g. so that Opacus ghost clipping, which refuses tied
weights, has something to run). Every provider of a configuration gets a copy
of the same initial weights and the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from vaultkern.models import DecoderConfig, get_config, make_config

TIES = ("tied", "untied")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    preset: Optional[str] = None                 # a vaultkern.models preset ...
    fields: Dict[str, object] = field(default_factory=dict)  # ... and/or explicit fields
    batch: int = 8
    autocast: Optional[str] = None               # "bf16": torch.autocast(bfloat16); None: fp32
    max_batch_cap: int = 0                       # > 0: search the largest batch up to this (GPU)
    crosscheck_rows: Optional[int] = None        # rows of the first batch for the norm check

    def config(self, tied: bool) -> DecoderConfig:
        overrides = dict(self.fields, tie_embeddings=tied)
        if self.preset is not None:
            return get_config(self.preset, **overrides)
        return make_config(overrides, source=f"benchmark model {self.name!r}")

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]


@dataclass(frozen=True)
class SizeSpec:
    name: str
    device: str
    models: List[ModelSpec]
    warmup: int
    steps: int
    description: str

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise ValueError(f"--size {self.name} has no model {name!r}; "
                         f"available: {', '.join(m.name for m in self.models)}")


_MICRO_COMMON = dict(vocab_size=64, seq_len=16, num_layers=1, d_model=32, num_heads=2)
_CPU_COMMON = dict(vocab_size=259, seq_len=128, num_layers=4, d_model=256, num_heads=4)

SIZES: Dict[str, SizeSpec] = {
    "micro": SizeSpec(
        name="micro", device="cpu", warmup=1, steps=2,
        description="code-path check for the tests: 1-layer models, batch 2, 2 timed steps",
        models=[
            ModelSpec("gemma", fields=dict(_MICRO_COMMON, style="gemma", num_kv_heads=1, d_ff=64),
                      batch=2),
            ModelSpec("gpt2", fields=dict(_MICRO_COMMON, style="gpt2"), batch=2),
        ]),
    "cpu": SizeSpec(
        name="cpu", device="cpu", warmup=2, steps=10,
        description="small decoders for a 2-core CPU: 4 layers, d=256, T=128, batch 8, fp32",
        models=[
            ModelSpec("gemma", fields=dict(_CPU_COMMON, style="gemma", num_kv_heads=1, d_ff=768),
                      batch=8),
            ModelSpec("gpt2", fields=dict(_CPU_COMMON, style="gpt2"), batch=8),
        ]),
    "gpu": SizeSpec(
        name="gpu", device="cuda", warmup=3, steps=10,
        description="GPT-2-small and -medium class and a ~1B Gemma-style decoder, T=1024, "
                    "bf16 autocast",
        models=[
            ModelSpec("gpt2-small", preset="gpt2-small", batch=8, autocast="bf16",
                      max_batch_cap=256, crosscheck_rows=4),
            ModelSpec("gpt2-medium", preset="gpt2-medium", batch=4, autocast="bf16",
                      max_batch_cap=128, crosscheck_rows=4),
            ModelSpec("gemma-1b", preset="gemma-1b", batch=2, autocast="bf16",
                      max_batch_cap=32, crosscheck_rows=2),
        ]),
}

# With --max-batch auto, only these models get the largest-batch search (time budget).
MAX_BATCH_AUTO = ("gpt2-small",)
