"""The benchmark run: every provider on every configuration, side by side.

For each configuration (model spec x tied/untied embeddings), in one process:

1. *norm cross-check* (fp32, first batch): vaultkern's ``vk.last_norms`` against
   the norms of Opacus hooks' materialised per-example gradients;
2. *memory*: each provider alone (built from the same initial weights), two
   steps, peak memory (see :mod:`vaultkern.benchmark.memory`); a provider that
   cannot be built or fails its first step is recorded with the reason;
3. *timing*: all working providers built together and stepped round-robin, one
   step each per round (the first provider rotates every round) so that drift
   hits them alike; warm-up rounds, then the timed rounds. If the providers do
   not fit on the GPU together, each is timed alone in turn (recorded);
4. *largest batch* (GPU): per provider, doubling from the benchmark batch up to
   a cap, then bisection, at most ``max_probes`` one-step probes.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from vaultkern.benchmark import memory, providers as prov
from vaultkern.benchmark.specs import MAX_BATCH_AUTO, SIZES, TIES, ModelSpec
from vaultkern.models import Decoder, count_parameters

SCHEMA = "vaultkern-bench/1"
MEMORY_STEPS = 2
N_BATCHES = 2
MAX_BATCH_MODES = ("auto", "all", "off")
# Providers are timed together on a GPU only if their measured peaks sum to at most this
# fraction of the device memory; otherwise each is timed alone.
INTERLEAVE_MEMORY_FRACTION = 0.8
# Warnings every Opacus step repeats (hooks on a module whose inputs need no gradient, i.e.
# the token embedding); they say nothing about the benchmark.
QUIET_WARNINGS = ("Full backward hook is firing when gradients are computed with respect to "
                  "module outputs",)


@dataclass
class RunOptions:
    size: str = "micro"
    providers: Sequence[str] = prov.PROVIDERS
    models: Optional[Sequence[str]] = None        # None: every model of the size
    ties: Sequence[str] = TIES
    optimizer: str = "adamw"
    lr: float = 1e-4
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    steps: Optional[int] = None                   # None: the size's default
    warmup: Optional[int] = None
    batch: Optional[int] = None                   # None: each model's default
    device: Optional[str] = None                  # None: the size's device
    max_batch: str = "auto"                       # auto: MAX_BATCH_AUTO models; all; off
    max_probes: int = 8
    time_budget_s: Optional[float] = None
    crosscheck_tol: float = 1e-4
    seed: int = 0

    def validate(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose from {', '.join(SIZES)}")
        unknown = [p for p in self.providers if p not in prov.PROVIDERS]
        if unknown or not self.providers:
            raise ValueError(f"unknown providers {unknown}; choose from {', '.join(prov.PROVIDERS)}")
        bad_ties = [t for t in self.ties if t not in TIES]
        if bad_ties or not self.ties:
            raise ValueError(f"ties must be a non-empty subset of {TIES}, got {list(self.ties)}")
        for m in self.models or ():
            SIZES[self.size].model(m)  # raises with the list of models
        if self.max_batch not in MAX_BATCH_MODES:
            raise ValueError(f"max_batch must be one of {MAX_BATCH_MODES}, got {self.max_batch!r}")
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.max_probes < 1:
            raise ValueError(f"max_probes must be >= 1, got {self.max_probes}")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _reason(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def failure_status(name: str, exc: BaseException, batch: int, first_step: bool) -> str:
    """'oom: ...', 'unsupported: <reason>' (an Opacus provider failing to start) or 'error: ...'."""
    if memory.is_oom(exc):
        return f"oom: batch {batch}"
    if first_step and name not in prov.REQUIRED_PROVIDERS:
        return f"unsupported: {_reason(exc)}"
    return f"error: {_reason(exc)}"


def quantile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_times(seconds: List[float]) -> Dict[str, object]:
    ms = sorted(s * 1e3 for s in seconds)
    return {"median": quantile(ms, 0.5), "p10": quantile(ms, 0.1), "p90": quantile(ms, 0.9),
            "n": len(ms), "samples": [round(s * 1e3, 4) for s in seconds]}


class _Budget:
    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() >= self.seconds

    def skipped(self) -> str:
        return f"skipped: time budget of {self.seconds:.0f} s spent"


class ConfigRun:
    """All phases for one configuration; ``result`` is its JSON entry."""

    def __init__(self, harness: "Harness", spec: ModelSpec, tie: str):
        self.h = harness
        self.spec = spec
        self.tie = tie
        self.device = harness.device
        self.batch = harness.options.batch or spec.batch
        self.cfg = spec.config(tied=(tie == "tied"))
        self.settings = dataclasses.replace(harness.settings, autocast_dtype=spec.autocast_dtype)
        self.names = list(harness.options.providers)
        # One initialisation (on the device, where it is fast); its weights are kept on the CPU
        # (so they take no device memory) and loaded into every provider's model.
        torch.manual_seed(harness.options.seed)
        with torch.device(self.device):
            base = Decoder(self.cfg)
        params = count_parameters(base)
        self.base_state = {k: v.detach().to("cpu", copy=True) for k, v in base.state_dict().items()}
        del base
        self.batches = self._make_batches(self.batch, N_BATCHES, harness.options.seed + 1)
        self.entries: Dict[str, Dict[str, object]] = {
            n: {"status": "pending", "step_ms": None, "tokens_per_s": None, "ratio_vs_nondp": None,
                "peak_mem_bytes": None, "max_batch": None, "timing_mode": None}
            for n in self.names}
        self.result: Dict[str, object] = {
            "name": f"{spec.name}/{tie}", "model": spec.name, "tie": tie, "style": self.cfg.style,
            "params": params, "batch_size": self.batch,
            "seq_len": self.cfg.seq_len, "tokens_per_step": self.batch * self.cfg.seq_len,
            "precision": f"{spec.autocast} autocast" if spec.autocast else "fp32",
            "model_config": self.cfg.to_dict(), "crosscheck": None, "providers": self.entries,
            "phase_seconds": {}}

    # ---- building blocks ----------------------------------------------------------------
    def log(self, msg: str) -> None:
        self.h.log(f"[{self.result['name']}] {msg}")

    def _make_batches(self, batch: int, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            ids = torch.randint(0, self.cfg.vocab_size, (batch, self.cfg.seq_len + 1), generator=gen)
            # contiguous: Opacus' embedding norm sampler views its input ids
            out.append((ids[:, :-1].contiguous().to(self.device),
                        ids[:, 1:].contiguous().to(self.device)))
        return out

    def fresh_model(self) -> torch.nn.Module:
        """A new model on the device holding the configuration's initial weights."""
        with torch.device(self.device):
            model = Decoder(self.cfg)
        model.load_state_dict(self.base_state)
        if self.cfg.tie_embeddings and model.lm_head.weight is not model.embed_tokens.weight:
            raise RuntimeError("the model's embedding tie is broken")
        return model.train()

    def build(self, name: str, batch: Optional[int] = None,
              settings: Optional[prov.StepSettings] = None) -> prov.Provider:
        return prov.build(name, self.fresh_model(), settings or self.settings, batch or self.batch)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_step(self, p: prov.Provider, x, y) -> float:
        self.sync()
        t0 = time.perf_counter()
        p.step(x, y)
        self.sync()
        return time.perf_counter() - t0

    def ok(self, name: str) -> bool:
        return self.entries[name]["status"] == "ok"

    # ---- phase 1: per-example norms, vaultkern vs Opacus hooks (fp32) --------------------
    def crosscheck(self) -> Dict[str, object]:
        rows = min(self.batch, self.spec.crosscheck_rows or self.batch)
        x, y = self.batches[0][0][:rows], self.batches[0][1][:rows]
        fp32 = dataclasses.replace(self.settings, autocast_dtype=None)
        out: Dict[str, object] = {"reference": "opacus-hooks grad_sample norms (all params jointly)",
                                  "dtype": "float32", "rows": rows, "tol": self.h.options.crosscheck_tol,
                                  "max_rel_diff": None}
        if prov.opacus_version() is None:
            out["status"] = "not run: opacus is not installed"
            return out
        norms = {}
        for name in ("vaultkern", "opacus-hooks"):
            problem, p = None, None
            try:
                p = self.build(name, rows, fp32)
                p.backward(x, y)
                norms[name] = p.per_example_norms().detach().double().cpu()
            except Exception as exc:  # noqa: BLE001 - recorded below
                problem = failure_status(name, exc, rows, first_step=True)
            p = None
            memory.release(self.device)
            if problem is not None:
                out["status"] = (f"error: vaultkern failed ({problem})" if name == "vaultkern"
                                 else f"not run: {name} failed ({problem})")
                return out
        vk, ref = norms["vaultkern"], norms["opacus-hooks"]
        if vk.shape != ref.shape:
            out["status"] = f"fail: norm shapes differ ({tuple(vk.shape)} vs {tuple(ref.shape)})"
            return out
        rel = ((vk - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
        out["max_rel_diff"] = rel
        out["vaultkern_norms"] = [round(v, 8) for v in vk.tolist()]
        out["opacus_norms"] = [round(v, 8) for v in ref.tolist()]
        out["status"] = "pass" if rel <= out["tol"] else \
            f"fail: max relative difference {rel:.3g} exceeds {out['tol']:g}"
        return out

    # ---- phase 2: status and peak memory of each provider alone --------------------------
    def measure_memory(self) -> None:
        meter = self.h.meter
        for name in self.names:
            if self.h.budget.exhausted():
                self.entries[name]["status"] = self.h.budget.skipped()
                continue

            def work():
                p = self.build(name)
                for i in range(MEMORY_STEPS):
                    x, y = self.batches[i % len(self.batches)]
                    p.step(x, y)
                self.sync()
            status, peak = "ok", None
            try:
                if meter.available:
                    peak = meter.measure(work)
                else:
                    work()
            except Exception as exc:  # noqa: BLE001 - recorded as the provider's status
                status = failure_status(name, exc, self.batch, first_step=True)
            memory.release(self.device)
            self.entries[name].update(status=status, peak_mem_bytes=peak)
            self.log(f"{name:<13} {status}" + (f", peak {peak / 2**20:.1f} MiB" if peak else ""))

    # ---- phase 3: step times -------------------------------------------------------------
    def _interleave(self, names: List[str]) -> bool:
        if self.device.type != "cuda":
            return True
        total = torch.cuda.get_device_properties(self.device).total_memory
        peaks = sum(self.entries[n]["peak_mem_bytes"] or 0 for n in names)
        return peaks <= INTERLEAVE_MEMORY_FRACTION * total

    def time_steps(self) -> None:
        names = [n for n in self.names if self.ok(n)]
        if not names:
            return
        if self._interleave(names):
            retry = self._time_interleaved(names)
        else:
            self.log("providers do not fit together: timing each alone")
            retry = names
        for name in retry:
            if self.h.budget.exhausted():
                self.entries[name]["status"] = self.h.budget.skipped()
                continue
            self._time_alone(name)

    def _record_times(self, name: str, seconds: List[float], mode: str) -> None:
        self.entries[name]["step_ms"] = summarize_times(seconds)
        self.entries[name]["timing_mode"] = mode

    def _time_interleaved(self, names: List[str]) -> List[str]:
        """Round-robin timing; returns providers that ran out of memory only when co-resident."""
        warmup, steps = self.h.warmup, self.h.steps
        built: Dict[str, prov.Provider] = {}
        retry: List[str] = []
        for name in names:
            try:
                built[name] = self.build(name)
            except Exception as exc:  # noqa: BLE001
                if memory.is_oom(exc):
                    retry.append(name)
                else:
                    self.entries[name]["status"] = failure_status(name, exc, self.batch, False)
        samples: Dict[str, List[float]] = {n: [] for n in built}
        alive = list(built)
        for r in range(warmup + steps):
            if not alive:
                break
            k = r % len(alive)
            x, y = self.batches[r % len(self.batches)]
            for name in alive[k:] + alive[:k]:
                try:
                    seconds = self.timed_step(built[name], x, y)
                except Exception as exc:  # noqa: BLE001
                    if memory.is_oom(exc):
                        retry.append(name)
                    else:
                        self.entries[name]["status"] = failure_status(name, exc, self.batch, False)
                    del built[name]
                    memory.release(self.device)
                    continue
                if r >= warmup:
                    samples[name].append(seconds)
            alive = [n for n in alive if n in built]
        for name in alive:
            self._record_times(name, samples[name], "interleaved")
        built.clear()
        memory.release(self.device)
        return retry

    def _time_alone(self, name: str) -> None:
        warmup, steps = self.h.warmup, self.h.steps
        seconds: List[float] = []
        p = None
        try:
            p = self.build(name)
            for r in range(warmup + steps):
                x, y = self.batches[r % len(self.batches)]
                t = self.timed_step(p, x, y)
                if r >= warmup:
                    seconds.append(t)
        except Exception as exc:  # noqa: BLE001
            self.entries[name]["status"] = failure_status(name, exc, self.batch, not seconds)
        p = None
        memory.release(self.device)
        if self.ok(name):
            self._record_times(name, seconds, "alone")

    def throughput(self) -> None:
        tokens = self.batch * self.cfg.seq_len
        for entry in self.entries.values():
            if entry["step_ms"] is not None:
                entry["tokens_per_s"] = tokens / (entry["step_ms"]["median"] / 1e3)
        base = self.entries.get("nondp")
        if base is None or base["step_ms"] is None:
            return
        for entry in self.entries.values():
            if entry["step_ms"] is not None:
                entry["ratio_vs_nondp"] = {
                    "tokens_per_s": entry["tokens_per_s"] / base["tokens_per_s"],
                    "step_time": entry["step_ms"]["median"] / base["step_ms"]["median"]}

    # ---- phase 4: largest batch before out-of-memory (GPU) -------------------------------
    def _probe(self, name: str, batch: int) -> bool:
        """One step at ``batch``: True if it fits, False on out-of-memory (raises otherwise)."""
        fits, p, data = True, None, None
        try:
            data = self._make_batches(batch, 1, self.h.options.seed + 2)[0]
            p = self.build(name, batch)
            p.step(*data)
            self.sync()
        except Exception as exc:  # noqa: BLE001
            if not memory.is_oom(exc):
                raise
            fits = False
        p = data = None
        memory.release(self.device)
        return fits

    def max_batch(self, name: str) -> Dict[str, object]:
        cap = self.spec.max_batch_cap
        status = self.entries[name]["status"]
        lo = self.batch if status == "ok" else 0        # largest batch known to fit
        hi = self.batch if status.startswith("oom") else None  # smallest known not to fit
        probes: List[Dict[str, object]] = []
        out: Dict[str, object] = {"cap": cap, "probes": probes}
        while len(probes) < self.h.options.max_probes:
            if self.h.budget.exhausted():
                out["note"] = self.h.budget.skipped()
                break
            if hi is None:
                if lo >= cap:
                    break
                b = min(2 * lo, cap) if lo else self.batch
            else:
                if hi - lo <= 1:
                    break
                b = (lo + hi) // 2
            try:
                fits = self._probe(name, b)
            except Exception as exc:  # noqa: BLE001
                out["error"] = f"batch {b}: {_reason(exc)}"
                memory.release(self.device)
                break
            probes.append({"batch": b, "fits": fits})
            if fits:
                lo = b
            else:
                hi = b
        out.update(value=lo, first_oom=hi, at_cap=hi is None and lo >= cap,
                   exact=(hi is not None and hi - lo <= 1) or (hi is None and lo >= cap))
        return out

    def search_max_batches(self) -> None:
        for name in self.names:
            status = self.entries[name]["status"]
            if status != "ok" and not status.startswith("oom"):
                continue
            self.entries[name]["max_batch"] = self.max_batch(name)
            mb = self.entries[name]["max_batch"]
            self.log(f"{name:<13} max batch {mb['value']}" +
                     (f" (first OOM at {mb['first_oom']})" if mb["first_oom"] else
                      f" (cap {mb['cap']} reached)" if mb["at_cap"] else " (search cut short)"))

    def wants_max_batch(self) -> bool:
        mode = self.h.options.max_batch
        if self.device.type != "cuda" or mode == "off" or self.spec.max_batch_cap <= 0:
            return False
        return mode == "all" or self.spec.name in MAX_BATCH_AUTO

    # ---- all phases ------------------------------------------------------------------------
    def run(self) -> Dict[str, object]:
        phases = self.result["phase_seconds"]

        def timed(label, fn):
            t0 = time.perf_counter()
            value = fn()
            phases[label] = round(time.perf_counter() - t0, 3)
            return value

        self.log(f"{self.result['params']:,} params, batch {self.batch} x T={self.cfg.seq_len}, "
                 f"{self.result['precision']}")
        self.result["crosscheck"] = timed("crosscheck", self.crosscheck)
        self.log(f"norm cross-check: {self.result['crosscheck']['status']}")
        timed("memory", self.measure_memory)
        if self.h.budget.exhausted():  # peak memory is measured; timing is not
            for name in self.names:
                if self.ok(name):
                    self.entries[name]["status"] = self.h.budget.skipped() + " before timing"
        timed("timing", self.time_steps)
        self.throughput()
        if self.wants_max_batch():
            timed("max_batch", self.search_max_batches)
        modes = {e["timing_mode"] for e in self.entries.values() if e["timing_mode"]}
        self.result["timing_mode"] = modes.pop() if len(modes) == 1 else \
            ("mixed" if modes else None)
        return self.result


class Harness:
    def __init__(self, options: RunOptions, log: Callable[[str], None] = _stderr):
        options.validate()
        self.options = options
        self.log = log
        self.size = SIZES[options.size]
        self.device = torch.device(options.device or self.size.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--size {options.size} runs on CUDA but no CUDA device is available "
                               "(use --size cpu or --device cpu)")
        self.warmup = self.size.warmup if options.warmup is None else options.warmup
        self.steps = options.steps or self.size.steps
        self.settings = prov.StepSettings(optimizer=options.optimizer, lr=options.lr,
                                          noise_multiplier=options.noise_multiplier,
                                          max_grad_norm=options.max_grad_norm, seed=options.seed)
        self.meter = memory.meter_for(self.device)
        self.budget = _Budget(options.time_budget_s)
        self.model_names = list(options.models or [m.name for m in self.size.models])
        self.plan = [(self.size.model(m), tie) for m in self.model_names for tie in TIES
                     if tie in options.ties]

    def settings_record(self) -> Dict[str, object]:
        o = self.options
        return {"size": o.size, "description": self.size.description, "device": str(self.device),
                "providers": list(o.providers), "models": self.model_names,
                "ties": list(o.ties), "optimizer": o.optimizer, "lr": o.lr,
                "noise_multiplier": o.noise_multiplier, "max_grad_norm": o.max_grad_norm,
                "loss": "mean over the batch of each sequence's mean token cross-entropy",
                "warmup_rounds": self.warmup, "timed_rounds": self.steps,
                "memory_steps": MEMORY_STEPS, "memory_method": self.meter.method,
                "memory_unavailable": self.meter.reason_unavailable,
                "crosscheck_tol": o.crosscheck_tol, "max_batch": o.max_batch,
                "max_probes": o.max_probes, "time_budget_s": o.time_budget_s, "seed": o.seed}

    def run(self, on_config: Optional[Callable[[Dict[str, object]], None]] = None
            ) -> Dict[str, object]:
        with warnings.catch_warnings():
            for message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            return self._run(on_config)

    def _run(self, on_config) -> Dict[str, object]:
        results: Dict[str, object] = {"schema": SCHEMA, "meta": machine_meta(self.device),
                                      "settings": self.settings_record(), "configs": []}
        for spec, tie in self.plan:
            if self.budget.exhausted():
                entry = {"name": f"{spec.name}/{tie}", "model": spec.name, "tie": tie,
                         "status": self.budget.skipped(), "providers": {}}
            else:
                entry = ConfigRun(self, spec, tie).run()
            results["configs"].append(entry)
            results["meta"]["elapsed_s"] = round(self.budget.elapsed(), 2)
            if on_config is not None:
                on_config(results)
        return results


# ---- machine description -------------------------------------------------------------------
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
        return {"error": _reason(exc)}
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
    cpu = memory.cpu_model_name()
    driver = None
    if cuda:
        out = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = out.splitlines()[0].strip() if out else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": gpu or cpu, "cpu": cpu, "cpu_count": memory.cpu_count(),
        "torch_threads": torch.get_num_threads(), "gpu": gpu,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "torch": torch.__version__, "triton": triton_version, "opacus": prov.opacus_version(),
        "cuda": torch.version.cuda, "driver": driver, "python": platform.python_version(),
        "platform": platform.platform(), "git_sha": git_sha(), "vaultkern": __version__,
        "vaultkern_backend": backend_info(device),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
