"""Privacy accounting for DP-SGD through Google's dp-accounting (DESIGN.md §5).

One DP-SGD step on a Poisson-sampled batch (each of the N examples joins
independently with probability q), clipped to norm C, with Gaussian noise of
standard deviation σ·C, is the event

    PoissonSampledDpEvent(q, GaussianDpEvent(σ))

and T steps are its T-fold composition. With *truncated* Poisson sampling (a
sampled batch larger than the cap b is cut down to a uniformly random subset
of size b, smaller batches are padded with weight-0 rows) one step is

    TruncatedSubsampledGaussianDpEvent(N, q, b, σ)

which dp-accounting accounts with its PLD accountant only; the RDP accountant
has no analysis of it, so ``Accountant("rdp")`` refuses truncated steps with an
error rather than report an ε that does not describe what was done.

Nothing here computes a privacy loss by itself: all numbers come from
dp-accounting's ``PLDAccountant`` (default, tight) or ``RdpAccountant``
(an upper bound, looser). Neighbouring datasets are add-or-remove-one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple

import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from vaultkern.privacy.pld import ComposedPLDs, parts_of

ACCOUNTANTS = ("pld", "rdp")
# Opacus' other accountants, and what vaultkern computes for them (one notice each time).
OPACUS_ACCOUNTANTS = {
    "prv": "accountant='prv' (Opacus' default): computed with dp-accounting's PLD accountant, "
           "the closest equivalent (numerical, tight, an upper bound); ε may differ from "
           "Opacus' PRV in the second or third digit. Pass accountant='pld' to silence this.",
    "gdp": "accountant='gdp': Opacus' Gaussian-DP accountant is a central-limit approximation "
           "that can under-report ε; vaultkern computes a valid upper bound with dp-accounting's "
           "PLD accountant instead (expect a larger ε). Pass accountant='pld' (or 'rdp').",
}


class HistoryEntry(NamedTuple):
    """``num_steps`` consecutive DP-SGD steps with the same parameters."""

    noise_multiplier: float
    sample_rate: float
    num_steps: int
    truncated_max_batch: Optional[int] = None
    dataset_size: Optional[int] = None

    def event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event of these steps, composed."""
        if self.truncated_max_batch is None:
            one = dp_accounting.PoissonSampledDpEvent(
                self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier))
        else:
            one = dp_accounting.TruncatedSubsampledGaussianDpEvent(
                dataset_size=self.dataset_size, sampling_probability=self.sample_rate,
                truncated_batch_size=self.truncated_max_batch,
                noise_multiplier=self.noise_multiplier)
        return dp_accounting.SelfComposedDpEvent(one, self.num_steps)


def _check_kind(kind: str) -> str:
    if kind not in ACCOUNTANTS:
        raise ValueError(f"accountant={kind!r}: expected one of {ACCOUNTANTS} (or Opacus' "
                         f"{tuple(OPACUS_ACCOUNTANTS)}, computed as 'pld')")
    return kind


class _UnconvergedOrder(logging.Filter):
    """Drops dp-accounting's warning for an RDP order whose series does not converge (small
    fractional orders at a large q): that order is left out of the minimum over orders, so
    ε stays an upper bound and the line, repeated per order and per call, tells nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


@contextlib.contextmanager
def _quiet_rdp():
    logger, drop = logging.getLogger("absl"), _UnconvergedOrder()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# Discretisation of the privacy-loss values in the PLD accountant. dp-accounting
# rounds pessimistically, so a coarser grid gives a (slightly) larger, still
# valid ε; the fine grid is what get_epsilon reports, the coarse one only speeds
# up the σ search in calibrate_noise_multiplier (the result is re-checked on
# the fine grid).
PLD_DISCRETIZATION = 1e-4
PLD_SEARCH_DISCRETIZATION = 1e-3


def make_dp_accountant(kind: str = "pld",
                       pld_discretization: float = PLD_DISCRETIZATION
                       ) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant (add-or-remove-one neighbours)."""
    if _check_kind(kind) == "pld":
        return pld_privacy_accountant.PLDAccountant(
            value_discretization_interval=pld_discretization)
    return rdp_privacy_accountant.RdpAccountant()


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta}: must lie strictly between 0 and 1")
    return delta


def _validated_entry(noise_multiplier, sample_rate, num_steps, truncated_max_batch,
                     dataset_size, kind) -> HistoryEntry:
    sigma = float(noise_multiplier)
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ValueError(f"noise_multiplier={noise_multiplier}: must be a finite number >= 0")
    q = float(sample_rate)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sample_rate={sample_rate}: must lie in [0, 1]")
    if int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(f"num_steps={num_steps}: must be an integer >= 0")
    if truncated_max_batch is None:
        return HistoryEntry(sigma, q, int(num_steps))
    if kind != "pld":
        raise ValueError(
            f"truncated_max_batch={truncated_max_batch}: truncated Poisson sampling is only "
            "accounted by the PLD accountant (dp-accounting's TruncatedSubsampledGaussianDpEvent); "
            f"this Accountant is {kind!r}. Use Accountant('pld').")
    if int(truncated_max_batch) != truncated_max_batch or truncated_max_batch < 1:
        raise ValueError(f"truncated_max_batch={truncated_max_batch}: must be an integer >= 1")
    if dataset_size is None or int(dataset_size) != dataset_size or dataset_size < 1:
        raise ValueError(
            f"dataset_size={dataset_size}: truncated Poisson accounting needs the dataset size "
            "(an integer >= 1)")
    return HistoryEntry(sigma, q, int(num_steps), int(truncated_max_batch), int(dataset_size))


class Accountant:
    """The privacy spent by a training run: a history of DP-SGD steps.

    ``kind="pld"`` (default) uses dp-accounting's privacy-loss-distribution
    accountant, ``"rdp"`` its Rényi-DP accountant; Opacus' ``"prv"`` and ``"gdp"``
    are computed as ``"pld"``, with a one-line notice. Consecutive steps with the
    same (σ, q, cap, N) are merged into one history entry, so long runs keep a
    short history. ε is a function of the history alone (PLD: composed by
    :mod:`vaultkern.privacy.pld`, which keeps the composed prefix so that a few
    more steps cost one composition), so a run restored with
    :meth:`load_state_dict` reports exactly the ε of an uninterrupted one.

    ``pld_discretization`` is the PLD accountant's grid of privacy-loss values
    (dp-accounting's default 1e-4). dp-accounting rounds pessimistically, so a
    coarser grid (e.g. 1e-3, about 10x faster; truncated-Poisson events are
    slow on the fine grid) reports a slightly larger but still valid ε.
    """

    def __init__(self, kind: str = "pld", pld_discretization: float = PLD_DISCRETIZATION):
        if kind in OPACUS_ACCOUNTANTS:
            warnings.warn(OPACUS_ACCOUNTANTS[kind], UserWarning, stacklevel=2)
            kind = "pld"
        self.kind = _check_kind(kind)
        if not 0 < pld_discretization <= 0.1:
            raise ValueError(f"pld_discretization={pld_discretization}: must lie in (0, 0.1]")
        self.pld_discretization = float(pld_discretization)
        self.history: List[HistoryEntry] = []
        self._plds = ComposedPLDs(self.pld_discretization)
        self._epsilons: dict = {}  # (history, δ) -> ε of the current history

    def __getstate__(self) -> dict:  # the caches are rebuilt on demand, never copied
        state = dict(self.__dict__)
        state["_plds"], state["_epsilons"] = ComposedPLDs(self.pld_discretization), {}
        return state

    def __len__(self) -> int:
        return len(self.history)

    @property
    def total_steps(self) -> int:
        return sum(entry.num_steps for entry in self.history)

    def mechanism(self) -> str:
        return self.kind

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1,
             truncated_max_batch: Optional[int] = None,
             dataset_size: Optional[int] = None) -> None:
        """Record ``num_steps`` steps of noise σ on batches sampled at rate q.

        With ``truncated_max_batch`` the steps used truncated Poisson sampling
        from a dataset of ``dataset_size`` examples (PLD only).
        """
        entry = _validated_entry(noise_multiplier, sample_rate, num_steps,
                                 truncated_max_batch, dataset_size, self.kind)
        if entry.num_steps == 0:
            return
        last = self.history[-1] if self.history else None
        if last is not None and last._replace(num_steps=0) == entry._replace(num_steps=0):
            self.history[-1] = last._replace(num_steps=last.num_steps + entry.num_steps)
        else:
            self.history.append(entry)

    def event(self) -> dp_accounting.DpEvent:
        """The composed dp-accounting event of the whole history."""
        return dp_accounting.ComposedDpEvent([entry.event() for entry in self.history])

    def _rdp(self, orders: Optional[Sequence[float]] = None) -> rdp_privacy_accountant.RdpAccountant:
        accountant = rdp_privacy_accountant.RdpAccountant(orders)
        with _quiet_rdp():
            accountant.compose(self.event())
        return accountant

    def get_epsilon(self, delta: float, alphas: Optional[Sequence[float]] = None, *,
                    eps_error: Optional[float] = None,
                    delta_error: Optional[float] = None) -> float:
        """ε such that the run so far is (ε, δ)-DP (0 before any step).

        Opacus' keywords: ``alphas`` (RDP orders, ``kind="rdp"`` only) are used;
        ``eps_error``/``delta_error`` (the tolerances of Opacus' PRV estimate) are checked
        and need nothing more: the PLD ε is already an upper bound, at the resolution of
        ``pld_discretization``.
        """
        delta = _check_delta(delta)
        for name, value in (("eps_error", eps_error), ("delta_error", delta_error)):
            if value is not None and not float(value) > 0:
                raise ValueError(f"{name}={value}: must be > 0")
        if alphas is not None and self.kind != "rdp":
            raise ValueError(f"alphas={alphas}: RDP orders, but this accountant is "
                             f"{self.kind!r}; use Accountant('rdp') to choose orders")
        if not self.history:
            return 0.0
        key = (tuple(self.history), delta, None if alphas is None else tuple(alphas))
        if key not in self._epsilons:
            if self.kind == "rdp":
                eps = self._rdp(alphas).get_epsilon(delta)
            else:
                parts = parts_of(self.history)
                eps = math.inf if parts is None else self._plds.compose(parts).get_epsilon_for_delta(delta)
            self._epsilons = {k: v for k, v in self._epsilons.items() if k[0] == key[0]}
            self._epsilons[key] = float(eps)
        return self._epsilons[key]

    def get_privacy_spent(self, *, delta: float,
                          alphas: Optional[Sequence[float]] = None) -> Tuple[float, float]:
        """(ε, the RDP order that gives it), as Opacus' RDP accountant returns them."""
        if self.kind != "rdp":
            raise ValueError(
                f"get_privacy_spent returns (epsilon, best RDP order), an RDP quantity; this "
                f"accountant is {self.kind!r}. Use get_epsilon(delta), or Accountant('rdp').")
        delta = _check_delta(delta)
        if not self.history:
            return 0.0, 0.0
        eps, order = self._rdp(alphas).get_epsilon_and_optimal_order(delta)
        return float(eps), float(order)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "pld_discretization": self.pld_discretization,
                "history": [list(entry) for entry in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(
                f"accountant state is of kind {state.get('kind')!r} but this Accountant is "
                f"{self.kind!r}")
        grid = state.get("pld_discretization", self.pld_discretization)
        if self.kind == "pld" and grid != self.pld_discretization:
            raise ValueError(
                f"accountant state has pld_discretization={grid} but this Accountant has "
                f"{self.pld_discretization}; the same history would report a different epsilon")
        history = [HistoryEntry(*entry) for entry in state["history"]]
        for entry in history:  # re-validate: a checkpoint is external input
            _validated_entry(*entry, kind=self.kind)
        self.history = history

    def __repr__(self) -> str:
        return f"Accountant(kind={self.kind!r}, steps={self.total_steps}, entries={len(self)})"


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "pld", truncated_max_batch: Optional[int] = None,
                dataset_size: Optional[int] = None,
                pld_discretization: float = PLD_DISCRETIZATION) -> float:
    """ε after ``steps`` steps of noise σ at sample rate q (one-off computation)."""
    acc = Accountant(accountant, pld_discretization)
    acc.step(noise_multiplier, sample_rate, steps, truncated_max_batch, dataset_size)
    return acc.get_epsilon(delta)


# The search for σ only considers this range; σ above it would drown any
# gradient, σ below it is not private in any useful sense.
SIGMA_MIN, SIGMA_MAX = 0.05, 1.0e4


@_quiet_rdp()
def calibrate_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float,
                               steps: int, accountant: str = "pld",
                               epsilon_tolerance: float = 0.01,
                               truncated_max_batch: Optional[int] = None,
                               dataset_size: Optional[int] = None,
                               pld_discretization: float = PLD_DISCRETIZATION) -> float:
    """Smallest noise multiplier σ whose ε after ``steps`` steps is at most the target.

    Returns σ with ``(1 - epsilon_tolerance)·ε* <= ε(σ) <= ε*``. The root is
    found by ``dp_accounting.calibrate_dp_mechanism`` (Brent's method with a
    guarantee that the returned σ does not exceed the budget) inside a bracket
    [σ_lo, σ_hi] found by doubling/halving; since ε is roughly proportional to
    1/σ, a σ tolerance of ``epsilon_tolerance·σ_lo/4`` is tried first and
    tightened if the ε check fails. The search runs on a coarse PLD grid
    (faster); the result is checked on ``pld_discretization``, the grid the
    :class:`Accountant` reports with, and searched again there if needed.
    ``truncated_max_batch``/``dataset_size``: calibrate for truncated Poisson.
    """
    kind = _check_kind(accountant)
    target_epsilon = float(target_epsilon)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon={target_epsilon}: must be a finite number > 0")
    target_delta = _check_delta(target_delta)
    if not 0.0 < float(sample_rate) <= 1.0:
        raise ValueError(f"sample_rate={sample_rate}: must lie in (0, 1]")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps={steps}: must be an integer >= 1")
    if not 0.0 < epsilon_tolerance < 1.0:
        raise ValueError(f"epsilon_tolerance={epsilon_tolerance}: must lie in (0, 1)")
    fine = float(pld_discretization)

    def entry(sigma: float) -> HistoryEntry:
        return _validated_entry(sigma, sample_rate, int(steps), truncated_max_batch,
                                dataset_size, kind)

    def epsilon(sigma: float, grid: float) -> float:
        dp = make_dp_accountant(kind, grid)
        return float(dp.compose(entry(sigma).event()).get_epsilon(target_delta))

    def within_target(eps: float) -> bool:
        return (1.0 - epsilon_tolerance) * target_epsilon <= eps <= target_epsilon

    entry(1.0)  # validate the truncation arguments once, before any search
    grids = [max(PLD_SEARCH_DISCRETIZATION, fine), fine] if kind == "pld" else [fine]
    if grids[0] == grids[-1]:
        grids = grids[:1]
    search = grids[0]
    # Bracket: epsilon(lo) > target >= epsilon(hi).
    lo, hi = 1.0, 1.0
    if epsilon(1.0, search) > target_epsilon:
        while epsilon(hi, search) > target_epsilon:
            lo, hi = hi, hi * 2.0
            if hi > SIGMA_MAX:
                raise ValueError(
                    f"target_epsilon={target_epsilon}, target_delta={target_delta} cannot be "
                    f"reached with sample_rate={sample_rate} and steps={steps}: even "
                    f"noise_multiplier={SIGMA_MAX:g} gives epsilon="
                    f"{epsilon(SIGMA_MAX, search):.4g}")
    else:
        while epsilon(lo, search) <= target_epsilon:
            lo, hi = lo / 2.0, lo
            if lo < SIGMA_MIN:
                raise ValueError(
                    f"target_epsilon={target_epsilon} is so large that noise_multiplier < "
                    f"{SIGMA_MIN} already meets it (sample_rate={sample_rate}, steps={steps}); "
                    "such a run is not meaningfully private - lower the target")

    # Search on the coarse grid first, then (if its answer fails the check on
    # the fine grid that get_epsilon uses) on the fine grid, tightening tol.
    tol = epsilon_tolerance * lo / 4.0
    sigma, eps = None, None
    for grid in grids:
        for _ in range(3):
            try:
                sigma = mechanism_calibration.calibrate_dp_mechanism(
                    lambda: make_dp_accountant(kind, grid), lambda s: entry(s).event(),
                    target_epsilon, target_delta,
                    mechanism_calibration.ExplicitBracketInterval(lo, hi), tol=tol)
            except ValueError as exc:  # the root finder's bracket: ε flat in σ out here
                raise ValueError(
                    f"target_epsilon={target_epsilon}, target_delta={target_delta} cannot be "
                    f"met reliably with sample_rate={sample_rate} and steps={steps}: it needs "
                    f"noise_multiplier > {lo:g}, where epsilon hardly changes with it. Use "
                    "fewer steps, a smaller sample rate (batch size) or a larger target "
                    f"epsilon. ({exc})") from exc
            eps = epsilon(sigma, fine)
            if within_target(eps):
                return float(sigma)
            if eps > target_epsilon:  # coarse grid not pessimistic enough here
                break
            tol /= 10.0
    raise RuntimeError(
        f"calibration did not reach epsilon within {epsilon_tolerance:.0%} of "
        f"target_epsilon={target_epsilon} (last sigma={sigma}, epsilon={eps}); "
        "the accountant's epsilon may be too coarse here - loosen epsilon_tolerance")
