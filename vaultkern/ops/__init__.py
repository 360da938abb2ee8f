"""Numerical ops, one per file, each with torch / triton / cpp implementations.

See vaultkern/backend.py for how an implementation is chosen.
"""
from vaultkern.ops.linear_norm import linear_norm_sq, choose_linear_mode  # noqa: F401
from vaultkern.ops.linear_cross import linear_cross  # noqa: F401
from vaultkern.ops.embedding_norm import embedding_norm_sq  # noqa: F401
from vaultkern.ops.embedding_cross import embedding_linear_cross, embedding_cross  # noqa: F401
from vaultkern.ops.clipped_grad import clipped_linear_grad, clipped_embedding_grad  # noqa: F401
from vaultkern.ops.noise import noisy_scale, noisy_scale_many, secure_noisy_scale  # noqa: F401
from vaultkern.ops.per_layer_clipped_linear_grad import per_layer_clipped_linear_grad  # noqa: F401
