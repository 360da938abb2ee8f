"""The plan of a training run, fixed before training, and the document-level ε after it.

The number of steps is fixed first: σ is calibrated so that the planned steps spend at
most the target ε, or, with --noise-multiplier and --epsilon both given, training stops
at the last step within the budget. N, the number of training sequences, sets q = B̄/N
and is treated as public (the card says so); δ must be below 1/N, since a mechanism that
publishes one random sequence in full is (0, 1/N)-DP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

DEFAULT_EPSILON, DEFAULT_DELTA, DEFAULT_STEPS = 8.0, 1e-6, 500


@dataclass
class Plan:
    dp: bool
    num_train: int
    batch_size: int                     # expected batch size B̄
    steps: int                          # steps this run will take in total
    requested_steps: int
    sample_rate: Optional[float] = None
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    delta: Optional[float] = None
    max_batch_size: Optional[int] = None  # truncated Poisson: every batch has exactly this many rows
    budget_note: str = ""


def _check_delta(args, num_train: int) -> None:
    from vaultkern.privacy.assembly import check_delta
    check_delta(args.delta, num_train, args.allow_delta_above_1_over_n,
                override=", or pass --allow-delta-above-1-over-n to train anyway (the model card "
                         "then says that no formal guarantee holds)")


def make_plan(args, num_train: int) -> Plan:
    if args.batch_size < 1 or args.batch_size > num_train:
        raise ValueError(f"--batch-size {args.batch_size} must be between 1 and the number of "
                         f"training sequences ({num_train})")
    if args.steps is not None:
        requested = args.steps
    elif args.epochs is not None:
        requested = math.ceil(args.epochs * num_train / args.batch_size)
    else:
        requested = DEFAULT_STEPS
    if requested < 1:
        raise ValueError(f"the run needs at least one step (got steps={requested})")
    if args.no_dp:
        return Plan(False, num_train, args.batch_size, requested, requested)

    from vaultkern.privacy import calibrate_noise_multiplier
    from vaultkern.privacy.accounting import epsilon_for

    _check_delta(args, num_train)
    cap = args.max_batch_size
    if cap is not None and not args.batch_size <= cap <= num_train:
        raise ValueError(f"--max-batch-size {cap} must lie between --batch-size "
                         f"{args.batch_size} and the number of training sequences ({num_train})")
    if cap is not None and args.accountant != "pld":
        raise ValueError("--max-batch-size (truncated Poisson) is accounted by dp-accounting's "
                         "PLD accountant only; use --accountant pld")
    truncation = {} if cap is None else {"truncated_max_batch": cap, "dataset_size": num_train}
    q = args.batch_size / num_train
    target = args.epsilon
    if args.noise_multiplier is None:
        target = DEFAULT_EPSILON if target is None else target
        sigma = calibrate_noise_multiplier(target, args.delta, q, requested,
                                           accountant=args.accountant, **truncation)
    else:
        sigma = args.noise_multiplier
        if not sigma > 0:
            raise ValueError(f"--noise-multiplier must be > 0, got {sigma}")

    def eps(k: int) -> float:
        return epsilon_for(sigma, q, k, args.delta, accountant=args.accountant, **truncation)

    steps, note = requested, ""
    # a calibrated σ meets the target by construction; a given σ is checked against the budget
    if args.noise_multiplier is not None and target is not None and eps(requested) > target:
        if eps(1) > target:
            raise ValueError(f"even one step with σ={sigma}, q={q:.4g} spends ε={eps(1):.3g} > "
                             f"--epsilon {target}; raise σ or the budget")
        lo, hi = 1, requested  # eps(lo) <= target < eps(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if eps(mid) <= target else (lo, mid)
        steps = lo
        note = (f"the ε budget {target} allows {steps} of the {requested} requested steps "
                f"(σ={sigma:.4g}, q={q:.4g}); training stops at step {steps}")
    return Plan(True, num_train, args.batch_size, steps, requested, q, sigma, target, args.delta,
                cap, note)


# The document-level number is derived, not the accounted guarantee: a coarse PLD grid keeps it
# to about a second (dp-accounting rounds pessimistically, so it stays an upper bound; on the
# demo it agreed with the 1e-4 grid to 5 digits, 10x faster)
DOCUMENT_PLD_DISCRETIZATION = 1e-2


def document_epsilon(plan: Plan, steps: int, k: int) -> Optional[float]:
    """ε (at the plan's δ) for a group of k sequences, e.g. one document spanning k rows.

    Poisson sampling: each of the k rows joins a batch independently with probability q, so
    a step's contribution of the group is the clipped sum of j ~ Binomial(k, q) rows, of
    norm at most j·C. Ganesh (2024, "Tight group-level DP guarantees for DP-SGD with sampling
    via mixture of Gaussians mechanisms", arXiv:2401.10294) shows that the mixture of
    Gaussians N(j·C, σ²C²), j ~ Binomial(k, q), against N(0, σ²C²) is a dominating pair of
    one step for groups of size k (tight when the k gradients are aligned); its composition
    over the steps is computed by dp-accounting's PLD accountant
    (MixtureOfGaussiansDpEvent), whatever accountant the run uses. For k = 1 this is the
    run's own ε. None for truncated Poisson, where rows are not sampled independently.
    """
    if not plan.dp or plan.max_batch_size is not None or k < 1 or steps < 1:
        return None
    import dp_accounting
    from vaultkern.privacy.accounting import make_dp_accountant
    q = plan.sample_rate
    step = dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
        plan.noise_multiplier, [float(j) for j in range(k + 1)],
        [math.comb(k, j) * q ** j * (1 - q) ** (k - j) for j in range(k + 1)])
    accountant = make_dp_accountant("pld", DOCUMENT_PLD_DISCRETIZATION)
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, steps))
    return float(accountant.get_epsilon(plan.delta))
