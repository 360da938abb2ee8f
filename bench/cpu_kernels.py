"""CPU kernels of vaultkern._C against the torch references of vaultkern/ops.

    PYTHONPATH=. python bench/cpu_kernels.py [--repeat 15] [--threads N] [--dtype float32] [--quick] [--only op,...]

Prints one table row per (op, shape): median wall time of the torch reference
and of the C++ kernel, the median speed-up over back-to-back pairs of runs
(robust on a machine shared with other jobs), and under which name _C exports the kernel
(the op name when the dispatch uses it, "_name" when it is kept out of the
dispatch because it was not faster here). Both sides run in this process with
torch's default thread count.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from vaultkern.ops.clipped_grad import clipped_embedding_grad_torch
from vaultkern.ops.embedding_cross import embedding_linear_cross_torch
from vaultkern.ops.embedding_norm import embedding_norm_sq_torch
from vaultkern.ops.linear_cross import linear_cross_torch
from vaultkern.ops.linear_norm import linear_norm_sq_torch
from vaultkern.ops.noise import noisy_scale_torch

try:
    from vaultkern import _C
except ImportError as exc:  # the bench is meaningless without the extension
    raise SystemExit(f"vaultkern._C is not built ({exc}); run `pip install --no-build-isolation -e .`")


def exported(name: str):
    """(function, exported name) of a _C kernel, public name or '_'-prefixed."""
    for candidate in (name, "_" + name):
        if hasattr(_C, candidate):
            return getattr(_C, candidate), candidate
    raise SystemExit(f"vaultkern._C has neither {name} nor _{name}")


def once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_timings(ref, cpp, repeat: int) -> tuple[float, float, float]:
    """(median torch ms, median cpp ms, median of per-pair speed-ups).

    The two implementations run alternately, and each pair's ratio is taken
    from back-to-back runs, so load from other processes on a shared machine
    hits both sides alike; the median ratio is the robust number."""
    for _ in range(2):  # warm-up (allocator, BLAS and thread-pool start-up)
        ref(), cpp()
    t_ref, t_cpp = [], []
    for _ in range(repeat):
        t_ref.append(once(ref))
        t_cpp.append(once(cpp))
    ratios = [r / c for r, c in zip(t_ref, t_cpp)]
    return 1e3 * statistics.median(t_ref), 1e3 * statistics.median(t_cpp), statistics.median(ratios)


def median_ms(fn, repeat: int) -> float:
    fn()
    return 1e3 * statistics.median(once(fn) for _ in range(repeat))


def cases(dtype: torch.dtype, quick: bool):
    """(op name, shape label, torch call, cpp call) for every benchmarked shape."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    B = 8
    Ts = (32, 128) if quick else (32, 128, 256)
    widths = (64, 256) if quick else (64, 256, 512)
    vocab = (259, 4096)

    for T in Ts:
        for w in widths:
            a, g = rnd(B, T, w), rnd(B, T, w)
            for mode in ("ghost", "direct"):
                fn, _ = exported("linear_norm_sq")
                yield ("linear_norm_sq", f"B={B} T={T} d=p={w} {mode}",
                       lambda a=a, g=g, m=mode: linear_norm_sq_torch(a, g, m),
                       lambda a=a, g=g, m=mode, fn=fn: fn(a, g, m))
    for T in Ts:
        for w in widths:
            a1, g1, a2, g2 = rnd(B, T, w), rnd(B, T, w), rnd(B, T, w), rnd(B, T, w)
            fn, _ = exported("linear_cross")
            mode = "ghost" if 2 * T * T < w * w else "direct"
            yield ("linear_cross", f"B={B} T1=T2={T} d=p={w} ({mode})",
                   lambda a1=a1, g1=g1, a2=a2, g2=g2: linear_cross_torch(a1, g1, a2, g2),
                   lambda fn=fn, a1=a1, g1=g1, a2=a2, g2=g2: fn(a1, g1, a2, g2))
    for T in Ts:
        for d in widths[:2]:
            for V in vocab:
                ids = torch.randint(-1, V, (B, T), generator=gen)
                g = rnd(B, T, d)
                clip = torch.rand(B, generator=gen, dtype=dtype)
                fn, _ = exported("embedding_norm_sq")
                yield ("embedding_norm_sq", f"B={B} T={T} d={d} V={V}",
                       lambda ids=ids, g=g: embedding_norm_sq_torch(ids, g),
                       lambda ids=ids, g=g, fn=fn: fn(ids, g))
                fn, _ = exported("clipped_embedding_grad")
                yield ("clipped_embedding_grad", f"B={B} T={T} d={d} V={V}",
                       lambda ids=ids, g=g, c=clip, V=V: clipped_embedding_grad_torch(ids, g, c, V),
                       lambda ids=ids, g=g, c=clip, V=V, fn=fn: fn(ids, g, c, V))
    for T in Ts[:2]:
        for d in widths[:2]:
            for V in vocab:
                ids = torch.randint(-1, V, (B, T), generator=gen)
                e, h, z = rnd(B, T, d), rnd(B, T, d), rnd(B, T, V)
                fn, _ = exported("embedding_linear_cross")
                yield ("embedding_linear_cross", f"B={B} T1=T2={T} d={d} V={V}",
                       lambda ids=ids, e=e, h=h, z=z: embedding_linear_cross_torch(ids, e, h, z),
                       lambda ids=ids, e=e, h=h, z=z, fn=fn: fn(ids, e, h, z))
    for n in (1_000, 100_000) if quick else (1_000, 100_000, 1_000_000):
        x = rnd(n)
        fn, _ = exported("noisy_scale")
        yield ("noisy_scale", f"n={n}",
               lambda x=x: noisy_scale_torch(x, 1.0, 0.5, seed=1, step=2, offset=3),
               lambda x=x, fn=fn: fn(x, 1.0, 0.5, seed=1, step=2, offset=3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    parser.add_argument("--only", default="", help="comma-separated op names to run")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    only = {s for s in args.only.split(",") if s}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"median of {args.repeat}; _C build {_C.build_info()}")
    header = (f"| {'op':24s} | {'shape':36s} | {'torch ms':>9s} | {'cpp ms':>9s} "
              f"| {'speed-up':>8s} | export as |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for op, shape, ref, cpp in cases(dtype, args.quick):
        if only and op not in only:
            continue
        t_ref, t_cpp, ratio = paired_timings(ref, cpp, args.repeat)
        print(f"| {op:24s} | {shape:36s} | {t_ref:9.3f} | {t_cpp:9.3f} | {ratio:7.2f}x "
              f"| {exported(op)[1]} |", flush=True)

    # The secure generator has no torch counterpart: report its throughput.
    key, nonce = torch.arange(32, dtype=torch.uint8), torch.zeros(12, dtype=torch.uint8)
    for n in (100_000, 1_000_000):
        x = torch.zeros(n, dtype=dtype)
        t = median_ms(lambda: _C.secure_noisy_scale(x, 1.0, 1.0, key, nonce), args.repeat)
        t_randn = median_ms(lambda: torch.randn(n, dtype=dtype), args.repeat)
        print(f"secure_noisy_scale n={n}: {t:.3f} ms ({1e6 * t / n:.1f} ns/element); "
              f"torch.randn (not secure) {t_randn:.3f} ms")
    t = median_ms(lambda: _C.chacha20_stream(key, nonce, 0, 1 << 22), args.repeat)
    print(f"chacha20_stream 4 MiB: {t:.3f} ms ({(1 << 22) / t / 1e6:.2f} GB/s)")


if __name__ == "__main__":
    main()
