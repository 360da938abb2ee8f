"""What machine a benchmark ran on: CPU, GPU, driver, library versions, commit, backends."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from typing import Dict, List, Optional

import torch

from vaultkern.benchmark import providers as prov


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _run_quiet(cmd: List[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_sha() -> Optional[str]:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # VAULTKERN_GIT_SHA first: a copy of the tree sent to another machine (the GPU device
    # tool) can carry a stale .git, whose HEAD is not the code that ran
    return os.environ.get("VAULTKERN_GIT_SHA") or _run_quiet(["git", "rev-parse", "HEAD"], cwd=repo)


def backend_info(device: torch.device) -> Dict[str, object]:
    try:
        from vaultkern.info import collect
        data = collect()
    except Exception as exc:  # noqa: BLE001 - the benchmark still runs; the reason is kept
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    key = "cuda" if device.type == "cuda" else "cpu"
    return {"cpp_extension": data.get("cpp_extension"),
            "cpp_extension_cuda": data.get("cpp_extension_cuda"),
            "triton_mode": data.get("triton_mode"), "forced_backend": data.get("forced_backend"),
            "ops": {name: d.get(key) for name, d in data.get("ops", {}).items()}}


def machine_meta(device: torch.device) -> Dict[str, object]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    from vaultkern._version import __version__
    cuda = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if cuda else None
    cpu = cpu_model_name()
    driver = None
    if cuda:
        out = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = out.splitlines()[0].strip() if out else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": gpu or cpu, "cpu": cpu, "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(), "gpu": gpu,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "torch": torch.__version__, "triton": triton_version, "opacus": prov.opacus_version(),
        "cuda": torch.version.cuda, "driver": driver, "python": platform.python_version(),
        "platform": platform.platform(), "git_sha": git_sha(), "vaultkern": __version__,
        "vaultkern_backend": backend_info(device),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
