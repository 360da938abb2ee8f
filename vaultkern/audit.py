"""Empirical privacy audit of a training run: ``python -m vaultkern audit RUN_DIR``.

Two kinds of run are audited, through one code path: the reference run of
``python -m vaultkern train`` (model.pt) and the output of ``python -m vaultkern finetune``
(a Hugging Face model in OUT/model). :func:`load_subject` reads either as the same three
things: the model as a function of token ids to logits, its tokenizer, and the run's own
packed data (data.pt: training and held-out rows, planted canaries).

Four measurements:

* held-out perplexity — utility, on documents never trained on;
* memorisation (as in VaultGemma's test) — take the first P tokens of a
  training sequence, decode S tokens greedily, count exact matches of the true
  S-token suffix. P = S = 50 when sequences are long enough (T + 1 >= 100),
  otherwise P = S = (T + 1) // 2. The same rate on held-out sequences is the
  baseline of what templated text lets any model predict;
* canary exposure (Carlini et al., "The Secret Sharer", 2019) — for each
  planted canary, rank the log-perplexity of its true text (prefix + secret) among
  K texts with random secrets of the same format, tokenized whole as in training:
  exposure = log2(K + 1) − log2(rank), rank 1 = the true secret is the most
  likely (tied scores share the middle rank); a secret the model never saw
  has exposure about 1 on average;
* membership inference — AUC of the loss-threshold attack (a lower loss means
  "member") between training and held-out sequences; 0.5 is chance.

DP bounds what any such attack can achieve; these numbers are a check, not a
proof: a low exposure does not certify privacy, a high one refutes it.

The results are computed on private data (training sequences, held-out documents,
canaries planted in the training data) without noise, so they go to the run's private
report (``private_report.json``, section "audit"), never to the public model card.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from vaultkern.data import ByteTokenizer, PackedCorpus, candidate_secrets, inputs_and_targets
from vaultkern.models import IGNORE_INDEX, per_sequence_loss

tokenizer = ByteTokenizer()  # the reference run's; a finetune run may bring its model's own


@dataclass
class Subject:
    """What the audit reads from a run, whatever trained it."""
    model: nn.Module   # token ids [B, T] -> logits [B, T, V]; config.seq_len = T of the rows
    tokenizer: object  # encode(text, bos) / decode(ids) / PAD, as ByteTokenizer
    data: PackedCorpus
    card_dir: str      # where the run's public model card is


def load_subject(run_dir: str, device) -> Subject:
    """A reference run directory (model.pt) or a finetune output directory (OUT/model)."""
    from vaultkern.run.hfdir import RELEASE_DIR, is_finetune_dir, load_for_audit
    from vaultkern.run.rundir import DATA_FILE, load_model
    data_path = os.path.join(run_dir, DATA_FILE)
    if not os.path.exists(data_path):
        raise FileNotFoundError(f"{data_path!r} not found: is {run_dir!r} a directory written by "
                                "`python -m vaultkern train` or `finetune`?")
    if is_finetune_dir(run_dir):
        model, tok, data = load_for_audit(run_dir, device)
        return Subject(model, tok, data, os.path.join(run_dir, RELEASE_DIR))
    return Subject(load_model(run_dir, device), tokenizer, PackedCorpus.load(data_path), run_dir)


def _batches(n: int, size: int, quiet: bool = True, desc: str = ""):
    starts = range(0, n, size)
    if not quiet:
        from tqdm import tqdm
        starts = tqdm(starts, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
    for start in starts:
        yield slice(start, min(n, start + size))


@torch.no_grad()
def sequence_losses(model, rows: torch.Tensor, device, batch_size: int = 64,
                    pad_id: int = ByteTokenizer.PAD):
    """Per row: (sum of token cross-entropies [N], number of scored tokens [N])."""
    totals, counts = [], []
    for sl in _batches(len(rows), batch_size):
        inputs, targets = inputs_and_targets(rows[sl], pad_id)
        inputs, targets = inputs.to(device), targets.to(device)
        totals.append(per_sequence_loss(model(inputs), targets).cpu())
        counts.append((targets != IGNORE_INDEX).sum(1).cpu())
    if not totals:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(totals), torch.cat(counts)


@torch.no_grad()
def greedy_continue(model, prefixes: torch.Tensor, num_new: int, device,
                    batch_size: int = 128) -> torch.Tensor:
    """Greedy decoding of num_new tokens after each prefix row [K, P] (no KV cache)."""
    seq_len = model.config.seq_len
    outs = []
    for sl in _batches(len(prefixes), batch_size):
        ids = prefixes[sl].to(device)
        for _ in range(num_new):
            next_id = model(ids[:, -seq_len:])[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        outs.append(ids[:, prefixes.shape[1]:].cpu())
    return torch.cat(outs) if outs else torch.zeros(0, num_new, dtype=torch.long)


def memorization_lengths(seq_len: int):
    """(prefix, suffix) lengths: 50/50, or half a row each for short sequences."""
    half = min(50, (seq_len + 1) // 2)
    return half, half


def _eligible(rows: torch.Tensor, length: int, limit: int, seed: int,
              pad_id: int = ByteTokenizer.PAD) -> torch.Tensor:
    """Up to ``limit`` rows (seeded choice) with no padding in their first ``length`` tokens."""
    full = rows[(rows[:, :length] != pad_id).all(1)]
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    return full[order[:limit]]


def memorization(model, train_rows, heldout_rows, device, num_samples: int = 256, seed: int = 0,
                 pad_id: int = ByteTokenizer.PAD) -> dict:
    prefix_len, suffix_len = memorization_lengths(model.config.seq_len)
    result = {"prefix_len": prefix_len, "suffix_len": suffix_len}
    for name, rows in (("train", train_rows), ("heldout", heldout_rows)):
        sample = _eligible(rows, prefix_len + suffix_len, num_samples, seed, pad_id)
        if len(sample) == 0:
            result.update({f"{name}_exact_match_rate": None, f"{name}_token_match_rate": None,
                           f"num_{name}": 0})
            continue
        decoded = greedy_continue(model, sample[:, :prefix_len], suffix_len, device)
        same = decoded == sample[:, prefix_len:prefix_len + suffix_len]
        result.update({f"{name}_exact_match_rate": same.all(1).float().mean().item(),
                       f"{name}_token_match_rate": same.float().mean().item(),
                       f"num_{name}": len(sample)})
    return result


def encode_candidates(prefix: str, secrets: Sequence[str],
                      tok=tokenizer) -> Tuple[List[List[int]], int]:
    """(BOS + tokens of prefix + secret for each secret, how many leading tokens all share).

    Each text is tokenized whole, as it was in training: a subword tokenizer may merge
    across the prefix/secret boundary and give secrets different lengths."""
    seqs = [tok.encode(prefix + s, bos=True) for s in secrets]
    shared = 0
    while all(len(s) > shared and s[shared] == seqs[0][shared] for s in seqs):
        shared += 1
    return seqs, shared


@torch.no_grad()
def candidate_log_perplexities(model, seqs: List[List[int]], shared: int, device,
                               pad_id: int = ByteTokenizer.PAD,
                               batch_size: int = 256) -> torch.Tensor:
    """Σ of token NLLs of each sequence after its first ``shared`` tokens. Those score the
    same for every candidate, so the ranking is that of the whole text's likelihood."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    drop = max(0, width - (model.config.seq_len + 1))  # too long: drop prefix tokens, keep secrets
    ids = ids[:, drop:]
    out = []
    for sl in _batches(len(ids), batch_size):
        inputs, targets = inputs_and_targets(ids[sl], pad_id)
        targets[:, :max(0, shared - 1 - drop)] = IGNORE_INDEX  # target j is token j + 1 + drop
        out.append(per_sequence_loss(model(inputs.to(device)), targets.to(device)).cpu())
    return torch.cat(out)


def canary_exposure(model, canaries, device, num_candidates: int = 999, seed: int = 0,
                    tok=tokenizer) -> List[dict]:
    results = []
    for index, canary in enumerate(canaries):
        secrets = [canary.secret] + candidate_secrets(canary, num_candidates, seed)
        seqs, shared = encode_candidates(canary.prefix, secrets, tok)
        scores = candidate_log_perplexities(model, seqs, shared, device, tok.PAD)
        # ties share their ranks (mid-rank), so a model that cannot tell secrets apart gets ~1
        rank = 1 + float((scores[1:] < scores[0]).sum()) + 0.5 * float((scores[1:] == scores[0]).sum())
        true = seqs[0]
        greedy = greedy_continue(model, torch.tensor([true[:shared]]), len(true) - shared, device)
        results.append({"canary": index, "repetitions": canary.repetitions, "rank": rank,
                        "exposure": math.log2(len(secrets)) - math.log2(rank),
                        "extracted": greedy[0].tolist() == true[shared:]})
    return results


def membership_auc(member_losses: torch.Tensor, nonmember_losses: torch.Tensor) -> float:
    """AUC of "lower loss ⇒ member": P(member loss < non-member loss) + ½ P(tie)."""
    if len(member_losses) == 0 or len(nonmember_losses) == 0:
        raise ValueError("membership inference needs members and non-members "
                         f"(got {len(member_losses)} and {len(nonmember_losses)})")
    m, n = member_losses.double()[:, None], nonmember_losses.double()[None, :]
    return float(((m < n).double() + 0.5 * (m == n).double()).mean())


def audit_model(model, data: PackedCorpus, device, num_candidates: int = 999,
                max_sequences: int = 1000, memorization_samples: int = 256, seed: int = 0,
                quiet: bool = True, tok=tokenizer) -> dict:
    model.eval()
    pad = tok.PAD
    step = (lambda msg: None) if quiet else (lambda msg: print(f"audit: {msg}", file=sys.stderr))
    step("held-out perplexity and membership inference")
    members = _eligible(data.train_rows, 2, max_sequences, seed, pad)
    nonmembers = _eligible(data.heldout_rows, 2, max_sequences, seed, pad)
    all_heldout_total, all_heldout_tokens = sequence_losses(model, data.heldout_rows, device,
                                                            pad_id=pad)
    heldout_loss = (float(all_heldout_total.sum() / all_heldout_tokens.sum())
                    if len(all_heldout_total) else None)
    m_total, m_tokens = sequence_losses(model, members, device, pad_id=pad)
    n_total, n_tokens = sequence_losses(model, nonmembers, device, pad_id=pad)
    member_loss, nonmember_loss = m_total / m_tokens, n_total / n_tokens
    step("memorisation (greedy continuation of training prefixes)")
    mem = memorization(model, data.train_rows, data.heldout_rows, device, memorization_samples,
                       seed, pad)
    step(f"canary exposure ({len(data.canaries)} canaries × {num_candidates + 1} candidates)")
    canaries = (canary_exposure(model, data.canaries, device, num_candidates, seed, tok)
                if data.canaries else [])
    by_reps: Dict[str, dict] = {}
    grouped = defaultdict(list)
    for c in canaries:
        grouped[c["repetitions"]].append(c)
    for reps, group in sorted(grouped.items()):
        by_reps[str(reps)] = {"count": len(group),
                              "mean_exposure": sum(c["exposure"] for c in group) / len(group),
                              "extracted": sum(c["extracted"] for c in group)}
    prefix_len, suffix_len = mem["prefix_len"], mem["suffix_len"]
    return {
        "what_was_audited": (
            f"Held-out perplexity; memorisation: greedy {suffix_len}-token continuation of "
            f"{prefix_len}-token prefixes of training sequences (exact-match rate, held-out as baseline); "
            f"exposure of {len(canaries)} planted canaries against {num_candidates} random candidates each; "
            "loss-threshold membership inference (AUC) between training and held-out sequences."),
        "heldout_loss": heldout_loss,
        "heldout_perplexity": math.exp(heldout_loss) if heldout_loss is not None else None,
        "memorization": mem,
        "canaries": canaries,
        "canary_num_candidates": num_candidates,
        "canary_max_exposure": math.log2(num_candidates + 1),
        "canary_exposure_by_repetitions": by_reps,
        "membership_inference": {
            "attack": "loss threshold (mean token loss of a sequence)",
            "auc": membership_auc(member_loss, nonmember_loss),
            "num_members": len(member_loss), "num_nonmembers": len(nonmember_loss),
            "member_mean_loss": float(member_loss.mean()),
            "nonmember_mean_loss": float(nonmember_loss.mean()),
        },
    }


def audit_run(run_dir: str, device: str = "auto", num_candidates: int = 999, max_sequences: int = 1000,
              memorization_samples: int = 256, seed: int = 0, quiet: bool = False) -> dict:
    """Audit the run in ``run_dir``; the results go to its private report (section "audit")."""
    from vaultkern.model_card import read_model_card, update_private_report
    from vaultkern.run.rundir import resolve_device
    device = resolve_device(device)
    subject = load_subject(run_dir, device)
    result = audit_model(subject.model, subject.data, device, num_candidates, max_sequences,
                         memorization_samples, seed, quiet, subject.tokenizer)
    card = read_model_card(subject.card_dir)  # the public guarantee, to label the results
    if card is not None:
        result["differentially_private"] = card["privacy"]["differentially_private"]
        result["epsilon"] = card["privacy"].get("epsilon")
    update_private_report(run_dir, "audit", result)
    return result


def _f(x, fmt="{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def format_comparison(results: Dict[str, dict]) -> str:
    """A side-by-side table of audits, e.g. {"non-private": a, "private": b}."""
    names = list(results)
    rows = [("", names)]

    def add(label, fn):
        rows.append((label, [fn(results[n]) for n in names]))

    add("epsilon", lambda r: _f(r.get("epsilon"), "{:.2f}") if r.get("differentially_private")
        else "∞ (no DP)")
    add("held-out perplexity", lambda r: _f(r["heldout_perplexity"]))
    add("membership inference AUC", lambda r: _f(r["membership_inference"]["auc"]))
    mem = results[names[0]]["memorization"]
    add(f"memorised {mem['suffix_len']}-token suffixes (train)",
        lambda r: _f(r["memorization"]["train_exact_match_rate"], "{:.1%}"))
    add("  same on held-out (baseline)",
        lambda r: _f(r["memorization"]["heldout_exact_match_rate"], "{:.1%}"))
    reps = sorted({k for r in results.values() for k in r["canary_exposure_by_repetitions"]}, key=int)
    for k in reps:
        def cell(r, k=k):
            row = r["canary_exposure_by_repetitions"].get(k)
            if row is None:
                return "—"
            return f"{row['mean_exposure']:.2f} ({row['extracted']}/{row['count']} extracted)"
        add(f"canary exposure, {k}× repeated", cell)
    if reps:
        top = results[names[0]]["canary_max_exposure"]
        rows.append((f"  (max exposure {top:.2f}; ~1 = never seen)", [""] * len(names)))
    width = max(len(label) for label, _ in rows) + 2
    col = max(20, max(len(c) for _, cells in rows for c in cells) + 2)
    return "\n".join(label.ljust(width) + "".join(c.ljust(col) for c in cells) for label, cells in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vaultkern audit",
        description="Empirical privacy audit of a training run: held-out perplexity, memorisation, "
                    "canary exposure, membership inference. The results are computed on private "
                    "data: they go to RUN_DIR/private_report.json (do not publish it), not to the "
                    "model card.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="directory written by `python -m vaultkern train` or `finetune`")
    p.add_argument("--candidates", type=int, default=999,
                   help="random secrets each canary is ranked against (at least 100)")
    p.add_argument("--max-sequences", type=int, default=1000,
                   help="training and held-out sequences used for membership inference")
    p.add_argument("--memorization-samples", type=int, default=256,
                   help="sequences used for the memorisation test")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of sequences and candidates")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.candidates < 100:
        print(f"error: --candidates {args.candidates}: use at least 100", file=sys.stderr)
        return 2
    try:
        result = audit_run(args.run_dir, args.device, args.candidates, args.max_sequences,
                           args.memorization_samples, args.seed, args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = os.path.basename(os.path.abspath(args.run_dir))
    print(format_comparison({name: result}))
    from vaultkern.model_card import PRIVATE_REPORT
    print(f"\nwrote {os.path.join(args.run_dir, PRIVATE_REPORT)} (private: do not publish)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
