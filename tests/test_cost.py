"""Cost model: interpolation and a hand-computed trace (known answers), reference-trainer mode, profiles,
the modeled clock and budgets, and `bench plan`'s trace equal to a real run's trace (tiny model)."""

import json
import math

import pytest
import torch

from bench import config
from bench.budget import Budget, Totals
from bench.cli import main as cli_main
from bench.cost.estimate import model_counts, plan_report, simulate
from bench.engine import pricing as cost
from bench.engine.rollout import RolloutEngine
from bench.engine.trace import Call, CallRecorder, attach_optimizer, read_trace, summarize
from bench.errors import UsageError
from bench.run import runner
from bench.types import PromptBatch, RolloutPlan


def _profile(tmp_path, kinds, name="toy"):
    obj = {"format": cost.FORMAT, "name": name, "model": "tiny-random", "models": ["tiny-random"], "device": "toy",
           "conditions": "hand-made for tests", "kinds": {k: {"points": [{"rows": r, "seconds": s, "peak_mem_mb": None}
                                                                           for r, s in pts]} for k, pts in kinds.items()}}
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(obj))
    return p


# ---- known answers ---------------------------------------------------------------------------------------
def test_interpolation_known_answers():
    xs, ys = [1, 2, 4], [1.0, 1.5, 2.5]
    assert cost.interpolate(xs, ys, 2) == 1.5            # a measured point
    assert cost.interpolate(xs, ys, 3) == 2.0            # halfway between 2 and 4
    assert cost.interpolate(xs, ys, 1.5) == 1.25
    assert cost.interpolate(xs, ys, 8) == 4.5            # last segment's slope 0.5/row: 2.5 + 4 * 0.5
    assert cost.interpolate(xs, ys, 0.5) == 1.0          # below the first point: its value
    assert cost.interpolate([2], [1.0], 6) == 3.0        # one point: proportional beyond it
    assert cost.interpolate([2], [1.0], 1) == 1.0


def test_sd35_h200_profile_holds_the_measurements_and_states_its_assumptions():
    p = cost.load_profile("sd3.5-medium-h200")
    assert p.tables["forward"].seconds_at(64) == pytest.approx(0.56801)
    assert p.tables["forward"].seconds_at(1) == pytest.approx(0.055)
    assert p.tables["forward_backward_checkpointed"].seconds_at(16) == pytest.approx(0.5748)
    # 24 rows: between 16 (0.14735 s) and 32 (0.28664 s)
    assert p.tables["forward"].seconds_at(24) == pytest.approx(0.14735 + 0.5 * (0.28664 - 0.14735))
    # no VAE / reward / text-encoder table: those kinds are unpriced, and the profile says so
    for kind in ("vae_decode", "reward", "text_encode", "optimizer_step"):
        assert kind not in p.tables and kind in p.assumptions
    assert "full fine-tuning" in p.trainable and "LoRA" in p.assumptions["forward_backward"]


def test_hand_computed_trace_and_price(tiny_flow_policy, tmp_path):
    """2 prompts, T = 3 (SDE branching k=2 at step 0, SDE, ODE), CFG (2 rows per evaluation), micro-batch 4
    rows = 2 evaluations per call. Frontier: 2, 4, 4 latents -> denoiser calls of 4 | 4+4 | 4+4 rows."""
    plan = RolloutPlan(3, ("sde", "sde", "ode"), (2, 1, 1), trees_per_prompt=1, guidance=4.5)
    eng = RolloutEngine(tiny_flow_policy, max_micro_batch=4, seed=0)
    roll = eng.run(plan, PromptBatch(("a red circle", "a blue square")), 0)
    eng.logp(roll, torch.nonzero(roll.trainable).flatten())  # 8 SDE edges with 6 distinct parents: 12 rows
    calls = eng.recorder.drain()
    assert [(c.kind, c.rows, c.phase, c.per_eval) for c in calls] == (
        [("text_encode", 2, "rollout", 1)] + [("forward", 4, "rollout", 2)] * 5
        + [("forward_backward", 12, "update", 2)])
    assert summarize(calls)["trace/forward/rows"] == 20 and summarize(calls)["trace/forward/calls"] == 5
    prof = cost.load_profile(_profile(tmp_path, {"forward": [(2, 0.010), (8, 0.022)],
                                                 "forward_backward": [(2, 0.03), (16, 0.10)]}))
    p = cost.price(prof, calls)
    # forward at 4 rows: 0.010 + (0.022 - 0.010) * 2/6 = 0.014, 5 calls; fwd+bwd at 12 rows: 0.03 + 0.07 * 10/14
    assert p.phases["rollout"] == pytest.approx(5 * 0.014)
    assert p.phases["update"] == pytest.approx(0.03 + 0.07 * 10 / 14)
    assert p.unpriced == {"text_encode": 1}
    # reference trainers: 10 evaluations of 2 rows (0.010 s each), 6 trained steps of 2 rows (0.03 s each)
    r = cost.price(prof, cost.reference_calls(calls))
    assert r.phases["rollout"] == pytest.approx(10 * 0.010) and r.phases["update"] == pytest.approx(6 * 0.03)


def test_optimizer_steps_are_recorded_except_bookkeeping_ones():
    """Every optimizer step is a call of the trace, except those made inside ``ignoring()`` (the zero-lr step
    with which torch.distributed.checkpoint creates a fresh optimizer's state on a sharded resume)."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    rec = CallRecorder()
    attach_optimizer(opt, rec)
    w.grad = torch.ones(3)
    opt.step()
    with rec.ignoring():
        opt.step()
        rec.record("reward", 2, "reward", "x")
    with pytest.raises(RuntimeError), rec.ignoring():
        opt.step()
        raise RuntimeError
    opt.step()
    assert [(c.kind, c.rows) for c in rec.drain()] == [("optimizer_step", 1)] * 2


def test_reference_calls_split_per_item():
    calls = [Call("forward", 8, "rollout", per_eval=2), Call("reward", 3, "reward", "brightness"),
             Call("optimizer_step", 1, "update", "optimizer")]
    ref = cost.reference_calls(calls)
    assert [(c.kind, c.rows) for c in ref] == [("forward", 2)] * 4 + [("reward", 1)] * 3 + [("optimizer_step", 1)]


def test_bad_profiles_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="sd3.5-medium-h200"):
        cost.load_profile("no-such-profile")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(UsageError, match="not a treebench cost profile"):
        cost.load_profile(bad)
    with pytest.raises(UsageError, match="call kind"):
        cost.load_profile(_profile(tmp_path, {"forwards": [(1, 0.1)]}, "typo"))


def test_budget_on_the_modeled_clock():
    b = Budget.parse("10s", clock="modeled")
    assert b.exhausted(Totals(seconds=100.0, modeled_seconds=9.0)) is None
    assert b.exhausted(Totals(seconds=1.0, modeled_seconds=10.0)) == "budget_modeled_seconds"
    assert Budget.parse("10s").exhausted(Totals(seconds=10.0, modeled_seconds=0.0)) == "budget_seconds"
    with pytest.raises(UsageError):
        Budget.parse("10s", clock="gpu")


# ---- the trace of a real run equals bench plan's -----------------------------------------------------------
def _cfg(tmp_path, algo, name="run", budget="2it", model="tiny-random", **sets):
    base = {"eval.every": 0, "eval.at_start": False, "sampler.steps": 4, "sampler.guidance": 2.0,
            "train.micro_batch": 6, "run.progress": False, "run.trace": True, "run.checkpoint_every": 0}
    base.update(sets)
    return config.resolve(base, flags={"algo.name": algo, "model.name": model, "budget": budget,
                                       "out": str(tmp_path / name)})


@pytest.mark.parametrize("algo,sets", [("treegrpo", {"algo.k": 2, "algo.d": 2}), ("dancegrpo", {"algo.group_size": 3}),
                                       ("mixgrpo", {"algo.group_size": 3, "algo.window": 2}),
                                       ("ddpo", {"algo.group_size": 3}),
                                       ("flowdppo", {"algo.group_size": 3, "algo.num_sde_steps": 2})])
def test_plan_trace_equals_the_real_runs_trace(tmp_path, algo, sets):
    cfg = _cfg(tmp_path, algo, budget="3it", **sets)
    s = runner.run(cfg)
    real = [r for r in read_trace(s.out_dir) if r["stage"] == "train"]
    planned = simulate(cfg, 3)
    assert [r["calls"] for r in real] == planned
    recs = [json.loads(x) for x in (s.out_dir / "iterations.jsonl").read_text().splitlines()]
    for rec, calls in zip(recs, planned):
        assert {k: v for k, v in rec.items() if k.startswith("trace/")} == summarize(calls)
        assert rec["nfe_rollout"] + rec["nfe_update"] == sum(c.rows for c in calls if c.component == "denoiser")


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it): the tiny-model cases above run by default
def test_plan_trace_equals_a_latent_models_run_trace(tmp_path):
    """The real SD3.5 pipeline classes at CPU size: VAE decodes and LoRA included."""
    cfg = _cfg(tmp_path, "treegrpo", budget="1it", model="sd3.5-medium-random-reduced",
               **{"algo.k": 2, "algo.d": 1, "sampler.steps": 2, "train.prompts_per_iteration": 1,
                  "model.gradient_checkpointing": True})
    s = runner.run(cfg)
    real = [r["calls"] for r in read_trace(s.out_dir) if r["stage"] == "train"]
    assert real == simulate(cfg, 1)
    kinds = {c.kind for c in real[0]}
    assert {"vae_decode", "forward_backward_checkpointed"} <= kinds


def test_modeled_clock_is_deterministic_and_counts_the_budget(tmp_path):
    prof = _profile(tmp_path, {"forward": [(1, 0.01), (64, 0.1)], "forward_backward": [(1, 0.03), (16, 0.2)],
                               "reward": [(1, 0.001), (64, 0.01)]})
    runs = []
    for name in ("a", "b"):
        cfg = _cfg(tmp_path, "treegrpo", name, budget="1s", **{"run.clock": str(prof), "algo.k": 2, "algo.d": 2})
        s = runner.run(cfg)
        runs.append([json.loads(x) for x in (s.out_dir / "iterations.jsonl").read_text().splitlines()])
        assert s.stop_reason == "budget_modeled_seconds"
        final = json.loads((s.out_dir / "final.json").read_text())
        assert final["modeled_seconds_total"] >= 1.0 > final["modeled_seconds_total"] - runs[-1][-1]["modeled_iteration_s"]
        man = json.loads((s.out_dir / "manifest.json").read_text())
        assert man["budget"]["clock"] == "modeled" and man["cost_profile"]["name"] == "toy"
    keys = [k for k in runs[0][0] if k.startswith("modeled_")]
    assert "modeled_seconds_total" in keys and "modeled_reference_iteration_s" in keys
    assert [[r[k] for k in keys] for r in runs[0]] == [[r[k] for k in keys] for r in runs[1]]
    # the same numbers from the weightless simulation: they depend on the config and seed only
    rep = plan_report(cfg, cost.load_profile(prof), iterations=len(runs[0]), counts=model_counts(cfg)[0])
    assert rep["modeled_seconds_per_iteration"] == pytest.approx(
        sum(r["modeled_iteration_s"] for r in runs[0]) / len(runs[0]))
    # text_encode + optimizer_step: not in the profile, priced from their FLOPs (estimated), none unpriced
    assert all(r["modeled_estimated_calls"] == 2 and "modeled_unpriced_calls" not in r for r in runs[0])
    assert rep["estimated_calls_per_iteration"] == {"optimizer_step": 1, "text_encode": 1}
    # without FLOP counts the same plan leaves them unpriced (0 s), and says so
    bare = plan_report(cfg, cost.load_profile(prof), iterations=len(runs[0]))
    assert bare["unpriced_calls_per_iteration"] == {"optimizer_step": 1, "text_encode": 1}
    assert bare["modeled_seconds_per_iteration"] < rep["modeled_seconds_per_iteration"]


def test_contradictory_clock_settings_refused(tmp_path):
    cfg = _cfg(tmp_path, "treegrpo", **{"run.clock": "sd3.5-medium-h200", "run.cost_profile": "other"})
    with pytest.raises(UsageError, match="different profiles"):
        runner.run(cfg)
    assert not (tmp_path / "run").exists()


# ---- the command line ---------------------------------------------------------------------------------
def test_bench_plan_json(capsys):
    rc = cli_main(["plan", "--algo", "treegrpo", "--preset", "treegrpo-paper", "--model", "sd3.5-medium", "--prompts",
                   "8", "--profile", "sd3.5-medium-h200", "--budget", "24h", "--iterations", "2", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    for k in ("modeled_seconds_per_iteration", "reference_modeled_seconds_per_iteration", "nfe_per_iteration",
              "images_per_iteration", "modeled_phases", "reference_modeled_phases", "trace", "budget"):
        assert k in rep, k
    assert rep["images_per_iteration"] == 8 * 27
    assert rep["trace"]["trace/reward/rows"] == 216 and rep["trace"]["trace/vae_decode/rows"] == 216
    assert sum(rep["modeled_phases"].values()) == pytest.approx(rep["modeled_seconds_per_iteration"])
    assert rep["reference_modeled_seconds_per_iteration"] > rep["modeled_seconds_per_iteration"]
    assert rep["budget"]["treebench"]["iterations"] == math.ceil(86400 / rep["modeled_seconds_per_iteration"])
    # every call priced: the measured denoiser kinds, the rest estimated from FLOPs; per-kind seconds and FLOPs
    assert rep["unpriced_calls_per_iteration"] == {}
    assert {k: v["source"] for k, v in rep["kinds"].items()} == {
        "forward": "measured", "forward_backward": "measured", "vae_decode": "estimated", "text_encode": "estimated",
        "reward:hpsv2": "estimated", "optimizer_step": "estimated"}
    assert sum(v["seconds_per_iteration"] for v in rep["kinds"].values()) == pytest.approx(
        rep["modeled_seconds_per_iteration"])
    assert rep["flops_per_iteration"] == pytest.approx(sum(v["flops_per_iteration"] for v in rep["kinds"].values()))


@pytest.mark.parametrize("argv", [["--algo", "treegrpo", "--profile", "nope"],
                                  ["--algo", "treegrpo", "--profile", "sd3.5-medium-h200", "--budget", "3 parsecs"],
                                  ["--algo", "treegrpo", "--profile", "sd3.5-medium-h200", "--prompts", "0"],
                                  ["--algo", "treegrpox", "--profile", "sd3.5-medium-h200"],
                                  ["--algo", "treegrpo,dancegrpo", "--preset", "foo=bar", "--profile", "shapes-cpu"]])
def test_bench_plan_usage_errors_exit_2(argv, capsys):
    assert cli_main(["plan", *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_bench_run_unknown_clock_exits_2_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "x"
    rc = cli_main(["run", "--model", "tiny-random", "--budget", "1it", "--clock", "no-such-profile", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "cost profile" in capsys.readouterr().err


# ---- reports: the modeled-seconds axis ----------------------------------------------------------------
@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_report_plots_against_modeled_seconds(tmp_path):
    pytest.importorskip("matplotlib")
    from reports.load import axis_label, load
    from reports.pdf import build_report

    prof = _profile(tmp_path, {"forward": [(1, 0.01), (64, 0.1)], "forward_backward": [(1, 0.03), (16, 0.2)]})
    for algo, sets in (("treegrpo", {"algo.k": 2, "algo.d": 2}), ("dancegrpo", {"algo.group_size": 3})):
        runner.run(_cfg(tmp_path, algo, f"cmp/{algo}", budget="0.6s",
                        **{"run.clock": str(prof), "eval.every": 1, "eval.at_start": True, "run.trace": False}, **sets))
    rs = load([tmp_path / "cmp"])
    assert set(rs.runs["cost_profile"]) == {"toy"}
    assert rs.evals["modeled_seconds_total"].notna().all()
    assert axis_label(rs.runs, "modeled") == "MODELED seconds, cost profile toy (not wall-clock)"
    pages = build_report(rs, tmp_path / "r.pdf", x="modeled", baseline="dancegrpo")
    assert (tmp_path / "r.pdf").stat().st_size > 0
    assert any("MODELED seconds, cost profile toy" in p for p in pages)


def test_report_refuses_modeled_axis_without_profile(tmp_path):
    pytest.importorskip("matplotlib")
    from reports.pdf import build_report

    runner.run(_cfg(tmp_path, "dancegrpo", "plain", budget="1it", **{"algo.group_size": 3}))
    with pytest.raises(UsageError, match="cost profile"):
        build_report([tmp_path / "plain"], tmp_path / "r.pdf", x="modeled")


# ---- measuring a profile and validating it (smoke: the benchmark code paths, tiny sizes) -------------------
def test_measured_profile_loads_and_prices_a_run(tmp_path):
    from bench.cost.profiling import measure, profile_json
    from bench.cost.validate import format_table, validate

    cfg = config.resolve({}, flags={"algo.name": "grpo", "model.name": "tiny-random"})
    kinds = measure(cfg, torch.device("cpu"), warmup=0, repeats=1, log=lambda s: None, forward_rows=(1, 2),
                    backward_rows=(1, 2), image_rows=(1, 2))
    assert {"forward", "forward_backward", "forward_backward_checkpointed", "text_encode", "reward:brightness",
            "reward_backward:brightness", "optimizer_step"} <= set(kinds)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(profile_json("tiny-cpu", "tiny-random", ["tiny-random"], "cpu", "smoke", "", "full",
                                            kinds, "today")))
    prof = cost.load_profile(path)
    assert prof.tables["forward"].rows == (1, 2) and all(s > 0 for s in prof.tables["forward"].seconds)
    res = validate("tiny-random", str(path), ("treegrpo",), iterations=1, warmup=0,
                   sets={"algo.k": 2, "algo.d": 2, "sampler.steps": 3})
    r = res["results"]["treegrpo"]
    assert r["modeled_s_per_iter"] > 0 and r["measured_s_per_iter"] > 0
    assert r["ratio"] == pytest.approx(r["modeled_s_per_iter"] / r["measured_s_per_iter"])
    assert r["speed_factor"] > 0 and r["speed_corrected_ratio"] == pytest.approx(r["ratio"] * r["speed_factor"])
    assert r["unpriced_calls_per_iter"] == 0 and "treegrpo" in format_table(res)


def test_bench_plan_compares_algorithms_with_the_paper(capsys):
    rc = cli_main(["plan", "--algo", "treegrpo,dancegrpo", "--preset", "treegrpo-paper", "--model", "sd3.5-medium",
                   "--prompts", "2", "--profile", "sd3.5-medium-h200", "--iterations", "1", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["algo"]: r for r in out["comparison"]}
    assert rows["dancegrpo"]["ratio_to_dancegrpo"] == 1.0
    assert rows["treegrpo"]["paper_ratio_to_dancegrpo"] == pytest.approx(72.0 / 184.0)
    t, d = out["plans"]["treegrpo"], out["plans"]["dancegrpo"]
    assert rows["treegrpo"]["ratio_to_dancegrpo"] == pytest.approx(
        t["modeled_seconds_per_iteration"] / d["modeled_seconds_per_iteration"])


def test_eval_every_seconds_counts_modeled_seconds_on_the_modeled_clock(tmp_path):
    # run.clock = a profile: "0.25s" is 0.25 MODELED seconds (an iteration here models 0.31 s and takes
    # seconds of wall clock, so wall seconds would put the evaluations at other points)
    prof = _profile(tmp_path, {"forward": [(1, 0.01), (64, 0.1)], "forward_backward": [(1, 0.03), (16, 0.2)]})
    s = runner.run(_cfg(tmp_path, "dancegrpo", budget="0.6s", **{"run.clock": str(prof), "eval.every": "0.25s",
                                                                   "eval.at_start": True, "algo.group_size": 3,
                                                                   "run.trace": False}))
    assert s.stop_reason == "budget_modeled_seconds"
    its = [json.loads(line) for line in (s.out_dir / "iterations.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (s.out_dir / "evals.jsonl").read_text().splitlines()]
    step = {r["modeled_seconds_total"]: r["modeled_iteration_s"] for r in its}
    assert [e["eval_point"] for e in evals] == pytest.approx([0.0, 0.25, 0.5])
    for e in evals[1:]:
        total = e["modeled_seconds_total"]
        assert e["eval_point"] <= total < e["eval_point"] + step[total]
    assert evals[-1]["modeled_seconds_total"] == its[-1]["modeled_seconds_total"]
