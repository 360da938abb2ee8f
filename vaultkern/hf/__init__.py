"""Hugging Face integration: ``DPTrainer`` (needs ``transformers``)."""
from vaultkern.hf.losses import per_example_lm_loss, per_example_loss_for  # noqa: F401
from vaultkern.hf.trainer import DPTrainer  # noqa: F401
