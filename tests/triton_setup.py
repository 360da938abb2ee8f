"""What the Triton op tests share: where they run (a CUDA GPU, or the CPU under
``TRITON_INTERPRET=1``), random inputs there, and the relative-error check."""
from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# each test module of Triton ops: pytestmark = runs_triton
runs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRET),
                                 reason="needs a CUDA GPU or TRITON_INTERPRET=1")
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
