"""Decoder configurations: the dataclass, named presets, and loading from a file.

``get_config("tiny")`` returns a preset; ``get_config("my_model.toml")`` (or
``.json``) reads a file whose keys are :class:`DecoderConfig` fields, optionally
starting from a preset named by a ``base`` key::

    base = "gemma-1b"
    vocab_size = 32000
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass
from typing import Optional

BYTE_VOCAB_SIZE = 259  # 256 bytes + BOS, EOS, PAD (vaultkern.data.tokenizer)

STYLES = ("gemma", "gpt2")


@dataclass
class DecoderConfig:
    style: str = "gemma"              # "gemma" or "gpt2"
    vocab_size: int = BYTE_VOCAB_SIZE
    seq_len: int = 64                 # model positions per sequence (T)
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: = num_heads (MHA); 1: multi-query attention
    head_dim: Optional[int] = None      # None: d_model // num_heads
    d_ff: Optional[int] = None          # MLP width; None: 4·d_model (gpt2) or 8/3·d_model (gemma)
    bias: Optional[bool] = None         # None: False for gemma, True for gpt2
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    final_logit_softcap: Optional[float] = None  # gemma-2 uses 30.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and self.num_heads > 0:
            self.head_dim = self.d_model // self.num_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.style == "gpt2" else (8 * self.d_model) // 3
        if self.bias is None:
            self.bias = self.style == "gpt2"

    def validate(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        for name in ("vocab_size", "seq_len", "num_layers", "d_model", "num_heads",
                     "num_kv_heads", "head_dim", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.style == "gemma" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # CPU demo: about 0.1 M parameters, byte vocabulary
    "tiny": dict(style="gemma", seq_len=64, num_layers=2, d_model=64, num_heads=4,
                 num_kv_heads=1, d_ff=192),
    "tiny-gpt2": dict(style="gpt2", seq_len=64, num_layers=2, d_model=64, num_heads=4),
    "small": dict(style="gemma", seq_len=256, num_layers=6, d_model=384, num_heads=6,
                  num_kv_heads=1, d_ff=1024),
    "gpt2-small": dict(style="gpt2", vocab_size=50257, seq_len=1024, num_layers=12,
                       d_model=768, num_heads=12, norm_eps=1e-5),
    "gpt2-medium": dict(style="gpt2", vocab_size=50257, seq_len=1024, num_layers=24,
                        d_model=1024, num_heads=16, norm_eps=1e-5),
    # VaultGemma-like 1B decoder (26 layers, d=1152, 4 query heads of 256, one shared
    # k/v head, GeGLU). The vocabulary is configurable; VaultGemma uses 256 000 tokens.
    "gemma-1b": dict(style="gemma", vocab_size=256000, seq_len=1024, num_layers=26,
                     d_model=1152, num_heads=4, num_kv_heads=1, head_dim=256, d_ff=6912),
}


def config_names() -> list:
    return sorted(PRESETS)


def get_config(name_or_path: str, **overrides) -> DecoderConfig:
    """A preset by name, or a .toml / .json file of DecoderConfig fields; then overrides."""
    if name_or_path in PRESETS:
        fields = dict(PRESETS[name_or_path])
    elif os.path.isfile(name_or_path):
        fields = load_config_file(name_or_path)
    else:
        raise ValueError(f"unknown config {name_or_path!r}: not a preset ({', '.join(config_names())}) "
                         f"and not an existing .toml/.json file")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return make_config(fields, source=name_or_path)


def load_config_file(path: str) -> dict:
    if path.endswith(".toml"):
        with open(path, "rb") as f:
            fields = tomllib.load(f)
    elif path.endswith(".json"):
        with open(path) as f:
            fields = json.load(f)
    else:
        raise ValueError(f"config file {path!r} must end in .toml or .json")
    base = fields.pop("base", None)
    if base is not None:
        if base not in PRESETS:
            raise ValueError(f"{path}: base {base!r} is not a preset ({', '.join(config_names())})")
        fields = {**PRESETS[base], **fields}
    return fields


def make_config(fields: dict, source: str = "dict") -> DecoderConfig:
    known = {f.name for f in dataclasses.fields(DecoderConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: unknown config keys {unknown}; known keys: {sorted(known)}")
    cfg = DecoderConfig(**fields)
    cfg.validate()
    return cfg
