"""The core engine: per-example clipping in one backward pass (Book-Keeping)."""
from vaultkern.core.patch import (  # noqa: F401
    patch, unpatch, last_norms, bookkeeper, patched_sites, summary, set_row_mask, set_group_ids)
from vaultkern.core.errors import (  # noqa: F401
    BatchLayoutError, NonFiniteGradientError, UnclippedGradientError, UnsupportedModuleError)
