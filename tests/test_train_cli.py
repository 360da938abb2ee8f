"""The reference training run's command line: refused arguments and δ, help, a user's data
file, Ctrl-C and resume-once, and the document-level ε it reports."""
import json
import os

import pytest
import torch

from train_setup import private_report, run
from vaultkern.models import per_sequence_loss
from vaultkern.privacy.accounting import epsilon_for
from vaultkern.run import cli, loop
from vaultkern.run.budget import Plan, document_epsilon

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_checkpoint_is_resumed_once_unless_forced(tmp_path, config, monkeypatch, capsys):
    out = tmp_path / "twice"
    flags = ["--noise-multiplier", 1.0, "--steps", 6, "--epsilon-every", 6, "--accountant", "rdp"]
    run(out, config, *flags, "--stop-after", 2, "--secure")

    def crash(*args, **kwargs):  # the first continuation dies before writing a checkpoint
        raise RuntimeError("power cut")

    monkeypatch.setattr(loop, "per_sequence_loss", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        run(out, config, "--resume")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["resumed_at"] is not None  # claimed before training
    monkeypatch.setattr(loop, "per_sequence_loss", per_sequence_loss)
    assert cli.main(["--out", str(out), "--resume", "--quiet", "--device", "cpu"]) == 2
    assert "already resumed" in capsys.readouterr().err
    summary = run(out, config, "--resume", "--force-resume")
    assert summary["status"] == "complete"
    card = json.loads((out / "model_card.json").read_text())
    p = card["privacy"]
    assert p["resumes"] == 2 and p["formal_guarantee"] is False
    assert any("--force-resume" in c for c in p["caveats"])
    assert "No formal guarantee holds" in (out / "MODEL_CARD.md").read_text()
    # the finished run's checkpoint is a new, unclaimed state
    assert torch.load(out / "ckpt.pt", weights_only=True)["resumed_at"] is None


def test_delta_at_or_above_one_over_n_is_refused(tmp_path, config, capsys):
    argv = ["--config", config, "--num-records", "20", "--batch-size", "4", "--steps", "2",
            "--noise-multiplier", "1", "--accountant", "rdp", "--quiet", "--device", "cpu",
            "--delta", "0.02"]
    assert cli.main(argv + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "1/N" in err and "--allow-delta-above-1-over-n" in err
    assert not (tmp_path / "refused" / "model.pt").exists()
    summary = run(tmp_path / "allowed", config, "--num-records", 20, "--batch-size", 4, "--steps", 2,
                  "--noise-multiplier", 1, "--accountant", "rdp", "--delta", 0.02,
                  "--allow-delta-above-1-over-n")
    assert summary["status"] == "complete"
    card = json.loads((tmp_path / "allowed" / "model_card.json").read_text())
    assert card["privacy"]["formal_guarantee"] is False
    assert any("1/N" in c for c in card["privacy"]["caveats"])


def test_cli_help_and_errors(tmp_path, config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    helptext = capsys.readouterr().out
    for flag in ("--epsilon", "--delta", "--noise-multiplier", "--no-dp", "--batch-size",
                 "--max-physical-batch-size", "--steps", "--epochs", "--lr", "--max-grad-norm",
                 "--out", "--resume", "--force-resume", "--seed", "--dp-seed", "--device",
                 "--checkpoint-every", "--data", "--demo", "--max-batch-size",
                 "--allow-delta-above-1-over-n"):
        assert flag in helptext
    assert "--max-rejected-steps" not in helptext and "--secure-mode" not in helptext
    assert cli.main(["--config", config, "--batch-size", "100000", "--out", str(tmp_path / "x"),
                     "--quiet", "--num-records", "50"]) == 2
    assert "--batch-size 100000" in capsys.readouterr().err
    assert cli.main(["--out", str(tmp_path / "missing"), "--resume"]) == 2
    assert cli.main(["--config", config, "--no-dp", "--dp-seed", "1", "--out", str(tmp_path / "y"),
                     "--quiet"]) == 2
    assert cli.main(["--config", config, "--max-batch-size", "20", "--accountant", "rdp",
                     "--noise-multiplier", "1", "--out", str(tmp_path / "z"), "--quiet",
                     "--num-records", "50", "--batch-size", "8"]) == 2
    assert "PLD" in capsys.readouterr().err


def test_user_data_file(tmp_path, config):
    data = tmp_path / "notes.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i}: the meeting moved to room {i % 7}."}) + "\n"
                            for i in range(200)))
    summary = run(tmp_path / "user", config, "--data", data, "--no-dp", "--steps", 3)
    card_text = (tmp_path / "user" / "model_card.json").read_text()
    card = json.loads(card_text)
    assert summary["status"] == "complete"
    assert str(data) not in card_text and "notes" not in card_text  # the path stays private
    assert str(data) in private_report(tmp_path / "user")["training"]["data_source"]
    assert card["data"]["canaries_summary"] == "none"
    assert card["data"]["max_sequences_per_document"] == 2  # ~40-byte notes, T = 32


def test_ctrl_c_checkpoints_and_resume_finishes(tmp_path, config, monkeypatch):
    import signal
    calls = {"n": 0}

    def interrupt_on_third_step(logits, targets, weights=None):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C mid-step
        return per_sequence_loss(logits, targets, weights)

    monkeypatch.setattr(loop, "per_sequence_loss", interrupt_on_third_step)
    out = tmp_path / "ctrlc"
    # whatever SIGINT did before (a background CI job inherits SIG_IGN): the run restores it
    before = signal.getsignal(signal.SIGINT)
    summary = run(out, config, "--no-dp", "--steps", 6, "--max-physical-batch-size", 64)
    assert summary["status"] == "interrupted" and summary["step"] == 3  # the step in flight finished
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    monkeypatch.setattr(loop, "per_sequence_loss", per_sequence_loss)
    assert run(out, config, "--no-dp", "--steps", 6, "--resume")["status"] == "complete"


def test_document_epsilon_is_the_runs_for_one_row_and_matches_a_direct_computation():
    import math

    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    plan = Plan(dp=True, num_train=500, batch_size=10, steps=20, requested_steps=20,
                sample_rate=0.02, noise_multiplier=1.0, delta=1e-6)
    one = document_epsilon(plan, 20, 1)  # k = 1: the row-level ε (coarser grid: slightly above)
    assert epsilon_for(1.0, 0.02, 20, 1e-6) <= one <= 1.01 * epsilon_for(1.0, 0.02, 20, 1e-6)
    three = document_epsilon(plan, 20, 3)
    mixture = dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
        1.0, [0.0, 1.0, 2.0, 3.0], [math.comb(3, j) * 0.02 ** j * 0.98 ** (3 - j) for j in range(4)])
    direct = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3).compose(
        dp_accounting.SelfComposedDpEvent(mixture, 20)).get_epsilon(1e-6)
    assert direct <= three <= 1.01 * direct and one < document_epsilon(plan, 20, 2) < three


def test_bad_learning_rates_and_warm_up_are_refused(tmp_path, config, capsys, monkeypatch):
    """An infinite learning rate is refused up front; weights that blew up (here: poisoned at
    the final checkpoint) end the run with an error, writing no model file and no card (the
    DP step drops NaN examples, so training itself would go on)."""
    for flags, what in ((["--lr", "inf"], "--lr must be a finite number"),
                        (["--warmup-steps", "-5"], "--warmup-steps must be >= 0")):
        assert cli.main(["--config", config, "--out", str(tmp_path / "bad"), "--quiet",
                         "--num-records", "50", "--device", "cpu", *flags]) == 2
        assert what in capsys.readouterr().err
    save = loop.TrainingRun.save_checkpoint

    def poisoned(self):
        if self.step == 3:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        save(self)
    monkeypatch.setattr(loop.TrainingRun, "save_checkpoint", poisoned)
    out = tmp_path / "huge"
    assert cli.main(["--config", config, "--out", str(out), "--quiet", "--num-records", "120",
                     "--batch-size", "16", "--steps", "3", "--dp-seed", "1",
                     "--device", "cpu"]) == 2
    assert "not finite" in capsys.readouterr().err
    assert not (out / "model.pt").exists() and not (out / "model_card.json").exists()
