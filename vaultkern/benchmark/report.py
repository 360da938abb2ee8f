"""Results files: targets pass/miss, the JSON, a markdown table and a PNG chart."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Tuple

from vaultkern.benchmark.providers import PROVIDERS

# (id, size, model, kind, competitor, threshold, description)
#   kind "time_ratio":   vaultkern step time / competitor step time  <= threshold
#   kind "faster":       vaultkern step time / competitor step time  <  threshold (1.0)
#   kind "tps_ratio":    vaultkern tokens/s / competitor tokens/s    >= threshold
#   kind "batch_ratio":  vaultkern max batch / competitor max batch  >= threshold
TARGETS = [
    ("cpu-step-vs-nondp", "cpu", "*", "time_ratio", "nondp", 1.15,
     "vaultkern step time <= 1.15x non-private"),
    ("cpu-faster-than-hooks", "cpu", "*", "faster", "opacus-hooks", 1.0,
     "vaultkern faster than Opacus hooks"),
    ("cpu-faster-than-ghost", "cpu", "*", "faster", "opacus-ghost", 1.0,
     "vaultkern faster than Opacus ghost"),
    ("gpu-tps-vs-nondp", "gpu", "gpt2-small", "tps_ratio", "nondp", 0.95,
     "vaultkern tokens/s >= 0.95x non-private"),
    ("gpu-batch-vs-nondp", "gpu", "gpt2-small", "batch_ratio", "nondp", 0.95,
     "vaultkern largest batch >= 0.95x non-private's"),
    ("gpu-tps-vs-ghost", "gpu", "gpt2-small", "tps_ratio", "opacus-ghost", 2.0,
     "vaultkern tokens/s >= 2x Opacus ghost"),
]


def _ok(entry: Optional[dict], need: str) -> bool:
    if not entry or entry.get("status") != "ok":
        return False
    if need == "batch":
        mb = entry.get("max_batch")
        return bool(mb) and mb.get("value") is not None
    return entry.get("step_ms") is not None


def _value(kind: str, vk: dict, other: dict) -> float:
    if kind in ("time_ratio", "faster"):
        return vk["step_ms"]["median"] / other["step_ms"]["median"]
    if kind == "tps_ratio":
        return vk["tokens_per_s"] / other["tokens_per_s"]
    mine, theirs = vk["max_batch"]["value"], other["max_batch"]["value"]
    return mine / theirs if theirs else float("inf")


def _verdict(kind: str, value: float, threshold: float) -> Tuple[str, str]:
    if kind == "time_ratio":
        passed = value <= threshold
        miss = f"{(value / threshold - 1) * 100:.0f}% over the {threshold:g}x limit"
    elif kind == "faster":
        passed = value < threshold
        miss = f"{(value - 1) * 100:.0f}% slower than the competitor"
    else:
        passed = value >= threshold
        miss = f"{(1 - value / threshold) * 100:.0f}% short of the {threshold:g}x target"
    return ("pass", "") if passed else ("miss", miss)


def evaluate_targets(results: dict) -> List[dict]:
    """Pass/miss of every target that applies to this run's size.

    Both numbers of a comparison always come from the same configuration: the tied
    one when both providers ran there, else the untied one (e.g. Opacus ghost refuses
    tied weights).
    """
    size = results["settings"]["size"]
    configs = {c["name"]: c for c in results["configs"]}
    models = results["settings"]["models"]
    out = []
    for tid, tsize, tmodel, kind, competitor, threshold, desc in TARGETS:
        if tsize != size:
            continue
        for model in (models if tmodel == "*" else [tmodel]):
            if model not in models:
                continue
            need = "batch" if kind == "batch_ratio" else "time"
            record = {"id": tid, "model": model, "description": desc, "competitor": competitor,
                      "kind": kind, "threshold": threshold, "config": None, "value": None}
            reasons = []
            for tie in ("tied", "untied"):
                config = configs.get(f"{model}/{tie}")
                if config is None:
                    continue
                vk = config["providers"].get("vaultkern")
                other = config["providers"].get(competitor)
                if _ok(vk, need) and _ok(other, need):
                    value = _value(kind, vk, other)
                    status, miss = _verdict(kind, value, threshold)
                    record.update(config=config["name"], value=value, status=status, detail=miss)
                    break
                missing = [f"{n}: {(e or {}).get('status', 'not run')}" for n, e in
                           (("vaultkern", vk), (competitor, other)) if not _ok(e, need)]
                reasons.append(f"{config['name']}: " + "; ".join(missing))
            if record["config"] is None:
                record.update(status="n/a", detail=" | ".join(reasons) or "configuration not run")
            out.append(record)
    order = {m: i for i, m in enumerate(models)}
    return sorted(out, key=lambda r: order[r["model"]])  # stable: target order per model


def check(results: dict) -> List[str]:
    """Failures that make the run exit non-zero: a failed norm cross-check, or a
    required provider (nondp, vaultkern) that errored."""
    failures = []
    for config in results["configs"]:
        cc = config.get("crosscheck") or {}
        status = cc.get("status", "")
        if status.startswith("fail") or status.startswith("error"):
            failures.append(f"{config['name']}: norm cross-check {status}")
        for name in ("nondp", "vaultkern"):
            entry = config.get("providers", {}).get(name)
            if entry and str(entry.get("status", "")).startswith("error"):
                failures.append(f"{config['name']}: {name} {entry['status']}")
    return failures


# ---- formatting -------------------------------------------------------------------------------
def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def _num(x: Optional[float], fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _max_batch(mb: Optional[dict]) -> str:
    if not mb:
        return "-"
    if mb.get("error"):
        return f"error ({mb['error']})"
    text = str(mb["value"])
    if mb.get("at_cap"):
        return f">= {text} (cap)"
    if not mb.get("exact"):
        upper = mb.get("first_oom")
        text += f" (< {upper})" if upper else " (search cut short)"
    return text


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(results: dict) -> str:
    meta, st = results["meta"], results["settings"]
    lines = [f"# vaultkern benchmark: --size {st['size']} on {meta['machine']}", "",
             f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · opacus "
             f"{meta['opacus']} · cuda {meta['cuda']} · driver {meta['driver']} · python "
             f"{meta['python']} · git {(meta['git_sha'] or 'unknown')[:12]} · "
             f"{meta['cpu_count']} CPUs, {meta['torch_threads']} torch threads",
             "",
             f"{st['description']}. Optimizer {st['optimizer']}, σ = {st['noise_multiplier']}, "
             f"C = {st['max_grad_norm']}; step time = median of {st['timed_rounds']} steps after "
             f"{st['warmup_rounds']} warm-up rounds (p10–p90 in brackets); providers stepped "
             "round-robin in one process on the same weights and batches unless noted. "
             f"Peak memory: {st['memory_method']}"
             + (f" (not measured: {st['memory_unavailable']})" if st.get('memory_unavailable') else "")
             + ".", ""]
    lines += ["| config | provider | status | step ms | tokens/s | × nondp tokens/s | "
              "× nondp step time | peak mem | max batch |",
              "|---|---|---|---|---|---|---|---|---|"]
    for config in results["configs"]:
        if "status" in config and not config.get("providers"):
            lines.append(f"| {config['name']} | all | {config['status']} | | | | | | |")
            continue
        label = f"{config['name']} (B={config['batch_size']}, T={config['seq_len']}, " \
                f"{config['precision']})"
        for name, e in config["providers"].items():
            ms = e.get("step_ms")
            step = "-" if ms is None else f"{ms['median']:.1f} [{ms['p10']:.1f}–{ms['p90']:.1f}]"
            if e.get("timing_mode") == "alone":
                step += " (alone)"
            ratio = e.get("ratio_vs_nondp") or {}
            lines.append(
                f"| {label} | {name} | {_escape(str(e['status']))} | {step} | "
                f"{_num(e.get('tokens_per_s'))} | {_num(ratio.get('tokens_per_s'), '{:.3f}')} | "
                f"{_num(ratio.get('step_time'), '{:.3f}')} | {_mib(e.get('peak_mem_bytes'))} | "
                f"{_max_batch(e.get('max_batch'))} |")
            label = ""
    lines += ["", "## Per-example norm cross-check (vaultkern vs Opacus hooks, fp32, first batch)",
              "", "| config | rows | max relative difference | tolerance | status |",
              "|---|---|---|---|---|"]
    for config in results["configs"]:
        cc = config.get("crosscheck")
        if cc:
            lines.append(f"| {config['name']} | {cc['rows']} | {_num(cc['max_rel_diff'], '{:.2e}')} "
                         f"| {cc['tol']:g} | {_escape(cc['status'])} |")
    targets = results.get("targets") or []
    lines += ["", "## Targets", ""]
    if not targets:
        lines.append(f"No targets are defined for --size {st['size']} (targets: --size cpu, gpu).")
    else:
        lines += ["| target | model | config used | value | threshold | result |",
                  "|---|---|---|---|---|---|"]
        for t in targets:
            op = {"time_ratio": "<=", "faster": "<", "tps_ratio": ">=", "batch_ratio": ">="}[t["kind"]]
            result = t["status"] + (f": {t['detail']}" if t.get("detail") else "")
            lines.append(f"| {t['description']} | {t['model']} | {t['config'] or '-'} | "
                         f"{_num(t['value'], '{:.3f}')} | {op} {t['threshold']:g} | "
                         f"{_escape(result)} |")
    failures = results.get("failures") or []
    lines += ["", "## Result", "",
              "OK" if not failures else "FAILED:\n" + "\n".join(f"- {f}" for f in failures), ""]
    return "\n".join(lines)


def chart(results: dict, path: str) -> Optional[str]:
    """Bar chart of tokens/s relative to nondp; returns None or why it was not drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib unavailable ({exc})"
    configs = [c for c in results["configs"] if c.get("providers")]
    names = [p for p in PROVIDERS if any(p in c["providers"] for c in configs)]
    if not configs or not names:
        return "nothing to plot"
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(configs) + 2), 4.2))
    width = 0.8 / len(names)
    handles = {}
    for j, name in enumerate(names):
        for i, c in enumerate(configs):
            e = c["providers"].get(name)
            x = i + (j - (len(names) - 1) / 2) * width
            ratio = ((e or {}).get("ratio_vs_nondp") or {}).get("tokens_per_s")
            if ratio is None:
                label = "n/a" if e is None else str(e["status"]).split(":")[0]
                ax.text(x, 0.02, label, rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            handles[name] = ax.bar(x, ratio, width, color=f"C{j}")
            ax.text(x, ratio, f"{ratio:.2f}", ha="center", va="bottom", fontsize=7)
    shown = [n for n in names if n in handles]
    if shown:
        ax.legend([handles[n] for n in shown], shown, fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{c['name']}\nB={c['batch_size']} {c['precision']}" for c in configs],
                       fontsize=8)
    ax.set_ylabel("tokens/s relative to non-private")
    meta = results["meta"]
    ax.set_title(f"vaultkern bench --size {results['settings']['size']}: {meta['machine']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "machine"


def stem(results: dict) -> str:
    meta = results["meta"]
    return f"{meta['date'][:10]}-{_slug(meta['machine'])}-{results['settings']['size']}"


def write(results: dict, out_dir: str, draw: bool = True) -> Dict[str, str]:
    """Write <stem>.json, .md (and .png); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem(results))
    paths = {"json": base + ".json", "md": base + ".md"}
    if draw:
        why_not = chart(results, base + ".png")
        results["meta"]["chart"] = why_not or os.path.basename(base + ".png")
        if why_not is None:
            paths["png"] = base + ".png"
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1, default=str)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(markdown(results))
    return paths
