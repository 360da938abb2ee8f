"""The noise ops on Triton: the ChaCha20 Gaussian stream (vaultkern/ops/noise.py) and the
fused noise + SGD/AdamW steps (vaultkern/ops/fused_optimizer.py), against the torch
reference of the same stream and torch.optim.

Runs compiled on a CUDA GPU, or on the CPU under ``TRITON_INTERPRET=1`` (small sizes).
"""
from __future__ import annotations

import pytest
import torch

from triton_setup import DEVICE, INTERPRET, needs_gpu, randn, runs_triton

pytestmark = runs_triton
triton = pytest.importorskip("triton")

from vaultkern import ops  # noqa: E402
from vaultkern.ops import fused_optimizer as fused  # noqa: E402
from vaultkern.ops.noise import noisy_scale_triton  # noqa: E402


# --- noise ----------------------------------------------------------------------------------
# One ChaCha20 stream for every backend (vaultkern/ops/noise.py). The statistical checks
# run on the op's default backend (the extension on a CPU: fast; on a GPU, the kernel the
# op chooses there); the Triton kernel is checked against the torch reference element by
# element (under the interpreter: small sizes, it evaluates ChaCha20 op by op).

N_DRAWS = 1 << 20 if INTERPRET else 1 << 24


def draws(n=N_DRAWS, seed=1234, step=0, offset=0, std=1.0, scale=1.0, dtype=torch.float32,
          backend=None):
    zeros = torch.zeros(n, dtype=dtype, device=DEVICE)
    return ops.noisy_scale(zeros, std, scale, seed=seed, step=step, offset=offset,
                           backend=backend)


def corr(x, y):
    x, y = x.double().cpu(), y.double().cpu()
    x, y = x - x.mean(), y - y.mean()
    return ((x * y).sum() / (x.norm() * y.norm())).item()


def test_noise_is_standard_normal_scaled():
    from scipy import stats
    std, scale = 0.7, 0.25
    xi = draws(std=std, scale=scale).double().cpu() / (std * scale)
    n = xi.numel()
    assert abs(xi.mean().item()) < 5 / n ** 0.5
    assert abs(xi.std().item() - 1.0) < 5 * (0.5 / n) ** 0.5
    assert stats.kstest(xi.numpy(), "norm").pvalue > 1e-3
    # fourth moment (tails): E ξ⁴ = 3, Var ξ⁴ = 96
    assert abs((xi ** 4).mean().item() - 3.0) < 5 * (96 / n) ** 0.5


def test_noise_neighbours_uncorrelated():
    xi = draws().view(-1, 2)
    bound = 5 / xi.shape[0] ** 0.5
    # the two samples of one block: the cos and the sin halves of the same four pairs
    assert abs(corr(xi[:, 0], xi[:, 1])) < bound
    assert abs(corr(xi[:, 0] ** 2, xi[:, 1] ** 2)) < bound
    flat = xi.flatten()
    for lag in (1, 2, 3):
        assert abs(corr(flat[:-lag], flat[lag:])) < 5 / flat.numel() ** 0.5


def test_noise_reproducible_and_independent_across_steps_seeds_offsets():
    n = 1 << 16
    base = draws(n, seed=7, step=3)
    assert torch.equal(base, draws(n, seed=7, step=3))
    bound = 5 / n ** 0.5
    for other in (draws(n, seed=7, step=4), draws(n, seed=8, step=3),
                  draws(n, seed=7, step=3, offset=n)):
        assert not torch.equal(base, other)
        assert abs(corr(base, other)) < bound
    # an offset is a position in the step's stream: element j at offset k is sample k + j
    shifted = draws(n - 5, seed=7, step=3, offset=5)
    torch.testing.assert_close(shifted, base[5:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,offset", [(1, 0), (7, 3), (1001, 0), (513, 1030)])
def test_triton_noise_is_the_reference_stream(n, offset):
    want = draws(n, seed=5, step=2, offset=offset, backend="torch")
    got = draws(n, seed=5, step=2, offset=offset, backend="triton")
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("blocks", [8, 32])  # the interpreter pays per program: few of them
def test_noise_independent_of_block_size(blocks):
    zeros = torch.zeros(301, device=DEVICE)
    ref = ops.noisy_scale(zeros, 1.0, 1.0, seed=5, step=2, offset=9, backend="triton")
    got = noisy_scale_triton(zeros, 1.0, 1.0, seed=5, step=2, offset=9, blocks_per_program=blocks)
    assert torch.equal(ref, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noisy_scale_adds_to_summed_and_keeps_dtype(dtype):
    gen = torch.Generator().manual_seed(0)
    summed = torch.randn(5, 7, 3, generator=gen).to(DEVICE, dtype).transpose(0, 2)
    std, scale = 0.5, 0.125
    out = ops.noisy_scale(summed, std, scale, seed=1, step=9, offset=4, backend="triton")
    assert out.dtype == dtype and out.shape == summed.shape
    xi = noisy_scale_triton(torch.zeros_like(summed).double(), 1.0, 1.0, seed=1, step=9, offset=4)
    expected = (summed.double() + std * xi) * scale
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def _many_inputs(device):
    """Mixed dtypes, an empty, a non-contiguous and a float64 tensor, odd sizes."""
    gen = torch.Generator().manual_seed(3)
    ts = [torch.randn(1001, generator=gen), torch.randn(3, 7, generator=gen), torch.zeros(0),
          torch.randn(2, 513, generator=gen).to(torch.bfloat16), torch.randn(9, generator=gen),
          torch.randn(6, 5, generator=gen).t(), torch.randn(4, 4, generator=gen).double(),
          torch.randn(3, 3, generator=gen).half()]
    return [t.to(device) for t in ts]


@pytest.mark.parametrize("backend", [None, "torch"])
def test_noisy_scale_many_equals_one_call_per_tensor(backend):
    tensors = _many_inputs("cpu")
    offsets = [0, 1001, 1022, 1022, 2048, 2057, 2087, 2103]
    expected = [ops.noisy_scale(t, 0.7, 0.25, seed=11, step=5, offset=o, backend=backend)
                for t, o in zip(tensors, offsets)]
    ptrs = [t.data_ptr() for t in tensors]
    ops.noisy_scale_many(tensors, 0.7, 0.25, seed=11, step=5, offsets=offsets, backend=backend)
    assert [t.data_ptr() for t in tensors] == ptrs  # in place
    for got, want in zip(tensors, expected):
        assert got.dtype == want.dtype and torch.equal(got, want.view(got.shape))


@needs_gpu
def test_gpu_noise_bf16_keeps_dtype():
    out = draws(1 << 20, dtype=torch.bfloat16, std=2.0, scale=0.5)
    assert out.dtype == torch.bfloat16
    assert abs(out.float().std().item() - 1.0) < 0.01


# --- fused noise + optimizer step --------------------------------------------------------------

def private_grad(summed, std, scale, seed, step, offset):
    """ĝ from the triton noisy_scale: the fused kernels must use the identical stream."""
    return ops.noisy_scale(summed, std, scale, seed=seed, step=step, offset=offset, backend="triton")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_sgd_matches_torch_optim(momentum):
    gen = torch.Generator().manual_seed(21)
    shape, std, scale, lr, wd = (37, 29), 0.8, 1 / 64, 0.05, 0.01
    param = randn(*shape, gen=gen)
    reference = torch.nn.Parameter(param.clone())
    optim = torch.optim.SGD([reference], lr=lr, momentum=momentum, weight_decay=wd)
    buf = torch.zeros_like(param)
    for step in range(2):   # the second step exercises the momentum buffer
        summed = randn(*shape, gen=gen)
        reference.grad = private_grad(summed, std, scale, seed=3, step=step, offset=7)
        optim.step()
        fused.noisy_sgd_(param, summed, std, scale, seed=3, step=step, offset=7, lr=lr,
                         weight_decay=wd, momentum=momentum, momentum_buffer=buf, backend="triton")
        torch.testing.assert_close(param, reference.detach(), rtol=1e-5, atol=1e-6)


def test_fused_adamw_matches_torch_optim():
    gen = torch.Generator().manual_seed(22)
    shape, std, scale = (1001,), 1.1, 1 / 32
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    param = randn(*shape, gen=gen)
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    reference = torch.nn.Parameter(param.clone())
    optim = torch.optim.AdamW([reference], **hyper)
    for step in range(1, 4):
        summed = randn(*shape, gen=gen)
        reference.grad = private_grad(summed, std, scale, seed=9, step=step, offset=0)
        optim.step()
        fused.noisy_adamw_(param, summed, m, v, std, scale, seed=9, step=step, lr=hyper["lr"],
                           beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, adam_step=step,
                           backend="triton")
        torch.testing.assert_close(param, reference.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, optim.state[reference]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_fused_steps_independent_of_block_and_keep_dtypes():
    gen = torch.Generator().manual_seed(23)
    summed = randn(199, gen=gen)
    start = randn(199, dtype=torch.bfloat16, gen=gen)
    results = []
    for block in (16, None):
        param = start.clone()
        m, v = torch.zeros(199, device=DEVICE), torch.zeros(199, device=DEVICE)
        fused.noisy_adamw_triton(param, summed, m, v, 1.0, 0.5, seed=1, step=1, lr=1e-3, beta1=0.9,
                                 beta2=0.199, eps=1e-8, weight_decay=0.0, adam_step=1,
                                 blocks_per_program=block)
        assert param.dtype == torch.bfloat16 and m.dtype == torch.float32
        results.append((param, m, v))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], start)


def test_fused_torch_reference_runs_the_same_update():
    """The torch implementation: torch noise + the same update, checked against torch.optim."""
    gen = torch.Generator().manual_seed(24)
    param, summed = randn(50, gen=gen), randn(50, gen=gen)
    reference = torch.nn.Parameter(param.clone())
    reference.grad = ops.noisy_scale(summed, 0.3, 0.5, seed=2, step=0, backend="torch")
    torch.optim.SGD([reference], lr=0.1).step()
    fused.noisy_sgd_(param, summed, 0.3, 0.5, seed=2, step=0, lr=0.1, backend="torch")
    torch.testing.assert_close(param, reference.detach())
