"""One configuration of the benchmark (model spec x tied/untied embeddings), in one process:

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
import math
import time
from typing import TYPE_CHECKING, Dict, List, Optional

import torch

from vaultkern.benchmark import memory, providers as prov
from vaultkern.benchmark.specs import MAX_BATCH_AUTO, ModelSpec
from vaultkern.models import Decoder, count_parameters

if TYPE_CHECKING:
    from vaultkern.benchmark.harness import Harness

MEMORY_STEPS = 2
N_BATCHES = 2
# Providers are timed together on a GPU only if their measured peaks sum to at most this
# fraction of the device memory; otherwise each is timed alone.
INTERLEAVE_MEMORY_FRACTION = 0.8


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
