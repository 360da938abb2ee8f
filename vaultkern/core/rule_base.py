"""The interface every layer rule implements (see vaultkern.core.rules)."""
from __future__ import annotations

from torch import nn

from vaultkern.core.site import LayerSite


class UnsupportedModuleError(TypeError):
    """A module whose per-example gradients vaultkern cannot form (names the module)."""


class LayerRule:
    """Base class. ``forward(site, *args, **kwargs)`` replaces module.forward."""

    name = "rule"
    # True: the rule handles the parameters of the module's whole subtree.
    covers_subtree = False

    def check(self, module: nn.Module, path: str) -> None:
        """Raise UnsupportedModuleError for configurations the rule cannot handle."""

    def forward(self, site: LayerSite, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError
