"""The end-to-end benchmark harness (vaultkern.benchmark): results schema, the norm
cross-check, unsupported providers, targets and the largest-batch search.

No timing assertions: the micro run only checks that every code path produces a
well-formed, self-consistent results file.
"""
import json
import os

import pytest
import torch

from vaultkern.benchmark import config_run, harness, main, providers as prov, report

PROVIDER_KEYS = {"status", "step_ms", "tokens_per_s", "ratio_vs_nondp", "peak_mem_bytes",
                 "max_batch", "timing_mode"}
META_KEYS = {"date", "machine", "torch", "triton", "opacus", "cuda", "driver", "python",
             "git_sha", "vaultkern", "vaultkern_backend"}


def _results(out_dir):
    files = sorted(os.listdir(out_dir))
    stems = {os.path.splitext(f)[0] for f in files}
    assert len(stems) == 1, files
    stem = stems.pop()
    with open(os.path.join(out_dir, stem + ".json")) as f:
        return stem, files, json.load(f)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """One micro run (gemma, tied and untied, every provider) through the CLI."""
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--size", "micro", "--models", "gemma", "--out", str(out)])
    stem, files, results = _results(out)
    with open(out / (stem + ".md")) as f:
        md = f.read()
    return rc, files, results, md


def test_micro_run_writes_json_md_png(micro_run):
    rc, files, results, md = micro_run
    assert rc == 0, results.get("failures")
    assert results["ok"] is True and results["failures"] == []
    assert {os.path.splitext(f)[1] for f in files} == {".json", ".md", ".png"}
    assert results["schema"] == harness.SCHEMA
    assert META_KEYS <= set(results["meta"])
    assert results["meta"]["torch"] == torch.__version__
    assert results["settings"]["size"] == "micro"
    assert [c["name"] for c in results["configs"]] == ["gemma/tied", "gemma/untied"]
    assert "| gemma/tied" in md and "## Targets" in md


def test_micro_run_provider_entries(micro_run):
    _, _, results, _ = micro_run
    for config in results["configs"]:
        assert config["tokens_per_step"] == config["batch_size"] * config["seq_len"]
        assert set(config["providers"]) == set(prov.PROVIDERS)
        for name, e in config["providers"].items():
            assert set(e) == PROVIDER_KEYS, name
            assert e["max_batch"] is None  # CPU: no largest-batch search
            if e["status"] != "ok":
                assert e["step_ms"] is None and e["tokens_per_s"] is None
                continue
            ms = e["step_ms"]
            assert ms["n"] == 2 == len(ms["samples"])  # micro: 2 timed steps
            assert ms["p10"] <= ms["median"] <= ms["p90"]
            assert e["tokens_per_s"] == pytest.approx(
                config["tokens_per_step"] / (ms["median"] / 1e3))
            assert e["timing_mode"] == "interleaved"
            ratio = e["ratio_vs_nondp"]
            nondp = config["providers"]["nondp"]
            assert ratio["tokens_per_s"] == pytest.approx(e["tokens_per_s"] / nondp["tokens_per_s"])
            assert ratio["step_time"] == pytest.approx(ms["median"] / nondp["step_ms"]["median"])
            if results["settings"]["memory_unavailable"] is None:
                assert isinstance(e["peak_mem_bytes"], int) and e["peak_mem_bytes"] >= 0
        assert config["providers"]["nondp"]["ratio_vs_nondp"]["tokens_per_s"] == 1.0
        for name in ("nondp", "opacus-hooks", "vaultkern", "vaultkern-per-layer"):
            assert config["providers"][name]["status"] == "ok", (config["name"], name)


def test_micro_run_norm_crosscheck(micro_run):
    _, _, results, md = micro_run
    for config in results["configs"]:
        cc = config["crosscheck"]
        assert cc["status"] == "pass", cc
        assert cc["dtype"] == "float32" and cc["rows"] == config["batch_size"]
        assert 0.0 <= cc["max_rel_diff"] <= cc["tol"] == 1e-4
        assert len(cc["vaultkern_norms"]) == len(cc["opacus_norms"]) == cc["rows"]
        assert all(n > 0 for n in cc["opacus_norms"])
    assert "Per-example norm cross-check" in md


def test_micro_run_reports_unsupported_with_reason(micro_run):
    _, _, results, md = micro_run
    tied, untied = results["configs"]
    ghost = tied["providers"]["opacus-ghost"]["status"]
    # Opacus ghost clipping refuses the tied embedding / LM head; the reason is Opacus' own
    assert ghost.startswith("unsupported: NotImplementedError:") and "tying" in ghost.lower()
    assert ghost.replace("|", "\\|") in md
    assert untied["providers"]["opacus-ghost"]["status"] == "ok"


def test_crosscheck_mismatch_fails_the_run(tmp_path, monkeypatch):
    real = prov.VaultKern.per_example_norms
    monkeypatch.setattr(prov.VaultKern, "per_example_norms", lambda self: real(self) * 1.001)
    rc = main(["--size", "micro", "--models", "gemma", "--untie", "--providers", "nondp",
               "--no-chart", "--out", str(tmp_path)])
    _, _, results = _results(tmp_path)
    cc = results["configs"][0]["crosscheck"]
    assert rc == 1 and results["ok"] is False
    assert cc["status"].startswith("fail") and cc["max_rel_diff"] == pytest.approx(1e-3, rel=1e-2)
    assert any("cross-check" in f for f in results["failures"])


def test_cli_rejects_unknown_provider_and_model(tmp_path, capsys):
    assert main(["--size", "micro", "--providers", "nondp,opacus-magic", "--out", str(tmp_path)]) == 2
    assert "opacus-magic" in capsys.readouterr().err
    assert main(["--size", "micro", "--models", "gpt2-small", "--out", str(tmp_path)]) == 2
    assert "gemma, gpt2" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_failure_status_kinds():
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert config_run.failure_status("opacus-hooks", oom, 16, True) == "oom: batch 16"
    assert config_run.failure_status("opacus-ghost", NotImplementedError("no ties"), 4, True) == \
        "unsupported: NotImplementedError: no ties"
    # a provider the benchmark must run never counts as "unsupported"
    assert config_run.failure_status("vaultkern", ValueError("bad"), 4, True) == "error: ValueError: bad"
    assert config_run.failure_status("opacus-hooks", ValueError("late"), 4, False) == \
        "error: ValueError: late"


def test_time_summary():
    s = config_run.summarize_times([0.004, 0.001, 0.002, 0.003, 0.005])
    assert s["n"] == 5 and s["median"] == pytest.approx(3.0)
    assert s["p10"] == pytest.approx(1.4) and s["p90"] == pytest.approx(4.6)
    assert s["samples"] == [4.0, 1.0, 2.0, 3.0, 5.0]


def test_every_provider_starts_from_the_same_weights():
    h = harness.Harness(harness.RunOptions(size="micro", models=["gpt2"], ties=["tied"]))
    run = config_run.ConfigRun(h, *h.plan[0])
    a, b = run.fresh_model(), run.fresh_model()
    assert a.lm_head.weight is a.embed_tokens.weight  # the tie survives
    assert a.lm_head.weight is not b.lm_head.weight   # separate copies
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    (x1, y1), (x2, y2) = run.batches
    assert x1.is_contiguous() and torch.equal(x1[:, 1:], y1[:, :-1])  # next-token targets
    assert not torch.equal(x1, x2)


def test_max_batch_search_doubles_then_bisects(monkeypatch):
    h = harness.Harness(harness.RunOptions(size="micro", models=["gemma"], ties=["untied"]))
    run = config_run.ConfigRun(h, *h.plan[0])
    run.spec = config_run.ModelSpec("fake", batch=8, max_batch_cap=256)
    run.batch = 8
    probed = []

    def probe(name, batch):
        probed.append(batch)
        return batch <= 37
    monkeypatch.setattr(run, "_probe", probe)
    run.entries["nondp"]["status"] = "ok"
    mb = run.max_batch("nondp")
    assert probed == [16, 32, 64, 48, 40, 36, 38, 37]  # 8 probes at most
    assert (mb["value"], mb["first_oom"], mb["exact"], mb["at_cap"]) == (37, 38, True, False)

    probed.clear()
    monkeypatch.setattr(run, "_probe", lambda name, b: probed.append(b) or True)
    mb = run.max_batch("nondp")
    assert probed == [16, 32, 64, 128, 256] and mb["value"] == 256 and mb["at_cap"]

    probed.clear()  # out of memory at the benchmark batch: search downwards
    monkeypatch.setattr(run, "_probe", lambda name, b: probed.append(b) or b <= 2)
    run.entries["nondp"]["status"] = "oom: batch 8"
    mb = run.max_batch("nondp")
    assert probed == [4, 2, 3] and (mb["value"], mb["first_oom"]) == (2, 3)


def _entry(ms=None, status="ok", max_batch=None, tokens=1000):
    if ms is None:
        return {"status": status, "step_ms": None, "tokens_per_s": None, "max_batch": None}
    return {"status": status, "step_ms": {"median": ms}, "tokens_per_s": tokens / (ms / 1e3),
            "max_batch": None if max_batch is None else {"value": max_batch}}


def _fake_results(size, model, tied, untied):
    return {"settings": {"size": size, "models": [model]},
            "configs": [{"name": f"{model}/tied", "providers": tied},
                        {"name": f"{model}/untied", "providers": untied}]}


def test_targets_cpu_use_one_configuration_per_comparison():
    unsupported = _entry(status="unsupported: NotImplementedError: tying")
    results = _fake_results(
        "cpu", "gemma",
        tied={"nondp": _entry(100), "opacus-hooks": _entry(110), "opacus-ghost": unsupported,
              "vaultkern": _entry(120)},
        untied={"nondp": _entry(100), "opacus-hooks": _entry(300), "opacus-ghost": _entry(200),
                "vaultkern": _entry(105)})
    t = {r["id"]: r for r in report.evaluate_targets(results)}
    assert set(t) == {"cpu-step-vs-nondp", "cpu-faster-than-hooks", "cpu-faster-than-ghost"}
    assert t["cpu-step-vs-nondp"]["config"] == "gemma/tied"
    assert t["cpu-step-vs-nondp"]["value"] == pytest.approx(1.2)
    assert t["cpu-step-vs-nondp"]["status"] == "miss" and "4% over" in t["cpu-step-vs-nondp"]["detail"]
    assert t["cpu-faster-than-hooks"]["status"] == "miss"  # 120 vs 110 ms in the tied config
    # ghost could only run untied, so both of its numbers come from the untied config
    assert t["cpu-faster-than-ghost"]["config"] == "gemma/untied"
    assert t["cpu-faster-than-ghost"]["status"] == "pass"
    assert t["cpu-faster-than-ghost"]["value"] == pytest.approx(105 / 200)


def test_targets_gpu_and_not_available():
    tied = {"nondp": _entry(100, max_batch=64), "opacus-hooks": _entry(400, max_batch=8),
            "opacus-ghost": _entry(status="unsupported: x"), "vaultkern": _entry(104, max_batch=60)}
    untied = dict(tied, **{"opacus-ghost": _entry(status="unsupported: y")})
    t = {r["id"]: r for r in report.evaluate_targets(_fake_results("gpu", "gpt2-small", tied, untied))}
    assert t["gpu-tps-vs-nondp"]["status"] == "pass"
    assert t["gpu-tps-vs-nondp"]["value"] == pytest.approx(100 / 104)
    assert t["gpu-batch-vs-nondp"]["status"] == "miss"  # 60/64 = 0.9375 < 0.95
    assert t["gpu-batch-vs-nondp"]["value"] == pytest.approx(60 / 64)
    assert t["gpu-tps-vs-ghost"]["status"] == "n/a"
    assert "unsupported: x" in t["gpu-tps-vs-ghost"]["detail"]
    assert "unsupported: y" in t["gpu-tps-vs-ghost"]["detail"]
    assert report.evaluate_targets(_fake_results("micro", "gemma", tied, untied)) == []
