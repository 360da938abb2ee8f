"""Reference DP training loop: learning, accounting, resume, budget, NaN handling, CLI,
what is public (model card) and what is private (report), secure randomness by default."""
import json
import os

import pytest
import torch

import vaultkern as vk
from vaultkern.models import Decoder, get_config, per_sequence_loss
from vaultkern.privacy import Accountant
from vaultkern.privacy.accounting import epsilon_for
from vaultkern.run import batches, cli, loop
from vaultkern.run.budget import Plan, document_epsilon
from vaultkern.run.rundir import read_metrics

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
    if ("--dp-seed" not in argv and "--resume" not in argv and "--no-dp" not in argv
            and "--secure" not in argv):
        argv += ["--dp-seed", "1234"]  # reproducible DP randomness, so runs can be compared
    argv = [a for a in argv if a != "--secure"]  # the default: os.urandom
    if "--device" not in argv:
        # CPU even on a GPU machine: these tests compare runs bit for bit, which CUDA's
        # atomics-based kernels (embedding backward, cuDNN attention) do not promise
        argv += ["--device", "cpu"]
    parser = cli.build_parser()
    return loop.train(cli.resolve_args(parser, argv))


def private_report(run_dir):
    return json.loads((run_dir / "private_report.json").read_text())


def model_params(run_dir):
    return torch.load(os.path.join(run_dir, "model.pt"), weights_only=True)["model"]


# Every key the public card may hold (nested keys as a.b). A new key must be added here on
# purpose: the card is publishable, so nothing computed on private data without DP goes in.
PUBLIC_CARD_KEYS = {
    "name", "vaultkern_version", "created",
    "model", "model.style", "model.config", "model.parameters",
    "data", "data.description", "data.tokenizer", "data.seq_len", "data.train_sequences",
    "data.max_sequences_per_document", "data.canaries_summary", "data.packing", "data.split",
    "privacy", "privacy.differentially_private", "privacy.formal_guarantee", "privacy.caveats",
    "privacy.epsilon", "privacy.delta", "privacy.target_epsilon", "privacy.privacy_unit",
    "privacy.neighbouring_datasets", "privacy.document_level", "privacy.document_level.k",
    "privacy.document_level.epsilon", "privacy.document_level.delta",
    "privacy.document_level.derivation", "privacy.dataset_size", "privacy.dataset_size_note",
    "privacy.max_grad_norm", "privacy.noise_multiplier", "privacy.sample_rate",
    "privacy.expected_batch_size", "privacy.sampling", "privacy.max_batch_size", "privacy.steps",
    "privacy.accountant", "privacy.secure_randomness", "privacy.randomness",
    "privacy.non_finite_examples", "privacy.resumes", "privacy.budget_note",
    "training", "training.optimizer", "training.lr", "training.weight_decay",
    "training.warmup_steps", "training.batch_size", "training.max_physical_batch_size",
    "training.steps_done", "training.steps_planned", "training.complete", "training.device",
    "training.data_parallel_ranks",
    "training.seed",
}
PRIVATE_FIELDS = ("train_loss", "heldout_loss", "heldout_perplexity", "initial_heldout_loss",
                  "nonfinite_examples", "rejected_steps", "heldout_sequences", "wall_time_s",
                  "audit", "data_source")


def card_keys(card, prefix=""):
    keys = set()
    for key, value in card.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and key != "config":
            keys |= card_keys(value, prefix + key + ".")
    return keys


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
