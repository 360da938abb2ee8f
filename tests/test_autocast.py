"""Training under ``torch.autocast(bfloat16)`` on the CPU, as users run mixed precision.

The reference is the per-example gradients of the same float32 model under the same
autocast, each example alone (bf16 rounding differs between a batch's GEMMs and one row's,
hence the 1e-2 tolerance; a clipping or attribution error is of the order of 1). Calls
without a dedicated rule are replayed in backward, where autocast is off: they must run as
the forward ran them (torch's dtype error for Mamba and Llama 4's experts before).
"""
import copy

import pytest
import torch

from hf_zoo import V, assert_exact, batch, lm_loss, make

transformers = pytest.importorskip("transformers")


def _autocast_loss(model, b):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return lm_loss(model, b).float()


def _per_example_under_autocast(model, b):
    ref = copy.deepcopy(model)
    names, params = zip(*[(n, p) for n, p in ref.named_parameters() if p.requires_grad])
    out = []
    for i in range(b[0].shape[0]):
        grads = torch.autograd.grad(_autocast_loss(ref, tuple(t[i:i + 1] for t in b)).sum(),
                                    params, allow_unused=True)
        out.append({n: (torch.zeros_like(p) if g is None else g).double()
                    for n, p, g in zip(names, params, grads)})
    return out


def _mamba():
    cfg = transformers.MambaConfig(vocab_size=V, hidden_size=16, state_size=4, expand=2,
                                   num_hidden_layers=2, conv_kernel=3, time_step_rank=4)
    torch.manual_seed(0)
    return transformers.MambaForCausalLM(cfg).train()


def _llama4_text():
    """Llama 4's MoE layers: every expert processes every token (weighted by its router
    score), so the rows stay the examples' and the experts' batched matmul is exact."""
    cfg = transformers.Llama4TextConfig(
        vocab_size=V, hidden_size=16, intermediate_size=24, intermediate_size_mlp=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
        num_local_experts=4, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.Llama4ForCausalLM(cfg).train()


MODELS = {"mamba": _mamba, "llama4_text": _llama4_text,
          "llama": lambda: make("llama", dtype=torch.float32),
          "gpt2": lambda: make("gpt2", dtype=torch.float32)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_clipped_sum_under_bf16_autocast_matches_per_example_autocast(name):
    model, b = MODELS[name](), batch()
    assert_exact(model, b, _autocast_loss, grads=_per_example_under_autocast(model, b), tol=1e-2)


def test_llama4_mixture_of_experts_is_exact():
    assert_exact(_llama4_text().double(), batch(), lm_loss)

