"""per_layer_clipped_linear_grad (norms, clip factors and the clipped sum of one linear
weight from its per-example gradients) against a float64 oracle that forms every
example's gradient explicitly, for the torch path and the Triton kernels (compiled on a
GPU, under TRITON_INTERPRET=1 on the CPU)."""
import importlib
import os

import pytest
import torch

from vaultkern import ops

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if HAVE_TRITON and (INTERPRET or DEVICE == "cuda") else [])
EPS = 1e-6


def oracle(left, right, threshold, scale):
    """(Σ_i clip_i G_i over finite examples, ‖G_i‖²) in float64."""
    G = torch.einsum("btr,btc->brc", left.double().cpu(), right.double().cpu())
    norm_sq = G.flatten(1).square().sum(1)
    clip = (threshold / (norm_sq.sqrt() * scale + EPS)).clamp(max=1.0) * scale
    keep = torch.isfinite(norm_sq)
    return (clip[keep].view(-1, 1, 1) * G[keep]).sum(0), norm_sq


def inputs(B, T, rows, cols, dtype=torch.float32, seed=0, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(B, T, rows, generator=gen)
    right = torch.randn(B, T, cols, generator=gen) * torch.rand(B, 1, 1, generator=gen) * 3
    if transposed:  # T-major storage: the layout of a [T, B, ·] activation
        left = left.transpose(0, 1).contiguous().transpose(0, 1)
    return left.to(DEVICE, dtype), right.to(DEVICE, dtype)


def check(total, norm_sq, want, want_norm_sq, rtol):
    total, norm_sq = total.double().cpu(), norm_sq.double().cpu()
    err = float((total - want).abs().max()) / max(float(want.abs().max()), 1e-30)
    assert err <= rtol, f"clipped sum: relative error {err:.2e}"
    keep = torch.isfinite(want_norm_sq)
    assert not torch.isfinite(norm_sq[~keep]).any()
    nerr = float(((norm_sq - want_norm_sq)[keep]).abs().max() / want_norm_sq[keep].max())
    assert nerr <= rtol, f"norms: relative error {nerr:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,rows,cols", [(3, 37, 19, 23), (1, 5, 40, 3), (5, 1, 17, 9),
                                           (4, 16, 16, 32)])
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_against_float64_oracle(backend, B, T, rows, cols, scale):
    """Odd sizes (partial tiles everywhere), B = 1, T = 1; a threshold between the norms,
    so some examples are clipped and some are not; sum and mean scaling."""
    left, right = inputs(B, T, rows, cols, seed=B + T, transposed=True)
    _, norm_sq = oracle(left, right, 1.0, scale)
    threshold = float(norm_sq.sqrt().median()) * scale
    want, want_norm_sq = oracle(left, right, threshold, scale)
    got = ops.per_layer_clipped_linear_grad(left, right, threshold, scale, EPS, backend=backend)
    assert got[0].dtype == torch.float32 and got[0].shape == (rows, cols)
    check(*got, want, want_norm_sq, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_example_is_dropped(backend):
    left, right = inputs(4, 9, 11, 7, seed=5)
    left[1, 3, 2] = float("nan")
    right[2, 0, 0] = float("inf")
    want, want_norm_sq = oracle(left, right, 0.5, 1.0)
    assert torch.isfinite(want).all() and not torch.isfinite(want_norm_sq[1:3]).any()
    check(*ops.per_layer_clipped_linear_grad(left, right, 0.5, 1.0, EPS, backend=backend),
          want, want_norm_sq, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_over_examples_add_up(backend, monkeypatch):
    """Examples processed a chunk at a time (the transient bound) give the same result."""
    from vaultkern.ops import _chunk
    left, right = inputs(5, 6, 9, 10, seed=7)
    want, want_norm_sq = oracle(left, right, 2.0, 5.0)
    monkeypatch.setattr(_chunk, "CHUNK_ELEMENTS", 2 * 9 * 10)  # 2 examples per chunk
    check(*ops.per_layer_clipped_linear_grad(left, right, 2.0, 5.0, EPS, backend=backend),
          want, want_norm_sq, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    left, right = inputs(0, 4, 3, 5)
    total, norm_sq = ops.per_layer_clipped_linear_grad(left, right, 1.0, 1.0, EPS,
                                                       backend=backend)
    assert torch.equal(total.cpu(), torch.zeros(3, 5)) and norm_sq.shape == (0,)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_triton_dtypes(dtype):
    """float64 goes to the torch reference (bit for bit); bf16 operands accumulate in fp32."""
    left, right = inputs(3, 13, 10, 12, dtype=dtype, seed=9)
    got = ops.per_layer_clipped_linear_grad(left, right, 1.0, 3.0, EPS, backend="triton")
    if dtype == torch.float64:
        ref = ops.per_layer_clipped_linear_grad(left, right, 1.0, 3.0, EPS, backend="torch")
        assert all(torch.equal(x, y) for x, y in zip(got, ref))
        return
    assert got[0].dtype == torch.float32
    check(*got, *oracle(left, right, 1.0, 3.0), 1e-5)  # the oracle sees the bf16 values


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
def test_every_tile_config():
    """Each autotuning candidate of the tile kernel, run explicitly (one under the
    interpreter), on sizes that leave partial tiles of every block."""
    module = importlib.import_module("vaultkern.ops.per_layer_clipped_linear_grad")
    B, T, rows, cols = (2, 37, 19, 29) if INTERPRET else (3, 150, 200, 90)
    left, right = inputs(B, T, rows, cols, seed=11)
    want, want_norm_sq = oracle(left, right, 1.5, 2.0)
    for cfg in module.TILE_CONFIGS:
        check(*module.per_layer_triton(left, right, 1.5, 2.0, EPS, config=cfg),
              want, want_norm_sq, 1e-5)
