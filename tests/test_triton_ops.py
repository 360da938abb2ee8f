"""Triton kernels of vaultkern.ops against float64 oracles and the torch references.

The oracles form every example's gradient explicitly in float64 (G_i = g_iᵀ a_i,
the V×d embedding gradient by index_add, ...) and take norms / inner products of
those, so they share no algebra with the ghost / direct / tiled kernels.

Runs compiled on a CUDA GPU, or on the CPU under ``TRITON_INTERPRET=1`` (then
with tiny shapes and one small block configuration per kernel).
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
triton = pytest.importorskip("triton")

from vaultkern import ops  # noqa: E402
from vaultkern.ops.clipped_grad import clipped_linear_grad_triton_splits  # noqa: E402
from vaultkern.ops.linear_norm import direct_triton, ghost_triton  # noqa: E402
from vaultkern.ops.noise import noisy_scale_triton  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP32_RTOL = 1e-5


def assert_rel(result, expected, rtol=FP32_RTOL):
    """|result - expected| ≤ rtol·max|expected| elementwise (cross terms can be ≈ 0)."""
    result = result.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert result.shape == expected.shape
    scale = max(expected.abs().max().item(), 1e-30)
    err = (result - expected).abs().max().item() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.1g}"


def randn(*shape, dtype=torch.float32, contiguous=True, gen=None):
    """Standard normal tensor on DEVICE; non-contiguous = strided view of a bigger one."""
    if contiguous:
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    big = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen).to(DEVICE, dtype)
    view = big[..., 1::2]  # last-dim stride 2
    if len(shape) == 3:  # also break the [B, T] layout: T-major storage
        view = big.transpose(0, 1).contiguous().transpose(0, 1)[..., 1::2]
    assert not view.is_contiguous()
    return view


# --- float64 oracles: explicit per-example gradients ---------------------------------------

def oracle_linear_grads(a, g):
    """[B, p, d] per-example weight gradients gᵢᵀaᵢ in float64."""
    return torch.einsum("btp,btd->bpd", g.double().cpu(), a.double().cpu())


def oracle_embedding_grads(ids, g, num_embeddings):
    """[B, V, d] per-example embedding gradients in float64 (ids < 0 add nothing)."""
    ids, g = ids.cpu(), g.double().cpu()
    out = torch.zeros(ids.shape[0], num_embeddings, g.shape[-1], dtype=torch.float64)
    for i in range(ids.shape[0]):
        keep = ids[i] >= 0
        out[i].index_add_(0, ids[i][keep], g[i][keep])
    return out


def inner(x, y):
    return (x * y).flatten(1).sum(1)


# --- shapes ---------------------------------------------------------------------------------

# (B, T, d, p): odd sizes not multiples of any block, B = 1, T = 1, block-aligned.
LINEAR_SHAPES = [(3, 37, 19, 23), (1, 5, 40, 3), (2, 1, 17, 9), (2, 32, 16, 48)]


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("mode", ["ghost", "direct"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_linear_norm_sq(shape, mode, contiguous):
    B, T, d, p = shape
    gen = torch.Generator().manual_seed(sum(shape) * 4 + 2 * (mode == "ghost") + contiguous)
    a = randn(B, T, d, contiguous=contiguous, gen=gen)
    g = randn(B, T, p, contiguous=contiguous, gen=gen)
    got = ops.linear_norm_sq(a, g, mode, backend="triton")
    assert got.dtype == torch.float32 and got.device.type == DEVICE
    G = oracle_linear_grads(a, g)
    assert_rel(got, inner(G, G))
    assert_rel(got, ops.linear_norm_sq(a, g, mode, backend="torch"))


@pytest.mark.parametrize("kernel", [ghost_triton, direct_triton])
def test_linear_kernels_single_position(kernel):
    """T = 1 through the kernels themselves (the op shortcuts T = 1 to ‖a‖²‖g‖²)."""
    gen = torch.Generator().manual_seed(5)
    a, g = randn(4, 1, 21, gen=gen), randn(4, 1, 11, gen=gen)
    G = oracle_linear_grads(a, g)
    assert_rel(kernel(a, g, a, g, True), inner(G, G))


@pytest.mark.parametrize("T1,T2,d,p", [(7, 29, 33, 19),    # ghost branch: 2·T1·T2 < d·p
                                       (40, 17, 6, 5),     # direct branch
                                       (1, 3, 18, 20)])
def test_linear_cross(T1, T2, d, p):
    gen = torch.Generator().manual_seed(T1 * 1000 + T2)
    B = 3
    a1, g1 = randn(B, T1, d, gen=gen), randn(B, T1, p, contiguous=False, gen=gen)
    a2, g2 = randn(B, T2, d, contiguous=False, gen=gen), randn(B, T2, p, gen=gen)
    expected = inner(oracle_linear_grads(a1, g1), oracle_linear_grads(a2, g2))
    assert_rel(ops.linear_cross(a1, g1, a2, g2, backend="triton"), expected)
    assert_rel(ops.linear_cross(a1, g1, a2, g2, backend="torch"), expected)
    # both kernels on the same inputs, whichever the cost rule picks
    assert_rel(ghost_triton(a1, g1, a2, g2, False), expected)
    assert_rel(direct_triton(a1, g1, a2, g2, False), expected)


def make_ids(B, T, vocab, gen, pad_every=4):
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    ids[:, ::pad_every] = -1
    return ids.to(DEVICE)


@pytest.mark.parametrize("B,T,d,vocab", [(3, 37, 19, 5),      # many repeats
                                         (2, 50, 16, 1000),   # few repeats: tiles skipped
                                         (1, 1, 7, 3), (2, 17, 33, 2)])
def test_embedding_norm_sq(B, T, d, vocab):
    gen = torch.Generator().manual_seed(T * 7 + vocab)
    ids = make_ids(B, T, vocab, gen)
    g = randn(B, T, d, contiguous=B != 1, gen=gen)
    G = oracle_embedding_grads(ids, g, vocab)
    got = ops.embedding_norm_sq(ids, g, backend="triton")
    assert_rel(got, inner(G, G))
    assert_rel(got, ops.embedding_norm_sq(ids, g, backend="torch"))


def test_embedding_norm_sq_all_ignored_example():
    gen = torch.Generator().manual_seed(3)
    ids = make_ids(3, 20, 6, gen)
    ids[1] = -1
    g = randn(3, 20, 9, gen=gen)
    got = ops.embedding_norm_sq(ids, g, backend="triton")
    assert got[1].item() == 0.0
    G = oracle_embedding_grads(ids, g, 6)
    assert_rel(got, inner(G, G))


@pytest.mark.parametrize("T1,T2,vocab", [(19, 33, 6), (5, 40, 300), (1, 2, 2)])
def test_embedding_cross(T1, T2, vocab):
    gen = torch.Generator().manual_seed(T1 + T2)
    B, d = 3, 13
    ids1, ids2 = make_ids(B, T1, vocab, gen), make_ids(B, T2, vocab, gen, pad_every=5)
    e1, e2 = randn(B, T1, d, gen=gen), randn(B, T2, d, contiguous=False, gen=gen)
    expected = inner(oracle_embedding_grads(ids1, e1, vocab), oracle_embedding_grads(ids2, e2, vocab))
    assert_rel(ops.embedding_cross(ids1, e1, ids2, e2, backend="triton"), expected)
    assert_rel(ops.embedding_cross(ids1, e1, ids2, e2, backend="torch"), expected)


@pytest.mark.parametrize("T1,T2,d,vocab", [(23, 37, 19, 41), (1, 5, 16, 7), (30, 1, 9, 1000)])
def test_embedding_linear_cross(T1, T2, d, vocab):
    gen = torch.Generator().manual_seed(T1 * T2 + d)
    B = 2
    ids = make_ids(B, T1, vocab, gen)
    e, h = randn(B, T1, d, gen=gen), randn(B, T2, d, contiguous=False, gen=gen)
    z = randn(B, T2, vocab, contiguous=False, gen=gen)
    emb = oracle_embedding_grads(ids, e, vocab)            # [B, V, d]
    head = oracle_linear_grads(h, z)                        # [B, V, d] = zᵀh
    expected = inner(emb, head)
    assert_rel(ops.embedding_linear_cross(ids, e, h, z, backend="triton"), expected)
    assert_rel(ops.embedding_linear_cross(ids, e, h, z, backend="torch"), expected)


@pytest.mark.parametrize("B,T,rows,cols", [(3, 37, 19, 23), (1, 5, 40, 3), (5, 1, 17, 9)])
@pytest.mark.parametrize("splits", [None, 3])
def test_clipped_linear_grad(B, T, rows, cols, splits):
    gen = torch.Generator().manual_seed(B * T + rows)
    left = randn(B, T, rows, contiguous=False, gen=gen)
    right = randn(B, T, cols, gen=gen)
    clip = torch.rand(B, generator=gen).to(DEVICE)
    clip[0] = 0.0
    expected = torch.einsum("b,bpd->pd", clip.double().cpu(), oracle_linear_grads(right, left))
    got = clipped_linear_grad_triton_splits(left, right, clip, splits=splits)
    assert got.dtype == torch.float32 and got.shape == (rows, cols)
    assert_rel(got, expected)
    assert_rel(ops.clipped_linear_grad(left, right, clip, backend="triton"), expected)
    assert_rel(ops.clipped_linear_grad(left, right, clip, backend="torch"), expected)


@pytest.mark.parametrize("B,T,d,vocab", [(3, 37, 19, 11), (1, 1, 5, 3), (4, 9, 130, 1000)])
def test_clipped_embedding_grad(B, T, d, vocab):
    gen = torch.Generator().manual_seed(T + d)
    ids = make_ids(B, T, vocab, gen)
    g = randn(B, T, d, contiguous=False, gen=gen)
    clip = torch.rand(B, generator=gen).to(DEVICE)
    expected = torch.einsum("b,bvd->vd", clip.double().cpu(), oracle_embedding_grads(ids, g, vocab))
    assert_rel(ops.clipped_embedding_grad(ids, g, clip, vocab, backend="triton"), expected)
    assert_rel(ops.clipped_embedding_grad(ids, g, clip, vocab, backend="torch"), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_fp32(dtype):
    """16-bit operands, fp32 accumulation and outputs (oracle on the 16-bit values)."""
    gen = torch.Generator().manual_seed(11)
    a = randn(2, 21, 24, dtype=dtype, gen=gen)
    g = randn(2, 21, 18, dtype=dtype, gen=gen)
    G = oracle_linear_grads(a, g)
    for mode in ("ghost", "direct"):
        got = ops.linear_norm_sq(a, g, mode, backend="triton")
        assert got.dtype == torch.float32
        assert_rel(got, inner(G, G), rtol=1e-3)
    ids = make_ids(2, 21, 5, gen)
    emb = oracle_embedding_grads(ids, g, 5)
    assert_rel(ops.embedding_norm_sq(ids, g, backend="triton"), inner(emb, emb), rtol=1e-3)
    z = randn(2, 21, 5, dtype=dtype, gen=gen)
    h = randn(2, 21, 18, dtype=dtype, gen=gen)
    assert_rel(ops.embedding_linear_cross(ids, g, h, z, backend="triton"),
               inner(emb, oracle_linear_grads(h, z)), rtol=1e-3)
    clip = torch.rand(2, generator=gen).to(DEVICE)
    got = ops.clipped_linear_grad(g, a, clip, backend="triton")
    assert got.dtype == torch.float32
    # the clip factor is folded into g in the operand dtype (as the reference does): 1e-2
    assert_rel(got, torch.einsum("b,bpd->pd", clip.double().cpu(), G), rtol=1e-2)


def test_empty_batch():
    a, g = torch.zeros(0, 5, 8, device=DEVICE), torch.zeros(0, 5, 6, device=DEVICE)
    ids = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    for mode in ("ghost", "direct"):
        assert ops.linear_norm_sq(a, g, mode, backend="triton").shape == (0,)
    assert ops.embedding_norm_sq(ids, a, backend="triton").shape == (0,)
    clip = torch.zeros(0, device=DEVICE)
    assert torch.equal(ops.clipped_linear_grad(g, a, clip, backend="triton"),
                       torch.zeros(6, 8, device=DEVICE))


def test_float64_falls_back_to_reference():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 9, 5, dtype=torch.float64, generator=gen).to(DEVICE)
    g = torch.randn(2, 9, 4, dtype=torch.float64, generator=gen).to(DEVICE)
    got = ops.linear_norm_sq(a, g, "ghost", backend="triton")
    assert got.dtype == torch.float64
    assert torch.equal(got, ops.linear_norm_sq(a, g, "ghost", backend="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_block_config(dtype):
    """Each autotuning candidate of each kernel, run explicitly (all of them on a GPU;
    the interpreter has one), on odd sizes that leave partial tiles of every block."""
    # importlib: vaultkern.ops.embedding_cross is also the name of an op in vaultkern.ops
    clipped_grad, embedding_cross, embedding_norm, linear_norm = (
        importlib.import_module(f"vaultkern.ops.{name}")
        for name in ("clipped_grad", "embedding_cross", "embedding_norm", "linear_norm"))
    gen = torch.Generator().manual_seed(31)
    rtol = FP32_RTOL if dtype == torch.float32 else 1e-2
    B, T, T2, d, p, vocab = (2, 37, 23, 19, 29, 7) if INTERPRET else (2, 150, 70, 90, 200, 40)
    a, g = randn(B, T, d, dtype=dtype, gen=gen), randn(B, T, p, dtype=dtype, gen=gen)
    a2, g2 = randn(B, T2, d, dtype=dtype, gen=gen), randn(B, T2, p, dtype=dtype, gen=gen)
    G, G2 = oracle_linear_grads(a, g), oracle_linear_grads(a2, g2)
    ids, ids2 = make_ids(B, T, vocab, gen), make_ids(B, T2, vocab, gen)
    E, E2 = oracle_embedding_grads(ids, g, vocab), oracle_embedding_grads(ids2, g2, vocab)
    z = randn(B, T2, vocab, dtype=dtype, gen=gen)
    clip = torch.rand(B, generator=gen).to(DEVICE)
    for cfg in linear_norm._GHOST_CONFIGS:
        assert_rel(ghost_triton(a, g, a, g, True, config=cfg), inner(G, G), rtol)
        assert_rel(ghost_triton(a, g, a2, g2, False, config=cfg), inner(G, G2), rtol)
    for cfg in linear_norm.DIRECT_CONFIGS:
        assert_rel(direct_triton(a, g, a, g, True, config=cfg), inner(G, G), rtol)
        assert_rel(direct_triton(a, g, a2, g2, False, config=cfg), inner(G, G2), rtol)
    for cfg in embedding_norm._MATCH_CONFIGS:
        got = embedding_norm.matching_ids_triton(ids, g, ids, g, True, config=cfg)
        assert_rel(got, inner(E, E), rtol)
        got = embedding_norm.matching_ids_triton(ids, g, ids2, g2, False, config=cfg)
        assert_rel(got, inner(E, E2), rtol)
    for cfg in embedding_cross._HEAD_CONFIGS:
        got = embedding_cross.embedding_head_triton(ids, g, g2, z, config=cfg)
        assert_rel(got, inner(E, oracle_linear_grads(g2, z)), rtol)
    for cfg in clipped_grad._MATMUL_CONFIGS:
        expected = torch.einsum("b,bpd->pd", clip.double().cpu(), G)
        for splits in (1, 3):
            got = clipped_linear_grad_triton_splits(g, a, clip, splits=splits, config=cfg)
            assert_rel(got, expected, 1e-2 if dtype == torch.bfloat16 else rtol)


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


# --- GPU only: compiled kernels with bf16 inputs and larger shapes ----------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_linear_ops_large(dtype):
    gen = torch.Generator().manual_seed(0)
    rtol = FP32_RTOL if dtype == torch.float32 else 1e-2
    B, T, d, p = 3, 301, 200, 130
    a = torch.randn(B, T, d, generator=gen).cuda().to(dtype)
    g = torch.randn(B, T, p, generator=gen).cuda().to(dtype)
    G = oracle_linear_grads(a, g)
    for mode in ("ghost", "direct"):
        assert_rel(ops.linear_norm_sq(a, g, mode), inner(G, G), rtol)  # dispatch picks triton
    a2 = torch.randn(B, 77, d, generator=gen).cuda().to(dtype)
    g2 = torch.randn(B, 77, p, generator=gen).cuda().to(dtype)
    expected = inner(G, oracle_linear_grads(a2, g2))
    assert_rel(ghost_triton(a, g, a2, g2, False), expected, rtol)
    assert_rel(direct_triton(a, g, a2, g2, False), expected, rtol)
    clip = torch.rand(B, generator=gen).cuda()
    expected = torch.einsum("b,bpd->pd", clip.double().cpu(), G)
    # bf16 operands: the clip factor is folded in bf16, as the torch reference does
    assert_rel(ops.clipped_linear_grad(g, a, clip), expected, rtol)
    assert_rel(clipped_linear_grad_triton_splits(g, a, clip, splits=4), expected, rtol)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_embedding_ops_large(dtype):
    gen = torch.Generator().manual_seed(1)
    rtol = FP32_RTOL if dtype == torch.float32 else 1e-2
    B, T, d, vocab = 3, 257, 96, 500
    ids = torch.randint(-1, vocab, (B, T), generator=gen).cuda()
    e = torch.randn(B, T, d, generator=gen).cuda().to(dtype)
    h = torch.randn(B, 131, d, generator=gen).cuda().to(dtype)
    z = torch.randn(B, 131, vocab, generator=gen).cuda().to(dtype)
    emb = oracle_embedding_grads(ids, e, vocab)
    assert_rel(ops.embedding_norm_sq(ids, e), inner(emb, emb), rtol)
    assert_rel(ops.embedding_linear_cross(ids, e, h, z), inner(emb, oracle_linear_grads(h, z)), rtol)
    ids2 = torch.randint(-1, vocab, (B, 131), generator=gen).cuda()
    assert_rel(ops.embedding_cross(ids, e, ids2, h), inner(emb, oracle_embedding_grads(ids2, h, vocab)),
               rtol)
    clip = torch.rand(B, generator=gen).cuda()
    assert_rel(ops.clipped_embedding_grad(ids, e, clip, vocab),
               torch.einsum("b,bvd->vd", clip.double().cpu(), emb), rtol)


@needs_gpu
def test_gpu_noise_bf16_keeps_dtype():
    out = draws(1 << 20, dtype=torch.bfloat16, std=2.0, scale=0.5)
    assert out.dtype == torch.bfloat16
    assert abs(out.float().std().item() - 1.0) < 0.01


# --- fused noise + optimizer step --------------------------------------------------------------

from vaultkern.ops import fused_optimizer as fused  # noqa: E402


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
