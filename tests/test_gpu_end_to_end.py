"""End to end on a GPU: vk.patch on CUDA (Triton kernels) against the float64 oracle."""
import pytest
import torch

import vaultkern as vk
from oracle import TinyDecoder, lm_loss, oracle, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIGS = {
    "gpt-tied": dict(vocab=67, d=48, heads=4, T=33),
    "gemma-mqa-geglu": dict(vocab=67, d=48, heads=4, kv_heads=1, T=33, mlp="geglu", norm="rms",
                            rope=True, bias=False),
}


def flat(grads, model):
    return torch.cat([grads[n].double().flatten().cpu() for n, _ in model.named_parameters()])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_patch_matches_oracle(name, dtype):
    torch.manual_seed(0)
    model = TinyDecoder(**CONFIGS[name])
    ids = torch.randint(0, 67, (5, 34))
    want, want_norms = oracle(model, (ids,), lm_loss, 0.5)
    model = model.cuda()
    vk.patch(model, max_grad_norm=0.5)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        losses = lm_loss(model, (ids.cuda(),))
    losses.float().sum().backward()
    norms = vk.last_norms(model).cpu()
    got = {n: p.grad for n, p in model.named_parameters()}
    vk.unpatch(model)
    tol = 1e-4 if dtype == "fp32" else 2e-2
    assert rel_err(norms, want_norms) <= tol
    assert rel_err(flat(got, model), flat(want, model)) <= tol
    chosen = vk.backend.ALL_OPS["linear_norm_sq"].choose(torch.empty(0, device="cuda"))
    assert chosen == "triton"


@pytest.mark.parametrize("nan_example", [False, True])
def test_cuda_per_layer_clipping_inside_the_backward(nan_example):
    """Per-layer clipping on CUDA clips each parameter during the backward (rows of a
    non-finite unit zeroed without a host sync) and equals the same run in float64 on the
    CPU (itself checked against the per-layer oracle in test_clipping_variants.py)."""
    torch.manual_seed(1)
    base = TinyDecoder(**CONFIGS["gpt-tied"])
    ids = torch.randint(0, 67, (5, 34))
    weights = torch.ones(5)
    if nan_example:
        weights[3] = float("nan")

    def run(model, device, dtype):
        model = model.to(device, dtype)
        vk.patch(model, clipping="per_layer", max_grad_norm=0.5)
        (lm_loss(model, (ids.to(device),)) * weights.to(device, dtype)).sum().backward()
        out = {n: p.grad.double().cpu() for n, p in model.named_parameters()}
        count = vk.core.bookkeeper(model).nonfinite_examples
        vk.unpatch(model)
        return out, count

    import copy
    want, want_bad = run(copy.deepcopy(base), "cpu", torch.float64)
    got, bad = run(base, "cuda", torch.float32)
    assert bad == want_bad == int(nan_example)
    assert rel_err(flat(got, base), flat(want, base)) <= 1e-4
