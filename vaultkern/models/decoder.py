"""The reference decoder: one readable class for two architectures.

``style="gemma"`` — Gemma-2-style (as in VaultGemma): token embedding scaled by
sqrt(d) and tied to the LM head, pre-norm RMSNorm in Gemma's ``(1 + weight)``
form, rotary positions, multi-query / grouped-query attention, GeGLU MLP, no
biases, optional final-logit soft-capping.

``style="gpt2"`` — GPT-2-style: learned positions (an ``nn.Embedding``),
LayerNorm, multi-head attention, GELU MLP, biases, tied LM head.

Every trainable parameter lives in an ``nn.Linear``, ``nn.Embedding``,
``nn.LayerNorm`` or :class:`GemmaRMSNorm`, so vaultkern's fast per-example
norm rules cover the whole model (DESIGN.md §2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from vaultkern.models.configs import DecoderConfig

IGNORE_INDEX = -100


class GemmaRMSNorm(nn.Module):
    """RMSNorm with Gemma's ``(1 + weight)`` scale (weight starts at zero).

    x̂ = x · rsqrt(mean(x², -1) + eps) in fp32; y = x̂ · (1 + weight), cast back
    to the input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x_hat * (1.0 + self.weight.float())).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, theta: float):
    """cos and sin tables [seq_len, head_dim/2] for rotary position embeddings."""
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of x [B, H, T, hd] by position."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention; num_kv_heads < num_heads gives MQA / GQA."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rotary = cfg.style == "gemma"
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            cos, sin = rope
            q, k = apply_rotary(q, cos[:T], sin[:T]), apply_rotary(k, cos[:T], sin[:T])
        if self.num_kv_heads != self.num_heads:  # share each k/v head across a group of q heads
            group = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """GeGLU (gemma: down(gelu(gate(x)) * up(x))) or GELU (gpt2: down(gelu(up(x))))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gated = cfg.style == "gemma"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            hidden = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)
        else:
            hidden = F.gelu(self.up_proj(x), approximate="tanh")
        return self.down_proj(hidden)


def make_norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.style == "gemma":
        return GemmaRMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    """Decoder-only language model: ``forward(ids [B, T]) -> logits [B, T, V]``."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.style == "gpt2":
            self.embed_positions = nn.Embedding(cfg.seq_len, cfg.d_model)
        else:
            cos, sin = rotary_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self) -> None:
        std = self.config.init_std
        # GPT-2's scaled init: projections that write into the residual stream get std/sqrt(2L)
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith("o_proj") or name.endswith("down_proj")
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, seq], got shape {tuple(ids.shape)}")
        B, T = ids.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.config.seq_len}")
        x = self.embed_tokens(ids)
        rope = None
        if self.config.style == "gemma":
            # Gemma scales embeddings by sqrt(d), rounded to the activation dtype
            x = x * torch.tensor(self.config.d_model ** 0.5, dtype=x.dtype, device=x.device)
            rope = (self.rope_cos, self.rope_sin)
        else:
            positions = torch.arange(T, device=ids.device).unsqueeze(0).repeat(B, 1)  # [B, T]: dim 0 is the batch
            x = x + self.embed_positions(positions)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.lm_head(self.final_norm(x))
        cap = self.config.final_logit_softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits


def per_sequence_loss(logits: torch.Tensor, targets: torch.Tensor,
                      weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of token cross-entropies of each sequence: [B, T, V], [B, T] -> [B] (fp32).

    Targets equal to -100 are ignored; rows with weight 0 give exactly 0 (even
    when their logits are not finite), other rows are multiplied by their weight.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    B, T, V = logits.shape
    token_loss = F.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(B * T),
                                 ignore_index=IGNORE_INDEX, reduction="none")
    loss = token_loss.view(B, T).sum(dim=1)
    if weights is not None:
        weights = weights.to(loss.dtype)
        loss = torch.where(weights != 0, loss * weights, torch.zeros_like(loss))
    return loss


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of distinct parameter elements (a tied weight counts once)."""
    seen, total = set(), 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        if (p.requires_grad or not trainable_only) and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
