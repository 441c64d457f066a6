"""The verdict on synthetic runs with known values: matched-budget claims, cost brackets, the outcome rule,
controls and power, Holm, SESOI, verdict.json, the eval-means fallback; the reward-hacking rule; the
Pareto panel choices."""

import json
import math

import numpy as np
import pytest
from synthetic_runs import EVAL_PROMPTS, PROMPT_WEIGHTS, linear_curve, write_comparison, write_run

from bench.errors import UsageError
from reports import claims, inference, verdict
from reports.context import Context, ReportOptions
from reports.hacking import hacking_table
from reports.load import load
from reports.pages import pareto_specs

T975 = {2: 4.302653, 4: 2.776445, 8: 2.306004}  # t_{0.975} quantiles (printed tables)


@pytest.fixture(scope="module")
def five_seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("five")
    write_comparison(root, seeds=(0, 1, 2, 3, 4), controls="dancegrpo")
    return load([root])


def _verdict(rs, baseline="dancegrpo", x="samples", axes=("samples", "nfe"), **kw):
    return verdict.build_verdict(rs, rs.train_eval_key(), baseline, claims.schedule(rs, x), list(axes), **kw)


def _row(v, method, metric="eval/shapes_pref", axis="reward@budget", fraction=1.0, target=None, cost_axis=None):
    for r in v.rows:
        if (r["method"], r["metric"], r["axis"]) != (method, metric, axis):
            continue
        if axis == "reward@budget" and r["budget_fraction"] != fraction:
            continue
        if axis == "cost_to_target" and (r["target_fraction"] != target or r["cost_axis"] != cost_axis):
            continue
        return r
    raise KeyError((method, metric, axis, fraction, target, cost_axis))


def test_gains_and_resolution_known_values(five_seeds):
    g = verdict.gains(five_seeds, "eval/shapes_pref").set_index("run")
    # treegrpo seed 2: slope 0.042 per iteration from 0.1, 10 iterations
    assert g.loc["treegrpo/seed2", "start"] == pytest.approx(0.1)
    assert g.loc["treegrpo/seed2", "gain"] == pytest.approx(0.42)
    assert verdict.resolution(five_seeds, "eval/shapes_pref") == pytest.approx(0.05 / math.sqrt(32))


def test_reward_at_budget_is_paired_per_image_with_known_values(five_seeds):
    v = _verdict(five_seeds)
    sched = claims.schedule(five_seeds, "samples")
    # an iteration budget: every run reached 160 samples (16 per iteration)
    assert (sched.axis, sched.budget, sched.source) == ("samples", 160.0, "reached")
    r = _row(v, "treegrpo")
    # gains 0.40..0.44 vs 0.20..0.24: per-seed sd 0.0158 each side -> se 0.01, df 8; images cancel exactly
    assert r["data"] == "per-image" and r["prompts"] == EVAL_PROMPTS
    assert (r["estimate"], r["se"], r["df"]) == pytest.approx((0.2, 0.01, 8.0))
    assert r["prompt_variance"] == pytest.approx(0.0, abs=1e-12)
    assert (r["lo"], r["hi"]) == pytest.approx((0.2 - T975[8] * 0.01, 0.2 + T975[8] * 0.01), rel=1e-6)
    assert r["p_perm"] == pytest.approx(2 / 252) and r["p_perm_exact"] and r["seeds_above"] == 5
    assert r["outcome"] == "better" and r["role"] == "confirmatory" and r["mde"] == pytest.approx(
        (T975[8] + 0.888889) * 0.01, rel=1e-5)  # t_{0.8,8} = 0.8889
    assert r["sentence"].startswith("BETTER: treegrpo vs dancegrpo on shapes_pref (training reward) at the budget "
                                    "(160 scored samples): +0.200 [+0.177, +0.223] (gain over iteration 0")
    assert "5/5 seeds above dancegrpo's mean; n = 5 vs 5" in r["sentence"]
    # at 50% (80 samples): iteration 4 (64 samples); iteration 6 (96) is more than one iteration past
    half = _row(v, "treegrpo", fraction=0.5)
    assert half["role"] == "exploratory" and half["estimate"] == pytest.approx(4 * 0.02)
    assert half["cost_method"] == 64 and half["cost_baseline"] == 64 and math.isnan(half["p_holm"])


def test_frozen_arm_is_worse_and_the_comparison_has_power(five_seeds):
    v = _verdict(five_seeds)
    fr = _row(v, "dancegrpo-frozen")
    assert fr["role"] == "control" and fr["paired"] and fr["outcome"] == "worse"
    assert fr["estimate"] == pytest.approx(-0.22)  # the baseline's whole gain
    assert v.power is True and not any(r["withheld"] for r in v.rows)
    assert "Control dancegrpo-frozen is worse than dancegrpo" in v.headline
    aa = _row(v, "dancegrpo-aa")  # the same slopes under other seeds
    assert aa["estimate"] == pytest.approx(0.0, abs=1e-12) and aa["outcome"] not in ("better", "worse")
    assert "no false difference between identical methods" in v.headline


def test_identical_arms_are_equivalent(tmp_path):
    for s in range(5):  # a small seed spread: the interval fits inside the SESOI
        write_run(tmp_path / "dancegrpo" / f"seed{s}", algo="dancegrpo", seed=s,
                  train_curve=linear_curve(0.1, 0.02 + 0.00002 * s))
        write_run(tmp_path / "dancegrpo-aa" / f"seed{10 + s}", algo="dancegrpo", seed=10 + s, label="dancegrpo-aa",
                  train_curve=linear_curve(0.1, 0.02 + 0.00002 * ((s + 2) % 5)))
    v = _verdict(load([tmp_path]))
    aa = _row(v, "dancegrpo-aa")
    assert aa["outcome"] == "equivalent" and aa["sesoi"] == 0.005 and aa["sesoi_source"] == "default"
    assert -0.005 < aa["lo"] and aa["hi"] < 0.005
    assert "EQUIVALENT: dancegrpo-aa vs dancegrpo" in aa["sentence"] and "inside +-0.005 (SESOI)" in aa["sentence"]


def test_no_power_withholds_the_ranking(tmp_path):
    for s in range(3):  # a baseline that does not learn: its frozen copy cannot be worse
        write_run(tmp_path / "dancegrpo" / f"seed{s}", algo="dancegrpo", seed=s,
                  train_curve=linear_curve(0.1, 0.0001 * (s - 1)))
        write_run(tmp_path / "dancegrpo-frozen" / f"seed{s}", algo="dancegrpo", seed=s,
                  train_curve=linear_curve(0.1, 0.0))
        write_run(tmp_path / "treegrpo" / f"seed{s}", algo="treegrpo", seed=s,
                  train_curve=linear_curve(0.1, 0.02 + 0.001 * s))
    rs = load([tmp_path])
    assert set(rs.labels) == {"dancegrpo", "treegrpo", "dancegrpo-frozen"}  # the label from the directory
    v = _verdict(rs)
    assert v.power is False and "): NO POWER at this budget: dancegrpo-frozen (the baseline with frozen weights) " \
        "is equivalent, not worse, than dancegrpo" in v.headline
    assert "ahead" not in v.headline and "ranks nothing" in v.headline
    tree = _row(v, "treegrpo")
    assert tree["withheld"] and tree["outcome"] == "better"  # kept in verdict.json, not printed
    assert not any(line.startswith(("BETTER: treegrpo", "WORSE: treegrpo")) for line in v.lines)
    assert any(line.startswith("EQUIVALENT: dancegrpo-frozen vs dancegrpo") for line in v.lines)
    assert v.lines[-1].startswith("(claims withheld: no power")


def test_a_run_past_the_budget_is_compared_at_the_budget(tmp_path):
    for algo, iters in (("dancegrpo", 10), ("treegrpo", 14)):
        for s in range(3):  # treegrpo ran 4 iterations past a 3000-NFE budget (e.g. resumed with another one)
            d = write_run(tmp_path / algo / f"seed{s}", algo=algo, seed=s, iterations=iters, budget_spec="3000nfe",
                          train_curve=linear_curve(0.1, 0.02 + 0.001 * s))
            m = json.loads((d / "manifest.json").read_text())
            m["budget"].update(nfe=3000.0, iterations=None)
            (d / "manifest.json").write_text(json.dumps(m))
    rs = load([tmp_path])
    sched = claims.schedule(rs, "samples")
    assert (sched.axis, sched.budget, sched.source) == ("nfe", 3000.0, "budget")
    r = _row(verdict.build_verdict(rs, "eval/shapes_pref", "dancegrpo", sched, ["nfe"]), "treegrpo")
    # 320 NFE per iteration: the evaluation at 3200 NFE (iteration 10) is on the first boundary past 3000;
    # treegrpo's last evaluation (iteration 14, 4480 NFE) is not the budget
    assert r["cost_method"] == 3200 and r["cost_baseline"] == 3200
    assert r["estimate"] == pytest.approx(0.0, abs=1e-12) and r["outcome"] == "inconclusive"


def test_cost_to_target_brackets_known_values(tmp_path):
    base, meth = (0.0103, 0.0117, 0.0151), (0.0209, 0.0233, 0.0271)
    for algo, slopes in (("dancegrpo", base), ("treegrpo", meth)):
        for s, slope in enumerate(slopes):
            write_run(tmp_path / algo / f"seed{s}", algo=algo, seed=s, eval_every=1, nfe_per_iter=100.0,
                      train_curve=linear_curve(0.1, slope))
    v = _verdict(load([tmp_path]), x="nfe", axes=["nfe"])
    r = _row(v, "treegrpo", axis="cost_to_target", target=0.5, cost_axis="nfe")
    gain = 10 * np.mean(base)  # the baseline's mean gain at the budget (1000 NFE)
    assert r["target"] == pytest.approx(0.5 * gain)
    # crossings (first evaluation at or above the target, evaluations every 100 NFE):
    # baseline iterations 7, 6, 5 -> brackets (600, 700], (500, 600], (400, 500]; method all (200, 300]
    assert r["brackets_baseline"] == [[600, 700], [500, 600], [400, 500]] and r["brackets"] == [[200, 300]] * 3
    assert (r["reached"], r["reached_baseline"], r["bracket"]) == (3, 3, [200, 300])
    lhb, llb = np.log([700, 600, 500]), np.log([600, 500, 400])
    lo = math.log(200) - lhb.mean() - T975[2] * lhb.std(ddof=1) / math.sqrt(3)
    hi = math.log(300) - llb.mean() + T975[2] * llb.std(ddof=1) / math.sqrt(3)
    assert (r["lo"], r["hi"]) == pytest.approx((math.exp(lo), math.exp(hi)), rel=1e-6)
    assert r["estimate"] == pytest.approx(math.exp(math.log(250) - np.log([650, 550, 450]).mean()))
    assert r["scale"] == "ratio" and r["role"] == "confirmatory"
    assert "treegrpo: 3/3 seeds reach it, between 200 NFE and 300 NFE (median bracket)" in r["sentence"]


def test_a_method_that_never_reaches_states_its_own_costs(five_seeds):
    # ddpo never reaches 50% of dancegrpo's gain; its bracket ends at its own last evaluation within the
    # 2000-NFE budget (1920 NFE), not at a cost of another method (dancegrpo's is 2240)
    v = _verdict(five_seeds, x="nfe", axes=["nfe"])
    r = _row(v, "ddpo", axis="cost_to_target", target=0.5, cost_axis="nfe")
    assert r["reached"] == 0 and r["bracket"][0] == 1920 and r["hi"] == math.inf
    assert "ddpo: 0/5 seeds reach it (up to 1,920 NFE)" in r["sentence"]
    assert "up to 2,240" not in r["sentence"]


def test_holm_over_the_confirmatory_claims(five_seeds):
    v = _verdict(five_seeds, x="nfe", axes=["nfe", "samples"])
    conf = [r for r in v.rows if r["role"] == "confirmatory"]
    # 3 methods x (2 eval metrics at the budget + 2 targets on NFE)
    assert len(conf) == 12 and {r["family_size"] for r in conf} == {12}
    p = np.array([r["p"] for r in conf])
    np.testing.assert_allclose([r["p_holm"] for r in conf], inference.holm(p))
    for r in conf:
        assert (r["outcome"] in ("better", "worse")) == (r["p_holm"] < 0.05)
    expl = [r for r in v.rows if r["role"] == "exploratory"]
    assert expl and all(math.isnan(r["p_holm"]) and r["level"] == 0.05 for r in expl)
    assert {r["cost_axis"] for r in expl if r["axis"] == "cost_to_target"} == {"samples"}


def test_the_prompt_term_enters_with_a_method_prompt_interaction(tmp_path):
    for algo, inter in (("dancegrpo", 0.0), ("treegrpo", 0.04)):
        for s in range(3):
            write_run(tmp_path / algo / f"seed{s}", algo=algo, seed=s, interaction=inter,
                      train_curve=linear_curve(0.1, 0.02 + 0.001 * s))
    r = _row(_verdict(load([tmp_path])), "treegrpo")
    vp = 0.04 ** 2 * np.var(PROMPT_WEIGHTS, ddof=1) / EVAL_PROMPTS  # additive: no seed x prompt residual
    assert r["prompt_variance"] == pytest.approx(vp, rel=1e-9)
    assert r["se"] == pytest.approx(math.sqrt(2 * 0.0001 / 3 + vp), rel=1e-9)


def test_runs_without_per_image_scores_fall_back_to_eval_means_and_say_so(tmp_path):
    for algo, slope in (("dancegrpo", 0.02), ("treegrpo", 0.04)):
        for s in range(3):
            write_run(tmp_path / algo / f"seed{s}", algo=algo, seed=s, scores=s != 0,  # seed 0: an older run
                      train_curve=linear_curve(0.1, slope + 0.001 * s))
    rs = load([tmp_path])
    assert set(rs.scores["run"]) == {f"{a}/seed{s}" for a in ("dancegrpo", "treegrpo") for s in (1, 2)}
    r = _row(_verdict(rs), "treegrpo")
    assert r["data"] == "eval means" and "no per-image scores" in r["note"]
    assert r["estimate"] == pytest.approx(0.2) and r["df"] == pytest.approx(4.0)
    assert "per-seed eval means (no per-image scores: prompt variance not included)" in r["sentence"]


def test_two_seeds_show_values_without_interval(tmp_path):
    write_comparison(tmp_path, algos=("dancegrpo", "treegrpo"), seeds=(0, 1))
    v = _verdict(load([tmp_path]))
    r = _row(v, "treegrpo")
    assert r["outcome"] == "inconclusive" and r["lo"] != r["lo"]  # NaN
    assert ("INCONCLUSIVE: treegrpo vs dancegrpo on shapes_pref (training reward) at the budget (160 scored samples): "
            "too few seeds for an interval (n = 2 vs 2; needs >= 3 a side): gain over iteration 0 +0.200, +0.210 vs "
            "+0.100, +0.110") == r["sentence"]
    assert "[" not in " ".join(v.lines)  # no interval anywhere


def test_sesoi_defaults_overrides_and_bad_input(five_seeds, tmp_path):
    assert verdict.parse_sesoi(["shapes_attr=0.02", "eval/shapes_pref=0.3,cost=0.1"]) == {
        "shapes_attr": 0.02, "shapes_pref": 0.3, "cost": 0.1}
    for bad in ("shapes_attr", "shapes_attr=-1", "=0.1", "shapes_attr=x"):
        with pytest.raises(UsageError, match="METRIC=VALUE"):
            verdict.parse_sesoi([bad])
    with pytest.raises(UsageError, match="not an eval metric.*shapes_pref, shapes_attr, cost"):
        _verdict(five_seeds, sesoi={"nope": 0.1})
    # a large declared SESOI makes the A/A control equivalent; the sentence and the row say where it came from
    v = _verdict(five_seeds, sesoi={"shapes_pref": 0.1, "cost": 0.5})
    aa = _row(v, "dancegrpo-aa")
    assert aa["outcome"] == "equivalent" and aa["sesoi"] == 0.1 and aa["sesoi_source"] == "given (--sesoi)"
    assert _row(v, "treegrpo", axis="cost_to_target", target=0.5, cost_axis="samples")["sesoi"] == 0.5
    # any other reward: 0.05 x its per-image sd at iteration 0 (the synthetic pattern's sd is 0.05)
    for s in range(3):
        for algo in ("ddpo", "treegrpo"):
            write_run(tmp_path / algo / f"seed{s}", algo=algo, seed=s, reward="brightness", heldout="contrast")
    rs = load([tmp_path])
    assert verdict.sesoi_for(rs, "eval/brightness", {}) == pytest.approx((0.0025, verdict.sesoi_for(
        rs, "eval/brightness", {})[1]))


def test_verdict_json_schema(five_seeds, tmp_path):
    v = _verdict(five_seeds, x="nfe")
    path = verdict.write_json(v, tmp_path / "verdict.json")

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    rows = json.loads(path.read_text(), parse_constant=no_constants)
    assert isinstance(rows, list) and len(rows) == len(v.rows)
    need = {"method": str, "baseline": str, "metric": str, "axis": str, "outcome": str, "n": int, "n_baseline": int,
            "role": str, "sentence": str, "withheld": bool}
    for r in rows:
        for k, t in need.items():
            assert isinstance(r[k], t), (k, r[k])
        for k in ("estimate", "lo", "hi", "p", "p_holm", "sesoi"):
            assert r[k] is None or isinstance(r[k], (int, float)), (k, r[k])
        assert r["axis"] in ("reward@budget", "cost_to_target")
        assert r["outcome"] in ("better", "worse", "equivalent", "inconclusive")
        assert r["role"] in ("confirmatory", "exploratory", "control")
        if r["axis"] == "reward@budget":
            assert r["budget_fraction"] in (0.25, 0.5, 1.0) and r["scale"] == "difference"
        else:
            assert r["target_fraction"] in (0.5, 0.75) and r["scale"] == "ratio" and r["reached"] <= r["n"]
    # unbounded cost-ratio bounds are null
    assert any(r["axis"] == "cost_to_target" and r["hi"] is None for r in rows)
    # page 1 and the terminal print are rendered from these rows
    assert v.lines[0] == v.headline
    assert v.lines[1:] == [r["sentence"] for r in rows if r["role"] in ("confirmatory", "control")]


def test_reward_hacking_needs_consistent_drops_beyond_resolution(five_seeds, tmp_path):
    h = hacking_table(five_seeds).set_index("label")
    assert bool(h.loc["ddpo", "flagged"]) and h.loc["ddpo", "seeds_with_pattern"] == 5
    assert h.loc["ddpo", "heldout_gain"] == pytest.approx(-0.02)
    assert "FLAGGED on shapes_attr in all 5 seeds (shapes_attr -0.020" in h.loc["ddpo", "text"]
    assert not h.loc[["dancegrpo", "mixgrpo", "treegrpo"], "flagged"].any()
    # a drop smaller than the resolution (0.0088) in every seed, and a large drop in one seed only
    for s in range(3):
        write_run(tmp_path / "small" / f"seed{s}", algo="ddpo", seed=s, heldout_curve=linear_curve(0.2, -0.0005))
        write_run(tmp_path / "one" / f"seed{s}", algo="ddpo", seed=s,
                  heldout_curve=linear_curve(0.2, -0.01 if s == 0 else 0.001))
    for sub, pattern in (("small", 0), ("one", 1)):
        row = hacking_table(load([tmp_path / sub])).iloc[0]
        assert not row["flagged"] and row["seeds_with_pattern"] == pattern
    write_run(tmp_path / "single", algo="ddpo", heldout_curve=linear_curve(0.2, -0.01))
    assert "not assessed (1 seed" in hacking_table(load([tmp_path / "single"])).iloc[0]["text"]


def test_pareto_leaves_out_the_budget_axis_flat_quantities_and_cpu_wall_clock(tmp_path):
    write_comparison(tmp_path, seeds=(0, 1, 2))
    for man in tmp_path.glob("*/seed*/manifest.json"):  # an NFE budget, as `--budget 3000nfe` writes it
        m = json.loads(man.read_text())
        m["budget"].update(spec="3000nfe", nfe=3000.0, iterations=None)
        man.write_text(json.dumps(m))
    rs = load([tmp_path])
    c = Context(rs, ReportOptions(), "dancegrpo", "eval/shapes_pref", True, [])
    keep, why = pareto_specs(c)
    cols = [col for col, _ in keep]
    assert "nfe_total" not in cols and "total denoiser forward passes (NFE): fixed by the budget" in why
    assert "samples_total" not in cols and any(w.startswith("total scored samples: methods within 0.0%") for w in why)
    # CPU runs: time and process memory only when asked for
    assert "peak_mem_mb" not in cols and "s_per_iter" not in cols
    assert any(w.startswith("peak memory (MB): CPU runs") for w in why)
    c = Context(rs, ReportOptions(wall_pareto=True), "dancegrpo", "eval/shapes_pref", True, [])
    cols = [col for col, _ in pareto_specs(c)[0]]
    assert "peak_mem_mb" in cols and "s_per_iter" in cols  # 100..250 MB and 1.5..3 s differ between methods
    assert c.budget == "nfe" and "nfe" in verdict.cost_axes(rs, c.budget, c.present, True)


def test_a_modeled_cost_column_becomes_a_cost_axis(tmp_path):
    for algo, per_it in (("dancegrpo", 2.0), ("treegrpo", 1.0)):
        for s in range(3):
            d = write_run(tmp_path / algo / f"seed{s}", algo=algo, seed=s,
                          train_curve=linear_curve(0.1, 0.02 if algo == "dancegrpo" else 0.04))
            recs = [json.loads(line) for line in (d / "iterations.jsonl").read_text().splitlines()]
            for r in recs:  # as a cost model would log it: cumulative modeled seconds
                r["modeled_seconds_total"] = (r["iteration"] + 1) * per_it
            (d / "iterations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rs = load([tmp_path])
    ev = rs.evals[rs.evals["run"] == "treegrpo/seed0"].set_index("iteration")
    assert ev.loc[0, "modeled_seconds_total"] == 0.0 and ev.loc[4, "modeled_seconds_total"] == 4.0
    axes = verdict.cost_axes(rs, None, ["samples", "nfe", "modeled", "seconds"], True)
    assert axes == ["samples", "nfe", "modeled"]  # wall clock only when asked for
    assert verdict.cost_axes(rs, None, ["seconds"], True, include_wall=True) == ["seconds"]
    v = _verdict(rs, axes=axes)
    r = _row(v, "treegrpo", axis="cost_to_target", target=0.5, cost_axis="modeled")
    # target 0.1 (half of dancegrpo's 0.2): dancegrpo between iterations 4 and 6 (8..12 modeled s), treegrpo
    # between 2 and 4 (2..4 modeled s); no seed spread -> ratio bounds 2/12 and 4/8
    assert (r["lo"], r["hi"]) == pytest.approx((2 / 12, 4 / 8)) and r["outcome"] == "better"
    assert r["role"] == "exploratory" and "modeled seconds to reach 50% of dancegrpo's gain" in r["sentence"]
    wall = verdict.build_verdict(rs, "eval/shapes_pref", "dancegrpo", claims.schedule(rs, "samples"), ["seconds"])
    assert "wall clock on one machine: noisy" in _row(wall, "treegrpo", axis="cost_to_target", target=0.5,
                                                       cost_axis="seconds")["sentence"]


def test_two_seed_tables_say_why_there_is_no_interval(tmp_path):
    from reports.pdf import table_frames

    write_comparison(tmp_path, algos=("dancegrpo", "treegrpo"), seeds=(0, 1))
    rs = load([tmp_path])
    c = Context(rs, ReportOptions(), "dancegrpo", "eval/shapes_pref", True, [])
    final = table_frames(c)["final"].set_index("method")
    assert final.loc["treegrpo", "shapes_pref at the budget, mean [95% CI]"] == "0.300, 0.310 (n = 2, no interval)"
    matched = table_frames(c)["matched_budget"]
    row = matched[(matched["method"] == "treegrpo") & (matched["budget"] == "100%")
                  & (matched["metric"] == "shapes_pref")].iloc[0]
    assert row["outcome"] == "inconclusive" and row["vs baseline [95% CI]"] == "+0.100"
    curve = c.curve("nfe", "eval/shapes_pref")
    assert curve["value"].notna().all() and curve["lo"].isna().all()  # no band from two runs
