"""The benchmark run: every provider on every configuration, side by side (each
configuration's phases: :mod:`vaultkern.benchmark.config_run`), with the machine's
description (:mod:`vaultkern.benchmark.machine`) in the results."""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch

from vaultkern.benchmark import memory, providers as prov
from vaultkern.benchmark.config_run import MEMORY_STEPS, ConfigRun
from vaultkern.benchmark.machine import machine_meta
from vaultkern.benchmark.specs import SIZES, TIES

SCHEMA = "vaultkern-bench/1"
MAX_BATCH_MODES = ("auto", "all", "off")
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
