"""The core engine: per-example clipping in one backward pass (Book-Keeping)."""
from vaultkern.core.patch import patch, unpatch, last_norms, patched_sites, UnclippedGradientError  # noqa: F401
from vaultkern.core.rules import (  # noqa: F401
    LayerRule, LinearRule, Conv1DRule, EmbeddingRule, AffineNormRule, register_rule,
    UnsupportedModuleError, rms_norm_hat, layer_norm_hat)
from vaultkern.core.generic import GenericRule  # noqa: F401
from vaultkern.core.bookkeeping import NonFiniteGradientError, BatchLayoutError  # noqa: F401
