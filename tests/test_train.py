"""Reference DP training loop: learning, accounting, resume, budget, NaN handling, what is
public (model card) and what is private (report), secure randomness by default."""
import json

import pytest
import torch

import vaultkern as vk
from train_setup import PRIVATE_FIELDS, PUBLIC_CARD_KEYS, card_keys, model_params, private_report, run
from vaultkern.models import Decoder, get_config, per_sequence_loss
from vaultkern.privacy import Accountant
from vaultkern.privacy.accounting import epsilon_for
from vaultkern.run import batches, cli, loop
from vaultkern.run.rundir import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dp_training_learns_and_reports_the_accountants_epsilon(tmp_path, config):
    out = tmp_path / "dp"
    summary = run(out, config, "--noise-multiplier", 0.8, "--steps", 40, "--epsilon-every", 40)
    assert summary["status"] == "complete" and summary["step"] == 40
    assert summary["heldout_loss"] < summary["initial_heldout_loss"] - 0.3  # learned something
    card = json.loads((out / "model_card.json").read_text())
    p = card["privacy"]
    n_train = card["data"]["train_sequences"]
    assert p["differentially_private"] is True and p["dataset_size"] == n_train
    assert p["sample_rate"] == pytest.approx(16 / n_train)
    assert (p["noise_multiplier"], p["max_grad_norm"], p["steps"], p["delta"]) == (0.8, 1.0, 40, 1e-6)
    k = card["data"]["max_sequences_per_document"]
    assert 4 <= k <= 6  # built-in records are ~100-165 bytes, T = 32
    assert p["privacy_unit"] == (f"one sequence of 32 tokens; a document spans at most {k} "
                                 f"sequences, so a document-level guarantee follows by group "
                                 f"privacy with k = {k}")
    assert p["accountant"].startswith("pld")
    assert p["epsilon"] == summary["epsilon"]
    acc = Accountant("pld")
    for _ in range(40):
        acc.step(0.8, 16 / n_train)
    assert p["epsilon"] == pytest.approx(acc.get_epsilon(1e-6), rel=1e-12)
    doc = p["document_level"]
    assert doc["k"] == k and doc["epsilon"] == summary["document_epsilon"] > p["epsilon"]
    assert "derived number" in doc["derivation"] and "2401.10294" in doc["derivation"]
    assert card["data"]["canaries_summary"].startswith("6 canaries")
    assert "secret" not in (out / "model_card.json").read_text()  # secrets stay out of the card
    md = (out / "MODEL_CARD.md").read_text()
    assert f"ε = {p['epsilon']:.3g}" in md and "group privacy with k" in md
    assert "treated as public" in md and "private_report.json" in md
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(10, 41, 10))
    assert metrics[-1]["epsilon"] == pytest.approx(p["epsilon"])
    assert (out / "training.png").stat().st_size > 1000


def test_public_card_holds_no_private_field_and_the_private_report_does(tmp_path, config):
    out = tmp_path / "run"
    summary = run(out, config, "--noise-multiplier", 1.0, "--steps", 3, "--epsilon-every", 3,
                  "--accountant", "rdp")
    card = json.loads((out / "model_card.json").read_text())
    keys = card_keys(card)
    assert keys <= PUBLIC_CARD_KEYS, keys - PUBLIC_CARD_KEYS
    assert not {k.rsplit(".", 1)[-1] for k in keys} & set(PRIVATE_FIELDS)
    report = private_report(out)
    assert "do not publish" in report["warning"].lower()
    training = report["training"]
    for key in ("train_loss", "heldout_loss", "heldout_perplexity", "initial_heldout_loss",
                "nonfinite_examples", "heldout_sequences", "wall_time_s"):
        assert key in training, key
    assert training["heldout_loss"] == summary["heldout_loss"] and training["nonfinite_examples"] == 0
    md = (out / "MODEL_CARD.md").read_text()
    assert "held-out" not in md.split("## Privacy")[1].split("What the guarantee")[0]
    assert f"{summary['heldout_loss']:.4g}" not in md


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, config):
    flags = ["--noise-multiplier", 1.0, "--max-grad-norm", 0.5, "--steps", 8, "--log-every", 2,
             "--epsilon-every", 8, "--checkpoint-every", 3]
    full = run(tmp_path / "full", config, *flags)
    first = run(tmp_path / "split", config, *flags, "--stop-after", 4)
    assert first["status"] == "stopped" and first["step"] == 4
    card = json.loads((tmp_path / "split" / "model_card.json").read_text())
    assert card["training"]["complete"] is False and card["privacy"]["steps"] == 4
    with pytest.raises(ValueError, match="--lr"):  # settings of a resumed run cannot change
        run(tmp_path / "split", config, *flags, "--resume", "--lr", "0.1")
    with pytest.raises(ValueError, match="--max-grad-norm 1.0 differs"):  # written at its default
        cli.resolve_args(cli.build_parser(), ["--out", str(tmp_path / "split"), "--resume",
                                              "--max-grad-norm", "1.0"])
    resumed = run(tmp_path / "split", config, *flags, "--resume")
    assert resumed["status"] == "complete" and resumed["step"] == 8
    assert resumed["epsilon"] == full["epsilon"]
    a, b = model_params(tmp_path / "full"), model_params(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # same losses and learning rates logged (ε is also logged where the first invocation stopped)
    strip = lambda rows: [(r["step"], r["loss"], r["lr"]) for r in rows]  # noqa: E731
    full_metrics, split_metrics = (read_metrics(tmp_path / d) for d in ("full", "split"))
    assert strip(full_metrics) == strip(split_metrics)
    card = json.loads((tmp_path / "split" / "model_card.json").read_text())
    assert card["privacy"]["resumes"] == 1 and card["privacy"]["formal_guarantee"] is False


def test_budget_stops_before_exceeding_epsilon(tmp_path, config, capsys):
    target = 2.3
    summary = run(tmp_path / "budget", config, "--noise-multiplier", 1.0, "--epsilon", target,
                  "--steps", 40, "--epsilon-every", 40, "--accountant", "rdp")
    assert "budget" in capsys.readouterr().out
    k = summary["step"]
    assert 5 <= k < 40 and summary["steps_planned"] == k
    q = summary["sample_rate"]
    assert summary["epsilon"] <= target < epsilon_for(1.0, q, k + 1, 1e-6, accountant="rdp")
    card = json.loads((tmp_path / "budget" / "model_card.json").read_text())
    assert card["privacy"]["target_epsilon"] == target and card["privacy"]["steps"] == k


def test_calibrated_sigma_meets_the_target(tmp_path, config):
    # the RDP accountant keeps this fast; the default PLD path is exercised above
    summary = run(tmp_path / "calib", config, "--epsilon", 4, "--steps", 5, "--epsilon-every", 5,
                  "--accountant", "rdp")
    assert 0.95 * 4 <= summary["epsilon"] <= 4
    assert summary["epsilon"] == pytest.approx(
        epsilon_for(summary["noise_multiplier"], summary["sample_rate"], 5, 1e-6, accountant="rdp"))


def test_nan_example_is_dropped_and_the_step_proceeds(tmp_path, config, monkeypatch):
    """One sequence's loss is NaN on the third step: the engine gives it clip factor 0, the
    step is taken and accounted like every other, and the count goes to the private report."""
    calls = {"n": 0}

    def loss_with_one_nan_row(logits, targets, weights=None):
        calls["n"] += 1
        out = per_sequence_loss(logits, targets, weights)
        if calls["n"] == 3:
            poison = torch.ones_like(out)
            poison[0] = float("nan")
            out = out * poison
        return out

    monkeypatch.setattr(loop, "per_sequence_loss", loss_with_one_nan_row)
    summary = run(tmp_path / "nan", config, "--noise-multiplier", 1.0, "--steps", 6,
                  "--max-physical-batch-size", 64, "--epsilon-every", 6, "--accountant", "rdp")
    assert summary["status"] == "complete" and summary["step"] == 6
    assert summary["epsilon"] == pytest.approx(
        epsilon_for(1.0, summary["sample_rate"], 6, 1e-6, accountant="rdp"))
    assert summary["nonfinite_examples"] == 1
    assert private_report(tmp_path / "nan")["training"]["nonfinite_examples"] == 1
    assert all(torch.isfinite(t).all() for t in model_params(tmp_path / "nan").values())
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)
    assert ckpt["optimizer"]["vaultkern_dp"]["steps_taken"] == 6  # all noised and taken
    assert "nonfinite" not in (tmp_path / "nan" / "model_card.json").read_text().replace(
        "non_finite_examples", "")


def test_non_private_nan_aborts_without_touching_the_checkpoint(tmp_path, config, monkeypatch,
                                                                capsys):
    out = tmp_path / "abort"
    run(out, config, "--no-dp", "--steps", 6, "--stop-after", 2)
    before = (out / "ckpt.pt").read_bytes()
    monkeypatch.setattr(loop, "per_sequence_loss",
                        lambda logits, targets, weights=None: logits.sum((1, 2)) * float("inf"))
    rc = cli.main(["--out", str(out), "--resume", "--quiet", "--device", "cpu"])
    assert rc == 1
    assert "training aborted" in capsys.readouterr().err
    assert (out / "ckpt.pt").read_bytes() == before


def test_non_private_run_and_empty_poisson_batches(tmp_path, config):
    nodp = run(tmp_path / "nodp", config, "--no-dp", "--steps", 20)
    assert nodp["epsilon"] is None and nodp["heldout_loss"] < nodp["initial_heldout_loss"]
    card = json.loads((tmp_path / "nodp" / "model_card.json").read_text())
    assert card["privacy"]["differentially_private"] is False
    assert card_keys(card) <= PUBLIC_CARD_KEYS
    assert "Not differentially private" in (tmp_path / "nodp" / "MODEL_CARD.md").read_text()
    # expected batch size 1: about a third of the Poisson batches are empty (noise-only steps)
    tiny_batches = run(tmp_path / "b1", config, "--noise-multiplier", 1.0, "--steps", 6,
                       "--batch-size", 1, "--epsilon-every", 6)
    assert tiny_batches["status"] == "complete"
    assert all(torch.isfinite(t).all() for t in model_params(tmp_path / "b1").values())


def test_micro_batches_accumulate_into_the_same_step(tmp_path, config):
    """A logical batch split into micro-batches of 5 gives the update of one backward pass
    (same seed: same batches and same noise; σ small so the clipped sum matters)."""
    flags = ["--noise-multiplier", 0.3, "--steps", 3, "--epsilon-every", 3, "--accountant", "rdp"]
    run(tmp_path / "whole", config, *flags, "--max-physical-batch-size", 64)
    run(tmp_path / "micro", config, *flags, "--max-physical-batch-size", 5)
    a, b = model_params(tmp_path / "whole"), model_params(tmp_path / "micro")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_default_run_uses_secure_randomness(tmp_path, config):
    """Without --dp-seed: ChaCha20 noise (secure_mode) and an os.urandom sampler; two runs with
    the same public --seed differ, and the card says the run has a formal guarantee."""
    flags = ["--noise-multiplier", 1.0, "--steps", 3, "--epsilon-every", 3, "--accountant", "rdp",
             "--secure"]
    run(tmp_path / "a", config, *flags)
    run(tmp_path / "b", config, *flags)
    a, b = model_params(tmp_path / "a"), model_params(tmp_path / "b")
    assert any(not torch.equal(a[n], b[n]) for n in a)
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ckpt["optimizer"]["vaultkern_dp"]["secure_mode"] is True
    assert ckpt["optimizer"]["vaultkern_dp"]["seed"] is None
    assert ckpt["sampler"]["key"] is None  # an os.urandom key, kept out of the checkpoint
    p = json.loads((tmp_path / "a" / "model_card.json").read_text())["privacy"]
    assert p["secure_randomness"] is True and p["formal_guarantee"] is True and p["caveats"] == []
    assert "os.urandom" in p["randomness"]
    # opting out: --dp-seed is reproducible, never shown, and the card withdraws the guarantee
    run(tmp_path / "c", config, "--noise-multiplier", 1.0, "--steps", 3, "--epsilon-every", 3,
        "--accountant", "rdp", "--dp-seed", 987654321)
    text = (tmp_path / "c" / "model_card.json").read_text()
    p = json.loads(text)["privacy"]
    assert "987654321" not in text
    assert p["secure_randomness"] is False and p["formal_guarantee"] is False
    assert "No formal guarantee holds" in (tmp_path / "c" / "MODEL_CARD.md").read_text()


def test_truncated_poisson_padding_rows_contribute_nothing(tmp_path, config):
    """Padding rows of a truncated-Poisson batch are masked in the engine: with a loss that
    ignores both targets and weights (so padding rows have a gradient of their own), the
    clipped sum equals that of the real rows alone."""
    rows = torch.randint(0, 256, (6, 17))
    model = Decoder(get_config("tiny", seq_len=16, num_layers=1))
    vk.patch(model, max_grad_norm=1.0, loss_reduction="sum")

    def loss_ignoring_weights(logits, targets, weights=None):
        return logits.float().square().mean((1, 2)) * 100  # norm well above C: rows are clipped

    def clipped_sum(indices, cap, mask_rows):
        model.zero_grad(set_to_none=True)
        batch, real = batches.logical_batch(rows, indices, cap)
        batches.backward_in_microbatches(model, batch, real, loss_ignoring_weights, 3,
                                         torch.device("cpu"), mask_rows=mask_rows)
        return [p.grad.clone() for p in model.parameters()]

    padded = batches.logical_batch(rows, [4, 1], 5)
    assert padded[1].tolist() == [True, True, False, False, False]
    assert (padded[0][2:] == 258).all()  # padding rows hold no record, only PAD
    unpadded = clipped_sum([4, 1], None, False)
    masked = clipped_sum([4, 1], 5, True)
    for a, b in zip(unpadded, masked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    unmasked = clipped_sum([4, 1], 5, False)  # without the mask the padding rows would count
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(unpadded, unmasked))
    vk.unpatch(model)


def test_truncated_poisson_run_is_accounted_as_such(tmp_path, config):
    summary = run(tmp_path / "trunc", config, "--noise-multiplier", 1.0, "--steps", 3,
                  "--batch-size", 8, "--max-batch-size", 12, "--max-physical-batch-size", 5,
                  "--epsilon-every", 3)
    card = json.loads((tmp_path / "trunc" / "model_card.json").read_text())
    p = card["privacy"]
    n = p["dataset_size"]
    assert p["max_batch_size"] == 12 and p["sampling"].startswith("truncated Poisson")
    assert summary["epsilon"] == pytest.approx(epsilon_for(
        1.0, 8 / n, 3, 1e-6, truncated_max_batch=12, dataset_size=n))
    assert p["document_level"]["epsilon"] is None
    assert "not derived" in p["document_level"]["derivation"]
    ckpt = torch.load(tmp_path / "trunc" / "ckpt.pt", weights_only=True)
    assert [tuple(e[:3]) + tuple(e[3:]) for e in ckpt["accountant"]["history"]] == [
        (1.0, 8 / n, 3, 12, n)]
