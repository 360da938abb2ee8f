"""The errors the engine raises: each names the module or value at fault."""


class UnsupportedModuleError(TypeError):
    """A module whose per-example gradients vaultkern cannot form (names the module)."""


class UnclippedGradientError(RuntimeError):
    """A trainable parameter received a gradient that bypassed per-example clipping."""


class NonFiniteGradientError(FloatingPointError):
    """Per-example gradient norms are NaN/inf where the caller asked to be told (names rows)."""


class BatchLayoutError(ValueError):
    """Rows of a layer input are not (positions of) the model's examples."""
