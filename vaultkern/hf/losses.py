"""Per-example losses for ``DPTrainer``: one value per row of the batch, never a mean over
the batch (which would couple the examples' gradients, DESIGN.md §1). Each is the
per-example form of the loss the model computes itself from ``labels=``.

``per_example_loss_for(model)`` chooses by the model's task:

* causal language models: each sequence's mean next-token loss over its labelled tokens;
* encoder-decoder models (T5, BART, ...): each target's mean token loss, the decoder fed the
  labels shifted right, as the model does when it is given ``labels=``;
* token classification: each sequence's mean token loss (no shift);
* sequence classification: cross-entropy, mean squared error for regression
  (``num_labels == 1`` or float labels) or per-label binary cross-entropy for
  ``problem_type="multi_label_classification"``;
* multiple choice: cross-entropy over the choices;
* extractive question answering: the mean of the start and end positions' cross-entropies
  (``start_positions``/``end_positions``; positions outside the sequence count 0, as the
  model ignores them).

The task is read from the head's class first, so that an encoder-decoder with a
classification or QA head (BART, T5) gets that head's loss.

``-100`` labels are ignored throughout.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

PerExampleLoss = Callable[[torch.nn.Module, dict], torch.Tensor]


def _mean_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: each row's mean cross-entropy over its labelled positions (logits [B, T, V])."""
    tokens = F.cross_entropy(logits.transpose(1, 2).float(), labels, reduction="none",
                             ignore_index=-100)
    return tokens.sum(1) / (labels != -100).sum(1).clamp(min=1)


def per_example_lm_loss(model, inputs: dict) -> torch.Tensor:
    """[B]: each sequence's mean next-token cross-entropy over its own labelled tokens."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs).logits
    return _mean_token_loss(logits[:, :-1], labels[:, 1:])


def per_example_token_loss(model, inputs: dict) -> torch.Tensor:
    """[B]: token classification, each sequence's mean loss over its labelled tokens."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    return _mean_token_loss(model(**inputs).logits, labels)


def per_example_seq2seq_loss(model, inputs: dict) -> torch.Tensor:
    """[B]: encoder-decoder, each target's mean token loss; the decoder input is the labels
    shifted right (the model's own ``prepare_decoder_input_ids_from_labels``)."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    if inputs.get("decoder_input_ids") is None and inputs.get("decoder_inputs_embeds") is None:
        inputs["decoder_input_ids"] = _decoder_inputs(model, labels)
    return _mean_token_loss(model(**inputs).logits, labels)


def per_example_classification_loss(model, inputs: dict) -> torch.Tensor:
    """[B]: sequence classification or regression, as the model's own loss per example."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    logits = model(**inputs).logits.float()
    config = _config(model)
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype),
                                                  reduction="none").flatten(1).mean(1)
    if config.problem_type == "regression" or config.num_labels == 1 or labels.is_floating_point():
        per_row = F.mse_loss(logits.squeeze(-1) if config.num_labels == 1 else logits,
                             labels.to(logits.dtype), reduction="none")
        return per_row.reshape(per_row.shape[0], -1).mean(1)
    return F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)


def per_example_multiple_choice_loss(model, inputs: dict) -> torch.Tensor:
    """[B]: multiple choice (inputs [B, choices, T]), cross-entropy over each row's choices."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    return F.cross_entropy(model(**inputs).logits.float(), labels, reduction="none")


def per_example_qa_loss(model, inputs: dict) -> torch.Tensor:
    """[B]: extractive QA, each row's mean of its start and end cross-entropies."""
    inputs = dict(inputs)
    starts, ends = inputs.pop("start_positions"), inputs.pop("end_positions")
    out = model(**inputs)
    per_end = []
    for logits, positions in ((out.start_logits, starts), (out.end_logits, ends)):
        ignored = logits.shape[1]  # the model's own rule: out-of-sequence positions are ignored
        per_end.append(F.cross_entropy(logits.float(), positions.reshape(-1).clamp(0, ignored),
                                       reduction="none", ignore_index=ignored))
    return (per_end[0] + per_end[1]) / 2


_BY_HEAD = (("ForSequenceClassification", per_example_classification_loss),
            ("ForTokenClassification", per_example_token_loss),
            ("ForQuestionAnswering", per_example_qa_loss),
            ("ForMultipleChoice", per_example_multiple_choice_loss))


def per_example_loss_for(model) -> PerExampleLoss:
    """The per-example loss for this model's task (see the module docstring)."""
    names = [type(m).__name__ for m in _chain(model)]
    for suffix, loss in _BY_HEAD:
        if any(n.endswith(suffix) for n in names):
            return loss
    config = _config(model)
    if config is not None and config.is_encoder_decoder:
        return per_example_seq2seq_loss
    if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names):
        return per_example_lm_loss
    raise ValueError(
        f"vaultkern: DPTrainer has no per-example loss for {' / '.join(names)} (it knows causal "
        "language models, encoder-decoder models, token and sequence classification, multiple "
        "choice, extractive question answering); pass per_example_loss=fn(model, inputs) -> "
        "one loss per row of the batch")


def _chain(model) -> list:
    """The model and the modules it wraps: DDP's ``.module``, PEFT's ``.base_model`` and its
    tuner's ``.model``, transformers' inner model (each followed, breadth first)."""
    chain, todo = [], [model]
    while todo:
        m = todo.pop(0)
        if any(m is c for c in chain):
            continue
        chain.append(m)
        todo += [getattr(m, a) for a in ("module", "base_model", "model")
                 if isinstance(getattr(m, a, None), torch.nn.Module)]
    return chain


def _config(model):
    return next((m.config for m in _chain(model) if isinstance(getattr(m, "config", None),
                                                               PretrainedConfig)), None)


def _decoder_inputs(model, labels: torch.Tensor) -> torch.Tensor:
    """The decoder input the model itself makes from ``labels=``: its
    ``prepare_decoder_input_ids_from_labels``, or else (Blenderbot, M2M-100, NLLB, SeamlessM4T,
    whose forward shifts the labels inline) its modeling module's ``shift_tokens_right`` with
    the config's pad and decoder start tokens."""
    chain = _chain(model)
    for m in chain:
        if hasattr(m, "prepare_decoder_input_ids_from_labels"):
            return m.prepare_decoder_input_ids_from_labels(labels=labels)
    config = _config(model)
    for m in chain:
        shift = getattr(sys.modules.get(type(m).__module__), "shift_tokens_right", None)
        if callable(shift) and config is not None and getattr(
                config, "decoder_start_token_id", None) is not None:
            return shift(labels, config.pad_token_id, config.decoder_start_token_id)
    raise ValueError("vaultkern: this encoder-decoder model makes no decoder inputs from labels "
                     "(no prepare_decoder_input_ids_from_labels, no shift_tokens_right); pass "
                     "decoder_input_ids in the batch")
