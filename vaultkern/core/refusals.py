"""What vk.patch refuses before anything runs: modules whose per-example gradients cannot
be separated, and a model's own loss that couples examples."""
from __future__ import annotations

import sys
from typing import Dict

import torch
from torch import nn

from vaultkern.core.errors import BatchLayoutError

UNSUPPORTED = {
    nn.modules.batchnorm._BatchNorm: "batch norm mixes examples within a batch (its statistics "
                                      "are batch statistics); use LayerNorm/GroupNorm instead",
    nn.RNNBase: "torch's fused recurrent kernels consume the weights out of vaultkern's sight; "
                "use opacus.layers.DPLSTM / DPGRU / DPRNN (ModuleValidator.fix swaps them in), "
                "which vaultkern clips exactly",
}


def unsupported_modules() -> Dict[type, str]:
    """UNSUPPORTED, and PEFT's prompt learners when PEFT is in use (imported by the user)."""
    peft = sys.modules.get("peft")
    if peft is None:
        return UNSUPPORTED
    shared_prompt = ("the prompt is computed once for the whole batch and repeated to every "
                     "example, so its per-example gradients cannot be separated where it is "
                     "computed; prefix tuning and LoRA-style adapters are supported")
    return {**UNSUPPORTED, peft.tuners.PromptEmbedding: shared_prompt,
            peft.tuners.PromptEncoder: shared_prompt}


def check_model_loss(model: nn.Module, kwargs) -> None:
    """A Hugging Face model given ``labels=`` computes its own loss: the mean over all
    target tokens of the batch. Where rows hold different numbers of targets, an example's
    gradient is then divided by a count that depends on the other examples, and clipping it
    no longer bounds what one example changes (the mean over examples of per-example
    means, equal counts, is fine)."""
    labels = kwargs.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or labels.shape[0] < 2:
        return
    hf = [m.PreTrainedModel for m in (sys.modules.get("transformers"),) if m is not None]
    hf += [m.PeftModel for m in (sys.modules.get("peft"),) if m is not None]
    if not any(isinstance(model, cls) for cls in hf):
        return
    valid = (labels != -100).reshape(labels.shape[0], labels.shape[1], -1).any(-1)
    for counts in (valid.sum(1), valid[:, 1:].sum(1)):  # as given, and shifted (causal LMs)
        if bool((counts != counts[0]).any()):
            raise BatchLayoutError(
                f"vaultkern: {type(model).__name__} was called with labels= whose rows hold "
                f"different numbers of target tokens ({counts.tolist()[:8]}; -100 elsewhere). "
                "The model's own loss then averages tokens over the whole batch, so each "
                "example's gradient depends on the other examples and per-example clipping "
                "would not bound one example's influence. Compute a per-example loss from the "
                "logits (each example's own tokens) instead of passing labels, or use "
                "vaultkern.hf.DPTrainer, which does.")
