"""Two ways a layer use describes its per-example weight gradients.

Every time a patched layer takes part in a backward pass it hands the
book-keeper one *form* per trainable parameter it used:

``Factored``   G_i = Σ_t left_it ⊗ right_it  (rows × cols), never formed.
               nn.Linear: left = output grads g [B,T,p], right = inputs a [B,T,d].
               GPT-2 Conv1D: left = inputs, right = output grads.
               nn.Embedding: left = token ids [B,T] (one-hot rows, -1 = none),
               right = output grads [B,T,d].
``Materialized`` the per-example gradients themselves, [B, *param.shape]; used
               for small parameters (biases, norm weights) and the generic path.

The functions below give, per example, the squared norm of one form, the inner
product of two forms of the same parameter (the cross term of a tied or reused
parameter, DESIGN.md §2) and the clipped sum Σ_i clip_i G_i — all through the
dispatched ops, so Triton / C++ kernels are used where they exist.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

from vaultkern import ops
from vaultkern.backend import acc_dtype


@dataclass
class Factored:
    left: torch.Tensor           # [B,T,rows] dense, or [B,T] int64 ids when one_hot
    right: torch.Tensor          # [B,T,cols]
    one_hot: bool = False        # left holds row indices of a table with `rows` rows
    rows: Optional[int] = None   # number of rows (the table size) when one_hot
    mode: Optional[str] = None   # "ghost" / "direct" override for the self norm
    input_side: str = "right"    # which factor is the layer input (Conv1D: "left")

    def __post_init__(self):  # kept activations are data, never part of a graph
        self.left, self.right = self.left.detach(), self.right.detach()

    @property
    def batch(self) -> int:
        return self.right.shape[0]

    @property
    def layer_input(self) -> torch.Tensor:
        return self.right if self.input_side == "right" else self.left

    @property
    def output_grad(self) -> torch.Tensor:
        return self.left if self.input_side == "right" else self.right


@dataclass
class Materialized:
    per_example: torch.Tensor    # [B, *param.shape]

    def __post_init__(self):
        self.per_example = self.per_example.detach()

    @property
    def batch(self) -> int:
        return self.per_example.shape[0]


GradForm = Union[Factored, Materialized]


def zero_rows(form: GradForm, keep: torch.Tensor) -> GradForm:
    """The form with the examples where ``keep`` is False set to exactly 0 (NaN included)."""
    def z(t):
        k = keep.view(-1, *([1] * (t.dim() - 1))).to(t.device)
        return torch.where(k, t, torch.zeros((), dtype=t.dtype, device=t.device))
    if isinstance(form, Materialized):
        return Materialized(z(form.per_example))
    if form.one_hot:
        return Factored(form.left, z(form.right), one_hot=True, rows=form.rows, mode=form.mode)
    return Factored(z(form.left), z(form.right), mode=form.mode, input_side=form.input_side)


def _flat(m: torch.Tensor) -> torch.Tensor:
    """[B, *shape] -> [B, n]; also for B = 0, where reshape(B, -1) is ambiguous."""
    return m.reshape(m.shape[0], math.prod(m.shape[1:]))


def self_norm_sq(form: GradForm) -> torch.Tensor:
    """‖G_i‖² per example, [B]."""
    if isinstance(form, Materialized):
        m = form.per_example
        return _flat(m.to(acc_dtype(m))).square().sum(1)
    if form.one_hot:
        return ops.embedding_norm_sq(form.left, form.right)
    B, T, cols = form.right.shape
    rows = form.left.shape[-1]
    mode = form.mode or ops.choose_linear_mode(T, cols, rows)
    return ops.linear_norm_sq(form.right, form.left, mode)


def _input_key(form: Factored):
    a = form.layer_input
    return (a.data_ptr(), tuple(a.shape), a.stride(), a.dtype, a.device)


# Same-shape norm calls are stacked along the batch dimension into one call while the
# stacked copies stay under this many bytes (bounded extra memory at the end of backward).
# That saves kernel launches on an accelerator; on the CPU a launch costs nothing and the
# copies do (CPU bench, 2 cores: 10-20 ms a step faster without), so the CPU does not stack.
STACK_BYTES = 256 << 20
CPU_STACK_BYTES = 0


def summed_self_norms_sq(forms: List[GradForm]) -> Tuple[torch.Tensor, List[List[GradForm]]]:
    """Σ over ``forms`` of ‖G_i‖², with as few norm calls (kernel launches) as possible.

    1. Layers that read one input a (q/k/v projections, GeGLU gate/up) share the
       activation Gram: Σ_l Σ_{t,s}(a_t·a_s)(g^l_t·g^l_s) = Σ_{t,s}(a_t·a_s)(ĝ_t·ĝ_s)
       with ĝ = [g^1, g^2, ...] concatenated over output features, and likewise
       Σ_l ‖g^lᵀa‖² = ‖ĝᵀa‖². So one norm call on (a, ĝ) replaces one per layer,
       with the ghost/direct choice made for the combined width.
    2. The (a, g) pairs left with identical shapes, dtypes and mode (the same
       projection in every block of a decoder) are stacked along the batch
       dimension: one call on [L·B, T, ·] gives all L layers' norms, summed per
       example afterwards. Stacks are split so that a copy stays under STACK_BYTES (not
       at all on the CPU: CPU_STACK_BYTES).
    Returns the [B] sum and the groups of forms that went into each (a, g) pair.
    """
    groups: Dict[tuple, List[Factored]] = {}
    others: List[GradForm] = []
    for f in forms:
        if isinstance(f, Factored) and not f.one_hot and f.mode is None:
            groups.setdefault(_input_key(f), []).append(f)
        else:
            others.append(f)
    pairs: List[Tuple[torch.Tensor, torch.Tensor, str]] = []
    done: List[List[GradForm]] = []
    for group in groups.values():
        a = group[0].layer_input
        g = group[0].output_grad if len(group) == 1 else torch.cat([f.output_grad for f in group], -1)
        pairs.append((a, g, ops.choose_linear_mode(a.shape[1], a.shape[2], g.shape[-1])))
        done.append(list(group))
    parts: List[torch.Tensor] = []
    for f in others:
        if isinstance(f, Factored) and not f.one_hot:  # an explicit mode: its own pair
            pairs.append((f.right, f.left, f.mode))
        else:
            parts.append(self_norm_sq(f))
        done.append([f])
    parts += _stacked_norms(pairs)
    # one stacked sum instead of one addition per part (fewer kernel launches on a GPU)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else parts[0].dtype
    total = torch.stack([p.to(dtype) for p in parts]).sum(0) if len(parts) > 1 else parts[0]
    return total, done


def _stacked_norms(pairs: List[Tuple[torch.Tensor, torch.Tensor, str]]) -> List[torch.Tensor]:
    """[B] norms of the (a, g, mode) pairs, same-shape pairs stacked into one call."""
    buckets: Dict[tuple, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
    for a, g, mode in pairs:
        key = (tuple(a.shape), tuple(g.shape), a.dtype, g.dtype, a.device, mode)
        buckets.setdefault(key, []).append((a, g))
    out = []
    for (a_shape, _, _, _, _, mode), items in buckets.items():
        B = a_shape[0]
        per_layer = items[0][0].numel() * items[0][0].element_size() + \
            items[0][1].numel() * items[0][1].element_size()
        limit = CPU_STACK_BYTES if items[0][0].device.type == "cpu" else STACK_BYTES
        chunk = max(1, min(len(items), limit // max(per_layer, 1)))
        for i in range(0, len(items), chunk):
            part = items[i:i + chunk]
            if len(part) == 1:
                out.append(ops.linear_norm_sq(part[0][0], part[0][1], mode))
                continue
            a = torch.stack([x for x, _ in part]).flatten(0, 1)   # [L·B, T, d]
            g = torch.stack([y for _, y in part]).flatten(0, 1)   # [L·B, T, p]
            out.append(ops.linear_norm_sq(a, g, mode).view(len(part), B).sum(0))
    return out


def _factored_dot_materialized(f: Factored, m: torch.Tensor) -> torch.Tensor:
    """⟨Σ_t L_t ⊗ R_t, M_i⟩ = Σ_t L_tᵀ M_i R_t."""
    acc = acc_dtype(f.right)
    m = m.to(acc)
    right = f.right.to(acc)
    if f.one_hot:
        ids = f.left
        rows = torch.gather(m, 1, ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, m.shape[-1]))
        return ((rows * right).sum(-1) * (ids >= 0)).sum(1)
    return torch.einsum("btr,brc,btc->b", f.left.to(acc), m, right)


def cross(u: GradForm, v: GradForm) -> torch.Tensor:
    """⟨G_i^u, G_i^v⟩ per example for two uses of the same parameter, [B]."""
    if isinstance(u, Materialized) and isinstance(v, Materialized):
        a, b = u.per_example, v.per_example
        acc = acc_dtype(a)
        return _flat(a.to(acc) * b.to(acc)).sum(1)
    if isinstance(u, Materialized):
        u, v = v, u
    if isinstance(v, Materialized):
        return _factored_dot_materialized(u, v.per_example)
    if u.one_hot and v.one_hot:
        return ops.embedding_cross(u.left, u.right, v.left, v.right)
    if v.one_hot:
        u, v = v, u
    if u.one_hot:
        # ⟨onehot(x)ᵀ e, zᵀ h⟩ = Σ_{t,s} z_s[x_t] (e_t·h_s)
        return ops.embedding_linear_cross(u.left, u.right, v.right, v.left)
    return ops.linear_cross(u.right, u.left, v.right, v.left)


def clipped_sum(form: GradForm, clip: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Σ_i clip_i G_i, shaped like the parameter."""
    if isinstance(form, Materialized):
        m = form.per_example
        acc = acc_dtype(m)
        return torch.tensordot(clip.to(acc), m.to(acc), dims=1).reshape(shape)
    if form.one_hot:
        return ops.clipped_embedding_grad(form.left, form.right, clip, form.rows).reshape(shape)
    return ops.clipped_linear_grad(form.left, form.right, clip).reshape(shape)
