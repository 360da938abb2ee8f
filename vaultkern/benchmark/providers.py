"""Training-step providers compared by the benchmark (DESIGN.md §8).

Every provider wraps its own copy of one model and runs one complete training
step per call: forward, loss, backward, optimizer step, zero_grad. All use the
same per-example loss (the token-mean cross-entropy of each sequence), so the
batch loss is the same token-mean cross-entropy that non-private training
minimises, and every DP provider clips each example's gradient of that loss.

* ``nondp``        - plain PyTorch: mean loss, backward, step (the floor).
* ``opacus-hooks`` - Opacus GradSampleModule (per-example gradients materialised)
                     + Opacus DPOptimizer, ``grad_sample_mode="hooks"``.
* ``opacus-ghost`` - Opacus ghost clipping (``grad_sample_mode="ghost"``): the
                     criterion returned by ``make_private`` runs two backward passes.
* ``vaultkern``    - ``vk.patch`` (Book-Keeping, one backward) + vaultkern DPOptimizer.
* ``vaultkern-per-layer`` - the same with ``clipping="per_layer"`` (each parameter clipped
                     to C/√P, Opacus' per-layer semantics; the joint bound is C).

The Opacus providers are built with ``PrivacyEngine.make_private`` on a data
loader of ``batch_size`` dummy rows without Poisson sampling, so Opacus' expected
batch size equals the benchmark batch; the benchmark feeds fixed-size batches
itself (a speed measurement, not a training run).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn

from vaultkern.models import per_sequence_loss

PROVIDERS = ("nondp", "opacus-hooks", "opacus-ghost", "vaultkern", "vaultkern-per-layer")
DP_PROVIDERS = ("opacus-hooks", "opacus-ghost", "vaultkern", "vaultkern-per-layer")
# Providers the benchmark must be able to run: a failure of these is an error, not
# an "unsupported" configuration.
REQUIRED_PROVIDERS = ("nondp", "vaultkern")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class StepSettings:
    """What every provider shares: optimizer, DP parameters, precision."""
    optimizer: str = "adamw"
    lr: float = 1e-4
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    autocast_dtype: Optional[torch.dtype] = None  # e.g. torch.bfloat16; None = plain fp32
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


def example_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] per-example losses: each sequence's mean token cross-entropy (fp32)."""
    return per_sequence_loss(logits, targets) / targets.shape[1]


class ExampleLossCriterion:
    """A criterion in the form Opacus' ghost-clipping loss wrapper expects.

    ``DPLossFastGradientClipping`` sets ``reduction = "none"`` around its call and
    wraps the returned per-sample losses; with ``reduction="none"`` this returns the
    [B] per-sequence losses directly (no ``shape=`` flattening needed), otherwise
    their mean or sum.
    """

    def __init__(self, reduction: str = "mean"):
        self.reduction = reduction

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = example_losses(logits, targets)
        if self.reduction == "none":
            return losses
        if self.reduction == "mean":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {self.reduction!r}")


def make_optimizer(params, settings: StepSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr)
    return torch.optim.AdamW(params, lr=settings.lr)


class Provider:
    """One way of running a training step on its own copy of the model."""

    name = "?"

    def __init__(self, model: nn.Module, settings: StepSettings, batch_size: int):
        self.model = model
        self.module = model  # what the step calls (Opacus providers: their wrapped module)
        self.settings = settings
        self.batch_size = batch_size
        self.optimizer = None  # set by each provider

    def autocast(self, device_type: str):
        if self.settings.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.settings.autocast_dtype)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch loss: the mean over examples of their mean token cross-entropy."""
        return example_losses(self.module(x), y).mean()

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.autocast(x.device.type):
            loss = self.loss(x, y)
        loss.backward()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """forward + loss + backward + optimizer step + zero_grad."""
        self.backward(x, y)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def per_example_norms(self) -> torch.Tensor:
        """[B] gradient norms of the last backward (DP providers that expose them)."""
        raise NotImplementedError(f"{self.name} does not expose per-example norms")


class NonDP(Provider):
    name = "nondp"

    def __init__(self, model, settings, batch_size):
        super().__init__(model, settings, batch_size)
        self.optimizer = make_optimizer(model.parameters(), settings)


class VaultKern(Provider):
    name = "vaultkern"
    clipping = "flat"

    def __init__(self, model, settings, batch_size):
        super().__init__(model, settings, batch_size)
        import vaultkern as vk
        from vaultkern.privacy.optimizer import DPOptimizer
        self._vk = vk
        vk.patch(model, max_grad_norm=settings.max_grad_norm, loss_reduction="mean",
                 clipping=self.clipping)
        self.optimizer = DPOptimizer(make_optimizer(model.parameters(), settings),
                                     noise_multiplier=settings.noise_multiplier,
                                     max_grad_norm=settings.max_grad_norm,
                                     expected_batch_size=batch_size, loss_reduction="mean",
                                     seed=settings.seed)

    def per_example_norms(self):
        norms = self._vk.last_norms(self.model)
        if norms is None:
            raise RuntimeError("vaultkern recorded no per-example norms (no backward yet?)")
        return norms


class VaultKernPerLayer(VaultKern):
    name = "vaultkern-per-layer"
    clipping = "per_layer"


def _dummy_loader(batch_size: int):
    from torch.utils.data import DataLoader, TensorDataset
    return DataLoader(TensorDataset(torch.zeros(batch_size, 1)), batch_size=batch_size)


def _make_private(model, settings: StepSettings, batch_size: int, **kwargs):
    with warnings.catch_warnings():
        # "Secure RNG turned off" etc.: expected for a speed benchmark
        warnings.simplefilter("ignore")
        from opacus import PrivacyEngine
        engine = PrivacyEngine()
        return engine.make_private(
            module=model, optimizer=make_optimizer(model.parameters(), settings),
            data_loader=_dummy_loader(batch_size), noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm, poisson_sampling=False, **kwargs)


class OpacusHooks(Provider):
    name = "opacus-hooks"

    def __init__(self, model, settings, batch_size):
        super().__init__(model, settings, batch_size)
        self.module, self.optimizer, _ = _make_private(model, settings, batch_size,
                                                       grad_sample_mode="hooks")

    def per_example_norms(self):
        """Norms over all trainable parameters jointly of Opacus' materialised grad samples."""
        squares = None
        for p in self.module.parameters():
            if not p.requires_grad:
                continue
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                raise RuntimeError(f"Opacus left no grad_sample on a parameter of shape "
                                   f"{tuple(p.shape)}")
            sq = gs.reshape(gs.shape[0], -1).float().pow(2).sum(dim=1)
            squares = sq if squares is None else squares + sq
        if squares is None:
            raise RuntimeError("the model has no trainable parameters")
        return squares.sqrt()


class OpacusGhost(Provider):
    name = "opacus-ghost"

    def __init__(self, model, settings, batch_size):
        super().__init__(model, settings, batch_size)
        self.module, self.optimizer, self.criterion, _ = _make_private(
            model, settings, batch_size, grad_sample_mode="ghost",
            criterion=ExampleLossCriterion("mean"))

    def loss(self, x, y):
        # wraps the [B] per-example losses; its backward runs two passes (norms, then the
        # clipped-weighted loss)
        return self.criterion(self.module(x), y)


_CLASSES: Dict[str, Callable[..., Provider]] = {
    "nondp": NonDP, "opacus-hooks": OpacusHooks, "opacus-ghost": OpacusGhost,
    "vaultkern": VaultKern, "vaultkern-per-layer": VaultKernPerLayer,
}


def build(name: str, model: nn.Module, settings: StepSettings, batch_size: int) -> Provider:
    """The provider ``name`` wrapping ``model`` (which it modifies: pass a fresh copy)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
    return _CLASSES[name](model, settings, batch_size)


def opacus_version() -> Optional[str]:
    try:
        import opacus
        return opacus.__version__
    except ImportError:
        return None
