"""The core engine: per-example clipping in one backward pass (Book-Keeping)."""
from vaultkern.core.patch import patch, unpatch  # noqa: F401
from vaultkern.core.queries import (  # noqa: F401
    last_norms, bookkeeper, patched_sites, summary, set_row_mask, set_group_ids)
from vaultkern.core.errors import (  # noqa: F401
    BatchLayoutError, NonFiniteGradientError, UnclippedGradientError, UnsupportedModuleError)
