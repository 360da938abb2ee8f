"""The run directory of ``python -m vaultkern train``: its files and how they are read.

Publishable: ``model.pt`` (weights + config), ``model_card.json``, ``MODEL_CARD.md``.
Private, never to be published: ``data.pt`` (the packed training and held-out data),
``ckpt.pt`` (resumable state: optimizer moments, sampler state, a --dp-seed run's seed),
``metrics.jsonl`` and ``training.png`` (training losses), ``private_report.json``
(see :mod:`vaultkern.model_card`).

Resume claims. A checkpoint is one saved state; two continuations of the same state would
each be accounted as the only one, while together they release two independently noised
models. So a run that resumes from ``ckpt.pt`` first writes back into that file that it has
been resumed (:func:`claim_for_resume`), and a second resume of the same saved state is
refused unless forced. The next checkpoint the continuation saves is a new state, unclaimed.
A copy of ``ckpt.pt`` taken before the claim escapes this check: do not keep copies.
"""
from __future__ import annotations

import json
import os
import time
from typing import List, Optional

import torch

from vaultkern.models import Decoder, make_config

DATA_FILE, CKPT_FILE, MODEL_FILE = "data.pt", "ckpt.pt", "model.pt"
METRICS_FILE, PLOT_FILE = "metrics.jsonl", "training.png"
CHECKPOINT_FORMAT = 2  # 2: secure randomness by default, resume claims, per-document packing


def atomic_save(obj, path: str) -> None:
    """torch.save that leaves the previous file intact if it fails part-way."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_model(run_dir: str, device="cpu"):
    """The trained model of a run directory (model.pt, else the latest ckpt.pt), in eval mode."""
    for name in (MODEL_FILE, CKPT_FILE):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = Decoder(make_config(blob["config"], source=path))
            model.load_state_dict(blob["model"])
            return model.to(device).eval()
    raise FileNotFoundError(f"no {MODEL_FILE} or {CKPT_FILE} in {run_dir!r}: is it a training run directory?")


# --- checkpoints ------------------------------------------------------------------------------

def load_checkpoint(run_dir: str) -> dict:
    path = os.path.join(run_dir, CKPT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint {path!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt.get('format')}, expected "
                         f"{CHECKPOINT_FORMAT}; it was written by another vaultkern version")
    return ckpt


def claim_for_resume(run_dir: str, ckpt: dict, force: bool) -> List[dict]:
    """Mark the saved state as resumed (written back before training); the run's resume history.

    Refuses a state that was resumed before unless ``force``: that continuation may have
    released a model, and this one would be accounted as if it had not."""
    previous = ckpt.get("resumed_at")
    if previous is not None and not force:
        raise ValueError(
            f"the checkpoint in {run_dir!r} (step {ckpt['step']}) was already resumed at "
            f"{previous}. Two continuations of one state are each accounted as the only one, "
            "but together they release two differently noised models. If the earlier "
            "continuation released nothing (it crashed before writing a checkpoint or "
            "model.pt, and nothing it wrote was shared), pass --force-resume; the model card "
            "then records that no formal guarantee holds.")
    resumes = list(ckpt.get("resumes", [])) + [
        {"from_step": ckpt["step"], "forced": previous is not None,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    atomic_save({**ckpt, "resumed_at": resumes[-1]["time"], "resumes": resumes},
                os.path.join(run_dir, CKPT_FILE))
    return resumes


# --- metrics (private: training losses) ----------------------------------------------------------

def read_metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(run_dir: str, last_step: int) -> None:
    """Drop metric lines written after the checkpoint a resumed run starts from."""
    rows = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    path = os.path.join(run_dir, METRICS_FILE)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def plot_metrics(run_dir: str) -> Optional[str]:
    """training.png: training loss and ε against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in read_metrics(run_dir) if r.get("loss") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue",
            label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)", color="tab:blue")
    with_epsilon = [r for r in rows if r.get("epsilon") is not None]
    if with_epsilon:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in with_epsilon], [r["epsilon"] for r in with_epsilon],
                 color="tab:red", marker="o", label="ε")
        ax2.set_ylabel("ε spent", color="tab:red")
    ax.set_title(f"{os.path.basename(os.path.abspath(run_dir))} (private: training loss)")
    fig.tight_layout()
    path = os.path.join(run_dir, PLOT_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
