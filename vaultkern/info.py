"""``vaultkern.info()`` / ``python -m vaultkern info``: versions and active backends."""
from __future__ import annotations

import os
import platform
import sys
from typing import Dict

import torch

from vaultkern import backend
from vaultkern._version import __version__


def collect() -> Dict[str, object]:
    import vaultkern.ops  # noqa: F401  (registers every op)
    triton_version = None
    if backend.triton_available():
        import triton
        triton_version = triton.__version__
    ext = backend.extension()
    build = ext.build_info() if ext is not None and hasattr(ext, "build_info") else None
    cuda = torch.cuda.is_available()
    return {
        "vaultkern": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "triton": triton_version,
        "triton_mode": (None if triton_version is None else
                        "interpreted (TRITON_INTERPRET=1)" if backend.triton_interpreted() else
                        "compiled" if cuda else "installed, no GPU (set TRITON_INTERPRET=1 to run on CPU)"),
        "cpp_extension": ext is not None,
        "cpp_extension_cuda": bool(build and build.get("cuda")),
        "forced_backend": os.environ.get("VAULTKERN_BACKEND") or None,
        "ops": {name: {"backends": [b for b in backend.BACKENDS if op.available(b)],
                       "cpu": _chosen(op, "cpu"),
                       "cuda": _chosen(op, "cuda") if cuda else None}
                for name, op in sorted(backend.ALL_OPS.items())},
    }


def _chosen(op, device: str) -> str:
    return op.choose(torch.empty(0, device=device))


def info(file=None) -> Dict[str, object]:
    """Print versions and which backend each op uses on CPU/CUDA; returns the dict."""
    data = collect()
    out = file or sys.stdout
    for key, value in data.items():
        if key != "ops":
            print(f"{key:<20} {value}", file=out)
    print("ops (backend chosen for cpu / cuda tensors):", file=out)
    for name, d in data["ops"].items():
        print(f"  {name:<24} cpu={d['cpu']:<7} cuda={d['cuda'] or '-':<7} available={','.join(d['backends'])}",
              file=out)
    return data


def main(argv=None) -> int:
    import argparse
    argparse.ArgumentParser(prog="python -m vaultkern info",
                            description="Print versions and the active backend of every op.").parse_args(argv)
    info()
    return 0
