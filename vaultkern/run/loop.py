"""The training loop of ``python -m vaultkern train``.

One logical step (DESIGN.md §1):

  1. Poisson-sample the logical batch: each training sequence joins with probability
     q = batch_size / N (the batch may be empty; with --max-batch-size it is truncated
     and padded to exactly that many rows, padding rows masked in the engine);
  2. split it into micro-batches of at most --max-physical-batch-size rows and call
     ``per_sequence_loss(...).sum().backward()`` on each: the patched model accumulates
     Σ_i clip_i · g_i into every p.grad. An example whose gradient norm is NaN/inf gets
     clip factor 0 inside the engine (counted, privately), so every step proceeds;
  3. ``DPOptimizer.step()`` adds σ·C·ξ once, divides by the expected batch size, and
     updates; the accountant records one step of what the sampler did.

``--no-dp`` runs the same loop with shuffled batches and no clipping or noise; there a
non-finite gradient aborts the run (the last checkpoint is kept).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict
from typing import List, Optional

import torch

from vaultkern._version import __version__
from vaultkern.data import ByteTokenizer, PackedCorpus, builtin_corpus, builtin_user_corpus, file_corpus
from vaultkern.model_card import training_card, update_private_report, write_model_card
from vaultkern.models import Decoder, count_parameters, get_config, make_config, per_sequence_loss
from vaultkern.run.batches import ShuffledBatches, backward_in_microbatches, logical_batch
from vaultkern.run.budget import Plan, document_epsilon, make_plan
from vaultkern.run import ranks
from vaultkern.run.cli import check_args
from vaultkern.run.users import apply_els_cap, card_entries, user_rows, user_sampling
from vaultkern.run.rundir import (CHECKPOINT_FORMAT, CKPT_FILE, DATA_FILE, METRICS_FILE, MODEL_FILE,
                                  atomic_save, claim_for_resume, load_checkpoint, plot_metrics,
                                  resolve_device, truncate_metrics)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def heldout_loss(model, rows: torch.Tensor, device) -> Optional[float]:
    """Mean token cross-entropy (nats) of the model on rows (private: held-out data)."""
    from vaultkern.audit import sequence_losses
    if len(rows) == 0:
        return None
    total, tokens = sequence_losses(model, rows, device)
    return float(total.sum() / tokens.sum())


def build_data(args, seq_len: int) -> PackedCorpus:
    by_user = user_sampling(args) is not None
    if args.data is None and by_user:
        corpus = builtin_user_corpus(args.num_records, args.seed, args.heldout_fraction,
                                     records_per_user=args.records_per_user)
    elif args.data is None:
        corpus = builtin_corpus(args.num_records, args.seed, args.heldout_fraction)
    else:
        corpus = file_corpus(args.data, args.seed, args.heldout_fraction,
                             (1, 4, 16) if args.plant_canaries else None, with_users=by_user)
    packed = apply_els_cap(PackedCorpus.from_corpus(corpus, seq_len), args)
    if len(packed.train_rows) == 0:
        raise ValueError("the training data packs into 0 sequences")
    return packed


class StopRequest:
    """First Ctrl-C: finish the current step, checkpoint, stop. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step and writing a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def train(args) -> dict:
    """Run (or resume) training as described by parsed ``args``; returns a summary dict."""
    return TrainingRun(args).run()


class TrainingRun:
    """Everything one invocation of ``train`` holds: model, optimizer, sampler, accountant."""

    def __init__(self, args):
        check_args(args)
        self.args, self.started = args, time.time()
        self.device = resolve_device(args.device)
        self.rank, self.world = ranks.start(self.device)  # torchrun: rank 0 writes the run dir
        self.main = self.rank == 0
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        if not args.resume and os.path.exists(os.path.join(self.out, CKPT_FILE)):
            raise FileExistsError(f"{self.out!r} already holds a run; pass --resume to continue it "
                                  "or choose another --out")
        ckpt = load_checkpoint(self.out) if args.resume else None
        self._load_data(ckpt)
        self.plan = Plan(**ckpt["plan"]) if ckpt else make_plan(args, self.units)
        if self.plan.budget_note and not ckpt:
            print(f"note: {self.plan.budget_note}")
        self._build_model_and_optimizer(resuming=ckpt is not None)
        self.step, self.last_loss, self.last_epsilon = 0, None, None
        self.nonfinite_earlier, self.resumes = 0, []
        if ckpt:
            self._restore(ckpt)
            self.resumes = ckpt["resumes"]
            if self.plan.dp and self.main:  # written back before training: a second resume is seen
                self.resumes = claim_for_resume(self.out, ckpt, args.force_resume)

    # -- setup -----------------------------------------------------------------------------
    def _load_data(self, ckpt) -> None:
        args = self.args
        self.cfg = make_config(ckpt["config"]) if ckpt else get_config(
            args.config, seq_len=args.seq_len, vocab_size=args.vocab_size)
        if self.cfg.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"vocab_size {self.cfg.vocab_size} is smaller than the byte tokenizer's "
                             f"{ByteTokenizer.vocab_size}")
        if ckpt:
            self.data = PackedCorpus.load(os.path.join(self.out, DATA_FILE))
        else:
            self.data = build_data(args, self.cfg.seq_len)  # the same on every rank
            if self.main:
                self.data.save(os.path.join(self.out, DATA_FILE))
            if self.main and os.path.exists(os.path.join(self.out, METRICS_FILE)):
                os.remove(os.path.join(self.out, METRICS_FILE))
        if self.data.seq_len != self.cfg.seq_len:
            raise ValueError(f"data was packed for seq_len {self.data.seq_len} but the model has "
                             f"{self.cfg.seq_len}")
        self.rows, self.row_users, self.users = self.data.train_rows, None, None
        if user_sampling(args):
            self.users = user_rows(self.data, args)
            self.row_users = self.users.row_users
        self.units = self.users.units if self.users else len(self.rows)

    def _build_model_and_optimizer(self, resuming: bool) -> None:
        args, plan = self.args, self.plan
        torch.manual_seed(args.seed)
        self.model = Decoder(self.cfg).to(self.device)
        self.initial_heldout = None if resuming else heldout_loss(self.model, self.data.heldout_rows,
                                                                  self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                           weight_decay=args.weight_decay)
        warmup = args.warmup_steps if args.warmup_steps is not None else max(1, plan.steps // 20)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, plan.steps, warmup))
        self.accountant, self.forward = None, self.model
        if not plan.dp:
            self.stepper = self.optimizer
            self.sampler = ShuffledBatches(len(self.rows), args.batch_size, plan.steps, args.seed)
            return
        from vaultkern.privacy.assembly import assemble
        # Knowing the noise removes it, and knowing the sampler's draws removes the amplification
        # by sampling: by default both are keyed from os.urandom (a release run). --dp-seed
        # makes them reproducible, and the card then says that no formal guarantee holds.
        run = assemble(self.model, self.optimizer, dataset_size=self.units,
                       expected_batch_size=args.batch_size, max_grad_norm=args.max_grad_norm,
                       steps=plan.steps, noise_multiplier=plan.noise_multiplier,
                       dp_seed=args.dp_seed, accountant=args.accountant,
                       truncated_max_batch=plan.max_batch_size, row_users=self.row_users,
                       max_rows_per_user=args.max_rows_per_user if self.row_users is not None
                       else None)
        self.stepper, self.sampler, self.accountant = run.optimizer, run.sampler, run.accountant
        self.forward = ranks.wrap(self.model, self.device, self.world)  # patched, then DDP

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.stepper.load_state_dict(ckpt["optimizer"])  # DPOptimizer: also its step (and seed)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        if self.plan.dp:  # never start a resumed run's accounting from zero
            self.accountant.load_state_dict(ckpt["accountant"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in ckpt["rng"]["python"]))
        self.step, self.nonfinite_earlier = ckpt["step"], ckpt["nonfinite_examples"]
        self.last_loss = ckpt.get("last_loss")
        self.initial_heldout = ckpt.get("initial_heldout_loss")
        if self.main:
            truncate_metrics(self.out, self.step)
        print(f"resuming {self.out} at step {self.step} of {self.plan.steps}")

    # -- state -----------------------------------------------------------------------------
    def epsilon(self) -> Optional[float]:
        return self.accountant.get_epsilon(self.plan.delta) if self.plan.dp else None

    def nonfinite_examples(self) -> Optional[int]:
        """Examples dropped (clip factor 0) for a NaN/inf gradient norm, over the whole run."""
        if not self.plan.dp:
            return None
        from vaultkern.core.queries import bookkeeper
        return self.nonfinite_earlier + bookkeeper(self.model).nonfinite_examples

    def parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def save_checkpoint(self) -> None:
        """Atomic: a crash mid-write leaves the previous checkpoint intact. Unclaimed: a new state."""
        if not self.main:
            return
        if not self.parameters_finite():
            print(f"error: parameters are not finite at step {self.step}; the last good checkpoint "
                  "is left untouched", file=sys.stderr)
            return
        atomic_save({
            "format": CHECKPOINT_FORMAT, "vaultkern_version": __version__,
            "args": vars(self.args), "config": self.cfg.to_dict(), "plan": asdict(self.plan),
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.stepper.state_dict(),
            "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
            "accountant": self.accountant.state_dict() if self.plan.dp else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                    "python": list(random.getstate())},
            "nonfinite_examples": self.nonfinite_examples() or 0, "last_loss": self.last_loss,
            "initial_heldout_loss": self.initial_heldout,
            "resumes": self.resumes, "resumed_at": None,
        }, os.path.join(self.out, CKPT_FILE))

    # -- one logical step --------------------------------------------------------------------
    def accumulate(self, indices: List[int]):
        """Forward/backward of the logical batch in micro-batches: (loss sum, tokens)."""
        args, plan = self.args, self.plan
        batch, real = logical_batch(self.rows, indices, plan.max_batch_size)
        # DP: the per-sequence sum (the DPOptimizer divides by B̄); non-DP: the mean token loss
        scale = 1.0 if plan.dp else 1.0 / (args.batch_size * self.cfg.seq_len)
        groups = self.sampler.group_ids(indices) if self.row_users is not None else None
        return backward_in_microbatches(
            self.model, batch, real, per_sequence_loss, args.max_physical_batch_size, self.device,
            scale, mask_rows=plan.max_batch_size is not None, groups=groups, forward=self.forward)

    def update(self) -> None:
        """The optimizer step (DP: noise once, also for an empty batch)."""
        if not self.plan.dp:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                raise FloatingPointError("gradient is not finite")
        self.stepper.step()  # DPOptimizer refuses a non-finite clipped sum by itself

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        args, plan = self.args, self.plan
        stop_at = plan.steps if args.stop_after is None else min(plan.steps, self.step + args.stop_after)
        # ε costs ~1 s per evaluation with the PLD accountant: about 10 evaluations per run
        epsilon_every = args.epsilon_every or args.log_every * max(
            1, math.ceil(plan.steps / (10 * args.log_every)))
        progress = None
        if not args.quiet and self.main:
            from tqdm import tqdm
            progress = tqdm(total=plan.steps, initial=self.step, unit="step", dynamic_ncols=True,
                            desc=f"train {'DP' if plan.dp else 'non-DP'}")
        window_tokens, window_start, interrupted = 0, time.time(), False
        batches = iter(self.sampler)
        metrics_path = os.path.join(self.out, METRICS_FILE) if self.main else os.devnull
        with StopRequest() as stop, open(metrics_path, "a") as metrics:
            while self.step < stop_at:
                if stop.requested:
                    interrupted = True
                    break
                try:
                    loss_sum, tokens = self.accumulate(list(next(batches)))
                    self.update()
                except FloatingPointError as exc:  # nothing of this step was applied
                    if progress is not None:
                        progress.close()
                    print(f"\nerror: step {self.step + 1}: {exc}; training aborted. The last "
                          "checkpoint is left untouched" + ("; try a lower --lr." if not plan.dp
                                                            else "."), file=sys.stderr)
                    return {"status": "aborted", "step": self.step, "out": self.out}
                self.stepper.zero_grad(set_to_none=True)  # (the DP step was accounted by the optimizer)
                self.scheduler.step()
                self.step += 1
                self.last_loss = loss_sum / tokens if tokens else self.last_loss
                window_tokens += tokens
                if progress is not None:
                    progress.update(1)
                if self.step % args.log_every == 0 or self.step == stop_at:
                    elapsed = time.time() - window_start
                    if plan.dp and (self.step % epsilon_every == 0 or self.step == stop_at):
                        self.last_epsilon = self.epsilon()
                    metrics.write(json.dumps({  # private: training losses
                        "step": self.step, "loss": self.last_loss, "epsilon": self.last_epsilon,
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / elapsed if elapsed > 0 else None,
                        "nonfinite_examples": self.nonfinite_examples()}) + "\n")
                    metrics.flush()
                    if progress is not None:
                        progress.set_postfix(
                            loss="-" if self.last_loss is None else f"{self.last_loss:.3f}",
                            eps="-" if self.last_epsilon is None else f"{self.last_epsilon:.2f}")
                    window_tokens, window_start = 0, time.time()
                if self.step % args.checkpoint_every == 0 and self.step < stop_at:
                    self.save_checkpoint()
        if progress is not None:
            progress.close()
        status = "complete" if self.step >= plan.steps else ("interrupted" if interrupted else "stopped")
        return self.finish(status)

    def finish(self, status: str) -> dict:
        """Checkpoint, release file (model.pt), plot, public card, private report, summary."""
        plan, out = self.plan, self.out
        self.save_checkpoint()
        if not self.parameters_finite():
            raise FloatingPointError(
                f"the model's parameters are not finite after step {self.step} (learning rate "
                f"{self.args.lr} too large?): no model file or card is written; the last "
                "checkpoint with finite parameters is kept")
        nonfinite = self.nonfinite_examples()
        if plan.dp:
            import vaultkern as vk
            vk.unpatch(self.model)
        eps = self.epsilon()
        if plan.dp and plan.target_epsilon is not None and eps > plan.target_epsilon * (1 + 1e-9):
            raise RuntimeError(f"ε={eps} exceeds the target {plan.target_epsilon}: this is a bug; "
                               "do not release this model")
        if not self.main:  # the same model, ε and plan as rank 0, which writes them
            return {"status": status, "out": out, "step": self.step, "epsilon": eps}
        mode = user_sampling(self.args)
        # ULS: the unit (a user) already covers whole documents; ELS: ε for a user's k rows
        doc_eps = None if mode == "uls" else document_epsilon(
            plan, self.step, self.data.max_rows_per_document)
        user = None if mode is None else card_entries(
            mode, self.users, self.cfg.seq_len, None if mode == "uls" else document_epsilon(
                plan, self.step, self.users.max_rows_per_user), plan.delta)
        final_heldout = heldout_loss(self.model, self.data.heldout_rows, self.device)
        atomic_save({"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                     "vaultkern_version": __version__}, os.path.join(out, MODEL_FILE))
        plot_metrics(out)
        run = {"status": status, "steps": self.step, "epsilon": eps, "document_epsilon": doc_eps,
               "user_level": user, "ranks": self.world,
               "resumes": self.resumes, "device": str(self.device)}
        card = training_card(self.args, self.cfg, count_parameters(self.model), self.data,
                             asdict(plan), run)
        write_model_card(out, card)
        private = {
            "status": status, "steps_done": self.step, "train_loss": self.last_loss,
            "initial_heldout_loss": self.initial_heldout, "heldout_loss": final_heldout,
            "heldout_perplexity": math.exp(final_heldout) if final_heldout is not None else None,
            "heldout_sequences": len(self.data.heldout_rows),
            "train_documents": self.data.num_train_documents,
            "heldout_documents": self.data.num_heldout_documents,
            "data_source": self.data.private_description or self.data.description,
            "nonfinite_examples": nonfinite,
            "wall_time_s": round(time.time() - self.started, 1),
        }
        update_private_report(out, "training", private)
        where = f"ε = {eps:.3f} (δ = {plan.delta:g})" if plan.dp else "no DP"
        heldout = "—" if final_heldout is None else f"{final_heldout:.4f}"
        print(f"{status}: step {self.step}/{plan.steps}, {where}, held-out loss {heldout} -> {out}")
        if plan.dp and not card["privacy"]["formal_guarantee"]:
            print("warning: no formal guarantee holds for this run: "
                  + " ".join(card["privacy"]["caveats"]), file=sys.stderr)
        if plan.budget_note:
            print(f"note: {plan.budget_note}")
        if status != "complete":
            print(f"continue with: python -m vaultkern train --out {out} --resume")
        return {**private, "out": out, "step": self.step, "steps_planned": plan.steps,
                "epsilon": eps, "document_epsilon": doc_eps, "delta": plan.delta,
                "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate}
