"""``DPTrainer``: DP-SGD fine-tuning with the Hugging Face ``Trainer``.

    trainer = DPTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                        data_collator=collator, target_epsilon=8.0, target_delta=1e-5,
                        max_grad_norm=1.0)
    trainer.train(); trainer.get_epsilon(); trainer.save_model(out)

What changes against a plain Trainer (the DP pieces come from
:func:`vaultkern.privacy.assembly.assemble`, as for every front door):

* the logical batch is the Trainer's own: ``per_device_train_batch_size ×
  gradient_accumulation_steps × world size`` is the *expected* batch B̄; every step is a
  Poisson sample of the training set at q = B̄/N (under torchrun one global sample, each
  rank its share; DDP reduces the clipped sums once per step), cut into physical
  micro-batches of at most ``per_device_train_batch_size`` rows, noised once, ÷ B̄. Internally the
  Trainer then runs with ``gradient_accumulation_steps=1`` (one loader item = one
  logical step), ``max_grad_norm=0`` (the per-example C replaces global clipping) and
  ``ignore_data_skip=True`` (the sampler resumes from its own state);
* the loss is each example's own loss, summed over the batch — never the batch-wide mean
  of ``model(labels=...)``, which couples examples (DESIGN.md §1): chosen by the model's
  task (:mod:`vaultkern.hf.losses`: causal LM, encoder-decoder, token or sequence
  classification) or given as ``per_example_loss=fn(model, inputs) -> [B]``;
* σ is calibrated from (ε, δ) and the planned steps, or given; training stops when
  the budget is spent; ε is logged; the accountant, sampler and DP step live in every
  checkpoint and come back with ``resume_from_checkpoint``; ``save_model`` writes a
  model card beside the weights;
* ``user_ids=`` (the user of each example) with ``max_rows_per_user=k``: user-level DP
  (ULS, :mod:`vaultkern.privacy.user_sampling`): users are Poisson-sampled at q = B̄/U,
  at most k examples each, and each user's summed gradient is clipped as one.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, List, Optional, Sequence

import torch
from transformers import Trainer

from vaultkern.core import set_group_ids
from vaultkern.hf.card import write_trainer_card
from vaultkern.hf.losses import PerExampleLoss, per_example_loss_for
from vaultkern.privacy.assembly import assemble, check_delta, steps_per_epoch
from vaultkern.privacy.optimizer import DPOptimizer
from vaultkern.privacy.user_sampling import UserPoissonSampler, group_microbatches

DP_STATE_FILE = "vaultkern_dp.pt"


class LogicalBatch(list):
    """One logical (Poisson-sampled) batch: a list of collated physical micro-batches, and
    for user-level runs the clipping group (user) of each micro-batch's rows."""

    rows = 0
    groups: List[Optional[torch.Tensor]] = []


class _Indexed(torch.utils.data.Dataset):
    """(index, item): the collate function learns which examples it got (their users)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


class _SplitCollate:
    def __init__(self, collate, max_rows: int, sampler, empty_item=None):
        self.collate, self.max_rows, self.sampler = collate, max_rows, sampler
        self.empty_item = empty_item  # DDP: an empty share still runs one 0-row micro-batch

    def __call__(self, pairs: List[Any]) -> LogicalBatch:
        indices, items = [i for i, _ in pairs], [x for _, x in pairs]
        if not items and self.empty_item is not None:
            batch = LogicalBatch([_rows_of(self.collate([self.empty_item]), 0)])
            batch.groups, batch.rows = [None], 0
            return batch
        if isinstance(self.sampler, UserPoissonSampler):  # users never straddle micro-batches
            groups = self.sampler.group_ids(indices)
            spans = group_microbatches(groups, self.max_rows)
        else:
            groups, spans = None, [(a, a + self.max_rows) for a in range(0, len(items), self.max_rows)]
        batch = LogicalBatch(self.collate(items[a:b]) for a, b in spans)
        batch.groups = [None if groups is None else groups[a:b] for a, b in spans]
        batch.rows = len(items)
        return batch


def _rows_of(batch: dict, n: int) -> dict:
    return {k: v[:n] if torch.is_tensor(v) else v for k, v in batch.items()}


class DPTrainer(Trainer):
    def __init__(self, *args, target_epsilon: Optional[float] = None,
                 target_delta: Optional[float] = None, noise_multiplier: Optional[float] = None,
                 max_grad_norm: float = 1.0, dp_seed: Optional[int] = None,
                 accountant: str = "pld", card_data: Optional[dict] = None,
                 user_ids: Optional[Sequence] = None, max_rows_per_user: Optional[int] = None,
                 per_example_loss: Optional[PerExampleLoss] = None, **kwargs):
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None and targs.fp16:
            raise ValueError(
                "DPTrainer with fp16=True is not supported: its GradScaler multiplies every "
                "example's gradient by the loss scale before the per-example clipping, so the "
                "examples would be clipped to C / scale. Use bf16=True (no loss scaling).")
        if targs is not None and targs.ddp_find_unused_parameters is None:
            # every trainable parameter is used under vaultkern; with the flag DDP would keep
            # each rank's own clipped sum (vaultkern refuses it)
            targs.ddp_find_unused_parameters = False
        super().__init__(*args, **kwargs)
        self.per_example_loss = per_example_loss or per_example_loss_for(self.model)
        for flag, what in (("is_fsdp_enabled", "FSDP (TrainingArguments fsdp=...)"),
                           ("is_deepspeed_enabled", "DeepSpeed")):
            if getattr(self, flag, False):  # they reduce the gradients through hooks that
                raise NotImplementedError(  # vaultkern's clipped sums never pass
                    f"DPTrainer with {what} is not supported: its gradient reduction would "
                    "bypass the clipped sums. Run DPTrainer under torchrun (DDP), or shard with "
                    "torch's fully_shard and vk.PrivacyEngine (see the README).")
        # public facts about the data for the card; with seq_len and max_rows_per_document
        # (k: the most rows one document spans) it states the row unit and a document-level ε
        self.dp_card_data = dict(card_data or {})
        targs = self.args
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError("DPTrainer needs a train_dataset with a length (N sets q = B̄/N)")
        if target_delta is None:
            raise ValueError("DPTrainer needs target_delta (δ of the reported guarantee)")
        n = len(self.train_dataset)
        if (user_ids is None) != (max_rows_per_user is None):
            raise ValueError("user-level DP needs both user_ids (the user of each training "
                             "example) and max_rows_per_user (k)")
        if user_ids is not None:
            if len(user_ids) != n:
                raise ValueError(f"user_ids has {len(user_ids)} entries for {n} examples")
            if max_rows_per_user > targs.per_device_train_batch_size:
                raise ValueError(f"max_rows_per_user={max_rows_per_user} exceeds "
                                 f"per_device_train_batch_size={targs.per_device_train_batch_size}: "
                                 "a user's rows must fit in one micro-batch to be clipped together")
            n = len(set(user_ids))  # the units are users: q = B̄/U
        check_delta(target_delta, n)
        self.dp_physical_batch = targs.per_device_train_batch_size
        # B̄ is global: under torchrun the ranks share one Poisson batch of this expected size
        self.dp_expected_batch = (targs.per_device_train_batch_size
                                  * targs.gradient_accumulation_steps * targs.world_size)
        if self.dp_expected_batch > n:
            raise ValueError(f"the expected batch {self.dp_expected_batch} exceeds the {n} "
                             "training examples")
        self.dp_delta, self.dp_target_epsilon = target_delta, target_epsilon
        per_epoch = steps_per_epoch(n, self.dp_expected_batch)
        planned = targs.max_steps if targs.max_steps > 0 else math.ceil(targs.num_train_epochs * per_epoch)
        self.dp = assemble(self.model, None, dataset_size=n,
                           expected_batch_size=self.dp_expected_batch, max_grad_norm=max_grad_norm,
                           steps=planned, noise_multiplier=noise_multiplier,
                           target_epsilon=target_epsilon if noise_multiplier is None else None,
                           target_delta=target_delta, dp_seed=dp_seed, accountant=accountant,
                           row_users=None if user_ids is None else list(user_ids),
                           max_rows_per_user=max_rows_per_user)
        self.noise_multiplier = self.dp.noise_multiplier
        self.dp_budget_steps = planned
        if target_epsilon is not None and noise_multiplier is not None:  # stop when spent
            self.dp_budget_steps = self.dp.steps_within(target_epsilon, target_delta, planned)
        # One loader item is one logical step and the sampler's one pass is the whole run
        # (Poisson sampling has no epochs); the per-example C replaces global clipping; the
        # sampler resumes from its own state instead of the Trainer skipping batches.
        targs.gradient_accumulation_steps, targs.max_grad_norm = 1, 0.0
        targs.max_steps, targs.ignore_data_skip = self.dp_budget_steps, True

    # -- the optimizer: the wrapped Trainer optimizer, noised by the assembled DPOptimizer ----
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if isinstance(optimizer, DPOptimizer):
            return optimizer
        if self.dp.optimizer is None or self.dp.optimizer.original_optimizer is not optimizer:
            self.optimizer = self.dp.attach_optimizer(optimizer)
        return self.optimizer

    # -- data: Poisson logical batches, micro-batches inside ------------------------------
    def get_train_dataloader(self):
        if type(self)._get_train_sampler is not Trainer._get_train_sampler or \
                type(self).get_train_dataloader is not DPTrainer.get_train_dataloader:
            raise RuntimeError("DPTrainer: a replaced train sampler or dataloader would not be "
                               "Poisson sampling, and the reported ε would not hold; remove "
                               "the override.")
        dataset = self.train_dataset
        if hasattr(self, "_remove_unused_columns") and hasattr(dataset, "column_names"):
            dataset = self._remove_unused_columns(dataset, description="training")
        return torch.utils.data.DataLoader(
            _Indexed(dataset), batch_sampler=self.dp.sampler,
            collate_fn=_SplitCollate(self.data_collator, self.dp_physical_batch, self.dp.sampler,
                                     dataset[0] if self.args.world_size > 1 else None),
            num_workers=0)  # prefetching workers would run the sampler ahead of its saved state

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        samples = []
        for _ in range(num_batches):
            try:
                samples.append(next(epoch_iterator))
            except StopIteration:
                break
        return samples, None

    def training_step(self, model, inputs: LogicalBatch, num_items_in_batch=None):
        model.train()
        total = torch.zeros((), device=self.args.device)
        for k, (micro, groups) in enumerate(zip(inputs, inputs.groups)):  # sums in p.grad
            if groups is not None:  # user-level: each user's summed gradient is clipped
                set_group_ids(self.dp.model, groups.to(self.args.device))
            micro = self._prepare_inputs(micro)
            # DDP: the clipped sums are all-reduced once per logical step, on the last backward
            sync = contextlib.nullcontext() if k == len(inputs) - 1 else self.accelerator.no_sync(model)
            with sync, self.compute_loss_context_manager():
                losses = self.per_example_loss(model, micro)
                self.accelerator.backward(losses.sum())
            total += losses.detach().sum()
        return total / max(inputs.rows, 1)

    def _get_grad_norm(self, model, grad_norm=None):
        # The Trainer would log ‖p.grad‖ before optimizer.step(): here that is the clipped sum
        # *before* the noise, a statistic of the private data without DP. Not computed.
        return None

    def floating_point_ops(self, inputs) -> int:
        return sum(super(DPTrainer, self).floating_point_ops(m) for m in inputs)

    def _track_num_input_tokens(self, inputs):
        for micro in inputs:
            super()._track_num_input_tokens(micro)

    # -- what is reported, saved and restored ---------------------------------------------
    def get_epsilon(self, delta: Optional[float] = None) -> float:
        return self.dp.get_epsilon(self.dp_delta if delta is None else delta)

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs:  # a training log: the guarantee spent so far goes with it
            logs["epsilon"] = self.get_epsilon()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            torch.save(self.dp.state_dict(), os.path.join(folder, DP_STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, DP_STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {DP_STATE_FILE}: it was not written by DPTrainer, and "
                "resuming without the accountant's history would under-report ε")
        self.dp.load_state_dict(torch.load(path, weights_only=False))

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            write_trainer_card(self, output_dir or self.args.output_dir)
