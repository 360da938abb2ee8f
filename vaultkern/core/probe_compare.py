"""How the layout probe (:mod:`vaultkern.core.probe`) compares its runs: row summaries of
tensors, and the checks that the rows of examples left unchanged stayed the same."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.utils._pytree import tree_flatten

from vaultkern.core.errors import BatchLayoutError

TOLERANCE = 1e-5  # relative: non-deterministic kernels (atomics) differ by ~1e-7


def row_digest(t: torch.Tensor) -> torch.Tensor:
    """[rows, 2] float64: each dim-0 row's sum and sum of squares."""
    t = torch.view_as_real(t.detach()) if t.is_complex() else t.detach()
    rows = t.reshape(t.shape[0], -1 if t.shape[0] else 0).to(torch.float64)
    return torch.stack([rows.sum(1), rows.square().sum(1)], 1).cpu()


def which(examples: List[int]) -> str:
    shown = ", ".join(map(str, examples[:6])) + (", ..." if len(examples) > 6 else "")
    return f"example{'s' if len(examples) > 1 else ''} {shown}"


def close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.isclose(a, b, rtol=TOLERANCE, atol=0.0, equal_nan=True) | (a == b)


def _others_unchanged(a: torch.Tensor, b: torch.Tensor, B: int, examples: List[int]) -> bool:
    """Are the rows of the examples not in ``examples`` the same in both (blocks of k rows for
    k·B rows, example-major)?"""
    if a.shape != b.shape:
        return False
    n = a.shape[0]
    same = close(a, b).all(1)
    others = torch.ones(n, dtype=torch.bool)
    if n % B == 0 and n != 1:
        k = n // B
        for example in examples:
            others[example * k:(example + 1) * k] = False  # the changed examples' own rows
    return bool(same[others].all())


def compare_rows(where: str, name: str, a: torch.Tensor, b: torch.Tensor, B: int,
                 examples: List[int]) -> None:
    """Refuse a layer input whose rows for other examples changed."""
    if not _others_unchanged(a, b, B, examples):
        raise BatchLayoutError(
            f"vaultkern: in module '{where}', the input rows of {name} ({a.shape[0]} rows for "
            f"{B} examples) change for other examples when only {which(examples)} change: dim "
            "0 does not hold examples here (e.g. a [T, B, d] layout with T == B, rows mixed "
            "across the batch, or tokens gathered across examples). Per-example clipping would "
            "be wrong, so it is refused. Keep the batch in dim 0 of every layer input "
            "(batch_first=True).")


def output_digests(output, B: int) -> List[Optional[torch.Tensor]]:
    """Row digests of the model's output tensors with one row per example (others None)."""
    return [row_digest(o) if isinstance(o, torch.Tensor) and o.dim() and o.shape[0] == B
            else None for o in tree_flatten(output)[0]]


def compare_outputs(first: list, second: list, B: int, examples: List[int]) -> None:
    """Refuse a forward whose output rows for other examples changed: the examples meet after
    the last call that reads a parameter (a batch statistic in the model's tail), which the
    layer inputs cannot show, and every example's gradient would depend on the others."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a is not None and b is not None and not _others_unchanged(a, b, B, examples):
            raise BatchLayoutError(
                f"vaultkern: output {index} of the model (one row per example) changes for "
                f"other examples when only {which(examples)} change: the forward couples the "
                "examples (e.g. a value computed from the whole batch — a mean, a min or max, "
                "or .item() of one — used in every row), so each example's gradient depends "
                "on the others and per-example clipping cannot bound one example's influence. "
                "It is refused; compute such values per example.")
