"""Plug-ins from outside the package: an installed package's entry points add names to ``bench list``
and runs; ``module:Class`` specs name an algorithm or reward directly; bad specs are usage errors.

The example package (tests/plugin_example, the one docs/PLUGINS.md walks through) is installed for each
test by the ``plugin_installed`` fixture (conftest.py): its sources on sys.path and a ``.dist-info`` with
the entry points its pyproject.toml declares, as ``pip install`` would make them visible, offline."""

import json

import pytest

from bench import registry
from bench.cli import main
from bench.run.records import metric_documented

RUN = ["run", "--model", "tiny-random", "--budget", "2it", "--no-progress", "--set", "sampler.steps=3",
       "--set", "eval.every=0", "--set", "eval.at_start=false", "--set", "train.prompts_per_iteration=2"]


def _records(out):
    return [json.loads(x) for x in (out / "iterations.jsonl").read_text().splitlines()]


def test_entry_points_add_names_to_bench_list(plugin_installed, capsys):
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "example_bestofgroup" in listing and "example_redness" in listing
    assert "plug-in from treebench-plugin-example" in listing


def test_without_the_package_the_names_are_unknown(capsys):
    assert "example_bestofgroup" not in registry.algorithms()
    assert main([*RUN, "--algo", "example_bestofgroup"]) == 2
    assert "unknown algorithm 'example_bestofgroup'" in capsys.readouterr().err


def test_installed_plugin_algorithm_and_reward_train(plugin_installed, tmp_path):
    out = tmp_path / "run"
    assert main([*RUN, "--algo", "example_bestofgroup", "--reward", "example_redness", "--eval-rewards",
                 "example_redness", "--out", str(out)]) == 0
    recs = _records(out)
    # the best and the worst chain of each of the 2 prompts
    assert len(recs) == 2 and all(r["example_bestofgroup/trained_chains"] == 4.0 for r in recs)
    assert all("reward/red" in r and r["nfe_update"] > 0 for r in recs)
    assert all(metric_documented(k) for r in recs for k in r)  # the plug-in's log_keys join the glossary
    man = json.loads((out / "manifest.json").read_text())
    assert man["reward"]["name"] == "example_redness" and man["algorithm"]["name"] == "example_bestofgroup"


def test_module_class_specs_need_no_registration(plugin_installed, tmp_path, monkeypatch):
    # only the sources on sys.path: no entry points
    monkeypatch.setattr(registry, "_plugins", lambda kind, builtin: {})
    out = tmp_path / "spec_run"
    assert main([*RUN, "--algo", "treebench_plugin_example.algorithm:BestOfGroup",
                 "--reward", "treebench_plugin_example.reward:Redness",
                 "--eval-rewards", "treebench_plugin_example.reward:Redness", "--out", str(out)]) == 0
    assert len(_records(out)) == 2


@pytest.mark.parametrize("spec,msg", [
    ("no_such_pkg.algo:Algo", "no module 'no_such_pkg.algo' (is its package installed, or on PYTHONPATH?)"),
    ("algorithms.grpo:Nope", "module 'algorithms.grpo' has no attribute 'Nope'"),
    ("algorithms.grpo:", "expected module:Class"),
])
def test_bad_specs_are_usage_errors(spec, msg, tmp_path, capsys):
    assert main([*RUN, "--algo", spec, "--out", str(tmp_path / "x")]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
