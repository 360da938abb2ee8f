"""The float64 per-example oracle (DESIGN.md §7) and small models for tests.

For each example i alone: backward of its loss gives g_i exactly; clip and sum.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def per_example_grads(model: nn.Module, batch: Tuple[torch.Tensor, ...],
                      per_example_loss: Callable[[nn.Module, Tuple[torch.Tensor, ...]], torch.Tensor]
                      ) -> List[Dict[str, torch.Tensor]]:
    """[{name: g_i}] in float64: example i's gradient from a backward of its loss alone.

    per_example_loss(model, batch) -> [b] losses of the rows of ``batch``.
    """
    ref = copy.deepcopy(model).double()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = [p for n, p in ref.named_parameters() if p.requires_grad]
    start = [(b, b.detach().clone()) for b in ref.buffers()]
    out = []
    for i in range(batch[0].shape[0]):
        with torch.no_grad():  # each example from the buffers the batch's forward starts from
            for b, v in start:  # (a forward may update one in place: spectral norm's u, v)
                b.copy_(v)
        row = tuple(t[i:i + 1].double() if t.is_floating_point() else t[i:i + 1] for t in batch)
        loss = per_example_loss(ref, row).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append({n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)})
    return out


def clip_and_sum(grads: List[Dict[str, torch.Tensor]], max_grad_norm: float
                 ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """(Σ_i clip_i g_i by name, per-example norms) for per-example gradients ``grads``."""
    sums = {n: torch.zeros_like(g) for n, g in grads[0].items()} if grads else {}
    norms = []
    for g_i in grads:
        norm = math.sqrt(sum(float(g.square().sum()) for g in g_i.values()))
        clip = min(1.0, max_grad_norm / (norm + 1e-6))
        for n, g in g_i.items():
            sums[n] += clip * g
        norms.append(norm)
    return sums, torch.tensor(norms, dtype=torch.float64)


def oracle(model: nn.Module, batch: Tuple[torch.Tensor, ...],
           per_example_loss: Callable[[nn.Module, Tuple[torch.Tensor, ...]], torch.Tensor],
           max_grad_norm: float) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """(clipped gradient sum by parameter name, per-example norms) in float64."""
    return clip_and_sum(per_example_grads(model, batch, per_example_loss), max_grad_norm)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# --- a small GPT-style decoder covering the layer types of the reference models ------------

class GemmaStyleNorm(nn.Module):
    """RMSNorm with Gemma's (1 + weight) scale, a class vaultkern has no rule for."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1)
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on [B, H, T, hd] (hd even)."""
    B, H, T, hd = x.shape
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=x.dtype, device=x.device) / hd))
    ang = torch.arange(T, dtype=x.dtype, device=x.device)[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


def causal_attention(q, k, v):
    """softmax(q kᵀ/√hd + causal mask) v, written out: the float64 oracle needs no fused
    kernel, and this one raises on mismatched head counts on every torch version."""
    T = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


class Block(nn.Module):
    def __init__(self, d, heads, kv_heads, mlp, norm, rope, bias):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
        self.h, self.kv, self.hd, self.rope = heads, kv_heads, d // heads, rope
        Norm = {"layer": nn.LayerNorm, "rms": nn.RMSNorm, "gemma": GemmaStyleNorm}[norm]
        self.n1, self.n2 = Norm(d), Norm(d)
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, kv_heads * self.hd, bias=bias)
        self.v = nn.Linear(d, kv_heads * self.hd, bias=bias)
        self.o = nn.Linear(d, d, bias=bias)
        self.mlp = mlp
        if mlp == "geglu":
            self.gate, self.up = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, 3 * d, bias=False)
            self.down = nn.Linear(3 * d, d, bias=False)
        else:
            self.up, self.down = nn.Linear(d, 3 * d, bias=bias), nn.Linear(3 * d, d, bias=bias)

    def forward(self, x):
        B, T, d = x.shape
        h = self.n1(x)
        q = self.q(h).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv, self.hd).transpose(1, 2)
        if self.rope:
            q, k = rotary(q), rotary(k)
        k = k.repeat_interleave(self.h // self.kv, 1)
        v = v.repeat_interleave(self.h // self.kv, 1)
        att = causal_attention(q, k, v)
        x = x + self.o(att.transpose(1, 2).reshape(B, T, d))
        h = self.n2(x)
        if self.mlp == "geglu":
            h = F.gelu(self.gate(h), approximate="tanh") * self.up(h)
        else:
            h = F.gelu(self.up(h))
        return x + self.down(h)


class TinyDecoder(nn.Module):
    def __init__(self, vocab=29, d=16, heads=4, kv_heads=4, layers=2, T=8, mlp="gelu", norm="layer",
                 rope=False, tied=True, bias=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = None if rope else nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, mlp, norm, rope, bias) for _ in range(layers))
        self.norm = {"layer": nn.LayerNorm, "rms": nn.RMSNorm, "gemma": GemmaStyleNorm}[norm](d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(ids.shape[1], device=ids.device).expand_as(ids))
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per-sequence summed next-token cross entropy, [B]."""
    ids = batch[0]
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return loss.sum(1)
