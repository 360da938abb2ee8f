"""PrivacyEngine: Opacus 1.6's front door, on vaultkern's clipping and noise.

    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0)
    for x, y in loader:                       # Poisson-sampled batches
        loss = criterion(model(x), y)         # "mean" reduction by default
        loss.backward()                       # p.grad = Σ_i clip_i g_i (vk.patch)
        optimizer.step()                      # + σC·ξ, / B̄, update, accountant.step
        optimizer.zero_grad()
    engine.get_epsilon(delta=1e-5)

What ``make_private`` does:

* the module is patched in place by ``vaultkern.patch(module, max_grad_norm=C,
  loss_reduction=...)`` (Book-Keeping ghost clipping; no wrapper module);
* the optimizer is wrapped in :class:`DPOptimizer` with B̄ = the loader's
  batch size (N / len(loader) if it has none) and σ, C;
* the loader is replaced by a Poisson loader with q = B̄ / N and as many
  steps per pass as the original loader had batches;
* every noised ``optimizer.step()`` records one step (σ, q) in the engine's
  accountant, so ε grows as training goes.

Shuffle-and-chunk loaders are not Poisson sampling and ε computed as if they
were is not a valid guarantee (Chua et al. 2024); ``poisson_sampling=False``
therefore needs ``allow_non_poisson=True`` and warns loudly.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from vaultkern.privacy.accounting import Accountant, calibrate_noise_multiplier
from vaultkern.core.distributed import shared_random_seed
from vaultkern.privacy.optimizer import DPOptimizer, validate_dp_arguments
from vaultkern.privacy.sampling import (
    MicroBatchLoader, StepCheckedLoader, expected_batch_size_of, make_poisson_loader,
    poisson_sampler_of)


class _NoteForward:
    """Forward pre-hook: which sampled batch the model's forwards ran on (one per step)."""

    def __init__(self, optimizer: DPOptimizer):
        self.optimizer = optimizer

    def __call__(self, module, args):
        if torch.is_grad_enabled():
            self.optimizer.note_forward()


class PrivacyEngine:
    """Creates private (module, optimizer, data_loader) and tracks ε.

    Args:
        accountant: "pld" (default, dp-accounting's PLD accountant), "rdp", or an
            :class:`Accountant` (e.g. ``Accountant("pld", pld_discretization=1e-3)``).
        secure_mode: noise from the ChaCha20 generator of the compiled
            extension and Poisson sampling from ``os.urandom``; no seeds.
    """

    def __init__(self, *, accountant="pld", secure_mode: bool = False):
        self.accountant = accountant if isinstance(accountant, Accountant) else \
            Accountant(accountant)
        self.secure_mode = bool(secure_mode)
        self.dataset = None
        self.dataset_size: Optional[int] = None
        self.module: Optional[nn.Module] = None
        self.optimizer: Optional[DPOptimizer] = None
        self.data_loader = None
        self.sample_rate: Optional[float] = None
        self.noise_multiplier: Optional[float] = None
        if not secure_mode:
            warnings.warn(
                "PrivacyEngine(secure_mode=False): noise and sampling use seedable pseudo-random "
                "generators, fine for experiments; train the release run with secure_mode=True.",
                UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ setup
    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: DataLoader, noise_multiplier: float, max_grad_norm: float,
                     poisson_sampling: bool = True, loss_reduction: str = "mean",
                     max_physical_batch_size: Optional[int] = None,
                     allow_non_poisson: bool = False, truncated_max_batch: Optional[int] = None,
                     seed: Optional[int] = None, criterion=None, batch_first: bool = True,
                     clipping: str = "flat") -> Tuple[nn.Module, DPOptimizer, object]:
        """Return (patched module, DPOptimizer, Poisson data loader).

        Args (Opacus' names and meaning, plus):
            max_physical_batch_size: the loader yields micro-batches of at most
                this many rows; the optimizer steps (noise + update) only at the
                end of each logical batch.
            allow_non_poisson: needed with ``poisson_sampling=False``.
            truncated_max_batch: truncated Poisson with this cap b: every batch
                has exactly b rows and the loader yields ``(batch, weights)``
                (weight 0 on padding rows; multiply per-example losses by it).
                Accounted with dp-accounting's TruncatedSubsampledGaussianDpEvent
                (PLD accountant only).
            seed: seed of the sampler and of the noise (non-secure mode);
                None draws one from os.urandom.
            criterion, batch_first, clipping: accepted for Opacus compatibility;
                only ``batch_first=True`` and ``clipping="flat"`` are supported
                and the criterion is not wrapped (one backward pass suffices).
        """
        import vaultkern as vk

        sigma, clip = validate_dp_arguments(noise_multiplier, max_grad_norm, loss_reduction)
        if clipping != "flat":
            raise ValueError(f"clipping={clipping!r}: vaultkern implements flat clipping only")
        if not batch_first:
            raise ValueError("batch_first=False is not supported: the batch must be dim 0")
        if self.secure_mode and seed is not None:
            raise ValueError(f"seed={seed} with secure_mode=True: secure mode cannot be seeded")
        if self.optimizer is not None:
            raise RuntimeError("this PrivacyEngine already made a model private; "
                               "use one PrivacyEngine per training run")
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader)}")
        module_params = {id(p) for p in module.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in module_params:
                    raise ValueError("the optimizer holds a parameter that is not in the module")
        if truncated_max_batch is not None and not poisson_sampling:
            raise ValueError("truncated_max_batch needs poisson_sampling=True")

        dataset_size = len(data_loader.dataset)
        expected_batch = expected_batch_size_of(data_loader)
        if poisson_sampling:
            sample_rate = expected_batch / dataset_size
        else:
            if not allow_non_poisson:
                raise ValueError(
                    "poisson_sampling=False: shuffle-and-chunk batches are not Poisson sampling "
                    "and the accountant's epsilon would not be a valid guarantee. Pass "
                    "allow_non_poisson=True to train anyway (epsilon is then only indicative).")
            warnings.warn(
                "PRIVACY WARNING: poisson_sampling=False. The reported epsilon assumes Poisson "
                "sampling, which this data loader does not do; it is NOT a valid privacy "
                "guarantee for this run.", UserWarning, stacklevel=2)
            sample_rate = 1.0 / len(data_loader)
        if self.dataset is not None and self.dataset is not data_loader.dataset:
            warnings.warn("PrivacyEngine got a different dataset object than before; "
                          "accounting assumes one dataset", UserWarning, stacklevel=2)

        if seed is None and not self.secure_mode:
            seed = shared_random_seed()
        # empty Poisson batches go through the user's loop unchanged (noise-only steps)
        module = vk.patch(module, max_grad_norm=clip, loss_reduction=loss_reduction,
                          allow_empty_batch=True)
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=clip,
                                   expected_batch_size=expected_batch,
                                   loss_reduction=loss_reduction, secure_mode=self.secure_mode,
                                   seed=seed)
        if poisson_sampling:
            generator = None
            if not self.secure_mode:
                generator = torch.Generator()
                generator.manual_seed((seed * 0x9E3779B97F4A7C15 + 1) & ((1 << 63) - 1))
            loader = make_poisson_loader(
                data_loader, generator=generator,
                truncated_poisson=truncated_max_batch is not None,
                max_batch_size=truncated_max_batch, secure=self.secure_mode)
        else:
            loader = data_loader

        accountant = self.accountant

        def record_step(opt: DPOptimizer) -> None:
            if truncated_max_batch is None:
                accountant.step(opt.noise_multiplier, sample_rate)
            else:
                accountant.step(opt.noise_multiplier, sample_rate,
                                truncated_max_batch=truncated_max_batch,
                                dataset_size=dataset_size)
        if truncated_max_batch is not None:  # fail now, not at the first step
            Accountant(accountant.kind).step(sigma, sample_rate, 0, truncated_max_batch,
                                             dataset_size)
        dp_optimizer.attach_step_hook(record_step)

        if max_physical_batch_size is not None:
            loader = MicroBatchLoader(loader, max_physical_batch_size, dp_optimizer)
        else:
            loader = StepCheckedLoader(loader, dp_optimizer)
        module.register_forward_pre_hook(_NoteForward(dp_optimizer))

        self.dataset, self.dataset_size = data_loader.dataset, dataset_size
        self.module, self.optimizer, self.data_loader = module, dp_optimizer, loader
        self.sample_rate, self.noise_multiplier = sample_rate, sigma
        return module, dp_optimizer, loader

    def make_private_with_epsilon(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                                  data_loader: DataLoader, target_epsilon: float,
                                  target_delta: float, epochs: int, max_grad_norm: float,
                                  epsilon_tolerance: float = 0.01, **kwargs):
        """:meth:`make_private` with σ calibrated so that ``epochs`` passes over
        the loader (``epochs * len(data_loader)`` steps) spend (ε, δ)."""
        if int(epochs) != epochs or epochs < 1:
            raise ValueError(f"epochs={epochs}: must be an integer >= 1")
        if len(self.accountant) > 0:
            warnings.warn("make_private_with_epsilon: the accountant already holds steps; the "
                          "calibrated noise ignores them, so the total epsilon will be higher",
                          UserWarning, stacklevel=2)
        self._warn_delta(target_delta, len(data_loader.dataset))
        if kwargs.get("poisson_sampling", True):
            sample_rate = expected_batch_size_of(data_loader) / len(data_loader.dataset)
        else:
            sample_rate = 1.0 / len(data_loader)
        truncated = kwargs.get("truncated_max_batch")
        sigma = calibrate_noise_multiplier(
            target_epsilon, target_delta, sample_rate, int(epochs) * len(data_loader),
            accountant=self.accountant.kind, epsilon_tolerance=epsilon_tolerance,
            pld_discretization=self.accountant.pld_discretization,
            truncated_max_batch=truncated,
            dataset_size=len(data_loader.dataset) if truncated is not None else None)
        return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                 noise_multiplier=sigma, max_grad_norm=max_grad_norm, **kwargs)

    # ------------------------------------------------------------- accounting
    @staticmethod
    def _warn_delta(delta: float, dataset_size: Optional[int]) -> None:
        if dataset_size and delta >= 1.0 / dataset_size:
            warnings.warn(
                f"delta={delta} >= 1/N = {1.0 / dataset_size:.3g}: a mechanism that publishes one "
                "random example in full meets this delta; use delta << 1/N", UserWarning,
                stacklevel=3)

    def get_epsilon(self, delta: float) -> float:
        """ε of the steps taken so far, at this δ."""
        self._warn_delta(delta, self.dataset_size)
        return self.accountant.get_epsilon(delta)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Accountant history, DPOptimizer state (wrapped optimizer + step/seed)
        and the Poisson sampler's position and generator state."""
        state = {"accountant": self.accountant.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        sampler = poisson_sampler_of(self.data_loader)
        if sampler is not None:
            state["sampler"] = sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        if "optimizer" in state:
            if self.optimizer is None:
                raise RuntimeError("load_state_dict: call make_private first, then load the "
                                   "state into the engine")
            self.optimizer.load_state_dict(state["optimizer"])
        if "sampler" in state:
            sampler = poisson_sampler_of(self.data_loader)
            if sampler is None:
                raise RuntimeError("the state has a Poisson sampler state but this engine's "
                                   "loader has no Poisson sampler")
            sampler.load_state_dict(state["sampler"])
