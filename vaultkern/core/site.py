"""A patched layer: where its backward hands gradient forms to the book-keeper."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Dict, Iterator

import torch
from torch import nn

from vaultkern.core.grad_forms import GradForm

if TYPE_CHECKING:  # pragma: no cover
    from vaultkern.core.bookkeeping import BookKeeper
    from vaultkern.core.rules import LayerRule


class LayerSite:
    """One patched module: its path, its rule, its original forward."""

    def __init__(self, bookkeeper: "BookKeeper", path: str, module: nn.Module, rule: "LayerRule",
                 original_forward: Callable):
        self.bookkeeper = bookkeeper
        self.path = path or "<root>"
        self.module = module
        self.rule = rule
        self.original_forward = original_forward
        self._bypass_depth = 0

    # -- forward side -------------------------------------------------------------------
    @property
    def bypassing(self) -> bool:
        return self._bypass_depth > 0

    @contextlib.contextmanager
    def bypass(self) -> Iterator[None]:
        """Calls of the module inside this block run its original forward."""
        self._bypass_depth += 1
        try:
            yield
        finally:
            self._bypass_depth -= 1

    def describe(self) -> str:
        return f"'{self.path}' ({type(self.module).__name__})"

    def check_batch(self, x: torch.Tensor, what: str = "input") -> int:
        """dim 0 of a layer input is the batch; refuse shapes that cannot be one."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(f"vaultkern: {what} of {self.describe()} has no batch dimension "
                             f"(shape {tuple(getattr(x, 'shape', ()))}); dim 0 must index examples")
        if x.shape[0] == 0 and not self.bookkeeper.allow_empty_batch:
            raise ValueError(
                f"vaultkern: empty batch: {what} of {self.describe()} has 0 rows. For an empty "
                "Poisson batch skip forward/backward and call optimizer.step() (noise only), "
                "or patch with allow_empty_batch=True.")
        return x.shape[0]

    def trainable(self, param) -> bool:
        return isinstance(param, torch.Tensor) and param.requires_grad

    # -- backward side ------------------------------------------------------------------
    def forward_id(self) -> int:
        return self.bookkeeper.forward_id

    def record(self, forms: Dict[nn.Parameter, GradForm], forward_id: int) -> None:
        """Called from a backward: this use's gradient forms, one per trainable parameter."""
        if forms:
            self.bookkeeper.add(self, forms, forward_id)
