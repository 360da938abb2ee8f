"""Hugging Face integration: ``DPTrainer`` (needs ``transformers``)."""
from vaultkern.hf.trainer import DPTrainer, per_example_lm_loss  # noqa: F401
