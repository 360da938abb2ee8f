"""Tables and the PNG of ``python -m vaultkern plan``'s sweep (vaultkern.privacy.planner)."""
from __future__ import annotations

from typing import List

from vaultkern.privacy.planner import (SWEEP_PLD_DISCRETIZATION, Problem, Row, Trend)

PROXY_NOTE = (
    "Ranked by the noise-batch ratio σ/B̄ (the std of the noise in the averaged gradient, in\n"
    "units of the clipping norm): a PROXY for utility, NOT a predicted loss - the fitted\n"
    "scaling-law data that would weigh it against steps and model size is not available here.\n"
    "On a fixed budget σ/B̄ falls as the batch grows, so the floor on steps (a judgement)\n"
    "decides how few, how large the steps are.")


def _si(x: float) -> str:
    """819200 -> '819.2K'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


def _factor(x: float) -> str:
    return f"×{x:g}" if x >= 1 else f"×1/{1 / x:g}"


def format_sweep(problem: Problem, rows: List[Row], pick: Row, final: Row,
                 accountant: str) -> str:
    k, n = problem.sequences, problem.dataset_size
    lines = [
        f"target       epsilon={problem.epsilon:g}, delta={problem.delta:g}; N={n} units of "
        f"{problem.seq_len} tokens",
        f"compute      {_si(problem.tokens)} tokens = {k} sequences = {k / n:.3g} epochs"
        + (f" (capped by --max-epochs {problem.max_epochs:g}: the rest of the budget is unused)"
           if problem.data_limited else ""),
        f"floor        {problem.min_steps} steps",
        "",
        PROXY_NOTE,
        "",
        f"{'batch':>9} {'steps':>8} {'q':>9} {'epochs':>7} {'tokens':>9} {'sigma':>8} "
        f"{'sigma/B':>10}",
    ]
    for r in rows:
        mark = ("  <- best" if r == pick else
                "  (below the floor)" if r.steps < problem.min_steps else "")
        lines.append(f"{r.batch_size:>9} {r.steps:>8} {r.sample_rate:>9.4g} {r.epochs:>7.3g} "
                     f"{_si(r.tokens):>9} {r.noise_multiplier:>8.4f} "
                     f"{r.noise_batch_ratio:>10.4g}{mark}")
    lines += [
        f"σ: PLD accountant on a {SWEEP_PLD_DISCRETIZATION:g} grid (dp-accounting rounds "
        "pessimistically: valid, within ~0.1% of the fine grid)",
        "",
        f"recommended  --batch-size {final.batch_size} --steps {final.steps}: σ = "
        f"{final.noise_multiplier:.4f} ({accountant}, as `train` calibrates it), "
        f"σ/B̄ = {final.noise_batch_ratio:.4g}, q = {final.sample_rate:.4g}",
        "             learning rate: not derived here; larger batches with fewer steps usually "
        "want a larger one",
    ]
    return "\n".join(lines)


def _scenarios(moves: List[Trend]):
    """(label, [trend per ε factor]) per compute or data factor, in order."""
    groups = {}
    for t in moves:
        key = (t.compute_factor, t.data_factor)
        groups.setdefault(key, []).append(t)
    return [(f"compute {_factor(c)}" if d == 1.0 else f"data {_factor(d)}", ts)
            for (c, d), ts in groups.items()]


def format_trends(problem: Problem, moves: List[Trend]) -> str:
    groups = _scenarios(moves)
    eps = [t.epsilon_factor * problem.epsilon for t in groups[0][1]]
    head = f"{'':<16}" + "".join(f"{f'ε={e:g}':>10}" for e in eps) + "   best batch × steps"
    lines = ["How the best configuration moves: σ/B̄ at the best batch × steps on the floor of "
             f"{problem.min_steps} steps,",
             "with ε, compute (tokens) and data (N) scaled one at a time from the problem above:",
             "", head]
    for label, ts in groups:
        cells = "".join(f"{t.row.noise_batch_ratio:>10.4g}" if t.row else f"{'-':>10}" for t in ts)
        configs = list(dict.fromkeys(f"{t.row.batch_size}×{t.row.steps}" for t in ts if t.row))
        lines.append(f"{label:<16}{cells}   {', '.join(configs)}")
    notes = list(dict.fromkeys(t.note for t in moves if t.note))
    lines += [f"  -: {note}" for note in notes]
    base = dict(groups).get("compute ×1")
    if base and all(t.row for t in base):
        drops = [1 - b.row.noise_batch_ratio / a.row.noise_batch_ratio
                 for a, b in zip(base, base[1:])]
        lines.append("each step up in ε at the same compute lowers σ/B̄ by "
                     + ", ".join(f"{d:.0%}" for d in drops)
                     + ": diminishing returns unless compute or data grow too")
    return "\n".join(lines)


def plot(path: str, problem: Problem, rows: List[Row], pick: Row, moves: List[Trend]) -> None:
    """Three panels: σ/B̄ over the sweep, and against ε per compute and per data factor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    for below in (True, False):
        sel = [r for r in rows if (r.steps < problem.min_steps) == below]
        ax.plot([r.batch_size for r in sel], [r.noise_batch_ratio for r in sel], "o-",
                color="0.6" if below else "C0",
                label=f"below the floor of {problem.min_steps} steps" if below else "allowed")
    ax.plot([pick.batch_size], [pick.noise_batch_ratio], "*", ms=16, color="C3",
            label=f"best: {pick.batch_size} × {pick.steps} steps")
    ax.set(xscale="log", yscale="log", xlabel="expected batch B̄ (steps = budget / B̄)",
           ylabel="σ / B̄", title=f"on the budget ({_si(problem.tokens)} tokens, "
                                 f"ε={problem.epsilon:g})")
    ax.legend(fontsize=8)
    for ax, kind in zip(axes[1:], ("compute", "data")):
        for label, ts in _scenarios(moves):
            if not label.startswith(kind) and label != "compute ×1":
                continue
            pts = [(t.epsilon_factor * problem.epsilon, t.row.noise_batch_ratio)
                   for t in ts if t.row]
            if pts:
                ax.plot(*zip(*pts), "o-", label=label if label.startswith(kind) else "data ×1")
        ax.set(xscale="log", yscale="log", xlabel="ε", ylabel="σ / B̄ at the best batch × steps",
               title=f"as ε and {kind} grow")
        ax.legend(fontsize=8)
    fig.suptitle("noise-batch ratio σ/B̄: a proxy for utility, not a predicted loss "
                 f"(δ={problem.delta:g}, N={problem.dataset_size}, floor {problem.min_steps} "
                 "steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
