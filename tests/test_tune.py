"""bench compare --tune (issue #28): equal tuning budget per algorithm, validation split, rejection of
hacking trials, tuned and reference-default arms."""

import json
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState

from bench.engine.prompts import load_prompt_set
from bench.errors import StopRun, UsageError
from bench.fleet import compare
from bench.fleet import tune as tune_mod
from bench.run.runner import RunSummary
from sweeps import cli
from sweeps.objective import Objective, TrialFailed, _Reporter

TINY = ["--model", "tiny-random", "--budget-per-trial", "1it", "--pruner", "none",
        "--set", "sampler.steps=3", "--set", "eval.every=1", "--set", "eval.num_prompts=2",
        "--set", "train.prompts_per_iteration=1"]


def test_validation_split_is_the_eval_set_past_the_heldout_prompts(tmp_path):
    cfg = {"data": {"eval_prompts": "shapes-eval"}, "eval": {"num_prompts": 32}}
    sets = cli.validation_split(cfg, tmp_path)
    held = load_prompt_set("shapes-eval")
    val = load_prompt_set(sets["data.eval_prompts"])
    assert sets["eval.num_prompts"] == len(val) == len(held) - 32 == 16
    assert not set(val.prompts) & set(held.prompts[:32])          # disjoint from the verdict's prompts
    assert not set(val.prompts) & set(load_prompt_set("shapes-train").prompts)  # and never trained on
    assert val.prompts == held.prompts[32:] and val.metadata == held.metadata[32:]  # the checker's attributes
    # no larger than the held-out evaluation, and refused when too little is left
    assert cli.validation_split({"data": {"eval_prompts": "shapes-eval"}, "eval": {"num_prompts": 4}},
                                tmp_path / "s")["eval.num_prompts"] == 4
    assert cli.validation_split({"data": {"eval_prompts": "shapes-eval"}, "eval": {"num_prompts": 2}},
                                tmp_path / "t")["eval.num_prompts"] == 4
    with pytest.raises(UsageError, match="at least 2 must remain"):
        cli.validation_split({"data": {"eval_prompts": "shapes-eval"}, "eval": {"num_prompts": 47}}, tmp_path)


def _spec(tmp_path, *args):
    a = cli.build_parser().parse_args(["--algo", "grpo", "--out", str(tmp_path), *TINY, *args])
    return cli.prepare(a)[0]


def test_reject_hacking_turns_eval_at_start_on_and_prunes_flagged_trials(tmp_path):
    spec = _spec(tmp_path, "--reject-hacking")
    assert spec.reject_hacking and spec.base_overrides["eval.at_start"] is True
    with pytest.raises(UsageError, match="eval.at_start"):
        _spec(tmp_path / "b", "--reject-hacking", "--set", "eval.at_start=false")

    def finished(flagged):
        def run_fn(cfg, **kw):
            final = {"iteration": 1, "eval/brightness": 0.9, "heldout_below_start": flagged}
            return RunSummary(Path(cfg["out"]), "budget_iterations", 1, 2, 10, 0.1, final_eval=final)
        return run_fn

    for flagged, state in ((["eval/other"], TrialState.PRUNED), ([], TrialState.COMPLETE)):
        study = optuna.create_study(direction="maximize")
        study.optimize(Objective(spec, run_fn=finished(flagged)), n_trials=1, catch=(TrialFailed,))
        t = study.trials[0]
        assert t.state == state
        if flagged:
            assert t.user_attrs["reason"].startswith("rejected: possible reward hacking at iteration 1: held-out other")
    # at an intermediate evaluation the run is stopped at once
    rep = _Reporter(optuna.create_study().ask(), "eval/brightness", multi=False, reject_hacking=True)
    with pytest.raises(StopRun):
        rep({"iteration": 2, "eval/brightness": 0.5, "heldout_below_start": ["eval/other"]})
    assert rep.prune_reason.startswith("rejected")


def _seeded_run(values, flagged=(), calls=None):
    """A fake run: final value values[seed], intermediate evaluations at iterations 1 and 2 (value - 0.1, then
    the value), the hacking flag on the seeds in ``flagged``; records (seed, out) in ``calls``."""
    def run_fn(cfg, on_eval=None, **kw):
        seed = int(cfg["seed"])
        if calls is not None:
            calls.append((seed, cfg["out"]))
        flag = ["eval/other"] if seed in flagged else []
        on_eval({"iteration": 1, "eval/brightness": values[seed] - 0.1, "heldout_below_start": [],
                 "seconds_total": 1.0, "samples_total": 2, "nfe_total": 10})
        final = {"iteration": 2, "eval/brightness": values[seed], "heldout_below_start": flag}
        return RunSummary(Path(cfg["out"]), "budget_iterations", 2, 4, 20, 1.5, final_eval=final)
    return run_fn


def test_seeds_per_trial_mean_value_first_seed_pruner_and_any_seed_rejects(tmp_path):
    """--seeds-per-trial 2: one run per seed in its own directory, the trial's value their mean, its totals
    their sum, only the first seed's evaluations reported to the pruner, and a hacking seed rejects it."""
    spec = _spec(tmp_path, "--reject-hacking", "--seed", "7", "--seeds-per-trial", "2")
    assert spec.seeds() == [7, 8]
    calls = []
    study = optuna.create_study(direction="maximize")
    study.optimize(Objective(spec, run_fn=_seeded_run({7: 0.6, 8: 0.8}, calls=calls)), n_trials=1,
                   catch=(TrialFailed,))
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE and t.value == pytest.approx(0.7, abs=1e-12)
    assert t.user_attrs["seed_values"] == [0.6, 0.8]
    assert [c[0] for c in calls] == [7, 8]
    assert [Path(c[1]) for c in calls] == [tmp_path / "trials" / "0" / "seed7", tmp_path / "trials" / "0" / "seed8"]
    assert (t.user_attrs["iterations"], t.user_attrs["samples_total"], t.user_attrs["nfe_total"]) == (4, 8, 40)
    assert t.user_attrs["seconds_total"] == pytest.approx(3.0)
    assert t.intermediate_values == {1: pytest.approx(0.5)}  # seed 7's evaluation only
    # the second seed hacks: the trial is rejected, its reason naming the seed, whatever the mean
    study = optuna.create_study(direction="maximize")
    study.optimize(Objective(spec, run_fn=_seeded_run({7: 0.6, 8: 0.9}, flagged={8})), n_trials=1,
                   catch=(TrialFailed,))
    t = study.trials[0]
    assert t.state == TrialState.PRUNED
    assert t.user_attrs["reason"].startswith("seed 8: rejected: possible reward hacking")
    assert t.user_attrs["seed_values"] == [0.6] and t.user_attrs["iterations"] == 4
    # one seed: the run directory is the trial's, as before
    one = _spec(tmp_path / "one")
    calls = []
    study = optuna.create_study(direction="maximize")
    study.optimize(Objective(one, run_fn=_seeded_run({0: 0.4}, calls=calls)), n_trials=1)
    assert Path(calls[0][1]) == tmp_path / "one" / "trials" / "0" and study.trials[0].value == pytest.approx(0.4)
    assert "seed_values" not in study.trials[0].user_attrs
    # the study definition records it: a worker with another --seeds-per-trial cannot join
    a = cli.build_parser().parse_args(["--algo", "grpo", "--out", str(tmp_path / "d"), *TINY, "--seeds-per-trial", "3"])
    assert cli.prepare(a)[3]["seeds_per_trial"] == 3
    assert "seeds_per_trial" not in cli.prepare(cli.build_parser().parse_args(
        ["--algo", "grpo", "--out", str(tmp_path / "e"), *TINY]))[3]
    with pytest.raises(UsageError, match="--seeds-per-trial must be >= 1"):
        _spec(tmp_path / "f", "--seeds-per-trial", "0")


def test_tune_seeds_reach_the_studies_and_tuned_json(tmp_path):
    cmd = tune_mod.sweep_command(["bench"], "treegrpo", ["lr"], 4, "3it", tmp_path, "eval/x", [], seeds=2)
    assert cmd[cmd.index("--seeds-per-trial") + 1] == "2" and cmd[cmd.index("--seed") + 1] == "2000"
    assert "--seeds-per-trial" not in tune_mod.sweep_command(["bench"], "treegrpo", ["lr"], 4, "3it", tmp_path,
                                                             "eval/x", [])
    info = tune_mod.write_tuned(tmp_path, "treegrpo", ["lr"], 4, "3it", "eval/x", seeds=3)
    assert info["seeds"] == [2000, 2001, 2002] and info["seed"] == 2000


def test_tuning_space_cadence_and_tuned_arms(tmp_path):
    assert tune_mod.keys_per_algo(["dancegrpo", "treegrpo"], ["lr", "timestep_fraction"]) == \
        {"dancegrpo": ["lr", "timestep_fraction"], "treegrpo": ["lr"]}
    with pytest.raises(UsageError, match="no compared algorithm declares it"):
        tune_mod.keys_per_algo(["dancegrpo"], ["lr", "nonsense"])
    assert [tune_mod.eval_every(b) for b in ("3it", "20it", "20000nfe", "400samples", "2m")] == \
        ["1", "5", "5000nfe", "100samples", "30s"]
    assert tune_mod.heldout_metric({"reward": {"name": "shapes_pref"},
                                    "eval": {"rewards": ["shapes_pref", "shapes_attr"]}}) == ("eval/shapes_attr", None)
    key, note = tune_mod.heldout_metric({"reward": {"name": "brightness"}, "eval": {"rewards": ["brightness"]}})
    assert key == "eval/brightness" and "cannot be detected" in note
    # a finished study -> tuned.json -> the tuned arm's options; none completed -> reference defaults
    d = tune_mod.tuning_dir(tmp_path, "dancegrpo")
    d.mkdir(parents=True)
    (d / "sweep.json").write_text(json.dumps({"states": {"COMPLETE": 3, "PRUNED": 1}, "best": {
        "number": 2, "value": 0.7, "params": {"lr": 3.5e-05}, "overrides": {"train.lr": 3.5e-05}}}))
    info = tune_mod.write_tuned(tmp_path, "dancegrpo", ["lr"], 4, "3it", "eval/shapes_attr")
    assert tune_mod.read_tuned(tmp_path, "dancegrpo") == info and info["budget_per_trial"] == "3it"
    assert tune_mod.tuned_sets(info) == ("--set", "train.lr=3.5e-05")
    none = tune_mod.write_tuned(tmp_path, "treegrpo", ["lr"], 4, "3it", "eval/shapes_attr")
    assert none["overrides"] is None and "reference defaults" in none["note"] and tune_mod.tuned_sets(none) == ()
    arms = compare.build_arms(["dancegrpo", "treegrpo"], [0, 1], controls=True,
                              tuned={"dancegrpo": ("--set", "train.lr=3.5e-05"), "treegrpo": ()})
    by = {a.label: a for a in arms}
    assert list(by) == ["dancegrpo", "dancegrpo-default", "treegrpo", "treegrpo-default", "dancegrpo-aa",
                        "dancegrpo-frozen"]
    assert "train.lr=3.5e-05" in by["dancegrpo"].sets and "train.lr=3.5e-05" in by["dancegrpo-aa"].sets
    assert "train.lr=3.5e-05" in by["dancegrpo-frozen"].sets
    assert not any("train.lr" in s for s in by["dancegrpo-default"].sets)
    # --no-default-arms: the tuned arms and the controls only
    lean = compare.build_arms(["dancegrpo", "treegrpo"], [0, 1], controls=True,
                              tuned={"dancegrpo": ("--set", "train.lr=3.5e-05"), "treegrpo": ()}, default_arms=False)
    assert [a.label for a in lean] == ["dancegrpo", "treegrpo", "dancegrpo-aa", "dancegrpo-frozen"]


@pytest.mark.parametrize("argv, msg", [
    (["--tune", "lr"], "--tune-budget"),
    (["--tune", "lr", "--tune-budget", "3it", "--seeds", "0,2000"], "seed 2000"),
    (["--tune", "lr", "--tune-budget", "3it", "--tune-trials", "0"], "--tune-trials"),
    (["--tune", "bogus", "--tune-budget", "3it"], "no compared algorithm declares it"),
    (["--tune", "lr", "--tune-budget", "3it", "--tune-range", "lr=2e-4:1e-5"], "LOW < HIGH"),
    (["--tune", "lr", "--tune-budget", "3it", "--tune-range", "timestep_fraction=0.1:0.5"], "is not tuned"),
    (["--tune", "lr", "--tune-budget", "3it", "--tune-range", "lr=abc"], "KEY=LOW:HIGH"),
    (["--tune", "lr", "--tune-budget", "3it", "--tune-grid", "lr=1e-5,1e-5"], "twice"),
    (["--tune", "lr", "--tune-budget", "3it", "--tune-grid", "lr=1e-5,3e-5", "--tune-trials", "3"], "2 points"),
    (["--tune", "lr", "--tune-budget", "3it", "--tune-grid", "lr=1e-5,3e-5", "--tune-range", "lr=1e-5:1e-4"],
     "give one of them"),
    (["--tune", "lr,timestep_fraction", "--tune-budget", "3it", "--tune-grid", "lr=1e-5,3e-5"], "every tuned key"),
    (["--no-default-arms"], "it needs --tune"),
    (["--tune", "lr", "--tune-budget", "3it", "--tune-seeds", "0"], "--tune-seeds must be >= 1"),
    (["--tune", "lr", "--tune-budget", "3it", "--tune-seeds", "3", "--seeds", "0,2002"], "seeds 2000-2002"),
    (["--tune", "lr", "--tune-budget", "3it", "--tune-seeds", "2", "--seeds", "5,1001", "--controls"], "reuse 2001"),
])
def test_tune_usage_errors(tmp_path, capsys, argv, msg):
    assert compare.main(["--algos", "dancegrpo", "--budget", "2it", "--out", str(tmp_path / "x"), *argv]) == 2
    assert msg in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_compare_tune_end_to_end_on_tiny_random(tmp_path):
    """The issue's check, smaller: every algorithm gets a study with the same trials and budget per trial,
    and each final run of the tuned arm records the tuned learning rate in its manifest."""
    out = tmp_path / "c"
    rc = compare.main(["--tune", "lr", "--tune-trials", "2", "--tune-budget", "2it", "--algos", "dancegrpo,treegrpo",
                       "--budget", "2it", "--seeds", "1", "--model", "tiny-random", "--out", str(out), "--no-report",
                       "--set", "sampler.steps=3", "--set", "train.prompts_per_iteration=1"])
    assert rc == 0
    infos = {a: tune_mod.read_tuned(out, a) for a in ("dancegrpo", "treegrpo")}
    assert {(i["trials"], i["budget_per_trial"]) for i in infos.values()} == {(2, "2it")}
    for a, info in infos.items():
        d = tune_mod.tuning_dir(out, a)
        assert (d / "trials.csv").is_file() and (d / "validation.jsonl").is_file()
        assert sum(info["states"].values()) == 2
        lr = json.loads((out / a / "seed0" / "manifest.json").read_text())["config"]["train"]["lr"]
        assert lr == pytest.approx(info["overrides"]["train.lr"], rel=1e-12)
        default = json.loads((out / f"{a}-default" / "seed0" / "manifest.json").read_text())["config"]["train"]["lr"]
        assert default == 1e-4  # the tiny-random preset's reference value


def test_tune_range_reaches_every_study_and_narrows_the_space():
    from sweeps import spaces

    assert tune_mod.parse_ranges(["lr=1e-5:2e-4"], ["lr", "timestep_fraction"]) == {"lr": [1e-5, 2e-4]}
    # passed to the studies of the algorithms that tune the key, not to the others
    cmd = tune_mod.sweep_command(["bench"], "treegrpo", ["lr"], 4, "3it", Path("o"), "eval/x", [],
                                 ["lr=1e-5:2e-4", "timestep_fraction=0.2:0.5"])
    assert cmd[cmd.index("--range") + 1] == "lr=1e-5:2e-4" and cmd.count("--range") == 1
    space = spaces.with_ranges(spaces.builtin_space("dancegrpo", ["lr", "timestep_fraction"]),
                               spaces.parse_ranges(["lr=1e-5:2e-4"]))
    lr = {p.name: p for p in space.params}["lr"]
    assert (lr.low, lr.high, lr.log) == (1e-5, 2e-4, True)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        t = study.ask()
        assert 1e-5 <= space(t)["train.lr"] <= 2e-4
        study.tell(t, 0.0)
    for bad, msg in ((["lr=0:1e-3"], "LOW > 0"), (["k=2:3"], "not in the searched space"),
                     (["lr=1e-5:1e-5"], "LOW < HIGH"), (["lr=1e-5:2e-4", "lr=1e-5:3e-4"], "twice")):
        with pytest.raises(UsageError, match=msg):
            spaces.with_ranges(spaces.builtin_space("dancegrpo", ["lr"]), spaces.parse_ranges(bad))


def test_tune_grid_gives_every_algorithm_the_same_values():
    grid = tune_mod.parse_grid(["lr=1e-5,3.2e-5,1e-4"], ["lr"])
    assert grid == {"lr": ["1e-5", "3.2e-5", "1e-4"]} and tune_mod.grid_trials(grid) == 3
    for algo in ("dancegrpo", "treegrpo"):
        cmd = tune_mod.sweep_command(["bench"], algo, ["lr"], 99, "3it", Path("o"), "eval/x", [], (), grid)
        assert cmd[cmd.index("--grid") + 1] == "lr=1e-5,3.2e-5,1e-4" and "--space" not in cmd
        assert cmd[cmd.index("--trials") + 1] == "3"
