"""Reports built end-to-end from synthetic run directories with known values."""

import json
import re

import pytest
from synthetic_runs import linear_curve, write_comparison, write_run, write_sweep

from bench.errors import UsageError
from reports import claims, cli
from reports.load import load
from reports.pdf import ReportOptions, build_report, final_table

FAST = {"reps": 200, "points": 20}


def pdf_pages(path) -> int:
    """Page objects in a matplotlib PDF (it writes no object streams, so they are plain text)."""
    return len(re.findall(rb"/Type\s*/Page\b", path.read_bytes()))


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    write_comparison(root)
    return root


def test_comparison_report_pages_via_cli(comparison, tmp_path, capsys):
    out = tmp_path / "report.pdf"
    assert cli.main([str(comparison), "--out", str(out), "--reps", "200", "--x", "nfe"]) == 0
    text = capsys.readouterr().out
    # the headline first, then one line per page-1 claim; then the pages: title, setup, curves, curves per
    # currency, Pareto, timing, samples, reward hacking (flagged: ddpo's held-out reward falls in every
    # seed), tables
    assert text.startswith("verdict:\n  * At the largest cost every run reached (2,000 NFE, runs compared at "
                           "matched cost), vs dancegrpo")
    assert "\n  * WORSE: ddpo vs dancegrpo on shapes_pref (training reward) at the budget (2,000 NFE): " in text
    assert "No controls (bench compare --controls adds them)" in text
    pages = text.split(f"wrote {out} (")[1].split(" pages: ")[0]
    assert "Learning curves vs denoiser forward passes" in text and pdf_pages(out) == int(pages)
    assert "Reward hacking: FLAGGED for ddpo;" in text
    assert text.rstrip().endswith(f"and {tmp_path / 'verdict.json'}")
    rows = json.loads((tmp_path / "verdict.json").read_text())
    assert {r["method"] for r in rows} == {"ddpo", "mixgrpo", "treegrpo"}
    files = {p.name for p in (tmp_path / "report_files").iterdir()}
    assert {"matched_budget.csv", "cost_to_target.csv", "final.csv", "final.md", "costs.csv", "verdict.csv",
            "verdict.md", "reward_hacking.csv", "verdict.json"} <= files
    assert "01_treebench_report.png" in files and "01_treebench_report.svg" in files
    assert sum(n.endswith(".png") for n in files) == int(pages)


def test_scores_at_the_budget_known_values(comparison):
    rs = load([comparison])
    sched = claims.schedule(rs, "samples")
    # treegrpo (index 3): slopes 0.040, 0.041, 0.042 per iteration, 10 iterations -> 0.50, 0.51, 0.52
    ft = final_table(rs, "eval/shapes_pref", sched).set_index("label")
    assert ft.loc["treegrpo", "value"] == pytest.approx(0.51)
    # mean 0.51, sd 0.01: half-width t_{0.975,2} x 0.01 / sqrt(3)
    assert ft.loc["treegrpo", "hi"] - 0.51 == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, rel=1e-5)
    assert ft.loc["dancegrpo", "value"] == pytest.approx(0.31)
    assert ft.loc["treegrpo", "gain"].point == pytest.approx(0.41)
    # on the NFE axis every run is compared at 2,000 NFE (treegrpo's total; 200 per iteration): ddpo (320 per
    # iteration) at its evaluation after 6 iterations (1,920 NFE); its last one (3,200 NFE) is past the budget
    ft = final_table(rs, "eval/shapes_pref", claims.schedule(rs, "nfe")).set_index("label")
    assert ft.loc["ddpo", "value"] == pytest.approx(0.1 + 6 * 0.011)


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_sweep_report_has_kd_page(tmp_path):
    write_sweep(tmp_path / "study", ks=(2, 3), ds=(1, 2), seeds=(0,))
    pages = build_report([tmp_path / "study"], tmp_path / "s.pdf", ReportOptions(**FAST))
    assert any(p.startswith("treegrpo k/d ablation") for p in pages)
    assert not any(p.startswith("Window size") for p in pages)
    assert pdf_pages(tmp_path / "s.pdf") == len(pages)


def test_kd_cells_count_optimizer_steps_and_their_correlation_with_the_metric(tmp_path):
    import math

    import pandas as pd

    from reports.context import Context
    from reports.pages import _grid_runs, kd_cells, steps_correlation

    write_sweep(tmp_path / "study", ks=(2, 3), ds=(1, 2), seeds=(0, 1))
    rs = load([tmp_path / "study"])
    c = Context(rs, ReportOptions(**FAST), rs.labels[0], "eval/shapes_pref", True, [])
    cells = kd_cells(c, _grid_runs(c))
    assert len(cells) == 4 and set(cells["opt_steps"]) == {10.0}  # 10 iterations x 1 optimizer step, per seed
    assert steps_correlation(cells) is None                        # the steps do not vary
    frame = lambda v, st: pd.DataFrame({"value": v, "opt_steps": st})
    e = math.e
    assert steps_correlation(frame([0.1, 0.2, 0.3], [e, e ** 2, e ** 3])) == pytest.approx(1.0, abs=1e-12)
    assert steps_correlation(frame([0.3, 0.2, 0.1], [10, 100, 1000])) == pytest.approx(-1.0, abs=1e-12)
    # log steps 0, 1, 2 against values 1, 2, 4: r = 3 / sqrt(2 x 42/9) by hand
    assert steps_correlation(frame([1.0, 2.0, 4.0], [1, e, e ** 2])) == pytest.approx(3 / math.sqrt(28 / 3), rel=1e-9)
    assert steps_correlation(frame([1.0, 2.0, math.nan], [1, e, e ** 2])) is None  # fewer than 3 usable cells


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_window_page_and_custom_metric(tmp_path):
    for w in (2, 4):
        for s in (0, 1):
            write_run(tmp_path / f"w{w}" / f"seed{s}", algo="mixgrpo", seed=s, algo_config={"window": w},
                      train_curve=linear_curve(0.1, 0.01 * w))
    pages = build_report([tmp_path], tmp_path / "w.pdf",
                         ReportOptions(metric="eval/shapes_attr", baseline="mixgrpo window=2", **FAST))
    assert any(p.startswith("Window size (algo.window)") for p in pages)
    with pytest.raises(UsageError, match="metric 'eval/nope'"):
        build_report([tmp_path], tmp_path / "x.pdf", ReportOptions(metric="eval/nope", **FAST))


def test_mixed_reward_versions_refused_by_report_and_cli(tmp_path, capsys):
    write_run(tmp_path / "runs" / "a", reward_version="1")
    write_run(tmp_path / "runs" / "b", reward_version="2")
    with pytest.raises(UsageError, match="training reward"):
        build_report([tmp_path / "runs"], tmp_path / "r.pdf", ReportOptions(**FAST))
    assert cli.main([str(tmp_path / "runs"), "--out", str(tmp_path / "r.pdf")]) == 2
    assert "shapes_pref@2 (b)" in capsys.readouterr().err
    assert not (tmp_path / "r.pdf").exists()


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_mixed_devices_only_drop_wall_clock(tmp_path):
    write_run(tmp_path / "runs" / "a", algo="ddpo", device_type="cuda", device_name="NVIDIA H100")
    write_run(tmp_path / "runs" / "b", algo="treegrpo", device_type="cuda", device_name="NVIDIA A100")
    pages = build_report([tmp_path / "runs"], tmp_path / "r.pdf", ReportOptions(**FAST))
    assert pdf_pages(tmp_path / "r.pdf") == len(pages)
    with pytest.raises(UsageError, match="device"):
        build_report([tmp_path / "runs"], tmp_path / "s.pdf", ReportOptions(x="seconds", **FAST))


def test_cli_usage_errors(comparison, tmp_path, capsys):
    out = tmp_path / "c.pdf"
    assert cli.main([str(comparison), "--out", str(out), "--baseline", "nope", "--reps", "200"]) == 2
    assert "choose one of: ddpo, dancegrpo, mixgrpo, treegrpo" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_report_file_options(comparison, tmp_path, capsys):
    assert cli.main([str(comparison), "--out", str(tmp_path / "a.pdf"), "--reps", "200", "--formats", "png"]) == 0
    files = {p.suffix for p in (tmp_path / "a_files").iterdir()}
    assert files == {".png", ".csv", ".md", ".json"}
    assert cli.main([str(comparison), "--out", str(tmp_path / "b.pdf"), "--reps", "200", "--no-files"]) == 0
    assert not (tmp_path / "b_files").exists()
    assert cli.main([str(comparison), "--out", str(tmp_path / "c.pdf"), "--formats", "gif"]) == 2
    assert "--formats 'gif'" in capsys.readouterr().err


def _write_tuning(root, algo, trials, tuned):
    """DIR/tuning/<algo>/: trials.csv rows (number, state, value, lr, reason) and tuned.json (``tuned`` over a
    study of lr on a three-point grid, two seeds per trial)."""
    d = root / "tuning" / algo
    d.mkdir(parents=True)
    lines = ["number,state,value,params_lr,seed,reason"]
    lines += [f"{n},{st},{'' if v is None else v},{lr},2000-2001,{reason}" for n, st, v, lr, reason in trials]
    (d / "trials.csv").write_text("\n".join(lines) + "\n")
    info = {"algo": algo, "space": ["lr"], "grid": {"lr": ["1.5e-5", "3e-5", "6e-5"]}, "sampler": "grid",
            "objective": "eval/shapes_attr", "objective_note": None, "trials": 3, "budget_per_trial": "2000nfe",
            "eval_every": "500nfe", "seed": 2000, "seeds": [2000, 2001], "pruner": "hyperband", **tuned}
    (d / "tuned.json").write_text(json.dumps(info))
    return d


def test_tuning_page_shows_every_study_and_the_tuned_settings(tmp_path, capsys):
    from reports.context import Context
    from reports.load import read_tuning
    from reports.pages import tuning_rows

    root = tmp_path / "cmp"
    write_comparison(root, algos=("dancegrpo", "treegrpo"), seeds=(0, 1, 2))
    untuned = load([root])
    assert untuned.tuning == {}
    assert tuning_rows(Context(untuned, ReportOptions(**FAST), "dancegrpo", "eval/shapes_pref", True, [])).empty
    hack = "seed 2001: rejected: possible reward hacking at iteration 9: held-out shapes_attr stays below"
    _write_tuning(root, "dancegrpo", [(0, "COMPLETE", 0.61, 1.5e-5, ""), (1, "COMPLETE", 0.7, 3e-5, ""),
                                      (2, "PRUNED", None, 6e-5, hack)],
                  {"states": {"COMPLETE": 2, "PRUNED": 1}, "best_trial": 1, "best_value": 0.7,
                   "overrides": {"train.lr": 3e-5}})
    _write_tuning(root, "treegrpo", [(0, "FAIL", None, 1.5e-5, "error: boom"),
                                     (1, "PRUNED", None, 3e-5, "pruned at iteration 4: eval/shapes_attr = 0.1")],
                  {"states": {"FAIL": 1, "PRUNED": 1}, "best_trial": None, "best_value": None, "overrides": None})
    _write_tuning(root, "mixgrpo", [], {"states": {}, "best_trial": None, "best_value": None, "overrides": None})
    rs = load([root])
    assert set(rs.tuning) == {"dancegrpo", "treegrpo"}  # a study of an algorithm not compared is left out
    assert set(rs.runs["lr"]) == {1e-4}                  # each run's learning rate, for the setup page
    rows = tuning_rows(Context(rs, ReportOptions(**FAST), "dancegrpo", "eval/shapes_pref", True, []))
    assert rows.to_dict("records") == [
        {"method": "dancegrpo", "tried": "lr 1.5e-5, 3e-5, 6e-5", "tuned": "lr 3e-05", "best value": "0.700",
         "trials": "2 / 1 / 0 / 0", "budget per trial": "2000nfe", "seeds": "2000-2001 (mean)"},
        {"method": "treegrpo", "tried": "lr 1.5e-5, 3e-5, 6e-5", "tuned": "reference defaults (no trial completed)",
         "best value": "-", "trials": "0 / 0 / 1 / 1", "budget per trial": "2000nfe", "seeds": "2000-2001 (mean)"}]
    # the studies kept apart from the runs (docs/results/tuning beside the exported runs): --tuning
    runs_only, studies = tmp_path / "runs_only", tmp_path / "studies"
    write_comparison(runs_only, algos=("dancegrpo", "treegrpo"), seeds=(0, 1, 2))
    (root / "tuning").rename(studies)
    out = tmp_path / "r.pdf"
    assert cli.main([str(runs_only), "--out", str(out), "--reps", "200", "--no-files", "--tuning", str(studies)]) == 0
    pages = capsys.readouterr().out.split(" pages: ")[1].split("; ")
    assert pages[2] == "Tuning: the same budget for every method (bench compare --tune)"  # after the setup page
    assert cli.main([str(runs_only), "--out", str(out), "--reps", "200", "--tuning", str(tmp_path / "nope")]) == 2
    assert "--tuning" in capsys.readouterr().err
    assert cli.main([str(runs_only), "--out", str(out), "--reps", "200", "--tuning", str(studies / "mixgrpo")]) == 2
    assert "no tuning study" in capsys.readouterr().err
    # one algorithm tuned twice, differently: refused (the page would show one of them)
    other = tmp_path / "other"
    _write_tuning(other, "dancegrpo", [], {"states": {}, "best_trial": None, "best_value": None, "overrides": None})
    with pytest.raises(UsageError, match="two tuning studies of 'dancegrpo'"):
        read_tuning([studies, other / "tuning"])


def test_runs_without_sample_grids_leave_the_sample_pages_out(tmp_path):
    """Exported runs (records only) draw no pages of "missing image" panels: the setup page says why."""
    import shutil

    from reports.context import Context
    from reports.pages import any_sample_grid

    root = tmp_path / "cmp"
    write_comparison(root, algos=("dancegrpo", "treegrpo"), seeds=(0, 1))
    with_images = load([root])
    assert any_sample_grid(Context(with_images, ReportOptions(**FAST), "dancegrpo", "eval/shapes_pref", True, []))
    for d in root.glob("*/seed*/samples"):
        shutil.rmtree(d)
    rs = load([root])
    assert not any_sample_grid(Context(rs, ReportOptions(**FAST), "dancegrpo", "eval/shapes_pref", True, []))
    pages = build_report(rs, tmp_path / "r.pdf", ReportOptions(figures=False, **FAST))
    assert not any(p.startswith("Eval samples") for p in pages) and pdf_pages(tmp_path / "r.pdf") == len(pages)


def test_export_with_sample_grids_redraws_the_sample_pages(tmp_path, capsys):
    """scripts/export_runs.py: records only by default (the report leaves the sample pages out); with
    --sample-grids exactly the grids the sample pages show, so the exported runs redraw them."""
    import importlib.util
    from pathlib import Path

    from reports.context import Context
    from reports.pages import any_sample_grid, sample_picks

    spec = importlib.util.spec_from_file_location("export_runs", Path(__file__).parents[1] / "scripts" / "export_runs.py")
    export = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export)
    src = tmp_path / "cmp"
    write_comparison(src, algos=("dancegrpo", "treegrpo"), seeds=(0, 1))
    picks = sample_picks(load([src]))
    # per method its first seed; 6 evaluations (iterations 0, 2, ..., 10): indices 0, round(2.5) = 2 and 5
    assert [(lab, seed, list(p["iteration"])) for _, lab, seed, _, p in picks] == [
        ("dancegrpo", 0, [0, 4, 10]), ("treegrpo", 0, [0, 4, 10])]
    assert export.main([str(src), str(tmp_path / "plain")]) == 0
    assert not list((tmp_path / "plain").rglob("*.png"))
    assert export.main([str(src), str(tmp_path / "full"), "--sample-grids"]) == 0
    assert "6 sample grids" in capsys.readouterr().out
    pngs = sorted(p.relative_to(tmp_path / "full").as_posix() for p in (tmp_path / "full").rglob("*.png"))
    assert pngs == [f"{a}/seed0/samples/eval_{i:06d}.png" for a in ("dancegrpo", "treegrpo") for i in (0, 4, 10)]
    rs = load([tmp_path / "full"])
    assert any_sample_grid(Context(rs, ReportOptions(**FAST), "dancegrpo", "eval/shapes_pref", True, []))
    assert [list(p["iteration"]) for *_, p in sample_picks(rs)] == [[0, 4, 10], [0, 4, 10]]
