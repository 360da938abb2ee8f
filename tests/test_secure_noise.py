"""ChaCha20 (RFC 8439) stream and the Gaussian noise built on it (vaultkern._C).

Known-answer tests from RFC 8439, an independent re-derivation of the
documented sample construction (csrc/chacha20.h), statistics of >= 1e6 draws
under a fixed key (deterministic), and the CUDA stream against the CPU stream
(GPU only). CI builds the extension, so a missing vaultkern._C fails here.
"""
from __future__ import annotations

import functools
import math
import struct

import numpy as np
import pytest
import torch
from scipy import stats


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KEY = torch.arange(32, dtype=torch.uint8)              # RFC 8439 §2.3.2 / §2.4.2 key 00..1f
NONCE_232 = torch.tensor([0, 0, 0, 9, 0, 0, 0, 0x4A, 0, 0, 0, 0], dtype=torch.uint8)
NONCE_242 = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0x4A, 0, 0, 0, 0], dtype=torch.uint8)
N = 1_000_000


def noisy_scale_fn(ext):
    """The extension's reproducible noisy_scale, called as the op calls it (the adapter turns
    the seed into the 256-bit master key)."""
    assert hasattr(ext, "noisy_scale"), "vaultkern._C does not export noisy_scale"
    from vaultkern import ops
    return functools.partial(ops.noisy_scale, backend="cpp")


def nonce(i: int) -> torch.Tensor:
    return torch.tensor(list(struct.pack("<III", i, 7, 11)), dtype=torch.uint8)


@pytest.fixture(scope="module")
def million(C):
    """1e6 draws under a fixed key (float64), shared by the statistics tests."""
    return C.gaussian(N, KEY, nonce(1), 0, dtype=torch.float64).numpy()


# ---------------------------------------------------------------------------
# RFC 8439 known answers
# ---------------------------------------------------------------------------
def test_rfc8439_block_function_2_3_2(C):
    want = bytes.fromhex(
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")
    got = C.chacha20_block(KEY, 1, NONCE_232)
    assert got.dtype == torch.uint8 and got.shape == (64,)
    assert bytes(got.tolist()) == want


def test_rfc8439_encryption_2_4_2(C):
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
                 b"for the future, sunscreen would be it.")
    want = bytes.fromhex(
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
        "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d")
    stream = C.chacha20_stream(KEY, NONCE_242, 1, len(plaintext))
    assert stream.shape == (len(plaintext),)
    assert bytes(p ^ k for p, k in zip(plaintext, stream.tolist())) == want


def test_stream_is_consecutive_blocks(C):
    stream = C.chacha20_stream(KEY, NONCE_232, 5, 3 * 64 + 10)
    for b in range(3):
        assert torch.equal(stream[64 * b: 64 * b + 64], C.chacha20_block(KEY, 5 + b, NONCE_232))
    assert torch.equal(stream[192:], C.chacha20_block(KEY, 8, NONCE_232)[:10])


def test_stream_argument_errors(C):
    with pytest.raises(RuntimeError, match="key must be a uint8 tensor of 32 bytes"):
        C.chacha20_block(KEY[:31], 0, NONCE_232)
    with pytest.raises(RuntimeError, match="nonce"):
        C.chacha20_stream(KEY, NONCE_232.int(), 0, 64)
    with pytest.raises(RuntimeError, match="counter"):
        C.chacha20_stream(KEY, NONCE_232, 2**32 - 1, 65)  # would run past 2^32 blocks
    with pytest.raises(RuntimeError, match="counter"):
        C.gaussian(10, KEY, NONCE_232, -1)


# ---------------------------------------------------------------------------
# The documented sampler, re-derived from the raw stream
# ---------------------------------------------------------------------------
def gaussian_from_stream(stream: bytes, j: int) -> float:
    """Sample j: block j//2 as 8 little-endian 64-bit words -> 4 Box–Muller pairs (u1 from
    word 2p, u2 from word 2p+1, top 53 bits each) -> ½ Σ_p r_p cos θ_p for an even j,
    ½ Σ_p r_p sin θ_p for an odd one: four independent draws per sample."""
    words = struct.unpack("<8Q", stream[64 * (j // 2): 64 * (j // 2) + 64])
    total = 0.0
    for pair in range(4):
        u1 = ((words[2 * pair] >> 11) + 1) * 2.0**-53       # (0, 1]
        u2 = (words[2 * pair + 1] >> 11) * 2.0**-53         # [0, 1)
        r, theta = math.sqrt(-2.0 * math.log(u1)), 2.0 * math.pi * u2
        total += r * (math.cos(theta) if j % 2 == 0 else math.sin(theta))
    return 0.5 * total


@pytest.mark.parametrize("counter, n", [(3, 9), (5, 37), (0, 16), (11, 1), (7, 601)])
def test_gaussian_follows_documented_construction(C, counter, n):
    """Also across the 8- and 16-block groups of the AVX2 and AVX-512 paths, their partial
    last group and the 256-block buffers."""
    stream = bytes(C.chacha20_stream(KEY, nonce(2), counter, 64 * ((n + 1) // 2)).tolist())
    got = C.gaussian(n, KEY, nonce(2), counter, dtype=torch.float64)
    want = torch.tensor([gaussian_from_stream(stream, j) for j in range(n)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_gaussian_splits_are_launch_independent(C):
    whole = C.gaussian(1001, KEY, nonce(3), 0, dtype=torch.float64)
    assert torch.equal(whole[4:], C.gaussian(997, KEY, nonce(3), 2, dtype=torch.float64))
    assert torch.equal(whole[:10], C.gaussian(10, KEY, nonce(3), 0, dtype=torch.float64))
    as32 = C.gaussian(1001, KEY, nonce(3), 0)  # float32 by default: rounded from the same doubles
    assert as32.dtype == torch.float32 and torch.equal(as32, whole.float())
    assert C.gaussian(0, KEY, nonce(3), 0).shape == (0,)


def test_gaussian_does_not_depend_on_thread_count(C):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.gaussian(100_003, KEY, nonce(4), 0)
        torch.set_num_threads(2)
        two = C.gaussian(100_003, KEY, nonce(4), 0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


# ---------------------------------------------------------------------------
# Statistics of 1e6 draws (fixed key: deterministic)
# ---------------------------------------------------------------------------
def test_gaussian_mean_variance(million):
    x = million
    # 5-sigma bounds: sd(mean) = 1/sqrt(N), sd(var) ≈ sqrt(2/N).
    assert abs(x.mean()) < 5 / math.sqrt(N)
    assert abs(x.var() - 1.0) < 5 * math.sqrt(2 / N)
    assert abs(stats.kurtosis(x)) < 5 * math.sqrt(24 / N)  # excess kurtosis of N(0,1) is 0
    assert np.isfinite(x).all()


def test_gaussian_kolmogorov_smirnov(million):
    result = stats.kstest(million, "norm")
    assert result.pvalue > 1e-3, f"KS statistic {result.statistic:.2e}, p = {result.pvalue:.2e}"


def test_gaussian_lag1_and_cross_stream_correlation(C, million):
    bound = 5 / math.sqrt(N)
    x = million
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < bound   # within and across block halves
    assert abs(np.corrcoef(x[0::2], x[1::2])[0, 1]) < 5 / math.sqrt(N / 2)  # the two samples of a block
    other_nonce = C.gaussian(N, KEY, nonce(2), 0, dtype=torch.float64).numpy()
    assert abs(np.corrcoef(x, other_nonce)[0, 1]) < bound
    other_counter = C.gaussian(N, KEY, nonce(1), N // 2, dtype=torch.float64).numpy()  # next N draws
    assert abs(np.corrcoef(x, other_counter)[0, 1]) < bound
    other_key = C.gaussian(N, torch.flip(KEY, [0]), nonce(1), 0, dtype=torch.float64).numpy()
    assert abs(np.corrcoef(x, other_key)[0, 1]) < bound


# ---------------------------------------------------------------------------
# secure_noisy_scale and noisy_scale
# ---------------------------------------------------------------------------
def test_secure_noisy_scale_statistics_on_zeros(C):
    std, scale = 3.0, 0.25
    out = C.secure_noisy_scale(torch.zeros(N), std, scale, KEY, nonce(9))
    assert out.dtype == torch.float32 and out.shape == (N,)
    assert abs(out.double().mean().item()) < 5 * std * scale / math.sqrt(N)
    assert abs(out.double().std().item() / (std * scale) - 1) < 5 / math.sqrt(2 * N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_secure_noisy_scale_formula_dtype_and_layout(C, dtype):
    summed = torch.randn(6, 50, dtype=torch.float64).to(dtype).t()  # non-contiguous [50, 6]
    out = C.secure_noisy_scale(summed, 2.0, 0.5, KEY, nonce(5))
    assert out.dtype == dtype and out.shape == summed.shape
    xi = C.gaussian(summed.numel(), KEY, nonce(5), 0, dtype=torch.float64).view(summed.shape)
    want = ((summed.contiguous().double() + 2.0 * xi) * 0.5).to(dtype)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(C.secure_noisy_scale(summed, 0.0, 3.0, KEY, nonce(5)),
                               (summed.double() * 3.0).to(dtype), rtol=0, atol=0)


def test_secure_noisy_scale_wrapper_draws_fresh_keys(C):  # C: fails clearly if not built
    from vaultkern.ops.noise import secure_noisy_scale
    zeros = torch.zeros(1000)
    first, second = secure_noisy_scale(zeros, 1.0, 1.0), secure_noisy_scale(zeros, 1.0, 1.0)
    assert not torch.equal(first, second)  # os.urandom keys: independent draws


def test_noisy_scale_is_reproducible_and_offset_addressed(C):
    fn = noisy_scale_fn(C)
    x = torch.randn(1001)
    full = fn(x, 1.5, 0.5, seed=7, step=3, offset=0)
    assert torch.equal(full, fn(x, 1.5, 0.5, seed=7, step=3, offset=0))
    # element j uses draw offset + j: a slice at its own offset gives the same values
    assert torch.equal(full[5:], fn(x[5:], 1.5, 0.5, seed=7, step=3, offset=5))
    assert torch.equal(full[:-1], fn(x[:-1], 1.5, 0.5, seed=7, step=3, offset=0))
    assert not torch.equal(full, fn(x, 1.5, 0.5, seed=7, step=4, offset=0))   # new step
    assert not torch.equal(full, fn(x, 1.5, 0.5, seed=8, step=3, offset=0))   # new seed
    two_d = fn(x[:1000].view(20, 50).t(), 1.5, 0.5, seed=7, step=3, offset=0)  # non-contiguous
    assert two_d.shape == (50, 20)
    assert torch.equal(two_d.contiguous().view(-1), fn(x[:1000].view(20, 50).t().contiguous().view(-1),
                                                       1.5, 0.5, seed=7, step=3, offset=0))


def test_noisy_scale_statistics_and_independence_across_steps(C):
    fn = noisy_scale_fn(C)
    zeros = torch.zeros(N, dtype=torch.float64)
    a = fn(zeros, 2.0, 1.0, seed=1, step=0, offset=0).numpy() / 2.0
    b = fn(zeros, 2.0, 1.0, seed=1, step=1, offset=0).numpy() / 2.0
    assert abs(a.mean()) < 5 / math.sqrt(N) and abs(a.var() - 1) < 5 * math.sqrt(2 / N)
    assert stats.kstest(a, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(N)


def test_noise_argument_errors(C):
    with pytest.raises(RuntimeError, match="std must be >= 0"):
        C.secure_noisy_scale(torch.zeros(3), -1.0, 1.0, KEY, nonce(0))
    with pytest.raises(RuntimeError, match="floating-point"):
        C.secure_noisy_scale(torch.zeros(3, dtype=torch.int64), 1.0, 1.0, KEY, nonce(0))
    with pytest.raises(RuntimeError, match="offset must be >= 0"):
        noisy_scale_fn(C)(torch.zeros(3), 1.0, 1.0, seed=0, step=0, offset=-2)


# ---------------------------------------------------------------------------
# CUDA: the same stream and samples on the GPU
# ---------------------------------------------------------------------------
@pytest.fixture
def cuda_C(C):
    assert C.build_info()["cuda"], "a CUDA GPU is present but vaultkern._C was built without CUDA"
    return C


@pytest.mark.gpu
@needs_cuda
def test_cuda_stream_equals_cpu_stream(cuda_C):
    C = cuda_C
    for counter, nbytes in ((1, 114), (0, 64 * 4097 + 3), (2**32 - 3, 3 * 64)):
        gpu = C.chacha20_stream(KEY, NONCE_242, counter, nbytes, device="cuda")
        assert gpu.is_cuda and gpu.dtype == torch.uint8
        assert torch.equal(gpu.cpu(), C.chacha20_stream(KEY, NONCE_242, counter, nbytes))


@pytest.mark.gpu
@needs_cuda
def test_cuda_gaussian_and_noise_match_cpu(cuda_C):
    C = cuda_C
    cpu = C.gaussian(100_001, KEY, nonce(1), 3, dtype=torch.float64)
    gpu = C.gaussian(100_001, KEY, nonce(1), 3, dtype=torch.float64, device=torch.device("cuda"))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)  # libm vs CUDA math: ulps
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        summed = torch.randn(333, 7).to(dtype)
        gpu = C.secure_noisy_scale(summed.cuda(), 2.0, 0.5, KEY, nonce(2))
        assert gpu.is_cuda and gpu.dtype == dtype and gpu.shape == summed.shape
        torch.testing.assert_close(gpu.cpu(), C.secure_noisy_scale(summed, 2.0, 0.5, KEY, nonce(2)))
        fn = noisy_scale_fn(C)
        torch.testing.assert_close(fn(summed.cuda(), 2.0, 0.5, seed=3, step=4, offset=5).cpu(),
                                   fn(summed, 2.0, 0.5, seed=3, step=4, offset=5))


@pytest.mark.gpu
@needs_cuda
def test_cuda_noise_statistics(cuda_C):
    out = cuda_C.secure_noisy_scale(torch.zeros(4 * N, device="cuda"), 2.0, 1.0, KEY, nonce(6)) / 2.0
    x = out.double().cpu().numpy()
    assert abs(x.mean()) < 5 / math.sqrt(4 * N) and abs(x.var() - 1) < 5 * math.sqrt(2 / (4 * N))
    assert stats.kstest(x[:N], "norm").pvalue > 1e-3
