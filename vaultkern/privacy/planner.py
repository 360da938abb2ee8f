"""Sweep DP-SGD batch size × steps on a compute budget, ranked by the noise-batch ratio σ/B̄.

For a privacy target (ε, δ), N privacy units (training sequences) and a budget of tokens
processed, every configuration spends the same compute: batch B̄ × steps S × seq_len T =
tokens (to within one step). Each gets the σ that meets (ε, δ) from dp-accounting; the
noise-batch ratio σ/B̄ is the std of the noise in the averaged gradient in units of the
clipping norm C, the quantity McKenna et al. (2025) and VaultGemma found to drive utility.

What this is not: a loss prediction. Their scaling laws weigh σ/B̄ against the number of
steps and the model size through a fit to many training runs; that data is not available
here. At a fixed budget σ/B̄ falls as the batch grows (σ grows more slowly than B̄), so on
its own it would always pick the fewest, largest steps - but a model needs steps to train.
The planner therefore takes a floor on the number of steps (``min_steps``) and picks the
lowest σ/B̄ at or above it; the floor is the user's judgement, not something it derives.

Accounting: the sweep calibrates with the PLD accountant on a coarse grid (1e-2; dp-accounting
rounds pessimistically, so σ is valid and within ~0.1 % of the fine grid's, ~10x faster);
the recommended configuration is calibrated again on the accountant's default grid, the
number ``python -m vaultkern train`` computes. Calibrations are cached per process.
"""
from __future__ import annotations

import functools
import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Tuple

from vaultkern.privacy.accounting import (PLD_DISCRETIZATION, calibrate_noise_multiplier,
                                         epsilon_for)

SWEEP_PLD_DISCRETIZATION = 1e-2
SWEEP_EPSILON_TOLERANCE = 0.01
# larger batches than the largest allowed one, shown for context (they violate min_steps)
CONTEXT_ROWS = 2


@dataclass(frozen=True)
class Problem:
    """What is fixed: the privacy target, the data, the compute and the floor on steps."""

    epsilon: float
    delta: float
    dataset_size: int              # N, privacy units (one sequence each)
    tokens: int                    # compute budget: tokens processed (batch · steps · seq_len)
    seq_len: int
    max_epochs: Optional[float] = None
    min_steps: int = 1
    allow_delta_above_1_over_n: bool = False

    def check(self) -> None:
        """Clear errors for inputs that admit no private configuration."""
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon={self.epsilon}: must be a finite number > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta}: must lie strictly between 0 and 1")
        if self.dataset_size < 1:
            raise ValueError(f"dataset size {self.dataset_size}: must be >= 1")
        if self.delta >= 1.0 / self.dataset_size and not self.allow_delta_above_1_over_n:
            raise ValueError(
                f"delta={self.delta:g} >= 1/N = {1.0 / self.dataset_size:.3g} (N = "
                f"{self.dataset_size}): a mechanism that publishes one random unit in full meets "
                "this delta; use a delta well below 1/N")
        if self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len}: must be >= 1")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise ValueError(f"max_epochs={self.max_epochs}: must be > 0")
        if self.min_steps < 1:
            raise ValueError(f"min_steps={self.min_steps}: must be >= 1")
        if self.sequences < 1:
            raise ValueError(
                f"the budget of {self.tokens:g} tokens does not fit one step: one sequence alone "
                f"is {self.seq_len} tokens" + (f" (and max_epochs={self.max_epochs:g} of "
                                               f"{self.dataset_size} units allows "
                                               f"{self.max_epochs * self.dataset_size:g})"
                                               if self.max_epochs is not None else ""))
        if self.sequences < self.min_steps:
            raise ValueError(
                f"the budget processes {self.sequences} sequences, fewer than min_steps="
                f"{self.min_steps} steps of one sequence each: raise the budget or lower min_steps")

    @property
    def sequences(self) -> int:
        """Sequences the budget may process: tokens // seq_len, capped by max_epochs · N."""
        k = int(self.tokens // self.seq_len)
        if self.max_epochs is not None:
            k = min(k, math.floor(self.max_epochs * self.dataset_size))
        return k

    @property
    def data_limited(self) -> bool:
        """True when max_epochs, not compute, bounds the sequences processed."""
        return self.sequences < self.tokens // self.seq_len

    def scaled(self, epsilon: float = 1.0, tokens: float = 1.0, data: float = 1.0) -> "Problem":
        """The same problem with ε, compute and N multiplied (δ and the floor unchanged)."""
        return replace(self, epsilon=self.epsilon * epsilon, tokens=int(self.tokens * tokens),
                       dataset_size=max(1, round(self.dataset_size * data)))


@dataclass(frozen=True)
class Row:
    """One configuration on the budget and its calibrated noise."""

    batch_size: int                # expected batch B̄ (Poisson: q = B̄/N)
    steps: int
    noise_multiplier: float        # σ
    dataset_size: int
    seq_len: int

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.dataset_size

    @property
    def noise_batch_ratio(self) -> float:
        return self.noise_multiplier / self.batch_size

    @property
    def tokens(self) -> int:
        return self.batch_size * self.steps * self.seq_len

    @property
    def epochs(self) -> float:
        return self.batch_size * self.steps / self.dataset_size


# (ε, δ, q, steps) -> σ of the sweep; trends and repeated sweeps in one process reuse it
_SWEEP_SIGMAS: Dict[Tuple[float, float, float, int], float] = {}


def _calibrate(key: Tuple[float, float, float, int]) -> float:
    epsilon, delta, sample_rate, steps = key
    return calibrate_noise_multiplier(epsilon, delta, sample_rate, steps, accountant="pld",
                                      epsilon_tolerance=SWEEP_EPSILON_TOLERANCE,
                                      pld_discretization=SWEEP_PLD_DISCRETIZATION)


def prefetch(keys: Iterable[Tuple[float, float, float, int]], jobs: int = 1) -> None:
    """Calibrate the (ε, δ, q, steps) not yet cached, in ``jobs`` forked processes (each
    calibration is independent and single-threaded; fork shares the imported modules)."""
    missing = list(dict.fromkeys(k for k in keys if k not in _SWEEP_SIGMAS))
    if jobs > 1 and len(missing) > 1 and "fork" in multiprocessing.get_all_start_methods():
        with ProcessPoolExecutor(min(jobs, len(missing)),
                                 mp_context=multiprocessing.get_context("fork")) as pool:
            values = list(pool.map(_calibrate, missing))
    else:
        values = [_calibrate(k) for k in missing]
    _SWEEP_SIGMAS.update(zip(missing, values))


def sweep_sigma(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """σ for (ε, δ) after ``steps`` Poisson-sampled steps at rate q, as the sweep calibrates it:
    ``calibrate_noise_multiplier`` with the PLD accountant on the sweep's grid."""
    key = (float(epsilon), float(delta), float(sample_rate), int(steps))
    prefetch([key])
    return _SWEEP_SIGMAS[key]


@functools.lru_cache(maxsize=None)
def final_sigma(epsilon: float, delta: float, sample_rate: float, steps: int,
                accountant: str = "pld") -> float:
    """σ as ``train`` calibrates it (default tolerance, the accountant's reporting grid)."""
    return calibrate_noise_multiplier(epsilon, delta, sample_rate, steps, accountant=accountant,
                                      pld_discretization=PLD_DISCRETIZATION)


def _sizes(problem: Problem) -> List[int]:
    """Candidate batch sizes, largest first: N (full batch) or the whole budget in one step,
    then the powers of two below it."""
    top = min(problem.dataset_size, problem.sequences)
    return [top] + [2 ** e for e in range(top.bit_length() - 1, -1, -1) if 2 ** e < top]


def batch_grid(problem: Problem, rows: int) -> List[int]:
    """The sweep's batch sizes, largest first: the ``rows`` largest candidates that give at
    least ``min_steps`` steps, after up to CONTEXT_ROWS larger ones that give fewer (shown
    for context, never recommended)."""
    k = problem.sequences
    sizes = _sizes(problem)
    above = [b for b in sizes if k // b < problem.min_steps][-CONTEXT_ROWS:]
    return above + [b for b in sizes if k // b >= problem.min_steps][:rows]


def _key(problem: Problem, batch_size: int) -> Tuple[float, float, float, int]:
    return (float(problem.epsilon), float(problem.delta), batch_size / problem.dataset_size,
            problem.sequences // batch_size)


def _row(problem: Problem, batch_size: int) -> Row:
    steps = problem.sequences // batch_size
    sigma = sweep_sigma(problem.epsilon, problem.delta, batch_size / problem.dataset_size, steps)
    return Row(batch_size, steps, sigma, problem.dataset_size, problem.seq_len)


def sweep(problem: Problem, rows: int = 8, jobs: int = 1) -> List[Row]:
    """Every configuration of the grid, largest batch first, each with its calibrated σ."""
    problem.check()
    prefetch([_key(problem, b) for b in batch_grid(problem, rows)], jobs)
    return [_row(problem, b) for b in batch_grid(problem, rows)]


def best(rows: Iterable[Row], min_steps: int) -> Row:
    """The row with the lowest σ/B̄ among those with at least ``min_steps`` steps."""
    allowed = [r for r in rows if r.steps >= min_steps]
    if not allowed:
        raise ValueError(f"no configuration on the grid has >= {min_steps} steps")
    return min(allowed, key=lambda r: r.noise_batch_ratio)


def finalize(problem: Problem, row: Row, accountant: str = "pld") -> Row:
    """The row with σ calibrated as ``train`` will calibrate it."""
    with quiet_dp_accounting():
        sigma = final_sigma(problem.epsilon, problem.delta, row.sample_rate, row.steps, accountant)
    return replace(row, noise_multiplier=sigma)


def _beats(problem: Problem, found: Row, batch_size: int) -> bool:
    """Whether ``found`` has a lower σ/B̄ than ``batch_size`` would, without calibrating it:
    at the σ that would tie the ratios, that configuration overspends ε, so (ε falls as σ
    grows) its own calibrated σ is larger and its ratio too. One ε evaluation on the sweep's
    grid instead of a calibration (~8 of them)."""
    steps = problem.sequences // batch_size
    tie = found.noise_batch_ratio * batch_size
    return epsilon_for(tie, batch_size / problem.dataset_size, steps, problem.delta, "pld",
                       pld_discretization=SWEEP_PLD_DISCRETIZATION) > problem.epsilon


def descend(problem: Problem) -> Row:
    """The best row of ``problem``'s grid for the trends: walk down from the largest batch
    allowed by the floor while σ/B̄ falls; stop at the first batch that ``found`` beats. A
    local minimum along the grid (the full sweep of the main problem shows σ/B̄ falling
    with the batch all along), usually for one calibration and one ε evaluation."""
    problem.check()
    found = None
    for b in _sizes(problem):
        if problem.sequences // b < problem.min_steps:
            continue
        if found is not None and _beats(problem, found, b):
            break
        row = _row(problem, b)
        if found is not None and row.noise_batch_ratio >= found.noise_batch_ratio:
            break
        found = row
    return found


@dataclass(frozen=True)
class Trend:
    """The best row of the main problem with ε, compute and data scaled by these factors."""

    epsilon_factor: float
    compute_factor: float
    data_factor: float
    row: Optional[Row]             # None: no configuration (why: ``note``)
    note: str = ""


def trends(problem: Problem, epsilon_factors: Iterable[float], compute_factors: Iterable[float],
           data_factors: Iterable[float], jobs: int = 1) -> List[Trend]:
    """The best row as ε varies, for each compute factor (data fixed) and each data factor
    (compute fixed): the VaultGemma picture of the returns on privacy budget."""
    scenarios = [(eps, compute, 1.0) for compute in compute_factors for eps in epsilon_factors]
    scenarios += [(eps, 1.0, data) for data in data_factors if data != 1.0
                  for eps in epsilon_factors]
    variants = [problem.scaled(epsilon=e, tokens=c, data=d) for e, c, d in scenarios]
    # the largest allowed batch of each variant, in parallel: descend usually needs no other
    keys = []
    for variant in variants:
        try:
            variant.check()
        except ValueError:
            continue
        allowed = [b for b in _sizes(variant) if variant.sequences // b >= variant.min_steps]
        keys += [_key(variant, b) for b in allowed[:1]]
    prefetch(keys, jobs)
    out = []
    for (eps, compute, data), variant in zip(scenarios, variants):
        try:
            row, note = descend(variant), ""
        except ValueError as exc:   # e.g. δ >= 1/N on a quarter of the data
            row, note = None, str(exc)
        out.append(Trend(eps, compute, data, row, note))
    return out


class quiet_dp_accounting:
    """dp-accounting's RDP code logs a warning per fractional order it drops; the planner's
    PLD calls are not affected, but any RDP call would flood the table with them."""

    def __enter__(self):
        self._logger = logging.getLogger("absl")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return False
