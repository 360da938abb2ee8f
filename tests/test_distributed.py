"""DistributedDataParallel on 2 gloo ranks (127.0.0.1, CPU): a DP step is the same as one
process on the whole batch, noise is added once and agrees across ranks (DESIGN.md §10)."""
import os
import socket
import subprocess
import sys

import pytest
import torch


WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(scenario, tmp_path):
    out = str(tmp_path / scenario)
    proc = subprocess.run([sys.executable, WORKER, scenario, str(_free_port()), out],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("scenario", ["sigma0", "accumulate"])
def test_ddp_step_equals_one_process_on_the_whole_batch(scenario, tmp_path):
    ranks = run(scenario, tmp_path)
    for steps in (1, 3):
        for r in ranks:
            single, ddp = r[steps]
            init = r["init"]
            for n in single:
                update = single[n] - init[n]
                err = float((ddp[n] - single[n]).norm() / update.norm().clamp(min=1e-12))
                assert err <= 1e-5, (scenario, steps, n, err)
        for n in ranks[0][steps][1]:
            assert torch.equal(ranks[0][steps][1][n], ranks[1][steps][1][n])


def test_noise_once_and_identical_on_every_rank(tmp_path):
    ranks = run("noise", tmp_path)
    for n in ranks[0]["noisy"]:
        assert torch.equal(ranks[0]["noisy"][n], ranks[1]["noisy"][n]), n
    # noisy - plain = -lr·σC·ξ per element (loss_reduction="sum": no ÷B̄): std lr·σC, not
    # √2 times that (noise added on both ranks before the sum) and not lr·σC/√2
    diff = torch.cat([(ranks[0]["noisy"][n] - ranks[0]["base"][n]).flatten()
                      for n in ranks[0]["noisy"]])
    want = 0.5 * 1.0 * 0.05
    assert diff.numel() > 4000
    assert abs(float(diff.std()) / want - 1) < 0.08, float(diff.std()) / want


def test_unsupported_modes_are_refused(tmp_path):
    """DDP flags that would keep or lose the clipped sums, DDP before patching, FSDP2 layouts
    vaultkern cannot reduce (root parameters left unsharded, HSDP's 2-D mesh), truncated
    Poisson across ranks, and parameters frozen after DDP or FSDP2 set up their reduction:
    each a clear error, never silent training."""
    errors = run("refusals", tmp_path)[0]["errors"]
    assert len(errors) == 8, errors
    assert "find_unused_parameters" in errors[0] and "static_graph" in errors[1]
    assert "before wrapping it in DistributedDataParallel" in errors[2]
    assert "'embed.weight' is not sharded" in errors[3] and "root" in errors[3]
    assert "2-D mesh" in errors[4]
    assert "truncated_max_batch under torch.distributed" in errors[5]
    assert "changed after it was wrapped in DistributedDataParallel" in errors[6]
    assert "changed after it was wrapped in FSDP2" in errors[7]


def test_fsdp2_step_equals_one_process_on_the_whole_batch(tmp_path):
    """FSDP2 (fully_shard on the blocks and the root, tied embeddings), patched before or
    after sharding: after 1 and 3 steps the gathered parameters equal one process on the
    whole batch: σ = 0, σ = 1 with a seed (each shard noised at its global offset: the very
    single-process noise), per-layer clipping, two backward passes per step."""
    ranks = run("fsdp", tmp_path)
    init = ranks[0]["init"]
    cases = [k for k in ranks[0] if isinstance(k, tuple)]
    assert len(cases) == 16
    for key in cases:
        for r in ranks:
            single, got = r[key]
            assert sum(float((single[n] - init[n]).norm()) for n in single) > 0, key
            for n in single:  # (a key bias gets no gradient: softmax ignores it; updates ~1e-2)
                update = (single[n] - init[n]).norm().clamp(min=1e-6)
                err = float((got[n] - single[n]).norm() / update)
                assert err <= 1e-9, (key, n, err)
    for mode in ("default_seed", "secure"):
        a, b = (r[mode] for r in ranks)
        assert a["key"] is not None and a["key"] == b["key"], mode  # rank 0's, on both
        for n in a["noisy"]:
            assert torch.equal(a["noisy"][n], b["noisy"][n]), (mode, n)
        # noise once: noisy - plain = -lr·σC·ξ, std lr·σC (not √2 times it)
        diff = torch.cat([(a["noisy"][n] - a["base"][n]).flatten() for n in a["noisy"]])
        assert diff.numel() > 4000
        assert abs(float(diff.std()) / (0.5 * 1.0 * 0.05) - 1) < 0.08, (mode, float(diff.std()))


def test_fsdp2_on_a_transformers_llama_and_an_empty_shard(tmp_path):
    """A transformers Llama sharded per decoder layer (tied embeddings, GQA; also with the
    embedding and head as one fully_shard([embed, head]) unit, and PEFT LoRA on a frozen base,
    whose base weights must get no gradient) and a model whose
    [1, 7] weight leaves one rank an empty shard, with reshard_after_forward True and False,
    2 AdamW steps at σ = 1 (seeded): the gathered weights equal one process's."""
    ranks = run("fsdp_models", tmp_path)
    assert len(ranks[0]) == 8
    for r in ranks:
        for key, (single, got, init, frozen_grads) in r.items():
            assert frozen_grads == 0, key  # LoRA's frozen base: no gradient, no collective
            for n in single:
                update = (single[n] - init[n]).norm()
                assert float(update) > 0, (key, n)
                err = float((got[n] - single[n]).norm() / update)
                assert err <= 1e-9, (key, n, err)


def test_privacy_engine_under_fsdp2_equals_one_process(tmp_path):
    """PrivacyEngine.make_private on a model sharded with fully_shard (the optimizer over its
    DTensor parameters) on 2 ranks = one process with the global B̄, same seed."""
    from distributed_worker import engine_run
    ranks = run("fsdp_engine", tmp_path)
    for sigma in (0.0, 1.0):
        single = engine_run(sigma, world=1, per_rank_batch=8)
        for n, p in single["params"].items():
            for r in ranks:
                torch.testing.assert_close(r[sigma]["params"][n], p, rtol=1e-9, atol=1e-12)


def test_fsdp2_run_resumes_from_per_rank_checkpoints(tmp_path):
    """An FSDP2 PrivacyEngine run (AdamW) saved after 2 steps, one checkpoint file per rank,
    and resumed into a fresh sharded model and engine, takes the third step of the run that
    never stopped: the same weights (bit for bit) and the same ε."""
    for r in run("fsdp_resume", tmp_path):
        straight, resumed = r["straight"], r["resumed"]
        assert resumed["epsilon"] == straight["epsilon"] > 0
        for n, p in straight["params"].items():
            assert torch.equal(resumed["params"][n], p), n


def test_privacy_engine_under_ddp_equals_one_process(tmp_path):
    """PrivacyEngine on 2 ranks (each the whole dataset, B̄ = 4 per rank) + DDP = one process
    with B̄ = 8, the same seed: the ranks' shares are disjoint and together the one-process
    Poisson batch, and the weights (σ = 0 and σ = 1: the noise too) are the same. Secure
    noise across ranks: rank 0's key on both, so the replicas agree."""
    from distributed_worker import engine_run
    ranks = run("engine", tmp_path)
    for sigma in (0.0, 1.0):
        single = engine_run(sigma, world=1, per_rank_batch=8)
        for step, whole in enumerate(single["rows"]):
            shares = [r[sigma]["rows"][step] for r in ranks]
            assert all(len(x) for x in shares)  # nobody idles: the test bites
            union = torch.cat(shares)
            assert sorted(map(tuple, union.tolist())) == sorted(map(tuple, whole.tolist()))
        for n, p in single["params"].items():
            for r in ranks:
                torch.testing.assert_close(r[sigma]["params"][n], p, rtol=1e-9, atol=1e-12)
    for n in ranks[0]["secure"]:
        assert torch.equal(ranks[0]["secure"][n], ranks[1]["secure"][n]), n


def test_reference_training_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m vaultkern train`: both ranks train (rank 0 writes the
    run), ε is the single-process ε of the same q, σ and steps, and the weights equal a
    single-process run with the same --dp-seed (one global Poisson batch, split in two)."""
    import json
    from vaultkern.privacy.accounting import epsilon_for
    config = tmp_path / "tiny32.toml"
    config.write_text('base = "tiny"\nseq_len = 32\nnum_layers = 1\n')
    flags = ["--config", str(config), "--num-records", "40", "--batch-size", "8", "--steps", "3",
             "--noise-multiplier", "1.0", "--epsilon-every", "3", "--accountant", "rdp",
             "--delta", "1e-3", "--dp-seed", "77", "--max-physical-batch-size", "2", "--quiet",
             "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    proc = subprocess.run(torchrun + ["-m", "vaultkern", "train", *flags, "--out",
                                      str(tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    single = subprocess.run([sys.executable, "-m", "vaultkern", "train", *flags, "--out",
                             str(tmp_path / "one")], capture_output=True, text=True,
                            timeout=300, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    cards = [json.loads((tmp_path / d / "model_card.json").read_text()) for d in ("ddp", "one")]
    assert cards[0]["training"]["data_parallel_ranks"] == 2
    assert cards[1]["training"]["data_parallel_ranks"] == 1
    p = cards[0]["privacy"]
    assert p["epsilon"] == pytest.approx(cards[1]["privacy"]["epsilon"], rel=1e-12)
    assert p["epsilon"] == pytest.approx(epsilon_for(1.0, p["sample_rate"], 3, 1e-3, "rdp"),
                                         rel=1e-9)
    weights = [torch.load(tmp_path / d / "model.pt", weights_only=True)["model"]
               for d in ("ddp", "one")]
    for n in weights[1]:
        torch.testing.assert_close(weights[0][n], weights[1][n], rtol=1e-5, atol=1e-6)


def test_dp_trainer_under_torchrun_equals_one_process(tmp_path):
    """DPTrainer under `torchrun --nproc_per_node 2` (per-device batch 3: global B̄ = 6) gives
    the weights and ε of one process with per-device batch 6, same dp_seed: the ranks share
    one Poisson batch, DDP reduces the clipped sums once per step (micro-batches of 2)."""
    worker = os.path.join(os.path.dirname(__file__), "dp_trainer_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          worker, str(tmp_path / "ddp.pt"), "3"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one.pt"), "6"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (torch.load(tmp_path / f, weights_only=False) for f in ("ddp.pt", "one.pt"))
    assert (a["world"], b["world"]) == (2, 1) and a["q"] == b["q"] == pytest.approx(6 / 30)
    assert a["epsilon"] == pytest.approx(b["epsilon"], rel=1e-12)
    # float64 weights, but the HF Llama upcasts to float32 inside (RMSNorm, logits): other
    # micro-batch shapes round differently there (~1e-7 relative on an AMD EPYC box; a lost
    # or doubled example, or noise added twice, is orders of magnitude more)
    for n, p in b["weights"].items():
        torch.testing.assert_close(a["weights"][n], p, rtol=1e-6, atol=1e-9)
