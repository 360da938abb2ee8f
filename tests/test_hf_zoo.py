"""Conformance sweep (DESIGN.md §9): Hugging Face causal LMs from tiny configs, called the
way users call them (``model(input_ids=..., attention_mask=...)``, -100 labels).

For each architecture and attention implementation: the patch changes no output (float64,
bit for bit), and every ``p.grad`` and the per-example norms equal the float64 per-example
oracle — or the model is refused with an error naming the module.
"""
import pytest
import torch

import vaultkern as vk
from hf_zoo import ZOO, batch, lm_loss, make
from oracle import clip_and_sum, oracle, per_example_grads, rel_err

EXACT = [n for n in ZOO if n != "mixtral"]
EAGER_ONLY = {"gpt_neo", "gemma2", "vaultgemma"}  # transformers offers them no sdpa attention
CASES = [(n, a) for n in EXACT for a in ("eager", "sdpa") if a == "eager" or n not in EAGER_ONLY]
FAST_KINDS = {"linear", "linear:per-example", "embedding", "norm", "elementwise"}


def check_exact(model, b, C=None, **patch_kw):
    """C=None: the median per-example norm, so that some examples are clipped and some not."""
    grads = per_example_grads(model, b, lm_loss)
    if C is None:
        C = float(clip_and_sum(grads, 1.0)[1].median())
    want, want_norms = clip_and_sum(grads, C)
    with torch.no_grad():
        ref = model(input_ids=b[0], attention_mask=b[1]).logits
    vk.patch(model, max_grad_norm=C, **patch_kw)
    out = model(input_ids=b[0], attention_mask=b[1]).logits
    assert torch.equal(out, ref), "the patch changed the model's output"
    lm_loss(model, b).sum().backward()
    total = sum(float(g.square().sum()) for g in want.values()) ** 0.5
    for n, p in model.named_parameters():
        if p.requires_grad:
            err = float((p.grad - want[n]).norm()) / max(float(want[n].norm()), 1e-6 * total)
            assert err <= 1e-6, f"{n}: rel err {err:.1e}"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"
    assert rel_err(vk.last_norms(model), want_norms) <= 1e-6
    return model


@pytest.mark.parametrize("name,attn", CASES)
def test_architecture_is_exact(name, attn):
    """eager: per-example weight gradients (MixOpt) where the budget allows; sdpa: factored
    forms only (budget 0), so both paths meet every architecture."""
    model = make(name, attn)
    check_exact(model, batch(), per_example_memory=0 if attn == "sdpa" else 1 << 24)
    kinds = {k for s in vk.core.patched_sites(model) for k in s.kinds}
    assert kinds <= FAST_KINDS, f"slow generic path taken: {vk.summary(model)}"


@pytest.mark.parametrize("name", sorted(EAGER_ONLY))
def test_eager_only_list_is_current(name):
    with pytest.raises(ValueError, match="(?i)sdpa|scaled_dot_product"):
        make(name, "sdpa")


def test_vaultgemma_without_attention_mask():
    model = make("vaultgemma")
    ids, _, labels = batch()

    def loss(m, b):
        logits = m(input_ids=b[0]).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), b[0][:, 1:], reduction="none").sum(1)
    want, _ = oracle(model, (ids,), loss, 0.05)
    vk.patch(model, max_grad_norm=0.05, per_example_memory=0)  # the factored forms
    loss(model, (ids,)).sum().backward()
    for n, p in model.named_parameters():
        assert rel_err(p.grad, want[n]) <= 1e-6, n


def test_mixture_of_experts_is_refused_naming_the_module():
    model = make("mixtral")
    vk.patch(model)
    with pytest.raises(vk.BatchLayoutError, match=r"mlp\.experts"):
        lm_loss(model, batch()).sum().backward()
    assert all(p.grad is None for p in model.parameters())
