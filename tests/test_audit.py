"""Audit: metrics on a planted-canary toy where the non-private model memorises and the
private one does not; exposure, AUC and memorisation helpers; generate; CLI."""
import json
import math

import pytest
import torch

from vaultkern import audit, generate
from vaultkern.data import PackedCorpus, make_canaries
from vaultkern.models import Decoder, get_config
from vaultkern.run.cli import build_parser, resolve_args
from vaultkern.run.demo import demo
from vaultkern.run.loop import train


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """Tiny model (T=64), 60 records + canaries; non-DP long enough to memorise, DP with σ=3.

    T=64 so that a canary (~42 tokens) fits one row: each document has rows of its own, and
    at T=32 a canary's secret was cut at the same place in every copy, its second half
    learned without the prefix (16× exposure 4.4, below this test's bar). 400 non-DP steps:
    token-match rate on training suffixes 0.35 vs 0.25 on held-out ones (with batch 16 it
    was 0.29 vs 0.20, too close to the DP run's). The DP run fixes its noise/sampling seed
    (--dp-seed) so the test is deterministic; its match rate was 0.078."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("toy")
    (root / "t64.toml").write_text('base = "tiny"\nseq_len = 64\n')
    common = ["--config", str(root / "t64.toml"), "--num-records", "60", "--batch-size", "32",
              "--lr", "3e-3", "--quiet"]
    parser = build_parser()
    train(resolve_args(parser, common + ["--no-dp", "--steps", "400", "--out", str(root / "nodp")]))
    train(resolve_args(parser, common + ["--noise-multiplier", "3", "--steps", "60",
                                         "--epsilon-every", "60", "--dp-seed", "0",
                                         "--out", str(root / "dp")]))
    results = {name: audit.audit_run(str(root / name), num_candidates=100, memorization_samples=64,
                                     quiet=True) for name in ("nodp", "dp")}
    torch.set_num_threads(threads)
    return root, results


def test_non_private_model_memorises_more_than_private(toy_runs):
    root, r = toy_runs
    nodp, dp = r["nodp"], r["dp"]
    print(audit.format_comparison({"non-private": nodp, "private": dp}))
    reps16 = lambda res: res["canary_exposure_by_repetitions"]["16"]["mean_exposure"]  # noqa: E731
    assert reps16(nodp) > reps16(dp) + 1.5
    assert reps16(nodp) > 5.0  # close to the maximum log2(101) = 6.66
    assert nodp["membership_inference"]["auc"] > dp["membership_inference"]["auc"] + 0.1
    assert nodp["memorization"]["train_token_match_rate"] > dp["memorization"]["train_token_match_rate"] + 0.2
    assert nodp["heldout_perplexity"] < dp["heldout_perplexity"]
    assert dp["differentially_private"] is True and nodp["differentially_private"] is False


def test_audit_goes_to_the_private_report_not_the_card(toy_runs):
    root, r = toy_runs
    for name in ("nodp", "dp"):
        report = json.loads((root / name / "private_report.json").read_text())
        assert report["audit"]["membership_inference"]["auc"] == r[name]["membership_inference"]["auc"]
        assert "training" in report and "do not publish" in report["warning"].lower()
        card_text = (root / name / "model_card.json").read_text()
        assert "audit" not in json.loads(card_text)
        for word in ("membership", "exposure", "perplexity", "exact_match"):
            assert word not in card_text, word
        for canary in PackedCorpus.load(str(root / name / "data.pt")).canaries:
            assert canary.secret not in card_text  # secrets never reach the card
        md = (root / name / "MODEL_CARD.md").read_text()
        assert "Canary exposure" not in md and "private report" in md
        assert not (root / name / "audit.json").exists()
    mem = r["dp"]["memorization"]
    assert (mem["prefix_len"], mem["suffix_len"]) == (32, 32)  # T + 1 = 65 -> half each
    assert r["dp"]["canary_max_exposure"] == pytest.approx(math.log2(101))


def test_audit_and_generate_cli(toy_runs, capsys):
    root, _ = toy_runs
    assert generate.main([str(root / "nodp"), "--prompt", "Patient ", "--max-new-tokens", "20",
                          "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Patient ") and len(text) > len("Patient ")
    assert audit.main([str(root / "missing")]) == 2
    assert audit.main([str(root / "dp"), "--candidates", "10"]) == 2
    with pytest.raises(SystemExit):
        audit.main(["--help"])
    assert "private_report.json" in capsys.readouterr().out


def test_membership_auc():
    assert audit.membership_auc(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    assert audit.membership_auc(torch.tensor([0.5, 0.6]), torch.tensor([0.1, 0.2])) == 0.0
    assert audit.membership_auc(torch.ones(3), torch.ones(4)) == 0.5
    with pytest.raises(ValueError, match="members"):
        audit.membership_auc(torch.ones(0), torch.ones(2))


class SecretLover(torch.nn.Module):
    """A fake model that predicts the next byte of one fixed text exactly (and nothing else)."""

    def __init__(self, text_ids, seq_len=64):
        super().__init__()
        self.config = get_config("tiny", seq_len=seq_len)
        self.text_ids = text_ids

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, 259)
        for b in range(B):
            for t in range(T):
                if t + 1 < len(self.text_ids) and ids[b, : t + 1].tolist() == self.text_ids[: t + 1]:
                    logits[b, t, self.text_ids[t + 1]] = 20.0
        return logits


def test_exposure_is_maximal_for_a_model_that_knows_the_secret():
    canary = make_canaries(seed=5, repetitions=(1,), per_repetition=1)[0]
    ids = audit.tokenizer.encode(canary.text, bos=True)
    result = audit.canary_exposure(SecretLover(ids), [canary], "cpu", num_candidates=127)[0]
    assert result["rank"] == 1 and result["extracted"] is True
    assert result["exposure"] == pytest.approx(7.0)
    blind = audit.canary_exposure(SecretLover([0, 1]), [canary], "cpu", num_candidates=127)[0]
    # a model that scores every candidate alike: mid-rank 64.5 of 128, exposure ~1
    assert blind["extracted"] is False and blind["rank"] == 64.5
    assert blind["exposure"] == pytest.approx(7.0 - math.log2(64.5))


def test_greedy_continue_and_memorization_lengths():
    model = Decoder(get_config("tiny", seq_len=16)).eval()
    prefixes = torch.randint(0, 256, (3, 5))
    out = audit.greedy_continue(model, prefixes, 4, "cpu")
    assert out.shape == (3, 4)
    with torch.no_grad():
        assert torch.equal(out[:, 0], model(prefixes)[:, -1].argmax(-1))
    assert audit.memorization_lengths(1024) == (50, 50)
    assert audit.memorization_lengths(64) == (32, 32)


def test_demo_runs_both_and_prints_the_comparison(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (tmp_path / "t32.toml").write_text('base = "tiny"\nseq_len = 32\nnum_layers = 1\n')
        results = demo(str(tmp_path / "demo"), quiet=True, epsilon=20.0, steps=3,
                       num_records=30, config=str(tmp_path / "t32.toml"), batch_size=8)
    finally:
        torch.set_num_threads(threads)
    assert set(results) == {"non-private", "private"}
    assert results["private"]["differentially_private"] and results["private"]["epsilon"] <= 20.0
    table = (tmp_path / "demo" / "comparison.txt").read_text()
    assert "canary exposure, 16× repeated" in table and "membership inference AUC" in table
    assert table in capsys.readouterr().out
