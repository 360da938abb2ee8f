"""Kernel benchmark: each vaultkern op's Triton kernel against the Opacus-style torch
formula and against its two floors, on the GPU it runs on.

    PYTHONPATH=. python3 bench/kernels.py --out bench/results       # GPU (~3 min on an H100)
    PYTHONPATH=. python3 bench/kernels.py --cpu                      # CPU: torch vs cpp extension
    TRITON_INTERPRET=1 PYTHONPATH=. python3 bench/kernels.py --dry-run   # tiny shapes, any machine

For every case it reports (times are medians of triton.testing.do_bench on a GPU,
of time.perf_counter repeats otherwise):

* ``triton_ms``  - the Triton implementation (what dispatch runs for CUDA tensors);
* ``torch_ms``   - the torch reference, i.e. the Opacus-style formula: Gram matrices
  (or per-example p×d gradients, or scaled copies) materialised in memory;
* extra baselines where one is meaningful (``cublas_ms``: the non-private weight
  gradient, one plain matmul);
* ``floor_ms`` = max(bytes / peak bandwidth, flops / peak matmul rate), with the peak
  bandwidth (a large device copy) and the bf16 / fp32 matmul rates (large matmuls)
  *measured at start on this GPU*; ``of_floor`` = floor_ms / triton_ms (1.0 = at the
  floor);
* ``rel_err``    - max |triton - torch| / max |torch| on the case's inputs.

The byte and flop counts of each case are the formula's essentials (inputs read once,
outputs written once, the flops of the cheapest exact evaluation the kernel uses);
bench/NOTES.md "## Kernels" derives them.

Writes ``<out>/kernels-<date>-<gpu>.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from vaultkern import ops  # noqa: F401  (registers the ops in ALL_OPS)
from vaultkern.ops import fused_optimizer  # noqa: F401  (registers noisy_sgd_ / noisy_adamw_)
from vaultkern.backend import ALL_OPS
from vaultkern.benchmark.machine import machine_meta

# ---------------------------------------------------------------------------------------------
# timing


def timer_gpu(fn: Callable[[], object]) -> Tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn on the current CUDA device."""
    import triton.testing
    out = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return tuple(float(x) for x in out)


def timer_cpu(fn: Callable[[], object], repeats: int = 7) -> Tuple[float, float, float]:
    """(median, min, max) milliseconds of fn over ``repeats`` calls after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), min(samples), max(samples)


# ---------------------------------------------------------------------------------------------
# peaks of this machine, measured


def measure_peaks(device: str, timer) -> Dict[str, float]:
    """Peak copy bandwidth (bytes/s) and matmul rates (flop/s) measured on ``device``."""
    on_gpu = device == "cuda"
    n_bytes = (1 << 30) if on_gpu else (1 << 24)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))[0]
    del src, dst
    peaks = {"bandwidth_Bps": 2 * n_bytes / (copy_ms * 1e-3)}
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 floor is for exact fp32 work
    try:
        for name, dtype, n in (("bf16", torch.bfloat16, 8192 if on_gpu else 256),
                               ("fp32", torch.float32, 8192 if on_gpu else 256)):
            x = torch.randn(n, n, device=device).to(dtype)
            y = torch.randn(n, n, device=device).to(dtype)
            ms = timer(lambda: x @ y)[0]
            peaks[f"matmul_{name}_flops"] = 2 * n ** 3 / (ms * 1e-3)
            del x, y
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return peaks


# ---------------------------------------------------------------------------------------------
# cases


@dataclasses.dataclass
class Case:
    """One op at one shape: how to make its inputs and what its floors count."""
    op: str                              # name in vaultkern.ops
    label: str                           # what layer / model the shape stands for
    shape: Dict[str, int]
    dtype: torch.dtype
    make: Callable[[str], tuple]         # device -> (args, kwargs)
    bytes: float                         # essential memory traffic
    flops: float                         # essential flops (0: memory-bound op)
    extra: Dict[str, Callable] = dataclasses.field(default_factory=dict)  # baselines: args -> out


def _esize(dtype):
    return torch.empty(0, dtype=dtype).element_size()


def zipf_ids(B, T, vocab, device, pad_fraction=0.0):
    """Token ids with a Zipf(1) rank distribution over the vocabulary, like text."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = (1.0 / ranks) / (1.0 / ranks).sum()
    ids = torch.multinomial(probs.float(), B * T, replacement=True).view(B, T)
    ids = ids[:, torch.randperm(T)] if T > 1 else ids
    if pad_fraction:
        ids[:, int(T * (1 - pad_fraction)):] = -1
    return ids.to(device)


def linear_norm_case(label, B, T, d, p, mode, dtype):
    es = _esize(dtype)
    flops = B * T * (T + 1) * (d + p) if mode == "ghost" else 2 * B * T * d * p

    def make(device):
        a = torch.randn(B, T, d, device=device, dtype=dtype)
        g = torch.randn(B, T, p, device=device, dtype=dtype)
        return (a, g, mode), {}
    return Case("linear_norm_sq", f"{label} ({mode})", dict(B=B, T=T, d=d, p=p), dtype, make,
                bytes=B * T * (d + p) * es, flops=flops)


def linear_cross_case(label, B, T1, T2, d, p, dtype):
    es = _esize(dtype)
    ghost = 2 * T1 * T2 < d * p
    flops = 2 * B * T1 * T2 * (d + p) if ghost else 2 * B * (T1 + T2) * d * p

    def make(device):
        t = lambda T, n: torch.randn(B, T, n, device=device, dtype=dtype)  # noqa: E731
        return (t(T1, d), t(T1, p), t(T2, d), t(T2, p)), {}
    return Case("linear_cross", f"{label} ({'ghost' if ghost else 'direct'})",
                dict(B=B, T1=T1, T2=T2, d=d, p=p), dtype, make,
                bytes=B * (T1 + T2) * (d + p) * es, flops=flops)


def embedding_norm_case(label, B, T, d, vocab, dtype):
    es = _esize(dtype)

    def make(device):
        return (zipf_ids(B, T, vocab, device, 0.05), torch.randn(B, T, d, device=device, dtype=dtype)), {}
    # Σ_v‖Σ_{x_t=v} g_t‖² needs every g_t once (~2·T·d flops): a memory-bound floor.
    return Case("embedding_norm_sq", label, dict(B=B, T=T, d=d, V=vocab), dtype, make,
                bytes=B * T * (d * es + 8), flops=2 * B * T * d)


def embedding_linear_cross_case(label, B, T, d, vocab, dtype):
    es = _esize(dtype)

    def make(device):
        ids = zipf_ids(B, T, vocab, device)
        e = torch.randn(B, T, d, device=device, dtype=dtype)
        h = torch.randn(B, T, d, device=device, dtype=dtype)
        z = torch.randn(B, T, vocab, device=device, dtype=dtype)
        return (ids, e, h, z), {}
    # reads e, h once and one z entry per (t, s) pair; e·hᵀ costs 2·T²·d per example
    return Case("embedding_linear_cross", label, dict(B=B, T1=T, T2=T, d=d, V=vocab), dtype, make,
                bytes=B * (2 * T * d + T * T) * es, flops=2 * B * T * T * d)


def clipped_linear_case(label, B, T, rows, cols, dtype):
    es = _esize(dtype)

    def make(device):
        left = torch.randn(B, T, rows, device=device, dtype=dtype)
        right = torch.randn(B, T, cols, device=device, dtype=dtype)
        clip = torch.rand(B, device=device)
        return (left, right, clip), {}

    def cublas(left, right, clip):  # the non-private weight gradient: one plain matmul
        return left.reshape(-1, rows).t() @ right.reshape(-1, cols)
    return Case("clipped_linear_grad", label, dict(B=B, T=T, rows=rows, cols=cols), dtype, make,
                bytes=B * T * (rows + cols) * es + rows * cols * 4, flops=2 * B * T * rows * cols,
                extra={"cublas_ms": cublas})


def per_layer_clipped_linear_case(label, B, T, rows, cols, dtype):
    """Fused per-layer clipping of one weight, against the two passes it replaces (a norm
    call, then the clip-weighted matmul) and the non-private weight gradient."""
    es = _esize(dtype)

    def make(device):
        left = torch.randn(B, T, rows, device=device, dtype=dtype)
        right = torch.randn(B, T, cols, device=device, dtype=dtype)
        return (left, right, 1.0, float(B), 1e-6), {}

    def two_passes(left, right, threshold, scale, eps):
        norm_sq = ops.linear_norm_sq(right, left, ops.choose_linear_mode(T, cols, rows))
        clip = (threshold / (norm_sq.sqrt() * scale + eps)).clamp(max=1.0) * scale
        return ops.clipped_linear_grad(left, right, clip)

    def cublas(left, right, *_):
        return left.reshape(-1, rows).t() @ right.reshape(-1, cols)
    # reads the factors once; writes and reads back the per-example gradients (fp32)
    return Case("per_layer_clipped_linear_grad", label, dict(B=B, T=T, rows=rows, cols=cols),
                dtype, make, bytes=B * T * (rows + cols) * es + 2 * B * rows * cols * 4,
                flops=2 * B * T * rows * cols,
                extra={"two_passes_ms": two_passes, "cublas_ms": cublas})


def clipped_embedding_case(label, B, T, d, vocab, dtype):
    es = _esize(dtype)

    def make(device):
        ids = zipf_ids(B, T, vocab, device, 0.05)
        return (ids, torch.randn(B, T, d, device=device, dtype=dtype),
                torch.rand(B, device=device), vocab), {}
    return Case("clipped_embedding_grad", label, dict(B=B, T=T, d=d, V=vocab), dtype, make,
                bytes=B * T * (d * es + 8) + vocab * d * 4, flops=0)


def noise_case(label, n, dtype):
    es = _esize(dtype)

    def make(device):
        return (torch.randn(n, device=device, dtype=dtype), 1.3, 1 / 4096), dict(seed=17, step=3, offset=0)
    return Case("noisy_scale", label, dict(n=n), dtype, make, bytes=2 * n * es, flops=0)


def adamw_case(label, n, dtype):
    """Fused noise + AdamW step, against noise then torch's own AdamW (fused on a GPU)."""
    es = _esize(dtype)
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)

    def make(device):
        param = torch.randn(n, device=device, dtype=dtype)
        summed = torch.randn(n, device=device, dtype=dtype)
        m, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
        return (param, summed, m, v, 1.3, 1 / 4096), dict(seed=1, step=1, adam_step=1, **hyper)

    optimizers = {}

    def noise_then_torch_adamw(param, summed, m, v, std, scale):
        if param.data_ptr() not in optimizers:
            weight = torch.nn.Parameter(param.detach().clone())
            optimizers.clear()
            optimizers[param.data_ptr()] = (weight, torch.optim.AdamW(
                [weight], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                weight_decay=hyper["weight_decay"], fused=param.is_cuda))
        weight, optim = optimizers[param.data_ptr()]
        weight.grad = ops.noisy_scale(summed, std, scale, seed=1, step=1)
        optim.step()
    # reads summed, param, m, v; writes param, m, v (m, v fp32)
    return Case("noisy_adamw_", label, dict(n=n), dtype, make, bytes=n * (3 * es + 16), flops=0,
                extra={"noise_then_torch_adamw_ms": noise_then_torch_adamw})


def gpu_cases() -> List[Case]:
    bf16, fp32 = torch.bfloat16, torch.float32
    return [
        # GPT-2 small (d 768, T 1024); Gemma-1B-like (d 1152, MLP 6912, MQA k/v 256);
        # 7B-class (4096) and 8192-wide layers.
        linear_norm_case("gpt2 c_attn", 16, 1024, 768, 2304, "ghost", bf16),
        linear_norm_case("gpt2 c_attn", 16, 1024, 768, 2304, "direct", bf16),
        linear_norm_case("gemma mlp up", 8, 1024, 1152, 6912, "ghost", bf16),
        linear_norm_case("gemma mqa k", 16, 1024, 1152, 256, "direct", bf16),
        linear_norm_case("7B attn", 8, 1024, 4096, 4096, "ghost", bf16),
        linear_norm_case("8192 wide", 4, 1024, 8192, 8192, "ghost", bf16),
        linear_norm_case("gpt2 c_attn fp32", 8, 1024, 768, 2304, "ghost", fp32),
        linear_cross_case("gpt2 tied twice", 8, 1024, 512, 768, 768, bf16),
        linear_cross_case("7B reused", 4, 1024, 1024, 4096, 4096, bf16),
        embedding_norm_case("gpt2 wte", 16, 1024, 768, 50257, bf16),
        embedding_norm_case("gemma embed", 8, 1024, 1152, 262144, bf16),
        embedding_linear_cross_case("gpt2 tie", 8, 1024, 768, 50257, bf16),
        embedding_linear_cross_case("gemma tie", 2, 1024, 1152, 262144, bf16),
        clipped_linear_case("gpt2 c_attn", 16, 1024, 2304, 768, bf16),
        clipped_linear_case("gemma mlp up", 8, 1024, 6912, 1152, bf16),
        clipped_linear_case("7B 64k tokens", 64, 1024, 4096, 4096, bf16),
        clipped_linear_case("8192 wide", 16, 1024, 8192, 8192, bf16),
        clipped_linear_case("gpt2 lm head", 16, 1024, 50257, 768, bf16),
        clipped_linear_case("gemma mqa k fp32", 8, 1024, 256, 1152, fp32),
        per_layer_clipped_linear_case("gpt2 c_attn", 8, 1024, 2304, 768, bf16),
        per_layer_clipped_linear_case("gpt2 mlp fc", 8, 1024, 3072, 768, bf16),
        per_layer_clipped_linear_case("gemma mlp up", 8, 1024, 6912, 1152, bf16),
        clipped_embedding_case("gpt2 wte", 16, 1024, 768, 50257, bf16),
        clipped_embedding_case("gemma embed", 8, 1024, 1152, 262144, bf16),
        noise_case("gpt2 124M fp32", 124_000_000, fp32),
        noise_case("1B bf16", 1_000_000_000, bf16),
        adamw_case("gpt2 124M fp32", 124_000_000, fp32),
        adamw_case("1B bf16 params", 1_000_000_000, bf16),
    ]


def small_cases() -> List[Case]:
    """CPU / dry-run shapes: seconds, not minutes, on two cores."""
    f = torch.float32
    return [
        linear_norm_case("small", 4, 64, 48, 40, "ghost", f),
        linear_norm_case("small", 4, 64, 48, 40, "direct", f),
        linear_cross_case("small", 3, 40, 24, 48, 40, f),
        embedding_norm_case("small", 4, 64, 32, 500, f),
        embedding_linear_cross_case("small", 2, 48, 32, 300, f),
        clipped_linear_case("small", 4, 64, 40, 48, f),
        clipped_embedding_case("small", 4, 64, 32, 500, f),
        per_layer_clipped_linear_case("small", 4, 64, 40, 48, f),
        noise_case("small", 1 << 16, f),
        adamw_case("small", 1 << 16, f),
    ]


# ---------------------------------------------------------------------------------------------
# running


def rel_err(result, expected) -> Optional[float]:
    if isinstance(result, tuple) and isinstance(expected, tuple):  # ops with several outputs
        errs = [rel_err(r, e) for r, e in zip(result, expected)]
        return None if None in errs else max(errs)
    if not (isinstance(result, torch.Tensor) and isinstance(expected, torch.Tensor)):
        return None
    scale = expected.double().abs().max().item() or 1.0
    return (result.double() - expected.double()).abs().max().item() / scale


def run_case(case: Case, device: str, backends: List[str], timer, peaks) -> dict:
    op = ALL_OPS[case.op]
    row = dict(op=case.op, label=case.label, shape=case.shape, dtype=str(case.dtype).replace("torch.", ""))
    try:
        args, kwargs = case.make(device)
    except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
        row["error"] = f"inputs: {exc.__class__.__name__}"
        return row
    outputs = {}
    for backend in backends:
        if not op.available(backend):
            row[f"{backend}_ms"] = None
            continue
        call = lambda: op(*args, backend=backend, **kwargs)  # noqa: E731
        try:
            outputs[backend] = call()   # first call compiles / autotunes
            med, lo, hi = timer(call)
            row[f"{backend}_ms"], row[f"{backend}_ms_range"] = med, [lo, hi]
        except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
            row[f"{backend}_ms"] = None
            row[f"{backend}_error"] = "out of memory"
        torch.cuda.empty_cache() if device == "cuda" else None
    for name, fn in case.extra.items():
        try:
            row[name] = timer(lambda: fn(*args))[0]
        except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
            row[name] = None
    fast = "triton" if "triton" in outputs else ("cpp" if "cpp" in outputs else None)
    if fast and "torch" in outputs:  # noise too: every backend draws the same ChaCha20 stream
        row["rel_err"] = rel_err(outputs[fast], outputs["torch"])
    if case.op == "noisy_scale" and fast:   # and the noise's spread
        x, std, scale = args
        xi = (outputs[fast].double() / scale - x.double()) / std
        row["noise_std"] = xi.std().item()
    if peaks:
        rate = peaks["matmul_fp32_flops" if case.dtype == torch.float32 else "matmul_bf16_flops"]
        row["bytes"], row["flops"] = case.bytes, case.flops
        row["floor_bytes_ms"] = case.bytes / peaks["bandwidth_Bps"] * 1e3
        row["floor_flops_ms"] = case.flops / rate * 1e3
        row["floor_ms"] = max(row["floor_bytes_ms"], row["floor_flops_ms"])
        if row.get(f"{fast}_ms"):
            row["of_floor"] = row["floor_ms"] / row[f"{fast}_ms"]
        if row.get(f"{fast}_ms") and row.get("torch_ms"):
            row["speedup_vs_torch"] = row["torch_ms"] / row[f"{fast}_ms"]
    del args, outputs
    return row


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


EXTRA_COLUMNS = ("cublas_ms", "two_passes_ms", "noise_then_torch_adamw_ms", "noise_std")


def print_table(rows: List[dict], fast: str) -> None:
    head = (f"{'op':24s} {'case':26s} {'dtype':8s} {fast + ' ms':>10s} {'torch ms':>10s} "
            f"{'x torch':>8s} {'floor ms':>9s} {'of floor':>8s} {'rel err':>8s}  extra")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['op']:24s} {r['label']:26s} {r['dtype']:8s} error: {r['error']}")
            continue
        extra = "  ".join(f"{k}={fmt(r[k])}" for k in EXTRA_COLUMNS if r.get(k) is not None)
        print(f"{r['op']:24s} {r['label'][:26]:26s} {r['dtype']:8s} {fmt(r.get(fast + '_ms')):>10s} "
              f"{fmt(r.get('torch_ms')):>10s} {fmt(r.get('speedup_vs_torch'), '.2f'):>8s} "
              f"{fmt(r.get('floor_ms')):>9s} {fmt(r.get('of_floor'), '.2f'):>8s} "
              f"{fmt(r.get('rel_err'), '.1e'):>8s}  {extra}", flush=True)


def environment(device: str) -> dict:
    """The benchmark's machine description, plus whether Triton ran interpreted."""
    env = machine_meta(torch.device(device))
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results", help="folder for the JSON result")
    parser.add_argument("--cpu", action="store_true", help="CPU: torch reference vs cpp extension")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes through the GPU code path (CPU needs TRITON_INTERPRET=1); no file")
    parser.add_argument("--only", default="", help="regex: run only cases whose op/label match")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device == "cpu" and not (args.cpu or args.dry_run):
        parser.error("no CUDA GPU: use --cpu (torch vs cpp) or --dry-run (with TRITON_INTERPRET=1)")
    if args.dry_run and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--dry-run on a CPU needs TRITON_INTERPRET=1")
    if args.cpu:
        backends, fast, cases = ["torch", "cpp"], "cpp", small_cases()
    else:
        backends, fast = ["torch", "triton"], "triton"
        cases = small_cases() if args.dry_run else gpu_cases()
    if args.only:
        cases = [c for c in cases if re.search(args.only, f"{c.op} {c.label}")]
    timer = timer_gpu if device == "cuda" else timer_cpu

    torch.manual_seed(0)
    start = time.time()
    peaks = measure_peaks(device, timer)
    print("measured peaks: " + ", ".join(
        f"{k}={v / 1e12:.2f} T" for k, v in peaks.items()) + " (bytes/s or flop/s)", flush=True)
    tag = (re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
           if device == "cuda" else "cpu")
    path = os.path.join(args.out, f"kernels-{_dt.date.today().isoformat()}-{tag}.json")

    def result_of(rows):
        return dict(environment=environment(device), peaks=peaks, mode="cpu" if args.cpu else
                    ("dry-run" if args.dry_run else "gpu"), wall_s=time.time() - start,
                    complete=len(rows) == len(cases), cases=rows)

    rows = []
    for case in cases:
        rows.append(run_case(case, device, backends, timer, peaks))
        print(f"  {case.op} {case.label}: done ({time.time() - start:.0f}s)", file=sys.stderr, flush=True)
        if not args.dry_run:  # rewritten after every case, so a run cut short keeps its rows
            os.makedirs(args.out, exist_ok=True)
            with open(path, "w") as fh:
                json.dump(result_of(rows), fh, indent=1)
    print()
    print_table(rows, fast)
    result = result_of(rows)
    if args.dry_run:
        print(f"\ndry run: {len(rows)} cases in {result['wall_s']:.0f}s; nothing written")
        return 0
    print(f"\nwrote {path} ({result['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
