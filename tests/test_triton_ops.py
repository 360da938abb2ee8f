"""Triton kernels of vaultkern.ops against float64 oracles and the torch references.

The oracles form every example's gradient explicitly in float64 (G_i = g_iᵀ a_i,
the V×d embedding gradient by index_add, ...) and take norms / inner products of
those, so they share no algebra with the ghost / direct / tiled kernels.

Runs compiled on a CUDA GPU, or on the CPU under ``TRITON_INTERPRET=1`` (then
with tiny shapes and one small block configuration per kernel).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from triton_setup import DEVICE, FP32_RTOL, INTERPRET, assert_rel, needs_gpu, randn, runs_triton

pytestmark = runs_triton
triton = pytest.importorskip("triton")

from vaultkern import ops  # noqa: E402
from vaultkern.ops.clipped_grad import clipped_linear_grad_triton_splits  # noqa: E402
from vaultkern.ops.linear_norm import direct_triton, ghost_triton  # noqa: E402

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
