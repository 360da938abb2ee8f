"""What the tests of the reference training run share: a tiny config, a run through the
command line, and the keys the public model card may hold (the fixtures ``config`` and
``one_thread`` are in conftest.py)."""
import json
import os

import torch

from vaultkern.run import cli, loop

TINY32 = 'base = "tiny"\nseq_len = 32\n'


def run(out, config, *flags):
    argv = ["--config", config, "--num-records", "120", "--batch-size", "16", "--lr", "3e-3",
            "--out", str(out), "--quiet", *map(str, flags)]
    if ("--dp-seed" not in argv and "--resume" not in argv and "--no-dp" not in argv
            and "--secure" not in argv):
        argv += ["--dp-seed", "1234"]  # reproducible DP randomness, so runs can be compared
    argv = [a for a in argv if a != "--secure"]  # the default: os.urandom
    if "--device" not in argv:
        # CPU even on a GPU machine: these tests compare runs bit for bit, which CUDA's
        # atomics-based kernels (embedding backward, cuDNN attention) do not promise
        argv += ["--device", "cpu"]
    parser = cli.build_parser()
    return loop.train(cli.resolve_args(parser, argv))


def private_report(run_dir):
    return json.loads((run_dir / "private_report.json").read_text())


def model_params(run_dir):
    return torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["model"]


# Every key the public card may hold (nested keys as a.b). A new key must be added here on
# purpose: the card is publishable, so nothing computed on private data without DP goes in.
PUBLIC_CARD_KEYS = {
    "name", "vaultkern_version", "created",
    "model", "model.style", "model.config", "model.parameters",
    "data", "data.description", "data.tokenizer", "data.seq_len", "data.train_sequences",
    "data.max_sequences_per_document", "data.canaries_summary", "data.packing", "data.split",
    "privacy", "privacy.differentially_private", "privacy.formal_guarantee", "privacy.caveats",
    "privacy.epsilon", "privacy.delta", "privacy.target_epsilon", "privacy.privacy_unit",
    "privacy.neighbouring_datasets", "privacy.document_level", "privacy.document_level.k",
    "privacy.document_level.epsilon", "privacy.document_level.delta",
    "privacy.document_level.derivation", "privacy.dataset_size", "privacy.dataset_size_note",
    "privacy.max_grad_norm", "privacy.noise_multiplier", "privacy.sample_rate",
    "privacy.expected_batch_size", "privacy.sampling", "privacy.max_batch_size", "privacy.steps",
    "privacy.accountant", "privacy.secure_randomness", "privacy.randomness",
    "privacy.non_finite_examples", "privacy.resumes", "privacy.budget_note",
    "training", "training.optimizer", "training.lr", "training.weight_decay",
    "training.warmup_steps", "training.batch_size", "training.max_physical_batch_size",
    "training.steps_done", "training.steps_planned", "training.complete", "training.device",
    "training.data_parallel_ranks",
    "training.seed",
}
PRIVATE_FIELDS = ("train_loss", "heldout_loss", "heldout_perplexity", "initial_heldout_loss",
                  "nonfinite_examples", "rejected_steps", "heldout_sequences", "wall_time_s",
                  "audit", "data_source")


def card_keys(card, prefix=""):
    keys = set()
    for key, value in card.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and key != "config":
            keys |= card_keys(value, prefix + key + ".")
    return keys
