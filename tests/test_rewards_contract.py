"""The Reward contract, for every name in ``bench.registry.REWARDS``, a weighted sum and an installed plug-in: identity
attributes, output shape/dtype/finiteness, determinism and batch-size invariance. Model-based
rewards run on tiny random checkpoints in their packages' real formats (``_rewards_tiny``), loaded
through the real lookup/loading code via ``$TREEBENCH_WEIGHTS``; no per-implementation branches."""

from __future__ import annotations

import importlib.util

import _rewards_tiny as T
import pytest
import torch

from bench.registry import REWARDS, WEIGHTED_REWARD, load_object, reward_class, rewards

L = 5
PROMPTS = ["a small red circle on the left", "a large blue square on the right", "a small green triangle on the top",
           "a large yellow diamond in the centre", "a small purple circle on the bottom"]
WEIGHTED_SPEC = "brightness=1.0,jpeg_compressibility=0.5"




def _images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(L, 3, 32, 32, generator=g)
    x[1] = 0.5  # a flat image among noisy ones
    return x


def _make(name: str, weights, monkeypatch):
    root, opts = weights
    monkeypatch.setenv("TREEBENCH_WEIGHTS", str(root))
    if name == "weighted":
        parse, cls = load_object("rewards.combine:parse_reward_spec"), load_object(WEIGHTED_REWARD)
        return cls([(n, w, reward_class(n)(device="cpu")) for n, w in parse(WEIGHTED_SPEC)], normalize="zscore")
    target = rewards()[name].target
    if importlib.util.find_spec(target.partition(":")[0]) is None:
        pytest.skip("module not present yet")
    return reward_class(name)(device="cpu", **opts.get(name, {}))


def _meta():
    return [{"prompt_id": i} for i in range(L)]


@pytest.mark.parametrize("name", [*REWARDS, "weighted", "example_redness"])  # the last: an installed plug-in
def test_reward_contract(name, weights, monkeypatch, plugin_installed):
    reward = _make(name, weights, monkeypatch)
    assert isinstance(reward.name, str) and reward.name
    if name != "weighted":
        assert reward.name == name
    images, meta = _images(), _meta()
    out = reward(images, PROMPTS, meta)
    assert out.scores.shape == (L,)
    assert out.scores.dtype == torch.float32 and out.scores.device.type == "cpu"
    assert torch.isfinite(out.scores).all(), out.scores
    for key, comp in out.components.items():
        assert isinstance(key, str) and comp.shape == (L,) and comp.dtype == torch.float32, key
        assert torch.isfinite(comp).all(), key
    assert isinstance(reward.version, str) and reward.version  # after loading: includes weight hashes

    again = reward(images.clone(), list(PROMPTS), meta)
    assert torch.equal(out.scores, again.scores), "not deterministic"

    if name != "weighted":  # a batch z-score depends on the batch by design
        parts = [reward(images[:2], PROMPTS[:2], meta[:2]).scores, reward(images[2:], PROMPTS[2:], meta[2:]).scores]
        assert torch.allclose(torch.cat(parts), out.scores, rtol=1e-4, atol=1e-5), "batch-size dependent"
        one = reward(images[3:4], PROMPTS[3:4], meta[3:4]).scores
        assert torch.allclose(one, out.scores[3:4], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in REWARDS if n in T.BUILDERS])
def test_batch_size_option_does_not_change_scores(name, weights, monkeypatch):
    root, opts = weights
    monkeypatch.setenv("TREEBENCH_WEIGHTS", str(root))
    a = reward_class(name)(device="cpu", batch_size=L, **opts[name])(_images(1), PROMPTS, _meta()).scores
    b = reward_class(name)(device="cpu", batch_size=2, **opts[name])(_images(1), PROMPTS, _meta()).scores
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_required_modules_come_from_the_registry_entry(monkeypatch):
    """A reward's extra Python modules are declared once, on its registry entry (``Entry.requires``): the
    run's preflight and ``bench rewards check`` both read them from there."""
    from bench import registry
    from bench.errors import UsageError
    from bench.run import scoring
    from rewards import cli as rewards_cli

    fake = registry.Entry("rewards.toy:Brightness", "needs a module that does not exist",
                          requires=("treebench_no_such_module_xyz",))
    monkeypatch.setitem(registry.REWARDS, "needs_missing", fake)
    assert scoring.missing_modules("needs_missing") == ["treebench_no_such_module_xyz"]
    with pytest.raises(UsageError, match="treebench_no_such_module_xyz.*install with"):
        scoring.check_packages("needs_missing")
    out = rewards_cli.check_one("needs_missing")
    assert out["status"] == "missing-package" and "treebench_no_such_module_xyz" in out["why"]
    assert scoring.missing_modules("brightness") == []  # built-in toys need only the core install
