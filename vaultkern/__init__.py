"""vaultkern: differentially private training as fast as ordinary training.

    import vaultkern as vk
    model = vk.patch(model, max_grad_norm=1.0, loss_reduction="sum")
    loss_per_example.sum().backward()   # p.grad = Σ_i clip_i g_i
    vk.last_norms(model)                # per-example gradient norms
    vk.unpatch(model)
"""
from vaultkern._version import __version__  # noqa: F401
from vaultkern.core import (  # noqa: F401
    patch, unpatch, last_norms, summary, set_row_mask, set_group_ids, UnsupportedModuleError,
    UnclippedGradientError, NonFiniteGradientError, BatchLayoutError)
from vaultkern.info import info  # noqa: F401

_LAZY = {
    "PrivacyEngine": "vaultkern.privacy",
    "DPOptimizer": "vaultkern.privacy",
    "Accountant": "vaultkern.privacy",
    "PoissonBatchSampler": "vaultkern.privacy",
    "calibrate_noise_multiplier": "vaultkern.privacy",
}


def __getattr__(name):  # the privacy engine is imported on first use
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vaultkern' has no attribute {name!r}")
