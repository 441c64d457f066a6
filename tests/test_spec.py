"""The run spec: a resolved config read once into frozen typed records (runner, sweeps and perf use it)."""

import dataclasses

import pytest

from bench import config
from bench.errors import AlgorithmSettingsError
from bench.spec import RunSpec


def _cfg(algo, model, **sets):
    return config.resolve(sets, flags={"algo.name": algo, "model.name": model, "budget": "2it"})


@pytest.mark.parametrize("model,prediction", [("tiny-random", "flow"), ("tiny-random-ddim", "epsilon"),
                                              ("sd1.5-random-reduced", "epsilon"),
                                              ("sd3.5-medium-random-reduced", "flow")])
def test_prediction_comes_from_the_model_not_its_name(model, prediction):
    spec = RunSpec.from_config(_cfg("ddpo", model))
    assert spec.model.prediction == spec.sampler.prediction == prediction


def test_typed_and_frozen():
    spec = RunSpec.from_config(_cfg("treegrpo", "tiny-random", **{"train.lr": 3e-4, "algo.k": 3}))
    assert spec.optimizer.lr == 3e-4 and spec.algo_config.k == 3 and spec.budget.iterations == 2
    assert isinstance(spec.sampler.steps, int) and isinstance(spec.eval.rewards, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1


def test_sweeps_validate_with_the_models_own_prediction():
    from sweeps.objective import validate_run_config

    # MixGRPO-Flash needs a flow model; an SD1.5 (epsilon) model used to be validated as a flow model
    with pytest.raises(AlgorithmSettingsError, match="flow-matching model"):
        validate_run_config(_cfg("mixgrpo", "sd1.5-random-reduced", **{"algo.flash": True}))
    validate_run_config(_cfg("mixgrpo", "sd3.5-medium-random-reduced", **{"algo.flash": True}))


def test_algorithm_settings_wraps_a_refusal_once():
    from bench.errors import UsageError, algorithm_settings

    with pytest.raises(AlgorithmSettingsError, match=r"^invalid settings for algorithm 'x': d > window$"):
        with algorithm_settings("x"):
            raise ValueError("d > window")
    with pytest.raises(AlgorithmSettingsError) as e:  # an inner usage error is not wrapped again
        with algorithm_settings("x"):
            with algorithm_settings("x"):
                raise ValueError("bad")
    assert str(e.value).count("invalid settings") == 1
    with pytest.raises(TypeError):  # only the declared kinds of refusal are turned into usage errors
        with algorithm_settings("x"):
            raise TypeError("a bug")
    assert issubclass(AlgorithmSettingsError, UsageError)


def test_the_settings_read_after_the_spec_is_built_are_on_it():
    spec = RunSpec.from_config(_cfg("grpo", "tiny-random", **{"model.distributed": "off", "run.flops": False,
                                                              "run.peak_flops": 5e12, "train.micro_batch": 3}))
    assert (spec.model.distributed, spec.run.flops, spec.run.peak_flops) == ("off", False, 5e12)
    assert spec.train.micro_batch == 3 and spec.budget.spec == "2it"
    default = RunSpec.from_config(_cfg("grpo", "tiny-random"))
    assert (default.model.distributed, default.run.flops, default.run.peak_flops) == ("auto", True, None)


def test_cost_profile_false_leaves_the_runs_profile_unloaded():
    cfg = _cfg("grpo", "shapes", **{"run.cost_profile": "shapes-cpu"})
    assert RunSpec.from_config(cfg).cost_profile.name == "shapes-cpu"
    assert RunSpec.from_config(cfg, cost_profile=False).cost_profile is None
