"""Budget strings and config resolution (precedence, validation, did-you-mean)."""

import pytest

from bench.budget import Budget, Totals
from bench.config import parse_sets, parse_value, resolve
from bench.errors import UsageError


@pytest.mark.parametrize("spec,field,value", [
    ("24h", "seconds", 86400.0), ("90m", "seconds", 5400.0), ("45s", "seconds", 45.0), ("1.5h", "seconds", 5400.0),
    ("5000samples", "samples", 5000), ("2e6nfe", "nfe", 2e6), ("300it", "iterations", 300),
])
def test_budget_forms(spec, field, value):
    b = Budget.parse(spec)
    assert getattr(b, field) == value


def test_budget_combination_first_hit_stops():
    b = Budget.parse("2h,5000samples")
    assert b.seconds == 7200 and b.samples == 5000
    assert b.exhausted(Totals(seconds=10, samples=4999)) is None
    assert b.exhausted(Totals(seconds=10, samples=5000)) == "budget_samples"
    assert b.exhausted(Totals(seconds=7200, samples=1)) == "budget_seconds"
    assert b.fraction(Totals(seconds=3600, samples=4000)) == pytest.approx(0.8)


@pytest.mark.parametrize("spec", ["5x", "", "10", "h", "-3it", "1h,2h", "3 apples", "1e3nfes"])
def test_bad_budget_lists_forms(spec):
    with pytest.raises(UsageError, match="24h"):
        Budget.parse(spec)


def test_parse_values():
    assert parse_value("1e-5") == 1e-5 and parse_value("3") == 3 and parse_value("true") is True
    assert parse_value("[a, b]") == ["a", "b"] and parse_value("none") is None and parse_value("uniform") == "uniform"
    assert parse_sets(["train.lr=1e-4", "algo.k=3"]) == {"train.lr": 1e-4, "algo.k": 3}
    with pytest.raises(UsageError, match="key=value"):
        parse_sets(["train.lr"])


def test_resolve_precedence_and_model_defaults(tmp_path):
    cfg = resolve({}, flags={"algo.name": "grpo", "model.name": "tiny-random"})
    assert cfg["sampler"]["steps"] == 6  # model preset default
    f = tmp_path / "c.yaml"
    f.write_text("sampler:\n  steps: 5\ntrain:\n  lr: 0.001\nalgo:\n  group_size: 3\n")
    cfg = resolve({"sampler.steps": 4}, config_file=f, flags={"algo.name": "grpo", "model.name": "tiny-random"})
    assert cfg["sampler"]["steps"] == 4  # --set beats the file
    assert cfg["train"]["lr"] == 0.001 and cfg["algo"]["group_size"] == 3
    assert cfg["algo"]["clip_range"] == 1e-4  # algorithm defaults filled in


@pytest.mark.parametrize("key,hint", [("sampler.stepz", "sampler.steps"), ("trian.lr", "train"),
                                      ("algo.group_sise", "algo.group_size")])
def test_unknown_keys_did_you_mean(key, hint):
    with pytest.raises(UsageError, match=hint.replace(".", r"\.")):
        resolve({key: 1}, flags={"algo.name": "grpo"})


def test_unknown_names_did_you_mean():
    with pytest.raises(UsageError, match="'grpo'"):
        resolve({}, flags={"algo.name": "grop"})
    with pytest.raises(UsageError, match="'shapes'"):
        resolve({}, flags={"algo.name": "grpo", "model.name": "shape"})


@pytest.mark.parametrize("key,value,msg", [("sampler.steps", 0, "sampler.steps"), ("train.lr", "fast", "train.lr"),
                                           ("eval.every", -1, "eval.every"), ("sampler.sde", "ito", "sampler.sde")])
def test_invalid_values(key, value, msg):
    with pytest.raises(UsageError, match=msg):
        resolve({key: value}, flags={"algo.name": "grpo"})


def test_bad_config_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        resolve({}, config_file=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UsageError, match="mapping"):
        resolve({}, config_file=bad)
