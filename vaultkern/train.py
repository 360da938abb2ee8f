"""DP training of the reference decoder: ``python -m vaultkern train``.

One logical step (DESIGN.md §1):

  1. Poisson-sample the logical batch: each packed sequence joins with
     probability q = batch_size / N (the batch may be empty);
  2. split it into micro-batches of at most --max-physical-batch-size rows and
     call ``per_sequence_loss(...).sum().backward()`` on each: the patched
     model accumulates Σ_i clip_i · g_i into every p.grad;
  3. ``DPOptimizer.step()`` adds σ·C·ξ once, divides by the expected batch size,
     and updates; the accountant records one Poisson-sampled Gaussian step.

The number of steps is fixed before training: σ is calibrated so that the
planned steps spend at most the target ε, or, with --noise-multiplier and
--epsilon both given, training stops at the last step within the budget.
``--no-dp`` runs the same loop with shuffled batches and no clipping or noise.

Run directory (--out): data.pt (packed data; private), ckpt.pt (resumable
state), model.pt (weights + config: the releasable artifact), metrics.jsonl,
training.png, MODEL_CARD.md, model_card.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

from vaultkern._version import __version__
from vaultkern.data import ByteTokenizer, PackedCorpus, builtin_corpus, file_corpus, inputs_and_targets
from vaultkern.model_card import training_card, write_model_card
from vaultkern.models import (IGNORE_INDEX, Decoder, count_parameters, get_config, make_config,
                              per_sequence_loss)

DATA_FILE, CKPT_FILE, MODEL_FILE = "data.pt", "ckpt.pt", "model.pt"
METRICS_FILE, PLOT_FILE = "metrics.jsonl", "training.png"
DEFAULT_EPSILON, DEFAULT_DELTA = 8.0, 1e-6
CHECKPOINT_FORMAT = 1
# flags that may change when a run is resumed; all others must match the saved run
RESUMABLE_OVERRIDES = ("resume", "stop_after", "checkpoint_every", "log_every", "epsilon_every",
                       "max_rejected_steps",
                       "device", "quiet")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vaultkern train",
        description="Train the reference decoder with DP-SGD (or without DP, --no-dp) and write a "
                    "run directory with checkpoints, metrics, and a model card.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--config", default="tiny",
                   help="model preset (tiny, tiny-gpt2, small, gpt2-small, gpt2-medium, gemma-1b) "
                        "or a .toml/.json file of DecoderConfig fields")
    g.add_argument("--seq-len", type=int, default=None,
                   help="override the config's sequence length T (tokens per training sequence)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="override the config's vocabulary size (the byte tokenizer needs >= 259; "
                        "a larger vocabulary only adds unused embedding rows)")
    g.add_argument("--data", default=None,
                   help="training text: a .txt file (documents separated by blank lines), a .jsonl "
                        "file with a 'text' field, or a folder of those; default: built-in synthetic "
                        "records with planted canaries")
    g.add_argument("--num-records", type=int, default=2000,
                   help="number of built-in synthetic records (ignored with --data)")
    g.add_argument("--heldout-fraction", type=float, default=0.1,
                   help="fraction of documents held out (never trained on) for evaluation and audit")
    g.add_argument("--plant-canaries", action="store_true",
                   help="also plant random canaries (1, 4, 16 repetitions) into --data for the audit")
    g = p.add_argument_group("privacy")
    g.add_argument("--epsilon", type=float, default=None,
                   help=f"target ε; σ is calibrated to it (default {DEFAULT_EPSILON} when "
                        "--noise-multiplier is not given; with --noise-multiplier it is a budget that "
                        "stops training early)")
    g.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="target δ")
    g.add_argument("--noise-multiplier", type=float, default=None,
                   help="σ (noise std = σ·C) instead of calibrating it from --epsilon")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="C: per-sequence gradient clipping bound")
    g.add_argument("--accountant", choices=("pld", "rdp"), default="pld",
                   help="privacy accountant (dp-accounting)")
    g.add_argument("--secure-mode", action="store_true",
                   help="draw noise from the cryptographically secure generator")
    g.add_argument("--no-dp", action="store_true",
                   help="train without differential privacy (shuffled batches, no clipping or noise)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64,
                   help="expected logical batch size (Poisson: q = batch_size / N)")
    g.add_argument("--max-physical-batch-size", type=int, default=32,
                   help="largest micro-batch run at once; a logical batch is split into micro-batches")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="number of logical steps (default 500)")
    length.add_argument("--epochs", type=float, default=None,
                        help="expected passes over the data (steps = ceil(epochs · N / batch_size))")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps before cosine decay (default: 5%% of the steps)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="run directory (default runs/<config>-<dp|nodp>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint with its saved settings")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the built-in data, the held-out split and the initialisation "
                        "(public: the model card records it)")
    g.add_argument("--dp-seed", type=int, default=None,
                   help="seed of the DP randomness (Poisson sampling and noise). Default: fresh "
                        "from os.urandom, kept only in the private checkpoint so --resume "
                        "continues the same streams. A fixed value makes the run reproducible and "
                        "NOT private against anyone who knows it: for experiments only")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--checkpoint-every", type=int, default=100,
                   help="write ckpt.pt every N steps (also at the end and on Ctrl-C)")
    g.add_argument("--log-every", type=int, default=10, help="append to metrics.jsonl every N steps")
    g.add_argument("--epsilon-every", type=int, default=None,
                   help="also compute ε for the metrics every N steps (it costs ~1 s per call; "
                        "default: about 10 times per run)")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after N steps in this invocation (checkpointed; continue with --resume)")
    g.add_argument("--max-rejected-steps", type=int, default=5,
                   help="abort after this many consecutive steps with a non-finite loss or gradient")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--demo", action="store_true",
                   help="train tiny with and without DP on the built-in data, audit both, and print "
                        "them side by side (a few minutes on a laptop CPU) into --out (default "
                        "runs/demo); other flags are ignored")
    return p


# --- the plan: steps, σ, budget ---------------------------------------------------------------

@dataclass
class Plan:
    dp: bool
    num_train: int
    batch_size: int
    steps: int                          # steps this run will take in total
    requested_steps: int
    sample_rate: Optional[float] = None
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    delta: Optional[float] = None
    budget_note: str = ""


def check_args(args) -> None:
    """Clear errors for values that make no sense, naming the flag and the value."""
    positive_ints = ("max_physical_batch_size", "log_every", "checkpoint_every", "max_rejected_steps",
                     "num_records", "epsilon_every", "stop_after", "seq_len", "vocab_size")
    for name in positive_ints:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("lr", "max_grad_norm", "epsilon", "epochs"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta must lie strictly between 0 and 1, got {args.delta}")
    if args.no_dp and (args.noise_multiplier is not None or args.epsilon is not None):
        raise ValueError("--no-dp trains without privacy; do not combine it with --epsilon or "
                         "--noise-multiplier")


def make_plan(args, num_train: int) -> Plan:
    if args.batch_size < 1 or args.batch_size > num_train:
        raise ValueError(f"--batch-size {args.batch_size} must be between 1 and the number of "
                         f"training sequences ({num_train})")
    if args.steps is not None:
        requested = args.steps
    elif args.epochs is not None:
        requested = math.ceil(args.epochs * num_train / args.batch_size)
    else:
        requested = 500
    if requested < 1:
        raise ValueError(f"the run needs at least one step (got steps={requested})")
    if args.no_dp:
        return Plan(False, num_train, args.batch_size, requested, requested)

    from vaultkern.privacy import calibrate_noise_multiplier
    from vaultkern.privacy.accounting import epsilon_for

    q = args.batch_size / num_train
    target = args.epsilon
    if args.noise_multiplier is None:
        target = DEFAULT_EPSILON if target is None else target
        sigma = calibrate_noise_multiplier(target, args.delta, q, requested, accountant=args.accountant)
    else:
        sigma = args.noise_multiplier
        if not sigma > 0:
            raise ValueError(f"--noise-multiplier must be > 0, got {sigma}")
    eps = lambda k: epsilon_for(sigma, q, k, args.delta, accountant=args.accountant)  # noqa: E731
    steps, note = requested, ""
    # a calibrated σ meets the target by construction; a given σ is checked against the budget
    if args.noise_multiplier is not None and target is not None and eps(requested) > target:
        if eps(1) > target:
            raise ValueError(f"even one step with σ={sigma}, q={q:.4g} spends ε={eps(1):.3g} > "
                             f"--epsilon {target}; raise σ or the budget")
        lo, hi = 1, requested  # eps(lo) <= target < eps(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if eps(mid) <= target else (lo, mid)
        steps = lo
        note = (f"the ε budget {target} allows {steps} of the {requested} requested steps "
                f"(σ={sigma:.4g}, q={q:.4g}); training stops at step {steps}")
    return Plan(True, num_train, args.batch_size, steps, requested, q, sigma, target, args.delta, note)


# --- batches --------------------------------------------------------------------------------

class ShuffledBatches:
    """Non-private batching: fixed-size batches from a fresh permutation each epoch."""

    def __init__(self, num_samples: int, batch_size: int, steps: int, seed: int):
        self.num_samples, self.batch_size, self.steps, self.seed = num_samples, batch_size, steps, seed
        self.step = 0

    def __iter__(self):
        per_epoch = max(1, self.num_samples // self.batch_size)
        while self.step < self.steps:
            epoch, i = divmod(self.step, per_epoch)
            perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))
            self.step += 1
            yield perm[i * self.batch_size:(i + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


# --- helpers --------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def all_finite(tensors) -> bool:
    """True when every tensor is free of NaN/inf (one device sync for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def params_finite(model: torch.nn.Module) -> bool:
    return all_finite(p.detach() for p in model.parameters())


def grads_finite(model: torch.nn.Module) -> bool:
    return all_finite(p.grad for p in model.parameters())


def load_model(run_dir: str, device="cpu"):
    """The trained model of a run directory (model.pt, else the latest ckpt.pt), in eval mode."""
    for name in (MODEL_FILE, CKPT_FILE):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = Decoder(make_config(blob["config"], source=path))
            model.load_state_dict(blob["model"])
            return model.to(device).eval()
    raise FileNotFoundError(f"no {MODEL_FILE} or {CKPT_FILE} in {run_dir!r}: is it a training run directory?")


@torch.no_grad()
def heldout_loss(model, rows: torch.Tensor, device, batch_size: int = 64) -> Optional[float]:
    """Mean token cross-entropy (nats) of the model on rows."""
    from vaultkern.audit import sequence_losses
    if len(rows) == 0:
        return None
    total, tokens = sequence_losses(model, rows, device, batch_size)
    return float(total.sum() / tokens.sum())


def plot_metrics(run_dir: str) -> Optional[str]:
    """training.png: training loss and ε against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(run_dir)
    rows = [r for r in rows if r.get("loss") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)", color="tab:blue")
    with_epsilon = [r for r in rows if r.get("epsilon") is not None]
    if with_epsilon:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in with_epsilon], [r["epsilon"] for r in with_epsilon],
                 color="tab:red", marker="o", label="ε")
        ax2.set_ylabel("ε spent", color="tab:red")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    path = os.path.join(run_dir, PLOT_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir: str, last_step: int) -> None:
    """Drop metric lines written after the checkpoint a resumed run starts from."""
    rows = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    path = os.path.join(run_dir, METRICS_FILE)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


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


# --- the run --------------------------------------------------------------------------------

def _urandom_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


def _sampler_seed(dp_seed: int) -> int:
    """The Poisson sampler's seed: a different stream from the noise's, from the same secret."""
    return (dp_seed * 6364136223846793005 + 1442695040888963407) & ((1 << 63) - 1)


def resolve_args(args, parser) -> argparse.Namespace:
    """With --resume: the saved run's settings (explicit conflicting flags are an error)."""
    if args.out is None:
        args.out = os.path.join("runs", f"{os.path.splitext(os.path.basename(args.config))[0]}-"
                                        f"{'nodp' if args.no_dp else 'dp'}")
    if not args.resume:
        return args
    path = os.path.join(args.out, CKPT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint {path!r}")
    saved = torch.load(path, map_location="cpu", weights_only=True)["args"]
    defaults = vars(parser.parse_args([]))
    merged = dict(saved)
    for key, value in vars(args).items():
        if key in RESUMABLE_OVERRIDES or key == "out":
            merged[key] = value
        elif value != defaults.get(key) and value != saved.get(key):
            raise ValueError(f"--{key.replace('_', '-')} {value!r} differs from the resumed run's "
                             f"{saved.get(key)!r}; a resumed run keeps its original settings")
    return argparse.Namespace(**merged)


def build_data(args, seq_len: int) -> PackedCorpus:
    if args.data is None:
        corpus = builtin_corpus(args.num_records, args.seed, args.heldout_fraction)
    else:
        corpus = file_corpus(args.data, args.seed, args.heldout_fraction,
                             (1, 4, 16) if args.plant_canaries else None)
    packed = PackedCorpus.from_corpus(corpus, seq_len)
    if len(packed.train_rows) == 0:
        raise ValueError("the training data packs into 0 sequences")
    return packed


def train(args) -> dict:
    """Run (or resume) training as described by parsed ``args``; returns a summary dict."""
    return TrainingRun(args).run()


class TrainingRun:
    """Everything one invocation of ``train`` holds: model, optimizer, sampler, accountant."""

    def __init__(self, args):
        check_args(args)
        self.args, self.started = args, time.time()
        self.device = resolve_device(args.device)
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        ckpt_path = os.path.join(self.out, CKPT_FILE)
        if not args.resume and os.path.exists(ckpt_path):
            raise FileExistsError(f"{self.out!r} already holds a run; pass --resume to continue it "
                                  "or choose another --out")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if args.resume else None
        if ckpt is not None and ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path} has checkpoint format {ckpt.get('format')}, "
                             f"expected {CHECKPOINT_FORMAT}")
        self._load_data(ckpt)
        self.plan = Plan(**ckpt["plan"]) if ckpt else make_plan(args, len(self.rows))
        if self.plan.budget_note and not ckpt:
            print(f"note: {self.plan.budget_note}")
        self._build_model_and_optimizer(resuming=ckpt is not None)
        self.step, self.rejected_total, self.last_loss, self.last_epsilon = 0, 0, None, None
        if ckpt:
            self._restore(ckpt)

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
            self.data = build_data(args, self.cfg.seq_len)
            self.data.save(os.path.join(self.out, DATA_FILE))
            if os.path.exists(os.path.join(self.out, METRICS_FILE)):
                os.remove(os.path.join(self.out, METRICS_FILE))
        if self.data.seq_len != self.cfg.seq_len:
            raise ValueError(f"data was packed for seq_len {self.data.seq_len} but the model has "
                             f"{self.cfg.seq_len}")
        self.rows = self.data.train_rows

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
        self.accountant = None
        if not plan.dp:
            self.stepper = self.optimizer
            self.sampler = ShuffledBatches(len(self.rows), args.batch_size, plan.steps, args.seed)
            return
        import vaultkern as vk
        from vaultkern.privacy import Accountant, DPOptimizer, PoissonBatchSampler
        vk.patch(self.model, max_grad_norm=args.max_grad_norm, loss_reduction="sum")
        # per-sequence losses are summed for backward; the optimizer divides the noisy sum by B̄
        # The DP randomness must be unpredictable to anyone outside the run: knowing the noise
        # seed removes the noise, knowing the sampler seed removes the privacy amplification of
        # sampling. So it never derives from the public --seed; without --dp-seed it comes from
        # os.urandom and lives only in the (private) checkpoint.
        dp_seed = args.dp_seed if args.dp_seed is not None else _urandom_seed()
        if args.dp_seed is not None and not args.secure_mode:
            print(f"warning: --dp-seed fixes the DP noise and sampling; the run is reproducible "
                  "but not private against anyone who knows the seed", file=sys.stderr)
        self.stepper = DPOptimizer(self.optimizer, noise_multiplier=plan.noise_multiplier,
                                   max_grad_norm=args.max_grad_norm, expected_batch_size=args.batch_size,
                                   loss_reduction="mean", secure_mode=args.secure_mode,
                                   seed=None if args.secure_mode else dp_seed)
        # secure mode also draws the Poisson decisions from os.urandom (not replayable)
        self.sampler = PoissonBatchSampler(
            len(self.rows), plan.sample_rate, plan.steps, secure=args.secure_mode,
            generator=None if args.secure_mode else torch.Generator().manual_seed(
                _sampler_seed(dp_seed)))
        self.accountant = Accountant(args.accountant)

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.stepper.load_state_dict(ckpt["optimizer"])  # DPOptimizer: also its noise seed and step
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        if self.plan.dp:
            self.accountant.load_state_dict(ckpt["accountant"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in ckpt["rng"]["python"]))
        self.step, self.rejected_total = ckpt["step"], ckpt["rejected_steps"]
        self.last_loss = ckpt.get("last_loss")
        self.initial_heldout = ckpt.get("initial_heldout_loss")
        truncate_metrics(self.out, self.step)
        print(f"resuming {self.out} at step {self.step} of {self.plan.steps}")

    # -- state -----------------------------------------------------------------------------
    def epsilon(self) -> Optional[float]:
        return self.accountant.get_epsilon(self.plan.delta) if self.plan.dp else None

    def save_checkpoint(self) -> None:
        """Atomic: a crash mid-write leaves the previous checkpoint intact."""
        if not params_finite(self.model):
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
            "rejected_steps": self.rejected_total, "last_loss": self.last_loss,
            "initial_heldout_loss": self.initial_heldout,
        }, os.path.join(self.out, CKPT_FILE))

    # -- one logical step --------------------------------------------------------------------
    def accumulate(self, indices: List[int]):
        """Forward/backward of the logical batch in micro-batches: (loss sum, tokens, rejection)."""
        args, loss_sum, tokens = self.args, 0.0, 0
        # DP: the per-sequence sum (the DPOptimizer divides by B̄); non-DP: the mean token loss
        scale = 1.0 if self.plan.dp else 1.0 / (args.batch_size * self.cfg.seq_len)
        for start in range(0, len(indices), args.max_physical_batch_size):
            chunk = indices[start:start + args.max_physical_batch_size]
            inputs, targets = inputs_and_targets(self.rows[chunk])
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with autocast_for(self.device):
                logits = self.model(inputs)
            loss = per_sequence_loss(logits, targets).sum()
            if not torch.isfinite(loss):
                return loss_sum, tokens, f"loss is {loss.item()}"
            try:
                (loss * scale).backward()
            except FloatingPointError as exc:  # vaultkern's NonFiniteGradientError
                return loss_sum, tokens, str(exc)
            loss_sum += loss.item()
            tokens += int((targets != IGNORE_INDEX).sum())
        return loss_sum, tokens, None

    def update(self) -> Optional[str]:
        """The optimizer step (DP: noise once, also for an empty batch); a rejection or None."""
        try:
            if not self.plan.dp and not grads_finite(self.model):  # DPOptimizer checks by itself
                raise FloatingPointError("gradient is not finite")
            self.stepper.step()
        except FloatingPointError as exc:  # nothing was modified
            return str(exc)
        return None

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        args, plan = self.args, self.plan
        stop_at = plan.steps if args.stop_after is None else min(plan.steps, self.step + args.stop_after)
        # ε costs ~1 s per evaluation with the PLD accountant: about 10 evaluations per run
        epsilon_every = args.epsilon_every or args.log_every * max(
            1, math.ceil(plan.steps / (10 * args.log_every)))
        progress = None
        if not args.quiet:
            from tqdm import tqdm
            progress = tqdm(total=plan.steps, initial=self.step, unit="step", dynamic_ncols=True,
                            desc=f"train {'DP' if plan.dp else 'non-DP'}")
        window_tokens, window_start = 0, time.time()
        consecutive_rejected, aborted, interrupted = 0, None, False
        batches = iter(self.sampler)
        with StopRequest() as stop, open(os.path.join(self.out, METRICS_FILE), "a") as metrics:
            while self.step < stop_at:
                if stop.requested:
                    interrupted = True
                    break
                loss_sum, tokens, rejected = self.accumulate(list(next(batches)))
                rejected = rejected or self.update()
                if rejected is None:
                    consecutive_rejected = 0
                    self.last_loss = loss_sum / tokens if tokens else self.last_loss
                else:
                    self.rejected_total += 1
                    consecutive_rejected += 1
                    charged = " (the step is still charged to the privacy accountant)" if plan.dp else ""
                    print(f"\nstep {self.step + 1} rejected: {rejected}; the update is skipped{charged}",
                          file=sys.stderr)
                self.stepper.zero_grad(set_to_none=True)
                self.scheduler.step()
                if plan.dp:
                    self.accountant.step(plan.noise_multiplier, plan.sample_rate)
                self.step += 1
                window_tokens += tokens
                if progress is not None:
                    progress.update(1)
                if consecutive_rejected >= args.max_rejected_steps:
                    aborted = (f"{consecutive_rejected} consecutive steps were rejected (non-finite loss "
                               f"or gradient); training aborted at step {self.step}. The last good "
                               "checkpoint is left untouched; try a lower --lr.")
                    break
                if self.step % args.log_every == 0 or self.step == stop_at:
                    elapsed = time.time() - window_start
                    logged_epsilon = None
                    if plan.dp and (self.step % epsilon_every == 0 or self.step == stop_at):
                        logged_epsilon = self.last_epsilon = self.epsilon()
                    metrics.write(json.dumps({
                        "step": self.step, "loss": self.last_loss, "epsilon": logged_epsilon,
                        "lr": self.scheduler.get_last_lr()[0],
                        "tokens_per_s": window_tokens / elapsed if elapsed > 0 else None,
                        "rejected_steps": self.rejected_total}) + "\n")
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
        if aborted:
            print(f"error: {aborted}", file=sys.stderr)
            return {"status": "aborted", "step": self.step, "rejected_steps": self.rejected_total,
                    "out": self.out}
        status = "complete" if self.step >= plan.steps else ("interrupted" if interrupted else "stopped")
        return self.finish(status)

    def finish(self, status: str) -> dict:
        """Checkpoint, release file (model.pt), plot, model card, summary."""
        plan, out = self.plan, self.out
        self.save_checkpoint()
        if plan.dp:
            import vaultkern as vk
            vk.unpatch(self.model)
        eps = self.epsilon()
        if plan.dp and plan.target_epsilon is not None and eps > plan.target_epsilon * (1 + 1e-9):
            raise RuntimeError(f"ε={eps} exceeds the target {plan.target_epsilon}: this is a bug; "
                               "do not release this model")
        final_heldout = heldout_loss(self.model, self.data.heldout_rows, self.device)
        atomic_save({"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                     "vaultkern_version": __version__}, os.path.join(out, MODEL_FILE))
        plot_metrics(out)
        summary = {
            "status": status, "out": out, "step": self.step, "steps_planned": plan.steps,
            "epsilon": eps, "delta": plan.delta, "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate, "train_loss": self.last_loss,
            "initial_heldout_loss": self.initial_heldout, "heldout_loss": final_heldout,
            "rejected_steps": self.rejected_total,
        }
        write_model_card(out, training_card(
            self.args, self.cfg, count_parameters(self.model), self.data, asdict(plan), summary,
            str(self.device), time.time() - self.started))
        where = f"ε = {eps:.3f} (δ = {plan.delta:g})" if plan.dp else "no DP"
        heldout = "—" if final_heldout is None else f"{final_heldout:.4f}"
        print(f"{status}: step {self.step}/{plan.steps}, {where}, held-out loss {heldout} -> {out}")
        if plan.budget_note:
            print(f"note: {plan.budget_note}")
        if status != "complete":
            print(f"continue with: python -m vaultkern train --out {out} --resume")
        return summary


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        demo(args.out or os.path.join("runs", "demo"), quiet=args.quiet)
        return 0
    try:
        args = resolve_args(args, parser)
        summary = train(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if summary["status"] == "aborted" else 0


# --- demo -----------------------------------------------------------------------------------

# 300 records pack into ~560 sequences of 64 tokens; 400 steps of 32 are ~23 epochs, enough for
# the non-private model to single out the 16-times-repeated canaries (about 1.5 CPU-minutes per run)
DEMO_SETTINGS = dict(config="tiny", num_records=300, batch_size=32, max_physical_batch_size=32,
                     steps=400, lr=3e-3)
DEMO_EPSILON = 8.0


def demo(out_dir: str = os.path.join("runs", "demo"), quiet: bool = False, epsilon: float = DEMO_EPSILON,
         **overrides) -> dict:
    """Train tiny with and without DP on the built-in data, audit both, print a comparison
    (also written to OUT_DIR/comparison.txt). ``overrides``: train options, e.g. steps=100."""
    from vaultkern.audit import audit_run, format_comparison
    settings = {**DEMO_SETTINGS, **overrides}
    flags = []
    for key, value in settings.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    results = {}
    for name, extra in (("non-private", ["--no-dp"]), ("private", ["--epsilon", str(epsilon)])):
        run_dir = os.path.join(out_dir, "nodp" if name == "non-private" else "dp")
        if os.path.exists(os.path.join(run_dir, CKPT_FILE)):
            import shutil
            shutil.rmtree(run_dir)
        args = build_parser().parse_args(flags + extra + ["--out", run_dir] + (["--quiet"] if quiet else []))
        print(f"== {name} training ({run_dir})")
        train(resolve_args(args, build_parser()))
        results[name] = audit_run(run_dir, quiet=quiet)
    table = format_comparison(results)
    with open(os.path.join(out_dir, "comparison.txt"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    return results


if __name__ == "__main__":
    sys.exit(main())
