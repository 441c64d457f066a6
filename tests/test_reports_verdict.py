"""The verdict, the reward-hacking rule and the panel choices, on synthetic runs with known values."""

import json
import math

import pytest
from synthetic_runs import linear_curve, write_comparison, write_run

from reports import verdict
from reports.context import Context, ReportOptions
from reports.hacking import hacking_table
from reports.load import load
from reports.pages import pareto_specs

REPS = 300


@pytest.fixture(scope="module")
def five_seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("five")
    write_comparison(root, seeds=(0, 1, 2, 3, 4))
    return load([root])


def _verdict(rs, baseline="dancegrpo", axes=("samples", "nfe")):
    return verdict.build_verdict(rs, rs.train_eval_key(), baseline, list(axes), reps=REPS)


def test_gains_and_resolution_known_values(five_seeds):
    g = verdict.gains(five_seeds, "eval/shapes_pref").set_index("run")
    # treegrpo seed 2: slope 0.042 per iteration from 0.1, 10 iterations
    assert g.loc["treegrpo/seed2", "start"] == pytest.approx(0.1)
    assert g.loc["treegrpo/seed2", "gain"] == pytest.approx(0.42)
    assert verdict.resolution(five_seeds, "eval/shapes_pref") == pytest.approx(0.05 / math.sqrt(32))


def test_verdict_sentences_with_intervals_and_speedups(five_seeds):
    v = _verdict(five_seeds)
    tree = [line for line in v.lines if line.startswith("treegrpo")]
    # gains 0.40..0.44 vs 0.20..0.24: IQM of 5 cuts one from each end -> 0.42 vs 0.22
    assert tree[0].startswith("treegrpo beats dancegrpo on shapes_pref (training reward): gain over iteration 0 "
                              "+0.420 vs +0.220, difference +0.200 [")
    assert tree[0].endswith("(IQM, 5 seeds; P(improve) 1.00)")
    # dancegrpo's final IQM 0.32 at 10 iterations x 280 NFE; treegrpo's middle three curves (slopes
    # 0.041..0.043, IQM = their mean 0.042/iteration, 200 NFE/iteration) reach it at 0.22/0.042 iterations
    rows = {(r["kind"], r["axis"], r["method"]): r for r in v.rows}
    nfe = rows[("cost", "nfe", "treegrpo")]
    assert nfe["baseline_budget"] == pytest.approx(2800)
    assert nfe["budget"] == pytest.approx(0.22 / 0.042 * 200)
    assert nfe["speedup"] == pytest.approx(2800 / (0.22 / 0.042 * 200))
    assert nfe["lo"] <= nfe["speedup"] <= nfe["hi"]
    assert "treegrpo reaches dancegrpo's final shapes_pref (0.320) with 2.7x [" in nfe["sentence"]
    assert nfe["sentence"].endswith("fewer NFE (5 seeds)")
    assert rows[("cost", "nfe", "ddpo")]["sentence"].startswith("ddpo does not reach dancegrpo's final shapes_pref")


def test_two_seeds_show_values_without_interval_or_probability(tmp_path):
    write_comparison(tmp_path, algos=("dancegrpo", "treegrpo"), seeds=(0, 1))
    v = _verdict(load([tmp_path]))
    metric = v.lines[0]
    assert "+0.200, +0.210 (n = 2, no interval) vs +0.100, +0.110 (n = 2, no interval)" in metric
    assert "too few seeds to call" in metric and "P(improve)" not in " ".join(v.lines)
    assert "[" not in " ".join(v.lines)  # no interval anywhere
    # dancegrpo final IQM 0.205 at 10 x 320 NFE; treegrpo (mean slope 0.0205, 280 NFE/iteration) reaches it
    # after 0.105 / 0.0205 iterations = 1434 NFE
    assert v.lines[-1] == ("treegrpo reaches dancegrpo's final shapes_pref (0.205) with 2.2x fewer NFE "
                           "(1434 NFE vs 3200 NFE; n = 2, no interval)")


def test_one_seed_compare(tmp_path):
    write_comparison(tmp_path, algos=("dancegrpo", "treegrpo"), seeds=(0,))
    v = _verdict(load([tmp_path]))
    assert "+0.200 (n = 1, no interval) vs +0.100 (n = 1, no interval)" in v.lines[0]


def test_no_detectable_difference_states_the_minimum_detectable_effect(tmp_path):
    for algo, sign in (("dancegrpo", 1), ("treegrpo", -1)):
        for s in range(5):  # the same five slopes in a different seed order: no difference
            write_run(tmp_path / algo / f"seed{s}", algo=algo, seed=s,
                      train_curve=linear_curve(0.1, 0.02 + 0.001 * sign * (s - 2)))
    v = _verdict(load([tmp_path]), axes=())
    line = v.lines[0]
    assert line.startswith("treegrpo vs dancegrpo on shapes_pref (training reward): no detectable difference at "
                           "this budget (n = 5; minimum detectable effect ")
    row = v.rows[0]
    # gains 0.18..0.22 both sides: sd 0.0158, MDE = 2.8016 * 0.0158 * sqrt(2/5) = 0.0280
    assert row["mde"] == pytest.approx(2.801585 * 0.0158114 * math.sqrt(0.4), rel=1e-4)
    assert row["difference"] == pytest.approx(0.0, abs=1e-12) and row["detectable"] is False


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


def test_pareto_leaves_out_the_budget_axis_and_flat_quantities(tmp_path):
    write_comparison(tmp_path, seeds=(0, 1, 2))
    for man in tmp_path.glob("*/seed*/manifest.json"):  # an NFE budget, as `--budget 3000nfe` writes it
        m = json.loads(man.read_text())
        m["budget"].update(spec="3000nfe", nfe=3000.0, iterations=None)
        man.write_text(json.dumps(m))
    rs = load([tmp_path])
    c = Context(rs, ReportOptions(reps=REPS), "dancegrpo", "eval/shapes_pref", True, [])
    keep, why = pareto_specs(c)
    cols = [col for col, _ in keep]
    assert "nfe_total" not in cols and "total denoiser forward passes (NFE): fixed by the budget" in why
    assert "samples_total" not in cols and any(w.startswith("total scored samples: methods within 0.0%") for w in why)
    assert "peak_mem_mb" in cols and "s_per_iter" in cols  # 100..250 MB and 1.5..3 s differ between methods
    assert c.budget == "nfe" and "nfe" in verdict.cost_axes(rs, c.budget, c.present, True)


def test_a_modeled_cost_column_becomes_a_verdict_axis(tmp_path):
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
    row = verdict.cost_verdict(rs, "eval/shapes_pref", "modeled", "treegrpo", "dancegrpo", REPS)
    # dancegrpo final 0.30 at 20 modeled s; treegrpo reaches 0.30 after 5 iterations = 5 modeled s -> 4x
    assert row["speedup"] == pytest.approx(4.0) and "4.0x [4.0, 4.0] fewer modeled seconds (3 seeds)" in row["sentence"]
    wall = verdict.cost_verdict(rs, "eval/shapes_pref", "seconds", "treegrpo", "dancegrpo", REPS)
    assert "wall clock on one machine: noisy" in wall["sentence"]


def test_two_seed_tables_say_why_there_is_no_interval(tmp_path):
    from reports.pdf import table_frames

    write_comparison(tmp_path, algos=("dancegrpo", "treegrpo"), seeds=(0, 1))
    rs = load([tmp_path])
    c = Context(rs, ReportOptions(reps=REPS), "dancegrpo", "eval/shapes_pref", True, [])
    final = table_frames(c)["final"].set_index("method")
    assert final.loc["treegrpo", "final shapes_pref IQM [95% CI]"] == "0.300, 0.310 (n = 2, no interval)"
    assert final.loc["treegrpo", "P(improve over dancegrpo) on shapes_pref [95% CI]"] == "n = 2: needs >= 3 per side"
    curve = c.curve("nfe", "eval/shapes_pref")
    assert curve["value"].notna().all() and curve["lo"].isna().all()  # no band from two runs
