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
