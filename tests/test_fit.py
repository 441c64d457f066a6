"""The memory model (known answers), fitting a GPU without changing the algorithm (bench plan --gpu-mem,
bench run --fit), warnings for algorithm-changing overrides, and a real check that the fitted settings
(micro-batching with accumulation, gradient checkpointing) leave the training run unchanged."""

import json

import pytest

from bench import config
from bench.cli import main as cli_main
from bench.cost import fit as fit_mod
from bench.cost.estimate import model_counts
from bench.cost.memory import ActivationFit, MemoryModel, fit_measured, memory_model
from bench.engine import pricing as cost
from bench.engine.trace import Call
from bench.errors import UsageError

MIB = 2**20


def _toy_profile(tmp_path, name="toymem", resident=100.0, fwd=(5.0, 1.0), fb=(5.0, 10.0), ck=(6.0, 2.0)):
    """Forward / forward+backward / checkpointed tables whose peaks are resident + a + b * rows exactly."""
    def kind(a_b, secs):
        a, b = a_b
        return {"points": [{"rows": r, "seconds": secs * r, "peak_mem_mb": resident + a + b * r} for r in (1, 2, 4, 8)]}

    obj = {"format": cost.FORMAT, "name": name, "model": "tiny-random", "models": ["tiny-random"], "device": "toy",
           "conditions": "hand-made for tests",
           "kinds": {"forward": kind(fwd, 0.01), "forward_backward": kind(fb, 0.03),
                     "forward_backward_checkpointed": kind(ck, 0.04)},
           "memory": {"resident_mb": {"forward": resident, "forward_backward": resident,
                                      "forward_backward_checkpointed": resident}}}
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(obj))
    return p


def test_parse_mem_units():
    assert fit_mod.parse_mem("80GB") == pytest.approx(80e9 / MIB)
    assert fit_mod.parse_mem("79.6GiB") == pytest.approx(79.6 * 1024)
    assert fit_mod.parse_mem("24000MiB") == 24000
    assert fit_mod.parse_mem("24") == pytest.approx(24e9 / MIB)
    for bad in ("lots", "-3GB", "0"):
        with pytest.raises(UsageError):
            fit_mod.parse_mem(bad)


def test_measured_fit_is_exact_on_a_line_and_an_upper_envelope_otherwise(tmp_path):
    prof = cost.load_profile(_toy_profile(tmp_path))
    f = fit_measured(prof, "forward_backward")
    assert f.source == "measured" and f.slope == pytest.approx(10.0) and f.intercept == pytest.approx(5.0)
    assert f.at(16) == pytest.approx(165.0)
    # one point above the line (a gradient phase at 1 row): the line is raised to bound it
    obj = json.loads(_toy_profile(tmp_path, "bump").read_text())
    obj["kinds"]["forward_backward"]["points"][0]["peak_mem_mb"] += 30.0
    (tmp_path / "bump.json").write_text(json.dumps(obj))
    f = fit_measured(cost.load_profile(tmp_path / "bump.json"), "forward_backward")
    pts = [(r, y) for r, y, _ in f.points]
    assert all(f.at(r) >= y - 1e-9 for r, y in pts) and any(abs(f.at(r) - y) < 1e-9 for r, y in pts)
    # a profile without memory: no measured fit
    assert fit_measured(cost.load_profile("shapes-cpu"), "forward") is None


def test_phase_peaks_known_answer():
    mm = MemoryModel(resident={"weights": 100.0, "reward": 10.0},
                     fits={"forward": ActivationFit("forward", 2.0, 1.0, "measured"),
                           "forward_backward": ActivationFit("forward_backward", 10.0, 0.0, "measured"),
                           "reward:r": ActivationFit("reward:r", 3.0, 0.0, "estimated"),
                           "optimizer_step": ActivationFit("optimizer_step", 0.0, 4.0, "estimated")},
                     latent_mib=0.5, reward_batch={"reward:r": 4})
    calls = [Call("forward", 4, "rollout", per_eval=2), Call("forward", 8, "rollout", per_eval=2),
             Call("reward", 10, "reward", "r"), Call("forward_backward", 3, "update", grad=True),
             Call("optimizer_step", 1, "update", "optimizer")]
    peaks = mm.phase_peaks([calls], nodes=20)
    base = 110.0 + 20 * 0.5
    assert peaks["rollout"]["peak_mib"] == base + 1.0 + 2.0 * 8 and peaks["rollout"]["call"] == "forward x8"
    assert peaks["reward"]["peak_mib"] == base + 3.0 * 4 and peaks["reward"]["call"] == "reward:r x4 of 10"
    assert peaks["update"]["peak_mib"] == base + 30.0
    assert MemoryModel({}, {}, 1.0).phase_peaks([calls], 1)["rollout"]["unmodeled"] == ["forward"]


def _cfg(**sets):
    base = {"sampler.steps": 4, "algo.k": 2, "algo.d": 2, "train.prompts_per_iteration": 4}
    base.update(sets)
    return config.resolve(base, flags={"algo.name": "treegrpo", "model.name": "tiny-random"})


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    monkeypatch.setenv("TREEBENCH_CACHE", str(tmp_path / "cache"))
    return cost.load_profile(_toy_profile(tmp_path))


def _fit(cfg, prof, mem_mib, **kw):
    counts, batch, _ = model_counts(cfg)
    mm = memory_model(prof, counts, cfg, kw.get("gpus", 1), batch)
    return fit_mod.fit(cfg, prof, counts, mm, mem_mib, headroom_mib=0.0, iterations=3, **kw), mm


def test_fit_shrinks_the_micro_batch_and_keeps_the_algorithm(toy):
    cfg = _cfg()
    res, mm = _fit(cfg, toy, 1e9)  # everything fits: nothing changes
    assert res.changes == [] and res.chosen.settings == {"train.micro_batch": 64, "model.gradient_checkpointing": False}
    base = sum(mm.resident.values())
    # room for 8 forward+backward rows (10 MiB/row) but not 64: the micro-batch shrinks, the algorithm stays
    res, _ = _fit(cfg, toy, base + 5 + 10 * 8 + res.chosen.nodes * mm.latent_mib + 0.5)
    assert res.chosen.peak_mib <= res.usable_mib
    assert res.chosen.micro_batch < 64 and res.chosen.micro_batch in fit_mod.CANDIDATE_MICRO_BATCHES
    assert [c["key"] for c in res.changes][0] == "train.micro_batch"
    assert "same gradient" in res.changes[0]["why"]
    before = fit_mod.invariants(fit_mod.simulate(cfg, 3), 4)
    assert res.invariants == before
    assert before["group_size"] == 4 and before["optimizer_steps_per_iteration"] == 1


def test_fit_turns_on_checkpointing_when_that_is_faster_or_the_only_way(toy):
    cfg = _cfg()
    counts, batch, _ = model_counts(cfg)
    mm = memory_model(toy, counts, cfg, 1, batch)
    room = sum(mm.resident.values()) + 40 * mm.latent_mib + 6 + 2 * 16  # 16 checkpointed rows, 3 plain ones
    res = fit_mod.fit(cfg, toy, counts, mm, room, headroom_mib=0.0, iterations=3)
    assert res.chosen.peak_mib <= res.usable_mib
    keys = [c["key"] for c in res.changes]
    assert "train.micro_batch" in keys
    if res.chosen.checkpointing:
        assert "model.gradient_checkpointing" in keys


def test_nothing_fits_exits_2_naming_the_nearest_fit(toy, tmp_path, capsys):
    argv = ["plan", "--algo", "treegrpo", "--model", "tiny-random", "--prompts", "4", "--set", "sampler.steps=4",
            "--set", "algo.k=2", "--set", "algo.d=2", "--profile", str(tmp_path / "toymem.json"), "--iterations", "2"]
    assert cli_main([*argv, "--gpu-mem", "5MiB", "--headroom", "0MiB"]) == 2
    err = capsys.readouterr().err
    assert "nothing that keeps the algorithm fits" in err and "Nearest fit: --gpu-mem" in err
    # the user's own micro-batch is kept, and the message says so
    assert cli_main([*argv, "--gpu-mem", "60MiB", "--headroom", "0MiB", "--set", "train.micro_batch=64", "--set",
                     "model.gradient_checkpointing=false"]) == 2
    assert "drop your train.micro_batch" in capsys.readouterr().err
    assert cli_main([*argv, "--gpu-mem", "lots"]) == 2
    assert cli_main([*argv, "--gpus", "3"]) == 2
    assert "use --gpus 2 or 4" in capsys.readouterr().err
    assert cli_main([*argv, "--gpu-mem", "10GB", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["fit"]["fits"] and rep["memory"]["peak_mem_mb"] <= rep["fit"]["usable_mb"]
    assert rep["fit"]["invariants"]["images_per_iteration"] == rep["images_per_iteration"]


def test_gpus_split_the_prompts_and_keep_the_invariants(toy, tmp_path, capsys):
    argv = ["plan", "--algo", "treegrpo", "--model", "tiny-random", "--prompts", "4", "--set", "sampler.steps=4",
            "--set", "algo.k=2", "--set", "algo.d=2", "--profile", str(tmp_path / "toymem.json"), "--iterations", "2",
            "--json"]
    assert cli_main(argv) == 0
    one = json.loads(capsys.readouterr().out)
    assert cli_main([*argv, "--gpus", "2", "--gpu-mem", "10GB"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["images_per_iteration"] == one["images_per_iteration"]  # all GPUs together
    assert two["trace"]["trace/reward/rows"] * 2 == one["trace"]["trace/reward/rows"]  # one GPU's calls
    assert "DDP gradient buckets" in two["memory"]["resident_mb"]
    assert [c["key"] for c in two["fit"]["changes"]][-1] == "gpus"


def test_overrides_that_change_the_algorithm_warn(toy, tmp_path, capsys):
    argv = ["plan", "--algo", "treegrpo", "--preset", "treegrpo-paper", "--model", "tiny-random", "--prompts", "2",
            "--profile", str(tmp_path / "toymem.json"), "--iterations", "1", "--json"]
    assert cli_main([*argv, "--set", "train.micro_batch=8", "--set", "model.gradient_checkpointing=true"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []  # execution settings: the algorithm is the same
    assert cli_main([*argv, "--set", "train.optimizer_steps=1"]) == 0
    (w,) = json.loads(capsys.readouterr().out)["warnings"]
    assert "train.optimizer_steps=1" in w and "preset treegrpo-paper (2)" in w
    assert "optimizer steps per iteration 2 -> 1" in w


def test_bench_run_fit_applies_the_fitted_settings(toy, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["run", "--model", "tiny-random", "--budget", "1it", "--out", str(out), "--no-progress", "--fit",
                   "--gpu-mem", "1054MiB", "--set", f"run.cost_profile={tmp_path / 'toymem.json'}", "--set",
                   "eval.every=0", "--set", "eval.at_start=false", "--set", "sampler.steps=3", "--set", "algo.k=2",
                   "--set", "algo.d=2", "--set", "train.prompts_per_iteration=2",
                   "--set", "model.gradient_checkpointing=false"])  # 1 GiB headroom: 30 MiB to fit
    assert rc == 0
    err = capsys.readouterr().err
    assert "fit: train.micro_batch 64 ->" in err
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["train"]["micro_batch"] < 64
    assert cli_main(["run", "--model", "tiny-random", "--budget", "1it", "--out", str(tmp_path / "x"), "--fit",
                     "--gpu-mem", "1GB"]) == 2  # no cost profile
    assert "cost profile" in capsys.readouterr().err


def test_fitted_settings_leave_the_run_unchanged(tmp_path):
    """The claim behind the fit, checked on real runs: micro-batches of 2 rows with gradient accumulation and
    checkpointing train the same as 64-row micro-batches (same images, optimizer steps, and the same loss,
    gradient norm and rewards up to float32 rounding of the batched matmuls)."""
    from bench.run import runner

    def go(name, **sets):
        base = {"eval.every": 0, "eval.at_start": False, "sampler.steps": 4, "algo.k": 2, "algo.d": 2,
                "train.prompts_per_iteration": 2, "run.progress": False, "run.checkpoint_every": 0,
                "train.optimizer_steps": 2, "run.flops": False}
        base.update(sets)
        cfg = config.resolve(base, flags={"algo.name": "treegrpo", "model.name": "tiny-random", "budget": "2it",
                                          "out": str(tmp_path / name)})
        s = runner.run(cfg)
        return [json.loads(x) for x in (s.out_dir / "iterations.jsonl").read_text().splitlines()]

    a = go("a", **{"train.micro_batch": 64})
    b = go("b", **{"train.micro_batch": 2, "model.gradient_checkpointing": True})
    for x, y in zip(a, b):
        assert (x["samples"], x["optimizer_steps"], x["edges"], x["nfe_update"]) == \
            (y["samples"], y["optimizer_steps"], y["edges"], y["nfe_update"])
        assert y["micro_batches"] > x["micro_batches"]
        for k in ("reward_mean", "loss", "grad_norm", "approx_kl"):
            assert y[k] == pytest.approx(x[k], rel=1e-3, abs=1e-6), k


@pytest.mark.parametrize("algo,preset", [("treegrpo", "treegrpo-paper"),
                                         pytest.param("dancegrpo", "dancegrpo-paper", marks=pytest.mark.slow),
                                         pytest.param("mixgrpo", "mixgrpo-paper", marks=pytest.mark.slow),
                                         pytest.param("flowgrpo", "flowgrpo-paper", marks=pytest.mark.slow),
                                         pytest.param("diffusionnft", "diffusionnft-paper", marks=pytest.mark.slow)])
def test_paper_presets_fit_24gb_on_sd35_medium(algo, preset, capsys):
    """The done-when check (with the shipped FLOP and parameter counts of sd3.5-medium: no counting here)."""
    argv = ["plan", "--algo", algo, "--preset", preset, "--model", "sd3.5-medium", "--prompts", "8", "--profile",
            "sd3.5-medium-h200", "--iterations", "2", "--json"]
    assert cli_main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli_main([*argv, "--gpu-mem", "24GB"]) == 0
    rep = json.loads(capsys.readouterr().out)
    f = rep["fit"]
    assert f["fits"] and f["peak_mem_mb"] <= 24e9 / MIB
    inv = f["invariants"]
    assert inv["images_per_iteration"] == plain["images_per_iteration"] == rep["images_per_iteration"]
    assert inv["optimizer_steps_per_iteration"] == plain["trace"]["trace/optimizer_step/calls"]
    assert rep["unpriced_calls_per_iteration"] == {} and plain["unpriced_calls_per_iteration"] == {}
    for k in ("vae_decode", "text_encode", "reward:hpsv2", "optimizer_step"):
        assert rep["kinds"][k]["source"] == "estimated" and rep["kinds"][k]["flops_per_iteration"] > 0
    assert rep["kinds"]["forward"]["source"] == "measured"
