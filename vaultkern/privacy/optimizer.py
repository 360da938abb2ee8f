"""DPOptimizer: noise once per logical step, then the wrapped optimizer's update.

After ``loss.backward()`` on a model patched by ``vaultkern.patch`` every
trainable ``p.grad`` already holds the clipped sum Σ_i clip_i·g_i (accumulated
over all backward calls since the last ``zero_grad``). ``DPOptimizer.step()``
then does, for every trainable parameter p of the wrapped optimizer
(DESIGN.md §1, §4):

    p.grad <- (p.grad + σ·C·ξ_p) · s,    ξ_p ~ N(0, I)
    s = 1/B̄  for loss_reduction="mean",  s = 1  for loss_reduction="sum"

and calls the wrapped optimizer's ``step``. B̄ is the *expected* batch size
(q·N), never the realised one. This is the scaling of Opacus 1.6's
DPOptimizer (it divides by ``expected_batch_size`` for "mean" and leaves the
noisy sum as is for "sum"), so results agree with Opacus for the same inputs.
(Opacus additionally divides by the number of backward calls accumulated
between steps; vaultkern's micro-batches all belong to one logical batch of
expected size B̄, so it does not.)

* A parameter whose ``p.grad`` is None (no gradient this step, or an empty
  batch) counts as a zero sum and still gets noise: whether a parameter was
  touched must not be observable.
* Reproducible noise (default): ξ_p[j] is a function of
  (seed, step, offset_p + j), where offset_p is the number of trainable
  elements before p (in param-group order). ``seed=None`` draws a seed from
  ``os.urandom``; the seed and the step counter are in :meth:`state_dict`, so
  a resumed run draws the same noise as an uninterrupted one.
* ``secure_mode=True``: ξ from the ChaCha20 generator of the compiled
  extension, keyed from ``os.urandom`` per call; there is no seed (passing one
  is an error). Under torch.distributed the key is drawn once on rank 0 and
  broadcast (every replica must add the same ξ), and never saved.
* Before anything is modified, every gradient is checked for NaN/inf; a
  non-finite gradient raises and leaves grads, params and counters unchanged.
* Micro-batches: ``signal_skip_step(do_skip=True)`` makes the next ``step()``
  a no-op that keeps the accumulated gradients (and the next ``zero_grad()``
  keeps them too); see :class:`vaultkern.privacy.micro_batches.BatchMemoryManager`.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional

import torch
from torch.optim import Optimizer

from vaultkern.core.distributed import is_distributed, shared_random_seed
from vaultkern.core.forward_hooks import clipped_by
from vaultkern.core.sharded import is_sharded_tensor, local_shard, max_over_ranks
from vaultkern.ops.noise import noisy_scale_many, secure_noisy_scale

_STATE_KEY = "vaultkern_dp"


def validate_dp_arguments(noise_multiplier, max_grad_norm, loss_reduction: str):
    """(σ, C) as floats, or a ValueError naming the bad value."""
    sigma = float(noise_multiplier)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"noise_multiplier={noise_multiplier}: must be a finite number >= 0")
    clip = float(max_grad_norm)
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"max_grad_norm={max_grad_norm}: must be a finite number > 0")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction={loss_reduction!r}: expected 'mean' or 'sum'")
    return sigma, clip


class DPOptimizer(Optimizer):
    """Wraps a torch optimizer; see the module docstring for the maths.

    Args:
        optimizer: the optimizer to wrap (its parameters should be those of a
            model patched by ``vaultkern.patch``).
        noise_multiplier: σ >= 0; the noise std is σ·C.
        max_grad_norm: C > 0, the clipping norm the model was patched with.
        expected_batch_size: B̄ = q·N, required for ``loss_reduction="mean"``.
        loss_reduction: "mean" (divide by B̄) or "sum" (no scaling).
        secure_mode: ChaCha20 noise from the C++ extension (no seed allowed).
        seed: seed of the reproducible noise; None draws one from os.urandom.
        require_patched: refuse a gradient on a parameter that no patched model owns (it
            was not clipped: a loss-side layer outside the model given to ``vk.patch``);
            False only for gradients clipped by other means.
    """

    # torch.amp.GradScaler then leaves the gradients scaled and tells step() so (found_inf),
    # which is how a scaled loss is noticed and refused (see step)
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: Optimizer, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: Optional[float], loss_reduction: str = "mean",
                 secure_mode: bool = False, seed: Optional[int] = None,
                 require_patched: bool = True):
        if isinstance(optimizer, DPOptimizer):
            raise TypeError("optimizer is already a DPOptimizer; wrap the original optimizer")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        sigma, clip = validate_dp_arguments(noise_multiplier, max_grad_norm, loss_reduction)
        if loss_reduction == "mean":
            if expected_batch_size is None or not float(expected_batch_size) > 0:
                raise ValueError(
                    f"expected_batch_size={expected_batch_size}: loss_reduction='mean' needs "
                    "the expected batch size B̄ = q·N > 0")
        if secure_mode and seed is not None:
            raise ValueError(
                f"seed={seed} with secure_mode=True: secure noise is keyed from os.urandom and "
                "cannot be seeded")
        self.original_optimizer = optimizer
        self.noise_multiplier = sigma
        self.max_grad_norm = clip
        self.expected_batch_size = (None if expected_batch_size is None
                                    else float(expected_batch_size))
        self.loss_reduction = loss_reduction
        self.require_patched = bool(require_patched)
        self._coverage_checked = False
        self.secure_mode = bool(secure_mode)
        # without a seed, rank 0's random seed on every rank: replicas draw the same noise
        self.seed = None if secure_mode else (int(seed) if seed is not None else shared_random_seed())
        # secure_mode across ranks: the replicas must add the same ξ, so rank 0 draws one
        # 256-bit key from os.urandom and broadcasts it once over the process group; the noise
        # is then the stream of that key (as reproducible noise is of its seed's), and the key
        # is never saved (a resumed run gets a new one). One process: a fresh key every call.
        self._secure_key_seed = shared_random_seed() if self.secure_mode and is_distributed() \
            else None
        self.steps_taken = 0  # logical (noised) steps so far
        self.step_hook: Optional[Callable[["DPOptimizer"], None]] = None
        self._skip_next_step = False
        self._batch_serial = 0          # logical batches handed out by the private loader
        self._batches_used: set = set()  # of those, the ones a forward ran on since the last step
        self._stepped_serial = 0        # the batch the last noised step was taken on
        self._forward_on_stepped = False  # a forward with gradients ran on that batch since
        self._is_last_step_skipped = False

    # ---- the wrapped optimizer's attributes --------------------------------
    @property
    def param_groups(self) -> List[dict]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: List[dict]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.original_optimizer.defaults = value

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, "
                f"max_grad_norm={self.max_grad_norm}, expected_batch_size="
                f"{self.expected_batch_size}, loss_reduction={self.loss_reduction!r}, "
                f"secure_mode={self.secure_mode}, steps_taken={self.steps_taken}, "
                f"optimizer={self.original_optimizer!r})")

    # ---- DP step -------------------------------------------------------------
    @property
    def params(self) -> List[torch.nn.Parameter]:
        """Trainable parameters of the wrapped optimizer, in group order, once each."""
        seen, out = set(), []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    @property
    def update_scale(self) -> float:
        return 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]) -> None:
        """``fn(optimizer)`` runs once per noised step, before the update (accounting)."""
        self.step_hook = fn

    def note_sampled_batch(self) -> None:
        """The private loader handed out a new logical (sampled) batch."""
        self._batch_serial += 1
        self._forward_on_stepped = False

    def note_forward(self) -> None:
        """The private model ran a forward (with gradients) on the current logical batch.

        A forward on the batch already stepped on (an evaluation loop without no_grad) is
        not a new batch; only a second step on it would be (pre_step refuses that)."""
        if self._batch_serial and self._batch_serial == self._stepped_serial:
            self._forward_on_stepped = True
        else:
            self._batches_used.add(self._batch_serial)

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Make the next ``step()`` only keep accumulating (micro-batch boundary)."""
        self._skip_next_step = bool(do_skip)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear grads, unless the last step was skipped (accumulation continues)."""
        if self._is_last_step_skipped:
            return
        self.original_optimizer.zero_grad(set_to_none)

    def check_clipping(self) -> None:
        """Raise unless every gradient is a clipped sum of one patched model's backward."""
        owners = {}
        for group in self.param_groups:
            for index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                which = f"parameter {index} of a param group (shape {tuple(p.shape)})"
                if not p.requires_grad:  # the wrapped optimizer would step it, unnoised
                    raise RuntimeError(
                        f"{which} has a gradient but requires_grad=False (frozen after its "
                        "gradient was computed): it would be updated without noise. Clear its "
                        "gradient (p.grad = None, or optimizer.zero_grad()) when freezing it; "
                        "optimizer step not taken, parameters unchanged")
                owner = clipped_by(p)
                if owner is None and self.require_patched:
                    raise RuntimeError(
                        f"{which} has a gradient that vaultkern did not clip: no patched model "
                        "owns it (a layer applied outside the model given to vk.patch, e.g. a "
                        "head or a loss with weights). Put it inside the patched model (or "
                        "patch the module holding both); optimizer step not taken, parameters "
                        "unchanged")
                if owner is not None:
                    owners[id(owner)] = owner
        if len(owners) > 1:
            raise RuntimeError(
                f"the gradients come from {len(owners)} separately patched models: each "
                "clipped its own part of an example's gradient to C, so together one example "
                "moves the sum by up to C·√(their number) while the noise is calibrated to C. "
                "Patch the one module that holds them all, once; optimizer step not taken, "
                "parameters unchanged")
        if owners and not self._coverage_checked:
            self._coverage_checked = True
            covered = {id(p) for p in self.params}
            missing = [n for n, p in next(iter(owners.values())).held
                       if p.grad is not None and id(p) not in covered]
            if missing:
                warnings.warn(
                    f"vaultkern: {len(missing)} trainable parameters of the patched model have "
                    f"clipped gradients but are not in this DPOptimizer (e.g. '{missing[0]}'): "
                    "another optimizer that steps them applies them without noise. Freeze them "
                    "(requires_grad_(False)) or give them to this optimizer.", stacklevel=5)

    def check_gradients(self) -> None:
        """Raise if any gradient is not one patched model's clipped sum (check_clipping), is
        sparse or is not finite (nothing is modified).

        One host-device synchronisation for all parameters (not one per parameter); under
        FSDP2 each rank checks its shards and every rank raises if any rank found one."""
        self.check_clipping()
        params = self.params
        with_grad = [(index, p) for index, p in enumerate(params) if p.grad is not None]
        for index, p in with_grad:
            if p.grad.is_sparse:
                raise ValueError(
                    f"parameter {index} (shape {tuple(p.shape)}) has a sparse gradient; "
                    "DPOptimizer needs dense gradients (use nn.Embedding(sparse=False))")
        bad = None
        if with_grad:
            # one multi-tensor reduction: a NaN/inf anywhere makes that parameter's norm
            # non-finite (a finite gradient overflowing fp32 in its norm, > ~1e19, counts too)
            grads = [local_shard(p.grad)[0] for _, p in with_grad]
            device = grads[0].device
            norms = torch._foreach_norm(grads, 2.0)
            finite = torch.isfinite(torch.stack([n.to(device) for n in norms]))
            if not bool(finite.all()):
                bad = with_grad[int((~finite).nonzero()[0])]
        elsewhere = any(is_sharded_tensor(p) for p in params) and max_over_ranks(bad is not None)
        if bad is not None or elsewhere:
            where = (f"in parameter {bad[0]} of shape {tuple(bad[1].shape)}" if bad is not None
                     else "in another rank's shard of the gradients")
            raise FloatingPointError(
                f"non-finite gradient (NaN or inf) {where}; optimizer step not taken, "
                "parameters unchanged")

    def add_noise(self) -> None:
        """p.grad <- (p.grad + σC·ξ)·s for every trainable p (None -> zeros), in place.

        Reproducible mode noises all gradients with one multi-tensor op (one kernel
        launch per dtype on CUDA); ξ of parameter k depends on (seed, step, offset_k)
        only, offset_k = the number of elements of the parameters before it. A shard of
        an FSDP2 gradient is noised with the counters of its place in the full tensor, so
        the ranks together add exactly the single-process noise."""
        std, scale = self.noise_std, self.update_scale
        params = self.params
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.dtype != p.dtype or not p.grad.is_contiguous():
                p.grad = p.grad.to(p.dtype).contiguous()
        shards = [local_shard(p.grad) for p in params]
        grads = [g for g, _ in shards]
        if std == 0.0:
            torch._foreach_mul_(grads, scale)
        elif self.secure_mode and self._secure_key_seed is None:
            for g in grads:
                g.copy_(secure_noisy_scale(g, std, scale))
        else:
            offsets, offset = [], 0
            for p, (_, start) in zip(params, shards):
                offsets.append(offset + start)
                offset += p.numel()
            seed = self.seed if self._secure_key_seed is None else self._secure_key_seed
            noisy_scale_many(grads, std, scale, seed=seed, step=self.steps_taken, offsets=offsets)

    def pre_step(self) -> bool:
        """Noise and scale the grads; False when this step is a skipped micro-step."""
        if self._skip_next_step:
            self._skip_next_step = False
            self._is_last_step_skipped = True
            return False
        n, self._batches_used = len(self._batches_used), set()
        reused, self._forward_on_stepped = self._forward_on_stepped and n == 0, False
        if reused:
            raise RuntimeError(
                "optimizer.step() again on the sampled batch the last step was taken on: the "
                "accountant charges one Poisson-sampled batch per step, and a second step on "
                "the same batch releases more than that. Take the next batch from the private "
                "loader before the next step.")
        if n > 1:
            raise RuntimeError(
                f"optimizer.step() after {n} sampled batches: each batch the private loader "
                "yields is one DP step, and the accountant charges one step for it; summing "
                "several batches into one step would release more than is accounted (and, "
                "without Poisson sampling, an update several times larger than Opacus'). Call "
                "optimizer.step() after every batch; to bound memory, split one logical batch "
                "with make_private(max_physical_batch_size=...) or BatchMemoryManager.")
        self.check_gradients()
        self.add_noise()
        if self.step_hook is not None:
            self.step_hook(self)
        self.steps_taken += 1
        self._stepped_serial = self._batch_serial
        self._is_last_step_skipped = False
        return True

    def step(self, closure: Optional[Callable[[], float]] = None):
        if getattr(self, "found_inf", None) is not None:
            for name in ("found_inf", "grad_scale"):  # GradScaler deletes them only after a step
                self.__dict__.pop(name, None)
            raise RuntimeError(
                "DPOptimizer under torch.amp.GradScaler: the scaled loss multiplies every "
                "example's gradient by the loss scale before vaultkern clips it, so each "
                "example would be clipped to C / scale and the update shrunk by that factor. "
                "Loss scaling (fp16 mixed precision) is not supported: use bf16 autocast, "
                "which needs no GradScaler. Optimizer step not taken, parameters unchanged")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            self.original_optimizer.step()
        return loss

    # ---- checkpoints ---------------------------------------------------------
    def dp_state_dict(self) -> dict:
        """The wrapper's own state: step counter, seed and settings."""
        return {"steps_taken": self.steps_taken, "seed": self.seed,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "expected_batch_size": self.expected_batch_size,
                "loss_reduction": self.loss_reduction, "secure_mode": self.secure_mode}

    def state_dict(self) -> dict:
        state = self.original_optimizer.state_dict()
        state[_STATE_KEY] = self.dp_state_dict()
        return state

    def load_dp_state_dict(self, dp_state: dict) -> None:
        """Restore the step counter and (non-secure mode) the noise seed.

        σ, C, B̄ and the loss reduction stay those this optimizer was built
        with (the accountant records what each step actually used).
        """
        steps = dp_state["steps_taken"]
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps_taken={steps}: must be an integer >= 0")
        self.steps_taken = int(steps)
        if not self.secure_mode:
            if dp_state.get("seed") is None:
                raise ValueError("the saved DPOptimizer state has no seed (it was secure_mode); "
                                 "cannot resume reproducible noise from it")
            self.seed = int(dp_state["seed"])
        self._skip_next_step = False
        self._is_last_step_skipped = False

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        dp_state = state_dict.pop(_STATE_KEY, None)
        self.original_optimizer.load_state_dict(state_dict)
        if dp_state is not None:
            self.load_dp_state_dict(dp_state)
