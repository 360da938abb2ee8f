"""The one place where the DP pieces of a training run are put together.

Every front door — ``PrivacyEngine``, the reference training run
(``python -m vaultkern train``) and ``vaultkern.hf.DPTrainer`` — builds its run with
:func:`assemble`, so they agree on what matters for the guarantee:

* the model is patched for per-example clipping (a loss that is a *sum* of
  per-example losses; the optimizer divides the noisy sum by the expected batch B̄);
* the DPOptimizer adds σ·C·ξ once per logical step and tells the accountant, which
  records exactly the event the sampler realises (Poisson, or truncated Poisson);
* the randomness: secure by default (noise and sampling keyed from ``os.urandom``);
  a ``dp_seed`` makes both reproducible — for experiments only, since whoever knows
  it can remove the noise (``formal_guarantee`` is then False);
* rejected steps: there are none. An example whose gradient is NaN/inf gets clip
  factor 0 inside the engine, the step proceeds and is accounted;
* the checkpointed state: accountant history, sampler position and DPOptimizer step
  (and seed), restored together so that a resumed run reports the same ε.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from vaultkern.core.distributed import is_distributed
from vaultkern.privacy.accounting import Accountant, calibrate_noise_multiplier
from vaultkern.privacy.distributed_sampling import DistributedPoissonBatchSampler
from vaultkern.privacy.optimizer import DPOptimizer
from vaultkern.privacy.sampling import PoissonBatchSampler
from vaultkern.privacy.user_sampling import UserPoissonSampler


def check_delta(delta: float, dataset_size: int, allow_above: bool = False,
                override: str = "") -> None:
    """δ must be below 1/N: publishing one random privacy unit in full is (0, 1/N)-DP."""
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta}: must lie in (0, 1)")
    if delta >= 1.0 / dataset_size and not allow_above:
        raise ValueError(
            f"delta={delta:g} >= 1/N = {1.0 / dataset_size:.3g} (N = {dataset_size} privacy "
            "units): a mechanism that publishes one random unit in full meets this delta. Use "
            f"a delta well below 1/N{override}.")


class AccountStep:
    """The optimizer's step hook: accounts the step, once sure that the noise is scaled to
    the sensitivity the model clips to and that the model is still patched for it."""

    def __init__(self, run: "DPRun"):
        self.run, self.patch_state = run, getattr(run.model, "_vaultkern", None)

    def __call__(self, optimizer: DPOptimizer) -> None:
        run = self.run
        if getattr(run.model, "_vaultkern", None) is not self.patch_state:
            raise RuntimeError(
                "this optimizer's model was made private again (or unpatched) since: step the "
                "optimizer that the latest make_private returned. Parameters not updated.")
        if optimizer.max_grad_norm != run.max_grad_norm:
            raise RuntimeError(
                f"optimizer.max_grad_norm={optimizer.max_grad_norm} but the model clips to "
                f"{run.max_grad_norm} (e.g. an Opacus grad-clip scheduler changed only the "
                "optimizer's): the noise would not match the sensitivity. Parameters not "
                "updated; call make_private again with the new max_grad_norm.")
        run.accountant.step(optimizer.noise_multiplier, run.sample_rate, **run.step_kwargs)


@dataclass
class DPRun:
    """What a front door trains with."""

    model: nn.Module
    optimizer: Optional[DPOptimizer]   # None until attach_optimizer (a Trainer makes it later)
    sampler: Optional[PoissonBatchSampler]  # None: the caller's own (non-Poisson) batches
    accountant: Accountant
    sample_rate: float
    noise_multiplier: float
    expected_batch_size: float
    dataset_size: int
    secure: bool
    truncated_max_batch: Optional[int] = None
    step_kwargs: dict = field(default_factory=dict)
    max_grad_norm: float = 1.0
    dp_seed: Optional[int] = None
    update_reduction: str = "mean"

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        """Wrap ``optimizer``: noise once per logical step, ÷ B̄, and account the step."""
        self.optimizer = DPOptimizer(
            optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size, loss_reduction=self.update_reduction,
            secure_mode=self.secure, seed=self.dp_seed)
        self.optimizer.attach_step_hook(AccountStep(self))
        return self.optimizer

    @property
    def formal_guarantee(self) -> bool:
        return self.secure

    def get_epsilon(self, delta: float) -> float:
        return self.accountant.get_epsilon(delta)

    def steps_within(self, target_epsilon: float, delta: float, planned: int) -> int:
        """The most steps (≤ planned) whose ε at this σ and q stays within the target."""
        def eps(steps: int) -> float:
            a = Accountant(self.accountant.kind)
            a.step(self.noise_multiplier, self.sample_rate, steps, **self.step_kwargs)
            return a.get_epsilon(delta)
        if eps(planned) <= target_epsilon:
            return planned
        lo, hi = 0, planned
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if eps(mid) <= target_epsilon else (lo, mid)
        return lo

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(),
                "sampler": None if self.sampler is None else self.sampler.state_dict(),
                "optimizer_dp": self.optimizer.dp_state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])  # never restart accounting at 0
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.optimizer.load_dp_state_dict(state["optimizer_dp"])


def assemble(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], *, dataset_size: int,
             expected_batch_size: float, max_grad_norm: float, steps: int,
             noise_multiplier: Optional[float] = None, target_epsilon: Optional[float] = None,
             target_delta: Optional[float] = None, dp_seed: Optional[int] = None,
             secure: Optional[bool] = None, accountant: Union[str, Accountant] = "pld",
             truncated_max_batch: Optional[int] = None, poisson_sampling: bool = True,
             clipping: str = "flat", thresholds=None, loss_reduction: str = "sum",
             update_reduction: str = "mean", row_users=None,
             max_rows_per_user: Optional[int] = None) -> DPRun:
    """Patch ``model``, wrap ``optimizer``, build the Poisson sampler and the accountant.

    σ is ``noise_multiplier``, or calibrated so that ``steps`` steps spend at most
    (target_epsilon, target_delta). ``steps`` is the sampler's length (one pass).
    ``optimizer`` may be None and attached later (:meth:`DPRun.attach_optimizer`).
    ``secure`` (default: no ``dp_seed``) keys noise and sampling from ``os.urandom``.
    ``loss_reduction`` is how the caller's loss reduces the rows (the patch's),
    ``update_reduction`` whether the optimizer divides the noisy sum by B̄ ("mean") or not;
    ``thresholds`` (default C) what the patch clips to (a list for per-layer clipping, whose
    joint bound is ``max_grad_norm``). ``poisson_sampling=False`` (the PrivacyEngine's opt-in)
    builds no sampler and accounts q = 1/steps: then ε is no guarantee. ``row_users`` (the
    user of each row) with ``max_rows_per_user`` k makes the unit a user (ULS,
    :class:`~vaultkern.privacy.user_sampling.UserPoissonSampler`): ``dataset_size`` and
    ``expected_batch_size`` then count users, and the caller clips each batch's users as
    groups (``sampler.group_ids``).
    """
    import vaultkern as vk
    if not 0 < expected_batch_size <= dataset_size:
        raise ValueError(f"expected batch size {expected_batch_size} must lie in (0, N = "
                         f"{dataset_size}]")
    secure = dp_seed is None if secure is None else bool(secure)
    if secure and dp_seed is not None:
        raise ValueError(f"dp_seed={dp_seed} with secure randomness: a secure run is not seeded")
    q = float(expected_batch_size) / dataset_size if poisson_sampling else 1.0 / steps
    acct = accountant if isinstance(accountant, Accountant) else Accountant(accountant)
    step_kwargs = ({} if truncated_max_batch is None else
                   {"truncated_max_batch": truncated_max_batch, "dataset_size": dataset_size})
    if noise_multiplier is None:
        if target_epsilon is None or target_delta is None:
            raise ValueError("give noise_multiplier, or target_epsilon and target_delta")
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon, target_delta, q, steps, accountant=acct.kind, **step_kwargs)
    if truncated_max_batch is not None:  # fail now (e.g. RDP), not at the first step
        Accountant(acct.kind).step(noise_multiplier, q, 0, **step_kwargs)
    # the sampler's key is its own: SHA-256 of the seed under the sampler's domain
    # (built before the patch: a refused configuration leaves the model as it was)
    if row_users is not None:
        if truncated_max_batch is not None or not poisson_sampling or is_distributed():
            raise NotImplementedError("user-level sampling is plain Poisson over users, on one "
                                      "process: no truncation, no torch.distributed")
        sampler = UserPoissonSampler(row_users, q, steps, max_rows_per_user, seed=dp_seed,
                                     secure=secure)
        if sampler.num_users != dataset_size:
            raise ValueError(f"dataset_size={dataset_size} but the rows have "
                             f"{sampler.num_users} users (the units)")
    elif poisson_sampling and is_distributed():  # every rank its share of one global batch
        if truncated_max_batch is not None:
            raise NotImplementedError("truncated_max_batch under torch.distributed is not "
                                      "implemented; use plain Poisson sampling")
        sampler = DistributedPoissonBatchSampler(dataset_size, q, steps, seed=dp_seed,
                                                 secure=secure)
    else:
        sampler = None if not poisson_sampling else PoissonBatchSampler(
            dataset_size, q, steps, max_batch_size=truncated_max_batch, secure=secure,
            seed=dp_seed)
    # empty Poisson batches go through the caller's loop unchanged (noise-only steps)
    vk.patch(model, max_grad_norm=max_grad_norm if thresholds is None else thresholds,
             loss_reduction=loss_reduction, clipping=clipping, allow_empty_batch=True)
    run = DPRun(model, None, sampler, acct, q, float(noise_multiplier), float(expected_batch_size),
                int(dataset_size), secure, truncated_max_batch, step_kwargs, float(max_grad_norm),
                dp_seed, update_reduction)
    if optimizer is not None:
        run.attach_optimizer(optimizer)
    return run


def steps_per_epoch(dataset_size: int, expected_batch_size: float) -> int:
    return max(1, math.ceil(dataset_size / expected_batch_size))
