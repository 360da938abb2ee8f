"""Shared plumbing for the Triton implementations of :mod:`vaultkern.ops`.

The op files define their kernels with ``@triton.jit`` at module level. When
Triton is not importable (a CPU-only install), :data:`triton` and :data:`tl`
are small stand-ins whose decorators return the function unchanged, so the
package still imports; such a kernel is never called, because
``Op.available("triton")`` is False without Triton.

Conventions of every launcher:

* accumulation is fp32 whatever the input dtype (fp32 / bf16 / fp16);
* fp32 inputs use ``tl.dot(..., input_precision="ieee")`` so that neither the
  GPU (tf32) nor anything else rounds the operands: fp32 results agree with
  the float64 oracle to ~1e-6 relative;
* float64 inputs fall back to the torch reference: Triton's fp64 ``tl.dot``
  runs on no tensor core and is slower than cuBLAS' DGEMM, so a kernel gains
  nothing there;
* partial sums are written to a buffer and summed by torch afterwards rather
  than combined with atomics, so results are deterministic (bit-identical from
  run to run). Autotuned kernels launch a config-dependent number of programs
  into a buffer sized for the most; :func:`zero_partial`, a pre-hook of every
  candidate config, clears it before each launch, so slots a launch does not
  write are 0 and timing runs leave nothing behind.
"""
from __future__ import annotations

import functools
import os
import types
from typing import List, Sequence

import torch

try:  # pragma: no cover - depends on the machine
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton absent (CPU-only installs)
    HAVE_TRITON = False

    def _identity_decorator(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    triton = types.SimpleNamespace(jit=_identity_decorator, autotune=_identity_decorator,
                                   heuristics=_identity_decorator,
                                   Config=lambda *a, **k: None,
                                   cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=int)


def interpreted() -> bool:
    """True when Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def zero_partial(nargs: dict) -> None:
    """Autotune pre-hook: clear the ``partial_ptr`` buffer before every launch."""
    nargs["partial_ptr"].zero_()


def configs(gpu: Sequence[dict], interpreter: dict, num_warps: Sequence[int] = (4,),
            num_stages: Sequence[int] = (3,), pre_hook=None) -> List["triton.Config"]:
    """Autotune candidates: the GPU list, or one small config under the interpreter.

    Each GPU entry holds meta-parameters, optionally with its own ``num_warps``
    / ``num_stages``; entries without them are tried with every listed value.
    Under the interpreter every candidate would be run (slowly) to time it, so
    only ``interpreter`` is offered there and autotuning is a no-op.

    ``pre_hook`` runs before every launch of a candidate, when timing it and
    when running the chosen one (Triton calls a Config's pre_hook in both).
    """
    if interpreted():
        return [triton.Config(dict(interpreter), num_warps=1, num_stages=1, pre_hook=pre_hook)]
    out = []
    for entry in gpu:
        meta = {k: v for k, v in entry.items() if k not in ("num_warps", "num_stages")}
        for w in ([entry["num_warps"]] if "num_warps" in entry else num_warps):
            for s in ([entry["num_stages"]] if "num_stages" in entry else num_stages):
                out.append(triton.Config(meta, num_warps=w, num_stages=s, pre_hook=pre_hook))
    return out


def autotune_enabled() -> bool:
    """``VAULTKERN_AUTOTUNE=0`` (read at import) keeps only each kernel's first candidate.

    Autotuning times every candidate at every new shape; a GPU test run can skip
    that (the per-config tests still run every candidate explicitly).
    """
    return os.environ.get("VAULTKERN_AUTOTUNE", "1") != "0"


def tuned(candidates: Sequence["triton.Config"]) -> List["triton.Config"]:
    """The candidates an autotuned kernel times: all, or the first when autotuning is off."""
    return list(candidates) if autotune_enabled() else list(candidates[:1])


def launch(kernel, grid, args: tuple, meta: dict, config=None) -> None:
    """Run an autotuned ``kernel``, or with ``config`` its plain JIT function in that config.

    The explicit form (used by tests that check every candidate, and by benches)
    runs the config's pre-hook first, as the autotuner would.
    """
    if config is None:
        kernel[grid](*args, **meta)
        return
    if config.pre_hook is not None:
        config.pre_hook({**dict(zip(kernel.fn.arg_names, args)), **meta})
    kernel.fn[grid](*args, **meta, **config.all_kwargs())


def uses_reference(*tensors: torch.Tensor) -> bool:
    """True if a launcher should hand over to the torch reference (float64 inputs)."""
    return any(t.dtype == torch.float64 for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 for fp32 operands, native otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype ``tl.dot`` operands share (mixed inputs are promoted).

    Under the interpreter bf16 becomes fp32: Triton's interpreter (3.8) computes
    ``tl.dot`` of bf16 operands on their raw bits (numpy has no bf16), while
    loads, converts and stores of bf16 are right. The upcast is exact, so the
    interpreter still checks the kernels on the bf16 values; compiled kernels
    keep bf16 operands for the tensor cores.
    """
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype == torch.bfloat16 and interpreted():
        dtype = torch.float32
    return dtype


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (no copy when it already is; strides are kept)."""
    return t if t.dtype == dtype else t.to(dtype)


def num_tile_pairs(n1: int, n2: int, symmetric: bool) -> int:
    """Programs a tile-pair grid launches: i ≤ j pairs of n1 tiles, or all n1·n2."""
    return n1 * (n1 + 1) // 2 if symmetric else n1 * n2


@triton.jit
def tile_pair(pair, n2, SYMMETRIC: tl.constexpr):
    """Row and column tile (i, j) of program ``pair`` in a tile-pair grid.

    Symmetric grids number the pairs i ≤ j column by column,
    pair = j(j+1)/2 + i, which does not depend on the number of tiles; j comes
    from the square root, corrected by one where fp32 rounding misses. Other
    grids are row-major over n2 column tiles.
    """
    pair = pair.to(tl.int64)
    if SYMMETRIC:
        j = ((tl.sqrt(8.0 * pair.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int64)
        j = tl.where((j + 1) * (j + 2) // 2 <= pair, j + 1, j)
        j = tl.where(j * (j + 1) // 2 > pair, j - 1, j)
        i = pair - j * (j + 1) // 2
    else:
        i = pair // n2
        j = pair % n2
    return i, j


@functools.lru_cache(maxsize=None)
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s CUDA device (a nominal 4 off-GPU)."""
    return _cuda_sms(t.device.index or 0) if t.is_cuda else 4
