"""reports.load: discovery, tidy frames, labels, and refusal to mix incomparable runs."""

import json

import pytest
from synthetic_runs import write_comparison, write_run, write_sweep

from bench.errors import UsageError
from reports import load as L


def test_load_comparison_tree(tmp_path):
    write_comparison(tmp_path / "cmp", algos=("treegrpo", "ddpo"), seeds=(0, 1))
    rs = L.load([tmp_path / "cmp"])
    assert list(rs.runs["run"]) == ["ddpo/seed0", "ddpo/seed1", "treegrpo/seed0", "treegrpo/seed1"]
    assert rs.labels == ["ddpo", "treegrpo"]  # canonical order, not the order given
    assert rs.eval_keys() == ["eval/shapes_pref", "eval/shapes_attr"]
    assert rs.heldout_keys() == ["eval/shapes_attr"]
    assert len(rs.iterations) == 4 * 10 and len(rs.evals) == 4 * 6
    r = rs.runs.set_index("run").loc["treegrpo/seed1"]
    # write_comparison: algorithm index 0 (treegrpo here) -> phases (0.5, 0.2, 0.05, 0.75), 320 NFE/it
    assert r["s_per_iter"] == pytest.approx(1.5) and r["t_rollout_s"] == pytest.approx(0.5)
    assert r["nfe_total"] == 3200 and r["samples_total"] == 160 and r["peak_mem_mb"] == 100
    assert r["stop_reason"] == "budget_iterations" and r["reward_version"] == "1"
    ev = rs.evals[(rs.evals["run"] == "treegrpo/seed1") & (rs.evals["iteration"] == 10)]
    assert ev["eval/shapes_pref"].item() == pytest.approx(0.1 + 10 * 0.011)


def test_load_recurses_into_sweeps_and_reads_trials(tmp_path):
    write_sweep(tmp_path / "study", ks=(2, 3), ds=(1,), seeds=(0,))
    rs = L.load([tmp_path / "study"])
    assert list(rs.runs["run"]) == ["0", "1"]  # trials/<n> relative to the common parent
    assert rs.labels == ["treegrpo k=2", "treegrpo k=3"]  # variants are never pooled as seeds
    assert rs.trials is not None and list(rs.trials["params_k"]) == [2, 3]
    assert list(rs.runs["cfg.algo.k"]) == [2, 3]


def test_single_run_dir_and_manifest_path(tmp_path):
    d = write_run(tmp_path / "one", algo="treegrpo")
    assert list(L.load([d]).runs["run"]) == ["one"]
    assert list(L.load([d / "manifest.json"]).runs["run"]) == ["one"]


def test_no_runs_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no run directories"):
        L.load([tmp_path / "empty"])
    with pytest.raises(UsageError, match="no such file"):
        L.load([tmp_path / "missing"])


def test_incomplete_last_line_is_skipped_with_a_warning(tmp_path):
    d = write_run(tmp_path / "r", final=False)
    with open(d / "iterations.jsonl", "a") as f:
        f.write('{"iteration": 10, "samp')
    with pytest.warns(UserWarning, match="incomplete last line"):
        rs = L.load([d])
    assert len(rs.iterations) == 10
    assert rs.runs["stop_reason"].item().startswith("incomplete")
    assert rs.runs["samples_total"].item() == 160  # from the last complete iteration


def test_bad_json_in_the_middle_is_an_error(tmp_path):
    d = write_run(tmp_path / "r")
    lines = (d / "evals.jsonl").read_text().splitlines()
    lines[1] = "{oops"
    (d / "evals.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match=r"evals.jsonl:2"):
        L.load([d])


def test_mixed_reward_versions_are_refused_naming_the_runs(tmp_path):
    write_run(tmp_path / "a", algo="ddpo", reward_version="1")
    write_run(tmp_path / "b", algo="treegrpo", reward_version="2")
    rs = L.load([tmp_path])
    with pytest.raises(UsageError) as e:
        L.check_comparable(rs.runs)
    msg = str(e.value)
    assert "training reward" in msg and "shapes_pref@1 (a)" in msg and "shapes_pref@2 (b)" in msg


def test_mixed_heldout_versions_and_schema_versions_are_refused(tmp_path):
    write_run(tmp_path / "a", heldout_version="1")
    write_run(tmp_path / "b", heldout_version="2")
    with pytest.raises(UsageError, match="evaluation rewards"):
        L.check_comparable(L.load([tmp_path]).runs)
    write_run(tmp_path / "s" / "c", schema_version=1)
    write_run(tmp_path / "s" / "d", schema_version=2)
    with pytest.raises(UsageError, match="schema version.*1 \\(c\\); 2 \\(d\\)"):
        L.check_comparable(L.load([tmp_path / "s"]).runs)


def test_devices_only_matter_for_wall_clock_axes(tmp_path):
    write_run(tmp_path / "a", device_type="cuda", device_name="NVIDIA H100")
    write_run(tmp_path / "b", device_type="cuda", device_name="NVIDIA A100")
    runs = L.load([tmp_path]).runs
    L.check_comparable(runs)  # samples / NFE axes: fine
    with pytest.raises(UsageError, match="device.*NVIDIA H100 x1 \\(a\\).*NVIDIA A100 x1 \\(b\\)"):
        L.check_comparable(runs, wall_clock=True)


def test_manifest_fields_read(tmp_path):
    d = write_run(tmp_path / "r", algo="mixgrpo", algo_config={"window": 4}, seed=7)
    m = json.loads((d / "manifest.json").read_text())
    assert L.config_value(m, "algo.window") == 4 and L.config_value(m, "algo.nope", "x") == "x"
    r = L.load([d]).runs.iloc[0]
    assert (r["algo"], r["seed"], r["cfg.algo.window"], r["label"]) == ("mixgrpo", 7, 4, "mixgrpo")
    assert r["git_commit"].startswith("0123") and r["device_name"] == "cpu"


def test_non_finite_values_as_the_run_log_writes_them(tmp_path):
    d = write_run(tmp_path / "r")
    lines = (d / "iterations.jsonl").read_text().splitlines()
    rec = json.loads(lines[3])
    rec["reward_mean"], rec["loss"], rec["grad_norm"] = None, "inf", "-inf"
    lines[3] = json.dumps(rec)
    (d / "iterations.jsonl").write_text("\n".join(lines) + "\n")
    it = L.load([d]).iterations
    assert it["loss"].dtype.kind == "f" and it["loss"].iloc[3] == float("inf")
    assert it["grad_norm"].iloc[3] == float("-inf") and it["reward_mean"].isna().iloc[3]
    assert it["samples_total"].dtype.kind == "i"


def test_per_image_scores_are_loaded_with_their_run(tmp_path):
    write_comparison(tmp_path / "cmp", algos=("treegrpo", "ddpo"), seeds=(0,))
    rs = L.load([tmp_path / "cmp"])
    sc = rs.scores
    # 6 evaluations x 16 prompts x 2 images per run; one column per score key
    assert len(sc) == 2 * 6 * 32 and {"eval/shapes_pref", "eval/shapes_attr"} <= set(sc.columns)
    one = sc[(sc["run"] == "treegrpo/seed0") & (sc["iteration"] == 10)]
    assert one["label"].unique().tolist() == ["treegrpo"] and one["seed"].unique().tolist() == [0]
    # the image mean is the eval record's mean (the shared pattern has mean 0)
    assert one["eval/shapes_pref"].mean() == pytest.approx(0.1 + 10 * 0.01)
    assert sorted(set(one["prompt_index"])) == list(range(16)) and set(one["image_index"]) == {0, 1}
    assert one["prompt"].iloc[0] == "eval prompt 0"


def test_runs_without_per_image_scores_load_as_before(tmp_path):
    write_run(tmp_path / "old", scores=False)
    rs = L.load([tmp_path / "old"])
    assert rs.scores.empty and list(rs.scores.columns) == L.SCORE_ID_COLUMNS


def test_control_arm_labels_from_manifest_or_directory(tmp_path):
    write_comparison(tmp_path / "cmp", algos=("dancegrpo", "treegrpo"), seeds=(0, 1), controls="dancegrpo")
    rs = L.load([tmp_path / "cmp"])
    # controls after every method; the baseline's own runs keep their plain label
    assert rs.labels == ["dancegrpo", "treegrpo", "dancegrpo-aa", "dancegrpo-frozen"]
    assert L.control_of("dancegrpo-frozen") == ("frozen", "dancegrpo")
    assert L.control_of("treegrpo k=3-aa") == ("aa", "treegrpo k=3") and L.control_of("-aa") is None
    assert L.control_of("dancegrpo") is None
    # without a label in the manifest, the arm directory names it
    for man in (tmp_path / "cmp").glob("dancegrpo-*/seed*/manifest.json"):
        m = json.loads(man.read_text())
        del m["label"]
        man.write_text(json.dumps(m))
    assert L.load([tmp_path / "cmp"]).labels == rs.labels


def test_a_comparisons_tuning_trials_are_not_arms(tmp_path):
    """bench compare --tune keeps its studies' trial runs under DIR/tuning/: a report of DIR leaves them out
    (they score the validation prompts), and naming the tuning folder reports them."""
    from reports.load import find_run_dirs

    cmp = tmp_path / "cmp"
    for d in ("dancegrpo/seed0", "dancegrpo-frozen/seed0", "tuning/dancegrpo/trials/0"):
        (cmp / d).mkdir(parents=True)
        (cmp / d / "manifest.json").write_text("{}")
    assert find_run_dirs([cmp]) == [cmp / "dancegrpo" / "seed0", cmp / "dancegrpo-frozen" / "seed0",
                                    cmp / "tuning" / "dancegrpo" / "trials" / "0"]  # not a compare dir yet
    (cmp / "compare.json").write_text("{}")
    assert find_run_dirs([cmp]) == [cmp / "dancegrpo" / "seed0", cmp / "dancegrpo-frozen" / "seed0"]
    assert find_run_dirs([cmp / "tuning"]) == [cmp / "tuning" / "dancegrpo" / "trials" / "0"]
