"""vk.patch with every op forced to its Triton kernel, against the float64 oracle.

On a CPU this runs the kernels under TRITON_INTERPRET=1 (set by conftest.py), so the
model is tiny; on a GPU the same test runs them compiled.
"""
import os

import pytest
import torch

import vaultkern as vk
from oracle import TinyDecoder, lm_loss, oracle, rel_err

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("cfg", [
    dict(vocab=13, d=8, heads=2, kv_heads=2, layers=1, T=5),                       # GPT-style, tied
    dict(vocab=13, d=8, heads=2, kv_heads=1, layers=1, T=5, mlp="geglu", norm="rms",
         rope=True, bias=False),                                                   # Gemma-style, MQA
])
def test_patch_with_triton_kernels_matches_oracle(cfg, monkeypatch):
    monkeypatch.setenv("VAULTKERN_BACKEND", "triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = TinyDecoder(**cfg)
    ids = torch.randint(0, 13, (3, 6))
    want, want_norms = oracle(model, (ids,), lm_loss, 0.3)
    model = model.to(dev)
    vk.patch(model, max_grad_norm=0.3)
    lm_loss(model, (ids.to(dev),)).sum().backward()
    norms = vk.last_norms(model).cpu()
    got = torch.cat([p.grad.cpu().double().flatten() for _, p in model.named_parameters()])
    vk.unpatch(model)
    ref = torch.cat([want[n].flatten() for n, _ in model.named_parameters()])
    assert vk.backend.ALL_OPS["linear_norm_sq"].choose(torch.empty(0, device=dev)) == "triton"
    assert rel_err(norms, want_norms) <= 1e-4
    assert rel_err(got, ref) <= 1e-4


def test_per_layer_clipping_with_the_fused_triton_kernel(monkeypatch):
    """clipping="per_layer" with each single-use linear weight clipped inside the backward
    by per_layer_clipped_linear_grad's Triton kernels: every p.grad equals the float64
    per-layer oracle (each parameter's per-example gradient clipped to its own C_k)."""
    import importlib
    from oracle import per_example_grads
    monkeypatch.setenv("VAULTKERN_BACKEND", "triton")
    module = importlib.import_module("vaultkern.ops.per_layer_clipped_linear_grad")
    calls, kernels = [], module.per_layer_triton
    monkeypatch.setattr(module, "per_layer_triton",
                        lambda *a, **k: (calls.append(a[0].shape), kernels(*a, **k))[1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    model = TinyDecoder(vocab=13, d=8, heads=2, kv_heads=1, layers=1, T=5, mlp="geglu",
                        norm="rms", rope=True, bias=False)
    ids = torch.randint(0, 13, (3, 6))
    grads = per_example_grads(model.double(), (ids,), lm_loss)
    model = model.float().to(dev)
    names = [n for n, _ in model.named_parameters()]
    limits = {n: float(torch.stack([g[n].norm() for g in grads]).median()) for n in names}
    want = {n: sum(min(1.0, limits[n] / (float(g[n].norm()) + 1e-6)) * g[n] for g in grads)
            for n in names}
    vk.patch(model, clipping="per_layer", max_grad_norm=[limits[n] for n in names])
    vk.core.bookkeeper(model).per_layer_fused = True
    lm_loss(model, (ids.to(dev),)).sum().backward()
    for n, p in model.named_parameters():
        assert rel_err(p.grad.cpu().double(), want[n]) <= 1e-4, n
    assert len(calls) == sum(isinstance(m, torch.nn.Linear) for m in model.blocks.modules())
