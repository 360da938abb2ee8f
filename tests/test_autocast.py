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

import vaultkern as vk
from hf_zoo import V, assert_exact, batch, lm_loss, make
from oracle import clip_and_sum, rel_err

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
    grads = _per_example_under_autocast(model, b)
    C = float(clip_and_sum(grads, 1.0)[1].median())
    want, want_norms = clip_and_sum(grads, C)
    vk.patch(model, max_grad_norm=C)
    _autocast_loss(model, b).sum().backward()
    assert rel_err(vk.last_norms(model), want_norms) <= 1e-2
    total = sum(float(g.square().sum()) for g in want.values()) ** 0.5
    for n, p in model.named_parameters():
        err = float((p.grad.double() - want[n]).norm()) / max(float(want[n].norm()), 1e-2 * total)
        assert err <= 1e-2, (n, err)


def test_llama4_mixture_of_experts_is_exact():
    assert_exact(_llama4_text().double(), batch(), lm_loss)

