"""Modules DP-SGD cannot train as they are, and the swaps that fix them.

The counterpart of Opacus' ``ModuleValidator`` for vaultkern's engine:

* BatchNorm normalises each example with statistics of the whole batch: an example's
  output, hence its gradient, depends on the other examples, so the clipped sum's
  sensitivity is no longer C; its running statistics are data released without noise.
  Fix: GroupNorm with gcd(32, channels) groups and the same ``affine`` (Opacus' choice).
* InstanceNorm with ``track_running_stats=True``: running statistics, same leak.
  Fix: the same norm without running statistics (its affine weights kept).
* ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` read every weight of every layer in one fused
  call over all time steps, with the batch in dim 1 of the hidden state; the engine has
  no rule for that call and fails in it with a message that does not say why. Fix:
  Opacus' ``DPLSTM`` / ``DPGRU`` / ``DPRNN`` (one linear layer per gate, called step by
  step), which vaultkern clips exactly; the weights are copied over.
"""
from __future__ import annotations

import copy
import math
from typing import List, Optional

from torch import nn

from vaultkern.core.errors import UnsupportedModuleError

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_RECURRENT = {nn.LSTM: "DPLSTM", nn.GRU: "DPGRU", nn.RNN: "DPRNN"}
_FIX_HINT = "PrivacyEngine.get_compatible_module(model) (or ModuleValidator.fix(model))"


def _problem(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be trained with DP-SGD as it is (None: it can)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return ("batch norm makes each example's output depend on the other examples of the "
                "batch (and its running statistics are released without noise); "
                f"{_FIX_HINT} swaps it for GroupNorm")
    if isinstance(module, _INSTANCE_NORMS) and module.track_running_stats:
        return ("track_running_stats=True keeps statistics of the data that are released "
                f"without noise; {_FIX_HINT} turns them off")
    if type(module) in _RECURRENT:
        if getattr(module, "proj_size", 0):
            return ("vaultkern has no rule for the fused recurrent kernel, and proj_size > 0 "
                    "has no step-by-step equivalent in opacus.layers")
        return ("vaultkern has no rule for the fused recurrent kernel (all weights of all "
                f"time steps in one call); use opacus.layers.{_RECURRENT[type(module)]}, which "
                f"vaultkern clips exactly: {_FIX_HINT} swaps it and copies the weights")
    return None


def _fixed(module: nn.Module, num_groups: Optional[int]) -> Optional[nn.Module]:
    """The replacement for ``module`` (None: nothing to replace)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        groups = num_groups or math.gcd(32, module.num_features)
        new = nn.GroupNorm(groups, module.num_features, eps=module.eps, affine=module.affine)
    elif isinstance(module, _INSTANCE_NORMS) and module.track_running_stats:
        new = type(module)(module.num_features, eps=module.eps, momentum=module.momentum,
                           affine=module.affine, track_running_stats=False)
        if module.affine:
            new.load_state_dict({"weight": module.weight, "bias": module.bias})
    elif type(module) in _RECURRENT and not getattr(module, "proj_size", 0):
        try:
            from opacus import layers
        except ImportError:  # validate() then names the module and what to install
            return None
        cls = getattr(layers, _RECURRENT[type(module)])
        extra = {"nonlinearity": module.nonlinearity} if isinstance(module, nn.RNN) else {}
        new = cls(module.input_size, module.hidden_size, num_layers=module.num_layers,
                  bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                  bidirectional=module.bidirectional, **extra)
        new.load_state_dict(module.state_dict())
    else:
        return None
    reference = next(iter(module.parameters()), None)
    if reference is None:
        reference = next(iter(module.buffers()), None)
    if reference is not None:
        new = new.to(device=reference.device, dtype=reference.dtype)
    return new.train(module.training)


class ModuleValidator:
    """``validate`` / ``is_valid`` / ``fix`` / ``fix_and_validate``, as Opacus names them."""

    @staticmethod
    def validate(module: nn.Module, *, strict: bool = False) -> List[UnsupportedModuleError]:
        """One error per module that cannot be trained as it is (raised if ``strict``)."""
        errors = [UnsupportedModuleError(f"module '{path or '<root>'}' ({type(m).__name__}): "
                                         f"{reason}")
                  for path, m in module.named_modules() for reason in [_problem(m)] if reason]
        if strict and errors:
            raise UnsupportedModuleError("vaultkern cannot train this model with DP-SGD as it "
                                         "is:\n  " + "\n  ".join(map(str, errors)))
        return errors

    @classmethod
    def is_valid(cls, module: nn.Module) -> bool:
        return not cls.validate(module)

    @staticmethod
    def fix(module: nn.Module, *, num_groups: Optional[int] = None) -> nn.Module:
        """A copy of ``module`` with every fixable module swapped (the original is unchanged).

        num_groups: GroupNorm groups replacing a BatchNorm (default gcd(32, channels))."""
        module = copy.deepcopy(module)
        root = _fixed(module, num_groups)
        if root is not None:
            return root
        for path, sub in list(module.named_modules()):
            new = _fixed(sub, num_groups) if path else None
            if new is not None:
                parent_path, _, name = path.rpartition(".")
                setattr(module.get_submodule(parent_path), name, new)
        return module

    @classmethod
    def fix_and_validate(cls, module: nn.Module, *, num_groups: Optional[int] = None) -> nn.Module:
        module = cls.fix(module, num_groups=num_groups)
        cls.validate(module, strict=True)
        return module
