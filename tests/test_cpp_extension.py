"""CPU kernels of the compiled extension vaultkern._C against float64 oracles.

The oracle forms every example's gradient explicitly in float64 (G_i = g_iᵀa_i
for a linear layer, the V×d table gradient for an embedding) and takes norms
and inner products of those; the kernels never form them. Kernels that _C
keeps out of the dispatch (exported as "_name" because they were not faster
than the torch reference) are tested all the same.

CI builds the extension, so a missing vaultkern._C is a failure here, not a skip.
"""
from __future__ import annotations

import pytest
import torch

from vaultkern.ops.clipped_grad import clipped_embedding_grad_torch
from vaultkern.ops.embedding_cross import embedding_linear_cross_torch
from vaultkern.ops.embedding_norm import embedding_norm_sq_torch
from vaultkern.ops.linear_cross import linear_cross_torch
from vaultkern.ops.linear_norm import linear_norm_sq_torch


KERNELS = ("linear_norm_sq", "linear_cross", "embedding_norm_sq", "embedding_linear_cross",
           "clipped_embedding_grad")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-5}



def kernel(ext, name):
    """The kernel under its op name (in the dispatch) or its '_' name (kept out)."""
    fn = getattr(ext, name, None) or getattr(ext, "_" + name, None)
    assert fn is not None, f"vaultkern._C exports neither {name} nor _{name}"
    return fn


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_rel(got, want, tol, scale=None, what=""):
    """max |got - want| <= tol · scale, scale = |want| elementwise by default."""
    got64, want64 = got.double(), want.double()
    scale = want64.abs() if scale is None else scale.double()
    err = ((got64 - want64).abs() / scale.clamp_min(1e-300)).max().item()
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


# ---------------------------------------------------------------------------
# float64 oracles: explicit per-example gradients
# ---------------------------------------------------------------------------
def linear_grads(a, g):
    """G_i = g_iᵀ a_i, [B, p, d] in float64."""
    return torch.einsum("btp,btd->bpd", g.double(), a.double())


def embedding_grads(ids, g, V):
    """Per-example table gradients [B, V, d] in float64 (ids < 0 skipped)."""
    B, T, d = g.shape
    out = torch.zeros(B, V, d, dtype=torch.float64)
    for i in range(B):
        valid = ids[i] >= 0
        out[i].index_add_(0, ids[i][valid].long(), g[i][valid].double())
    return out


def frob(x, y):
    return (x * y).flatten(1).sum(1)


def odd(t, how):
    """A non-contiguous tensor with the values of t."""
    if how == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "strided":
        big = torch.zeros(t.shape[0], t.shape[1], 2 * t.shape[2], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t


# ---------------------------------------------------------------------------
# linear_norm_sq
# ---------------------------------------------------------------------------
LINEAR_SHAPES = [  # (B, T, d, p): batch 1, T = 1, odd sizes, several Gram tiles, chunks
    (3, 17, 23, 19), (1, 1, 5, 3), (1, 9, 1, 1), (5, 130, 31, 29), (2, 3, 1000, 70), (7, 65, 8, 9),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["ghost", "direct"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_norm_sq_vs_oracle(C, dtype, mode, shape):
    B, T, d, p = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    a, g = rand(gen, B, T, d, dtype=dtype), rand(gen, B, T, p, dtype=dtype)
    got = kernel(C, "linear_norm_sq")(a, g, mode)
    G = linear_grads(a, g)
    assert got.dtype == acc_of(dtype) and got.shape == (B,)
    assert_rel(got, frob(G, G), TOL[dtype], what=f"linear_norm_sq {mode} {shape} {dtype}")


@pytest.mark.parametrize("how", ["transposed", "strided"])
@pytest.mark.parametrize("mode", ["ghost", "direct"])
def test_linear_norm_sq_non_contiguous_and_bf16(C, how, mode):
    gen = torch.Generator().manual_seed(1)
    a, g = rand(gen, 4, 11, 13), rand(gen, 4, 11, 7)
    want = frob(linear_grads(a, g), linear_grads(a, g))
    assert_rel(kernel(C, "linear_norm_sq")(odd(a, how), odd(g, how), mode), want, 1e-5, what=how)
    ab, gb = a.bfloat16(), g.bfloat16()  # bf16 inputs: computed in fp32 from the bf16 values
    Gb = linear_grads(ab, gb)
    got = kernel(C, "linear_norm_sq")(ab, gb, mode)
    assert got.dtype == torch.float32
    assert_rel(got, frob(Gb, Gb), TOL[torch.bfloat16], what="bf16")


def test_inputs_that_require_grad_are_accepted(C):
    a = torch.randn(2, 5, 4, requires_grad=True)
    g = torch.randn(2, 5, 3)
    ids = torch.tensor([[0, 1, 1, -1, 2]] * 2)
    for mode in ("ghost", "direct"):
        assert not kernel(C, "linear_norm_sq")(a, g, mode).requires_grad
    assert kernel(C, "linear_cross")(a, g, a, g).shape == (2,)
    assert kernel(C, "embedding_norm_sq")(ids, a).shape == (2,)
    assert kernel(C, "embedding_linear_cross")(ids, a, a, torch.randn(2, 5, 3)).shape == (2,)
    assert kernel(C, "clipped_embedding_grad")(ids, a, torch.ones(2), 3).shape == (3, 4)


def test_linear_norm_sq_zero_rows_and_bad_mode(C):
    a, g = torch.randn(3, 4, 5), torch.randn(3, 4, 6)
    g[1] = 0  # a padding row: gradient 0, norm 0
    for mode in ("ghost", "direct"):
        assert kernel(C, "linear_norm_sq")(a, g, mode)[1].item() == 0.0
    with pytest.raises(RuntimeError, match="mode"):
        kernel(C, "linear_norm_sq")(a, g, "fast")
    with pytest.raises(RuntimeError, match="positions"):
        kernel(C, "linear_norm_sq")(a, g[:, :3], "ghost")


# ---------------------------------------------------------------------------
# linear_cross
# ---------------------------------------------------------------------------
CROSS_SHAPES = [  # (B, T1, T2, d, p); the kernel picks ghost when 2·T1·T2 < d·p
    (3, 7, 5, 11, 13),       # ghost
    (2, 40, 30, 5, 6),       # direct
    (1, 1, 1, 3, 2),         # B = 1, T = 1
    (2, 300, 5, 40, 80),     # ghost, T1 past one 256-tile
    (3, 9, 12, 1000, 3),     # direct, several row tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", CROSS_SHAPES)
def test_linear_cross_vs_oracle(C, dtype, shape):
    B, T1, T2, d, p = shape
    gen = torch.Generator().manual_seed(sum(shape))
    a1, g1 = rand(gen, B, T1, d, dtype=dtype), rand(gen, B, T1, p, dtype=dtype)
    a2, g2 = rand(gen, B, T2, d, dtype=dtype), rand(gen, B, T2, p, dtype=dtype)
    got = kernel(C, "linear_cross")(a1, g1, odd(a2, "strided"), odd(g2, "transposed"))
    G1, G2 = linear_grads(a1, g1), linear_grads(a2, g2)
    # Cross terms can cancel to ~0: measure the error against ‖G1‖·‖G2‖ (Cauchy–Schwarz).
    scale = frob(G1, G1).sqrt() * frob(G2, G2).sqrt()
    assert got.dtype == acc_of(dtype)
    assert_rel(got, frob(G1, G2), TOL[dtype], scale=scale, what=f"linear_cross {shape} {dtype}")


def test_linear_cross_of_a_use_with_itself_is_its_norm(C):
    gen = torch.Generator().manual_seed(3)
    a, g = rand(gen, 2, 10, 6), rand(gen, 2, 10, 4)
    assert_rel(kernel(C, "linear_cross")(a, g, a, g), kernel(C, "linear_norm_sq")(a, g, "direct"), 1e-5)


# ---------------------------------------------------------------------------
# embedding_norm_sq, embedding_linear_cross, clipped_embedding_grad
# ---------------------------------------------------------------------------
EMB_SHAPES = [(3, 20, 7, 5), (1, 1, 4, 3), (2, 33, 9, 259), (4, 6, 1, 2)]  # (B, T, d, V)


def random_ids(gen, B, T, V):
    ids = torch.randint(-1, V, (B, T), generator=gen)  # -1: padding, skipped
    ids[0, 0] = V - 1
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", EMB_SHAPES)
def test_embedding_norm_sq_vs_oracle(C, dtype, shape):
    B, T, d, V = shape
    gen = torch.Generator().manual_seed(V + T)
    ids, g = random_ids(gen, B, T, V), rand(gen, B, T, d, dtype=dtype)
    G = embedding_grads(ids, g, V)
    got = kernel(C, "embedding_norm_sq")(ids, odd(g, "strided"))
    assert got.dtype == acc_of(dtype)
    assert_rel(got, frob(G, G), TOL[dtype], scale=frob(G, G).clamp_min(1e-30), what=str(shape))
    got32 = kernel(C, "embedding_norm_sq")(ids.int(), g)  # int32 ids are accepted too
    assert_rel(got32, frob(G, G), TOL[dtype], scale=frob(G, G).clamp_min(1e-30), what="int32 ids")


def test_embedding_norm_sq_all_padding(C):
    ids = torch.full((2, 5), -1)
    assert kernel(C, "embedding_norm_sq")(ids, torch.randn(2, 5, 3)).abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 20, 17, 7, 5), (1, 1, 1, 4, 3), (2, 70, 130, 9, 259)])
def test_embedding_linear_cross_vs_oracle(C, dtype, shape):
    B, T1, T2, d, V = shape
    gen = torch.Generator().manual_seed(T1 * T2)
    ids = random_ids(gen, B, T1, V)
    e, h, z = rand(gen, B, T1, d, dtype=dtype), rand(gen, B, T2, d, dtype=dtype), rand(gen, B, T2, V, dtype=dtype)
    G_emb = embedding_grads(ids, e, V)
    G_head = torch.einsum("bsv,bsd->bvd", z.double(), h.double())  # LM head: zᵀh
    got = kernel(C, "embedding_linear_cross")(ids, odd(e, "transposed"), h, odd(z, "strided"))
    scale = frob(G_emb, G_emb).sqrt() * frob(G_head, G_head).sqrt()
    assert got.dtype == acc_of(dtype)
    assert_rel(got, frob(G_emb, G_head), TOL[dtype], scale=scale.clamp_min(1e-30), what=str(shape))


def test_embedding_linear_cross_rejects_ids_past_the_head(C):
    ids = torch.tensor([[0, 5]])
    with pytest.raises(RuntimeError, match="id 5"):
        kernel(C, "embedding_linear_cross")(ids, torch.randn(1, 2, 3), torch.randn(1, 4, 3), torch.randn(1, 4, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", EMB_SHAPES)
def test_clipped_embedding_grad_vs_oracle(C, dtype, shape):
    B, T, d, V = shape
    gen = torch.Generator().manual_seed(B * V)
    ids, g = random_ids(gen, B, T, V), rand(gen, B, T, d, dtype=dtype)
    clip = torch.rand(B, generator=gen, dtype=torch.float64).to(dtype)
    want = (embedding_grads(ids, g, V) * clip.double().view(-1, 1, 1)).sum(0)
    got = kernel(C, "clipped_embedding_grad")(ids, odd(g, "transposed"), clip, V)
    assert got.shape == (V, d) and got.dtype == acc_of(dtype)
    scale = want.abs().sum(1, keepdim=True).clamp_min(1e-30).expand_as(want)  # per-row scale
    assert_rel(got, want, TOL[dtype], scale=scale, what=str(shape))


def test_clipped_embedding_grad_errors(C):
    ids, g, clip = torch.tensor([[0, 1], [2, 7]]), torch.randn(2, 2, 3), torch.ones(2)
    with pytest.raises(RuntimeError, match="id 7 at \\[1, 1\\]"):
        kernel(C, "clipped_embedding_grad")(ids, g, clip, 5)
    with pytest.raises(RuntimeError, match="clip"):
        kernel(C, "clipped_embedding_grad")(ids.clamp(max=4), g, torch.ones(3), 5)


# ---------------------------------------------------------------------------
# agreement with the torch references and thread-count independence
# ---------------------------------------------------------------------------
def reference_cases(gen):
    a, g = rand(gen, 5, 70, 24), rand(gen, 5, 70, 20)
    a2, g2 = rand(gen, 5, 9, 24), rand(gen, 5, 9, 20)
    ids, e = random_ids(gen, 5, 70, 50), rand(gen, 5, 70, 12)
    h, z = rand(gen, 5, 30, 12), rand(gen, 5, 30, 50)
    clip = torch.rand(5, generator=gen)
    return [
        ("linear_norm_sq", linear_norm_sq_torch, (a, g, "ghost")),
        ("linear_norm_sq", linear_norm_sq_torch, (a, g, "direct")),
        ("linear_cross", linear_cross_torch, (a, g, a2, g2)),
        ("embedding_norm_sq", embedding_norm_sq_torch, (ids, e)),
        ("embedding_linear_cross", embedding_linear_cross_torch, (ids, e, h, z)),
        ("clipped_embedding_grad", clipped_embedding_grad_torch, (ids, e, clip, 50)),
    ]


def test_kernels_match_torch_reference(C):
    for name, ref, args in reference_cases(torch.Generator().manual_seed(5)):
        want = ref(*args)
        got = kernel(C, name)(*args)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), msg=name)


def test_results_do_not_depend_on_thread_count(C, threads):
    cases = reference_cases(torch.Generator().manual_seed(6))
    results = {}
    for n in (1, 2):
        torch.set_num_threads(n)
        results[n] = [kernel(C, name)(*args) for name, _, args in cases]
    for (name, _, _), one, two in zip(cases, results[1], results[2]):
        torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6 * one.abs().max().item(), msg=name)


def test_every_kernel_is_exported_once(C):
    for name in KERNELS:
        assert hasattr(C, name) != hasattr(C, "_" + name), \
            f"{name}: export exactly one of {name} (dispatched) and _{name} (kept out)"


def test_build_info(C):
    info = C.build_info()
    assert set(info) >= {"cuda", "openmp", "version"}
    from vaultkern._version import __version__
    assert info["version"] == __version__
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
