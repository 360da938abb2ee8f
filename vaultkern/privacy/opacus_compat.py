"""Opacus habits on vaultkern's engine: the arguments and objects an Opacus program uses
beyond the plain loop, each either doing what it does in Opacus or refused with a
message that says what to change (README, "Coming from Opacus").

vaultkern patches the user's own module in place and forms the clipped sum in one
ordinary backward pass, so several Opacus notions have nothing left to do: the
per-sample-gradient modes all map to the one engine, the ghost-clipping criterion only
keeps its reduction, and there is no ``GradSampleModule`` wrapper (``model._module``
is the model itself, and ``_module.``-prefixed state dicts load into it).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger("vaultkern")

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost", "ghost_fsdp")


def check_grad_sample_mode(mode: str) -> bool:
    """Say what ``grad_sample_mode`` becomes; True when Opacus returns a criterion for it."""
    if mode == "no_op":
        raise ValueError(
            "grad_sample_mode='no_op': in Opacus the program computes p.grad_sample itself and "
            "the optimizer clips it; vaultkern forms the clipped sum inside an ordinary "
            "loss.backward() and never reads p.grad_sample. Drop grad_sample_mode and call "
            "loss.backward() on the model's loss.")
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode={mode!r}: expected one of {GRAD_SAMPLE_MODES}")
    logger.info("grad_sample_mode=%r runs on vaultkern's one engine (per-example norms and the "
                "clipped sum in one ordinary backward pass): the same clipped gradients as "
                "Opacus' %r mode", mode, mode)
    return "ghost" in mode


def seed_of(noise_generator: torch.Generator) -> int:
    """``noise_generator`` as vaultkern's seed: one 63-bit draw from it (the same generator
    state gives the same seed, hence the same noise and the same Poisson batches)."""
    if not isinstance(noise_generator, torch.Generator):
        raise TypeError(f"noise_generator must be a torch.Generator, got {type(noise_generator)}")
    return int(torch.randint(0, (1 << 63) - 1, (1,), generator=noise_generator,
                             device=noise_generator.device))


class PerExampleLoss:
    """Opacus' ghost-clipping criterion: ``loss = criterion(outputs, targets);
    loss.backward()``.

    Opacus' wrapper runs two backward passes; one ordinary backward suffices here, so this
    only keeps Opacus' reduction: the criterion is evaluated with ``reduction="none"`` and
    its per-example losses are averaged (``loss_reduction="mean"``) or summed over dim 0.
    With ``shape=(B, T, ...)`` (the logits' shape before flattening) B·T token losses are
    first reduced per sequence: their sum, or for "mean" their mean over the tokens that
    are not the criterion's ``ignore_index``. The result is an ordinary tensor.
    """

    def __init__(self, criterion, loss_reduction: str):
        reduction = getattr(criterion, "reduction", loss_reduction)
        if reduction != loss_reduction:
            raise ValueError(
                f"the criterion's reduction={reduction!r} but loss_reduction={loss_reduction!r}; "
                "they must agree (as in Opacus): e.g. nn.CrossEntropyLoss(reduction="
                f"{loss_reduction!r})")
        self.criterion, self.loss_reduction = criterion, loss_reduction

    def __call__(self, *args, shape: Optional[Sequence[int]] = None, **kwargs) -> torch.Tensor:
        had = hasattr(self.criterion, "reduction")
        saved = getattr(self.criterion, "reduction", None)
        self.criterion.reduction = "none"
        try:
            losses = self.criterion(*args, **kwargs)
        finally:
            if had:
                self.criterion.reduction = saved
            else:
                del self.criterion.reduction
        if losses.dim() == 0:
            raise ValueError("the criterion returned one number with reduction='none'; the "
                             "ghost-clipping criterion needs one loss per example (or per token, "
                             "with shape=)")
        if shape is not None and losses.shape[0] == shape[0] * shape[1]:
            tokens = losses.reshape(shape[0], shape[1])
            targets = kwargs.get("target", args[1] if len(args) > 1 else None)
            ignore = getattr(self.criterion, "ignore_index", None)
            if self.loss_reduction == "sum":
                losses = tokens.sum(1)
            elif ignore is not None and targets is not None:
                counted = (targets.reshape(shape[0], shape[1]) != ignore).sum(1).clamp(min=1)
                losses = tokens.sum(1) / counted
            else:
                losses = tokens.mean(1)
        return losses.mean(0) if self.loss_reduction == "mean" else losses.sum(0)


def per_layer_thresholds(module: nn.Module, optimizer: torch.optim.Optimizer,
                         max_grad_norm) -> Tuple[object, float]:
    """Opacus' ``clipping="per_layer"`` thresholds (one per trainable parameter, in the
    optimizer's order) as vaultkern's (in ``model.parameters()`` order), and the total
    sensitivity sqrt(Σ C_k²) the noise is scaled to. One float C is vaultkern's split
    C/sqrt(P) per parameter (total C)."""
    if not isinstance(max_grad_norm, (list, tuple)):
        return max_grad_norm, float(max_grad_norm)
    in_optimizer: List[nn.Parameter] = []
    for group in optimizer.param_groups:
        in_optimizer += [p for p in group["params"] if p.requires_grad]
    if len(max_grad_norm) != len(in_optimizer):
        raise ValueError(
            f"clipping='per_layer' got {len(max_grad_norm)} max_grad_norm values for the "
            f"optimizer's {len(in_optimizer)} trainable parameters: give one per parameter, in "
            "the order of the optimizer's param_groups (as Opacus)")
    values = [float(c) for c in max_grad_norm]
    if not all(c > 0 and math.isfinite(c) for c in values):
        raise ValueError(f"max_grad_norm={list(max_grad_norm)}: every value must be finite > 0")
    by_param = {id(p): c for p, c in zip(in_optimizer, values)}
    trainable = [p for p in module.parameters() if p.requires_grad]
    return [by_param[id(p)] for p in trainable], math.sqrt(sum(c * c for c in values))


def trainable_outside(module: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """Names of the module's trainable parameters the optimizer does not hold."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in held]


# ----------------------------------------------------------------------------------------
# The module as Opacus programs reach for it

def strip_opacus_prefix(module, state_dict, prefix, *_) -> None:
    """Load-state-dict pre-hook: keys of a state dict saved from Opacus' wrapper
    (``_module.<name>``) load as ``<name>``."""
    wrapped = prefix + "_module."
    for key in [k for k in state_dict if k.startswith(wrapped)]:
        plain = prefix + key[len(wrapped):]
        if plain not in state_dict:
            state_dict[plain] = state_dict.pop(key)


def _prefix_hooks(module: nn.Module) -> List[int]:
    return [k for k, h in module._load_state_dict_pre_hooks.items()
            if getattr(h, "hook", None) is strip_opacus_prefix]


def adopt_opacus_habits(module: nn.Module) -> None:
    """``module._module`` is the module itself and ``_module.``-prefixed state dicts load.

    The alias is a plain instance attribute, not a submodule: state_dict keys,
    named_modules() and repr are unchanged, and deepcopy/pickle map it to the copy."""
    if not hasattr(module, "_module"):
        module.__dict__["_module"] = module
    if not _prefix_hooks(module):
        module.register_load_state_dict_pre_hook(strip_opacus_prefix)


def drop_opacus_habits(module: nn.Module) -> None:
    if module.__dict__.get("_module") is module:
        del module.__dict__["_module"]
    for key in _prefix_hooks(module):
        del module._load_state_dict_pre_hooks[key]


def warn_rand_on_empty(rand_on_empty: bool) -> None:
    if rand_on_empty:
        warnings.warn("rand_on_empty=True is not needed: an empty Poisson batch comes as a "
                      "0-row batch, which the private model runs (the step adds noise only)",
                      UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------
# Checkpoints in Opacus' format (its keys), with what vaultkern needs to resume exactly

def save_checkpoint(engine, *, path, module: nn.Module, optimizer=None, noise_scheduler=None,
                    grad_clip_scheduler=None, checkpoint_dict: Optional[dict] = None,
                    module_state_dict_kwargs: Optional[dict] = None,
                    torch_save_kwargs: Optional[dict] = None) -> None:
    """Opacus' keys (module, accountant, optimizer, schedulers); the optimizer's state also
    holds the DP step counter and noise seed, and the Poisson sampler's position is added."""
    from vaultkern.privacy.sampling import poisson_sampler_of
    checkpoint = dict(checkpoint_dict or {})
    checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
    checkpoint["privacy_accountant_state_dict"] = engine.accountant.state_dict()
    sampler = poisson_sampler_of(engine.data_loader)
    for key, obj in (("optimizer_state_dict", optimizer), ("sampler_state_dict", sampler),
                     ("noise_scheduler_state_dict", noise_scheduler),
                     ("grad_clip_scheduler_state_dict", grad_clip_scheduler)):
        if obj is not None:
            checkpoint[key] = obj.state_dict()
    torch.save(checkpoint, path, **(torch_save_kwargs or {}))


def load_checkpoint(engine, *, path, module: nn.Module, optimizer=None, noise_scheduler=None,
                    grad_clip_scheduler=None, module_load_dict_kwargs: Optional[dict] = None,
                    torch_load_kwargs: Optional[dict] = None) -> dict:
    """Restore what :func:`save_checkpoint` (or Opacus' ``save_checkpoint``) wrote; returns
    the rest of the checkpoint, as Opacus does. The accountant's history is loaded whatever
    accountant wrote it (a history of (σ, q, steps) is the same for every accountant)."""
    from vaultkern.privacy.sampling import poisson_sampler_of
    checkpoint = torch.load(path, **{"weights_only": False, **(torch_load_kwargs or {})})
    module.load_state_dict(checkpoint["module_state_dict"], **(module_load_dict_kwargs or {}))
    engine.accountant.load_state_dict(checkpoint["privacy_accountant_state_dict"])
    for key, obj in (("optimizer_state_dict", optimizer),
                     ("noise_scheduler_state_dict", noise_scheduler),
                     ("grad_clip_scheduler_state_dict", grad_clip_scheduler)):
        state = checkpoint.pop(key, None)
        if obj is not None and state:
            obj.load_state_dict(state)
        elif key == "optimizer_state_dict" and (obj is None) != (not state):
            warnings.warn(f"the checkpoint {'has' if state else 'has no'} optimizer state but "
                          f"optimizer is {'not ' if obj is None else ''}given", UserWarning,
                          stacklevel=3)
    sampler_state, sampler = checkpoint.pop("sampler_state_dict", None), poisson_sampler_of(
        engine.data_loader)
    if sampler_state is not None and sampler is not None:
        try:
            sampler.load_state_dict(sampler_state)
        except ValueError as exc:  # another batch size or dataset: accounting is unaffected
            warnings.warn(f"Poisson sampler position not restored ({exc}); the batches will "
                          "differ from an uninterrupted run's", UserWarning, stacklevel=3)
    return checkpoint
