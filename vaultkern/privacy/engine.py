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

* the DP pieces are built by :func:`vaultkern.privacy.assembly.assemble`, as for the
  training run and DPTrainer: the module is patched in place by
  ``vaultkern.patch(module, max_grad_norm=C, loss_reduction=...)`` (Book-Keeping ghost
  clipping; no wrapper module);
* the optimizer is wrapped in :class:`DPOptimizer` with B̄ = the loader's
  batch size (N / len(loader) if it has none) and σ, C;
* the loader is replaced by a Poisson loader with q = B̄ / N and as many
  steps per pass as the original loader had batches;
* every noised ``optimizer.step()`` records one step (σ, q) in the engine's
  accountant, so ε grows as training goes.

Under torch.distributed (DDP) every rank passes the same loader over the whole dataset
with its per-rank batch size b: the ranks share one global Poisson batch (q = W·b/N, one
ChaCha20 key; :mod:`vaultkern.privacy.distributed_sampling`), each trains on its share, and
B̄ = W·b. Wrap the returned module in DistributedDataParallel.

Shuffle-and-chunk loaders are not Poisson sampling and ε computed as if they
were is not a valid guarantee (Chua et al. 2024); ``poisson_sampling=False``
therefore needs ``allow_non_poisson=True`` and warns loudly.

The rest of Opacus' surface (grad_sample_mode, the ghost criterion, noise_generator,
wrap_model, per-layer clipping, checkpoints, module validation) is mapped in
:mod:`vaultkern.privacy.opacus_compat` and :mod:`vaultkern.privacy.validator`.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from vaultkern.privacy import opacus_compat as compat
from vaultkern.privacy.accounting import Accountant, calibrate_noise_multiplier
from vaultkern.privacy.assembly import assemble
from vaultkern.core.distributed import shared_random_seed, world_size
from vaultkern.privacy.optimizer import DPOptimizer, validate_dp_arguments
from vaultkern.privacy.micro_batches import MicroBatchLoader, StepCheckedLoader
from vaultkern.privacy.sampling import (expected_batch_size_of, make_poisson_loader,
                                        poisson_sampler_of)
from vaultkern.privacy.validator import ModuleValidator

CLIPPING = ("flat", "per_layer", "automatic")


class _NoteForward:
    """Forward pre-hook: which sampled batch the model's forwards ran on (one per step)."""

    def __init__(self, optimizer: DPOptimizer):
        self.optimizer = optimizer

    def __call__(self, module, args):
        if torch.is_grad_enabled():
            self.optimizer.note_forward()


def release(module: nn.Module) -> nn.Module:
    """Undo make_private on ``module``: vaultkern's patch and the engine's hooks. Its earlier
    optimizers refuse to step from then on."""
    import vaultkern as vk
    if getattr(module, "_vaultkern", None) is not None:
        vk.unpatch(module)
    hooks = module._forward_pre_hooks
    for key in [k for k, h in hooks.items() if isinstance(h, _NoteForward)]:
        del hooks[key]
    compat.drop_opacus_habits(module)
    return module


class ModelHooks:
    """What ``make_private(wrap_model=False)`` returns instead of the model, as Opacus'
    hooks object: keep training the module you passed (patched in place, as with
    ``wrap_model=True``); ``cleanup()`` undoes the patch."""

    def __init__(self, module: nn.Module):
        self._module = module

    def cleanup(self) -> None:
        release(self._module)


class PrivacyEngine:
    """Creates private (module, optimizer, data_loader) and tracks ε.

    Args:
        accountant: "pld" (default, dp-accounting's PLD accountant), "rdp", or an
            :class:`Accountant` (e.g. ``Accountant("pld", pld_discretization=1e-3)``);
            Opacus' "prv" (its default) and "gdp" are computed as "pld", with a notice.
        secure_mode: noise from the ChaCha20 generator of the compiled
            extension and Poisson sampling from ``os.urandom``; no seeds.
    """

    def __init__(self, *, accountant="pld", secure_mode: bool = False):
        self.accountant = accountant if isinstance(accountant, Accountant) else \
            Accountant(accountant)  # Opacus' "prv"/"gdp": computed as "pld", with a notice
        self.secure_mode = bool(secure_mode)
        self.dataset = None
        self.dataset_size: Optional[int] = None
        self.module: Optional[nn.Module] = None
        self.optimizer: Optional[DPOptimizer] = None
        self.data_loader = None
        self.sample_rate: Optional[float] = None
        self.noise_multiplier: Optional[float] = None
        self._private_modules: list = []  # modules this engine patched (make_private again)
        if not secure_mode:
            warnings.warn(
                "PrivacyEngine(secure_mode=False): noise and sampling use seedable pseudo-random "
                "generators, fine for experiments; train the release run with secure_mode=True.",
                UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ setup
    def make_private(self, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                     data_loader: DataLoader, noise_multiplier: float, max_grad_norm,
                     criterion=None, batch_first: bool = True, loss_reduction: str = "mean",
                     poisson_sampling: bool = True, clipping: str = "flat",
                     noise_generator: Optional[torch.Generator] = None,
                     grad_sample_mode: str = "hooks", wrap_model: bool = True,
                     rand_on_empty: bool = False, max_physical_batch_size: Optional[int] = None,
                     allow_non_poisson: bool = False, truncated_max_batch: Optional[int] = None,
                     user_ids: Optional[Sequence] = None, max_rows_per_user: Optional[int] = None,
                     seed: Optional[int] = None) -> tuple:
        """Return (module, DPOptimizer, Poisson data loader); with a "ghost" grad_sample_mode
        (module, DPOptimizer, criterion, loader), as Opacus.

        Args (Opacus' names and meaning, plus):
            clipping: "flat"; "per_layer" with ``max_grad_norm`` a list of thresholds, one per
                trainable parameter in the optimizer's order (Opacus'), or one C split as
                C/sqrt(P); the noise is scaled to sqrt(Σ C_k²); "automatic" (C/(‖g‖+0.01)).
            criterion: wrapped for the "ghost" modes (:class:`~vaultkern.privacy.
                opacus_compat.PerExampleLoss`; default ``nn.CrossEntropyLoss()``).
            grad_sample_mode: any of Opacus' (all run on vaultkern's one engine).
            noise_generator: a torch.Generator; the seed is drawn from it.
            wrap_model: False returns a hooks object with ``cleanup()`` in place of the
                module (which is patched in place either way).
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
            user_ids, max_rows_per_user: user-level DP (vaultkern's, not Opacus'):
                ``user_ids[i]`` is the user of dataset example i; each step Poisson-samples
                users at q = B̄/U (B̄ = the loader's batch size, in users), at most k =
                ``max_rows_per_user`` examples each, and each user's summed gradient is
                clipped as one (the loader sets ``vk.set_group_ids`` for every batch it
                yields; a user's rows never straddle micro-batches). ε is per user.

        The same engine may make a model private again (e.g. with a new optimizer): the
        earlier optimizer of that model then refuses to step, and every step of either
        call is charged to the one accountant.
        """

        ghost = compat.check_grad_sample_mode(grad_sample_mode)
        compat.warn_rand_on_empty(rand_on_empty)
        if clipping not in CLIPPING:
            hint = (" (Opacus' adaptive clipping spends privacy on the clipping bound; vaultkern "
                    "does not implement it)" if clipping == "adaptive" else "")
            raise ValueError(f"clipping={clipping!r}: expected one of {CLIPPING}{hint}")
        if isinstance(max_grad_norm, (list, tuple)) and clipping != "per_layer":
            raise ValueError("max_grad_norm is a list (one threshold per parameter): that needs "
                             "clipping='per_layer'")
        if isinstance(optimizer, DPOptimizer):  # as Opacus: wrap the original again
            optimizer = optimizer.original_optimizer
        thresholds, clip_total = compat.per_layer_thresholds(module, optimizer, max_grad_norm)
        sigma, clip_total = validate_dp_arguments(noise_multiplier, clip_total, loss_reduction)
        if not batch_first:
            raise ValueError("batch_first=False is not supported: the batch must be dim 0 of "
                             "the model's input (a recurrent layer inside may still take "
                             "[T, B, ...], e.g. DPLSTM(batch_first=False))")
        if self.secure_mode and (seed is not None or noise_generator is not None):
            given = f"seed={seed}" if seed is not None else "a noise_generator"
            raise ValueError(f"{given} with secure_mode=True: secure mode cannot be seeded")
        if noise_generator is not None:
            if seed is not None:
                raise ValueError("give seed or noise_generator, not both")
            seed = compat.seed_of(noise_generator)
        again = getattr(module, "_vaultkern", None) is not None
        if again and not any(m is module for m in self._private_modules):
            raise RuntimeError("the module is already patched (vk.patch or another "
                               "PrivacyEngine); pass the model before patching")
        world = world_size()
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader)}")
        module_params = {id(p) for p in module.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in module_params:
                    raise ValueError("the optimizer holds a parameter that is not in the module")
        outside = compat.trainable_outside(module, optimizer)
        if outside:
            raise ValueError(
                f"trainable parameters {outside} are not in the optimizer: vaultkern clips the "
                "gradient of every trainable parameter (Opacus only the optimizer's), and theirs "
                "would get no noise. Freeze them (requires_grad_(False)) or add them.")
        ModuleValidator.validate(module, strict=True)
        if truncated_max_batch is not None and not poisson_sampling:
            raise ValueError("truncated_max_batch needs poisson_sampling=True")
        if (user_ids is None) != (max_rows_per_user is None):
            raise ValueError("user-level DP needs both user_ids and max_rows_per_user")
        if user_ids is not None and len(user_ids) != len(data_loader.dataset):
            raise ValueError(f"user_ids has {len(user_ids)} entries for "
                             f"{len(data_loader.dataset)} examples")

        dataset_size = len(data_loader.dataset) if user_ids is None else len(set(user_ids))
        # under torch.distributed each rank's loader holds the whole dataset and B̄ per rank:
        # the ranks share one global Poisson batch of expected size W·B̄ (q = W·B̄/N)
        expected_batch = expected_batch_size_of(data_loader) * world
        if not poisson_sampling:
            if not allow_non_poisson:
                raise ValueError(
                    "poisson_sampling=False: shuffle-and-chunk batches are not Poisson sampling "
                    "and the accountant's epsilon would not be a valid guarantee. Pass "
                    "allow_non_poisson=True to train anyway (epsilon is then only indicative).")
            warnings.warn(
                "PRIVACY WARNING: poisson_sampling=False. The reported epsilon assumes Poisson "
                "sampling, which this data loader does not do; it is NOT a valid privacy "
                "guarantee for this run.", UserWarning, stacklevel=2)
        if self.dataset is not None and self.dataset is not data_loader.dataset:
            warnings.warn("PrivacyEngine got a different dataset object than before; "
                          "accounting assumes one dataset", UserWarning, stacklevel=2)

        if seed is None and not self.secure_mode:
            seed = shared_random_seed()
        if again:
            release(module)
        run = assemble(module, optimizer, dataset_size=dataset_size,
                       expected_batch_size=expected_batch, max_grad_norm=clip_total,
                       steps=len(data_loader), noise_multiplier=sigma, dp_seed=seed,
                       secure=self.secure_mode, accountant=self.accountant,
                       truncated_max_batch=truncated_max_batch, poisson_sampling=poisson_sampling,
                       clipping=clipping, thresholds=thresholds, loss_reduction=loss_reduction,
                       update_reduction=loss_reduction,
                       row_users=None if user_ids is None else list(user_ids),
                       max_rows_per_user=max_rows_per_user)
        dp_optimizer, sample_rate = run.optimizer, run.sample_rate
        loader = data_loader
        if poisson_sampling:
            loader = make_poisson_loader(data_loader, sampler=run.sampler,
                                         truncated_poisson=truncated_max_batch is not None,
                                         max_batch_size=truncated_max_batch)

        if user_ids is not None:  # every (micro-)batch comes with its users' group ids
            loader = MicroBatchLoader(loader, max_physical_batch_size or len(data_loader.dataset),
                                      dp_optimizer, module=module)
        elif max_physical_batch_size is not None:
            loader = MicroBatchLoader(loader, max_physical_batch_size, dp_optimizer)
        else:
            loader = StepCheckedLoader(loader, dp_optimizer)
        module.register_forward_pre_hook(_NoteForward(dp_optimizer))
        compat.adopt_opacus_habits(module)
        if not any(m is module for m in self._private_modules):
            self._private_modules.append(module)

        self.dataset, self.dataset_size = data_loader.dataset, dataset_size
        self.module, self.optimizer, self.data_loader = module, dp_optimizer, loader
        self.sample_rate, self.noise_multiplier = sample_rate, sigma
        returned = module if wrap_model else ModelHooks(module)
        if ghost:
            criterion = nn.CrossEntropyLoss() if criterion is None else criterion
            return returned, dp_optimizer, compat.PerExampleLoss(criterion, loss_reduction), loader
        return returned, dp_optimizer, loader

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
            sample_rate = expected_batch_size_of(data_loader) * world_size() / len(data_loader.dataset)
        else:
            sample_rate = 1.0 / len(data_loader)
        if kwargs.get("user_ids") is not None:  # the units are users (q = B̄/U)
            sample_rate = expected_batch_size_of(data_loader) / len(set(kwargs["user_ids"]))
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

    def get_epsilon(self, delta: float, **kwargs) -> float:
        """ε of the steps taken so far, at this δ (``kwargs``: :meth:`Accountant.get_epsilon`'s,
        e.g. Opacus' ``eps_error``)."""
        self._warn_delta(delta, self.dataset_size)
        return self.accountant.get_epsilon(delta, **kwargs)

    # ------------------------------------------------------------- validation
    def is_compatible(self, *, module: nn.Module, optimizer=None, data_loader=None) -> bool:
        return ModuleValidator.is_valid(module)

    def validate(self, *, module: nn.Module, optimizer=None, data_loader=None) -> None:
        ModuleValidator.validate(module, strict=True)

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """A copy of ``module`` with BatchNorm -> GroupNorm, running statistics off, and
        nn.LSTM/GRU/RNN -> opacus.layers' DP versions; raises if anything is left."""
        return ModuleValidator.fix_and_validate(module)

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, *, path, module: nn.Module, optimizer=None, **kwargs) -> None:
        """Opacus' ``save_checkpoint`` (its keys and keywords), plus the sampler position."""
        compat.save_checkpoint(self, path=path, module=module, optimizer=optimizer, **kwargs)

    def load_checkpoint(self, *, path, module: nn.Module, optimizer=None, **kwargs) -> dict:
        """Opacus' ``load_checkpoint``; also reads checkpoints Opacus wrote."""
        return compat.load_checkpoint(self, path=path, module=module, optimizer=optimizer,
                                      **kwargs)

    def state_dict(self) -> dict:
        """Accountant history, DPOptimizer state (wrapped optimizer + step/seed)
        and the Poisson sampler's state (position, batches drawn, key unless secure)."""
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
