"""Privacy side of DP-SGD: Opacus-compatible engine, Poisson sampling, accounting.

* :class:`PrivacyEngine` - ``make_private`` / ``make_private_with_epsilon`` /
  ``get_epsilon`` with Opacus 1.6's names and meaning.
* :class:`DPOptimizer` - noise σ·C once per logical step, scale 1/B̄, update.
* :class:`Accountant`, :func:`calibrate_noise_multiplier` - dp-accounting's PLD
  (default) or RDP accountant over the history of steps.
* :class:`PoissonBatchSampler`, :func:`make_poisson_loader`,
  :class:`BatchMemoryManager` - Poisson / truncated Poisson batches and
  micro-batches.
* :class:`ModuleValidator` - Opacus' validate / fix (BatchNorm -> GroupNorm, recurrent
  layers -> opacus.layers' DP versions).
"""
from vaultkern.privacy.accounting import Accountant, calibrate_noise_multiplier  # noqa: F401
from vaultkern.privacy.engine import PrivacyEngine  # noqa: F401
from vaultkern.privacy.optimizer import DPOptimizer  # noqa: F401
from vaultkern.privacy.micro_batches import BatchMemoryManager  # noqa: F401
from vaultkern.privacy.sampling import (  # noqa: F401
    PoissonBatchSampler, make_poisson_loader, split_microbatches)
from vaultkern.privacy.validator import ModuleValidator  # noqa: F401

__all__ = ["PrivacyEngine", "DPOptimizer", "Accountant", "PoissonBatchSampler",
           "calibrate_noise_multiplier", "BatchMemoryManager", "make_poisson_loader",
           "split_microbatches", "ModuleValidator"]
