"""Reference DP training loop: learning, accounting, resume, budget, NaN handling, CLI."""
import json
import os

import pytest
import torch

from vaultkern import train as train_mod
from vaultkern.privacy import Accountant
from vaultkern.privacy.accounting import epsilon_for

TINY32 = 'base = "tiny"\nseq_len = 32\n'


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny32.toml"
    path.write_text(TINY32)
    return str(path)


def run(out, config, *flags):
    argv = ["--config", config, "--num-records", "120", "--batch-size", "16", "--lr", "3e-3",
            "--out", str(out), "--quiet", *map(str, flags)]
    if "--dp-seed" not in argv and "--resume" not in argv and "--fresh-dp-randomness" not in argv:
        argv += ["--dp-seed", "1234"]  # reproducible DP randomness, so runs can be compared
    argv = [a for a in argv if a != "--fresh-dp-randomness"]
    if "--device" not in argv:
        # CPU even on a GPU machine: these tests compare runs bit for bit, which CUDA's
        # atomics-based kernels (embedding backward, cuDNN attention) do not promise
        argv += ["--device", "cpu"]
    args = train_mod.resolve_args(train_mod.build_parser().parse_args(argv), train_mod.build_parser())
    return train_mod.train(args)


def model_params(run_dir):
    return torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["model"]


def test_dp_training_learns_and_reports_the_accountants_epsilon(tmp_path, config):
    out = tmp_path / "dp"
    summary = run(out, config, "--noise-multiplier", 0.8, "--steps", 40, "--epsilon-every", 40)
    assert summary["status"] == "complete" and summary["step"] == 40
    assert summary["heldout_loss"] < summary["initial_heldout_loss"] - 0.3  # learned something
    card = json.loads((out / "model_card.json").read_text())
    p = card["privacy"]
    n_train = card["data"]["train_sequences"]
    assert p["differentially_private"] is True
    assert p["sample_rate"] == pytest.approx(16 / n_train)
    assert (p["noise_multiplier"], p["max_grad_norm"], p["steps"], p["delta"]) == (0.8, 1.0, 40, 1e-6)
    assert p["privacy_unit"] == "one packed sequence of 32 tokens"
    assert p["accountant"].startswith("pld")
    assert p["epsilon"] == summary["epsilon"]
    acc = Accountant("pld")
    for _ in range(40):
        acc.step(0.8, 16 / n_train)
    assert p["epsilon"] == pytest.approx(acc.get_epsilon(1e-6), rel=1e-12)
    assert card["training"]["heldout_loss"] == summary["heldout_loss"]
    assert card["data"]["canaries_summary"].startswith("6 canaries")
    assert "secret" not in (out / "model_card.json").read_text()  # secrets stay out of the card
    md = (out / "MODEL_CARD.md").read_text()
    assert f"ε = {p['epsilon']:.3g}" in md and "one packed sequence of 32 tokens" in md
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(10, 41, 10))
    assert metrics[-1]["epsilon"] == pytest.approx(p["epsilon"])
    assert (out / "training.png").stat().st_size > 1000


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, config):
    flags = ["--noise-multiplier", 1.0, "--steps", 8, "--log-every", 2, "--epsilon-every", 8,
             "--checkpoint-every", 3]
    full = run(tmp_path / "full", config, *flags)
    first = run(tmp_path / "split", config, *flags, "--stop-after", 4)
    assert first["status"] == "stopped" and first["step"] == 4
    card = json.loads((tmp_path / "split" / "model_card.json").read_text())
    assert card["training"]["complete"] is False and card["privacy"]["steps"] == 4
    with pytest.raises(ValueError, match="--lr"):  # settings of a resumed run cannot change
        run(tmp_path / "split", config, *flags, "--resume", "--lr", "0.1")
    resumed = run(tmp_path / "split", config, *flags, "--resume")
    assert resumed["status"] == "complete" and resumed["step"] == 8
    assert resumed["epsilon"] == full["epsilon"]
    a, b = model_params(tmp_path / "full"), model_params(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # same losses and learning rates logged (ε is also logged where the first invocation stopped)
    strip = lambda rows: [(r["step"], r["loss"], r["lr"]) for r in rows]  # noqa: E731
    full_metrics, split_metrics = (train_mod.read_metrics(tmp_path / d) for d in ("full", "split"))
    assert strip(full_metrics) == strip(split_metrics)


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


def test_non_finite_loss_is_rejected(tmp_path, config, monkeypatch, capsys):
    real_loss = train_mod.per_sequence_loss
    calls = {"n": 0}

    def loss_with_one_nan(logits, targets, weights=None):
        calls["n"] += 1
        out = real_loss(logits, targets, weights)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(train_mod, "per_sequence_loss", loss_with_one_nan)
    summary = run(tmp_path / "nan", config, "--noise-multiplier", 1.0, "--steps", 6,
                  "--max-physical-batch-size", 64, "--epsilon-every", 6)
    assert "step 3 rejected: loss is nan" in capsys.readouterr().err
    assert summary["status"] == "complete" and summary["rejected_steps"] == 1
    assert summary["epsilon"] == pytest.approx(epsilon_for(1.0, summary["sample_rate"], 6, 1e-6))
    assert all(torch.isfinite(t).all() for t in model_params(tmp_path / "nan").values())


def test_persistent_nan_aborts_without_touching_the_checkpoint(tmp_path, config, monkeypatch, capsys):
    out = tmp_path / "abort"
    run(out, config, "--no-dp", "--steps", 6, "--stop-after", 2)
    before = (out / "ckpt.pt").read_bytes()
    monkeypatch.setattr(train_mod, "per_sequence_loss",
                        lambda logits, targets, weights=None: logits.sum((1, 2)) * float("inf"))
    rc = train_mod.main(["--out", str(out), "--resume", "--max-rejected-steps", "2", "--quiet",
                         "--device", "cpu"])
    assert rc == 1
    assert "training aborted" in capsys.readouterr().err
    assert (out / "ckpt.pt").read_bytes() == before


def test_non_private_run_and_empty_poisson_batches(tmp_path, config):
    nodp = run(tmp_path / "nodp", config, "--no-dp", "--steps", 20)
    assert nodp["epsilon"] is None and nodp["heldout_loss"] < nodp["initial_heldout_loss"]
    card = json.loads((tmp_path / "nodp" / "model_card.json").read_text())
    assert card["privacy"]["differentially_private"] is False
    assert "Not differentially private" in (tmp_path / "nodp" / "MODEL_CARD.md").read_text()
    # expected batch size 1: about a third of the Poisson batches are empty (noise-only steps)
    tiny_batches = run(tmp_path / "b1", config, "--noise-multiplier", 1.0, "--steps", 6,
                       "--batch-size", 1, "--epsilon-every", 6)
    assert tiny_batches["status"] == "complete"
    assert all(torch.isfinite(t).all() for t in model_params(tmp_path / "b1").values())


def test_cli_help_and_errors(tmp_path, config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_mod.main(["--help"])
    assert exit_info.value.code == 0
    helptext = capsys.readouterr().out
    for flag in ("--epsilon", "--delta", "--noise-multiplier", "--no-dp", "--batch-size",
                 "--max-physical-batch-size", "--steps", "--epochs", "--lr", "--max-grad-norm",
                 "--out", "--resume", "--seed", "--device", "--checkpoint-every", "--data", "--demo"):
        assert flag in helptext
    assert train_mod.main(["--config", config, "--batch-size", "100000", "--out", str(tmp_path / "x"),
                           "--quiet", "--num-records", "50"]) == 2
    assert "--batch-size 100000" in capsys.readouterr().err
    assert train_mod.main(["--out", str(tmp_path / "missing"), "--resume"]) == 2


def test_user_data_file(tmp_path, config):
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i}: the meeting moved to room {i % 7}."}) + "\n"
                            for i in range(200)))
    summary = run(tmp_path / "user", config, "--data", data, "--no-dp", "--steps", 3)
    card = json.loads((tmp_path / "user" / "model_card.json").read_text())
    assert summary["status"] == "complete"
    assert str(data) in card["data"]["description"] and card["data"]["canaries_summary"] == "none"


def test_ctrl_c_checkpoints_and_resume_finishes(tmp_path, config, monkeypatch):
    import signal
    real_loss = train_mod.per_sequence_loss
    calls = {"n": 0}

    def interrupt_on_third_step(logits, targets, weights=None):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C mid-step
        return real_loss(logits, targets, weights)

    monkeypatch.setattr(train_mod, "per_sequence_loss", interrupt_on_third_step)
    out = tmp_path / "ctrlc"
    summary = run(out, config, "--no-dp", "--steps", 6, "--max-physical-batch-size", 64)
    assert summary["status"] == "interrupted" and summary["step"] == 3  # the step in flight finished
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    monkeypatch.setattr(train_mod, "per_sequence_loss", real_loss)
    assert run(out, config, "--no-dp", "--steps", 6, "--resume")["status"] == "complete"


def test_micro_batches_accumulate_into_the_same_step(tmp_path, config):
    """A logical batch split into micro-batches of 5 gives the update of one backward pass
    (same seed: same batches and same noise; σ small so the clipped sum matters)."""
    flags = ["--noise-multiplier", 0.3, "--steps", 3, "--epsilon-every", 3, "--accountant", "rdp"]
    run(tmp_path / "whole", config, *flags, "--max-physical-batch-size", 64)
    run(tmp_path / "micro", config, *flags, "--max-physical-batch-size", 5)
    a, b = model_params(tmp_path / "whole"), model_params(tmp_path / "micro")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dp_randomness_is_fresh_by_default_and_never_in_the_card(tmp_path, config):
    """Without --dp-seed two runs with the same public --seed draw different noise and batches,
    and the model card never reveals a DP seed."""
    flags = ["--noise-multiplier", 1.0, "--steps", 3, "--epsilon-every", 3, "--fresh-dp-randomness"]
    run(tmp_path / "a", config, *flags)
    run(tmp_path / "b", config, *flags)
    a, b = model_params(tmp_path / "a"), model_params(tmp_path / "b")
    assert any(not torch.equal(a[n], b[n]) for n in a)
    card = json.loads((tmp_path / "a" / "model_card.json").read_text())
    assert card["privacy"]["dp_randomness"].startswith("seeded from os.urandom")
    run(tmp_path / "c", config, "--noise-multiplier", 1.0, "--steps", 3, "--epsilon-every", 3,
        "--dp-seed", 987654321)
    text = (tmp_path / "c" / "model_card.json").read_text()
    assert "987654321" not in text and "NOT private" in text
