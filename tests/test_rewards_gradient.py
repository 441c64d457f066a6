"""The rewards' gradient path (``differentiable`` + ``score_grad``), used by direct-gradient algorithms (ReFL,
DRaFT-K): the same scores as ``__call__``, a gradient that reaches the images, frozen reward weights; rewards
without one say so."""

from __future__ import annotations

import pytest
import torch

from bench.errors import UsageError
from bench.registry import reward_class
from bench.run.scoring import build_reward, check_reward_gradient

MODEL_REWARDS = ("hpsv2", "image_reward", "clip_score", "pickscore", "aesthetic")
PROMPTS = ["a red cat on the left", "a small blue circle", "photo of a city at night"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (0.1 + 0.8 * torch.rand((n, 3, size, size), generator=g)).requires_grad_(True)


def _check(reward, prompts, meta=None):
    x = _images(len(prompts))
    with torch.no_grad():
        plain = reward(x.detach(), prompts, meta or [{}] * len(prompts)).scores
    s = reward.score_grad(x, prompts, meta or [{}] * len(prompts))
    assert s.shape == (len(prompts),) and s.dtype == torch.float32 and s.requires_grad
    torch.testing.assert_close(s.detach().cpu(), plain, rtol=1e-4, atol=1e-5)
    s.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    return x.grad


@pytest.fixture
def env(weights, monkeypatch):
    root, opts = weights
    monkeypatch.setenv("TREEBENCH_WEIGHTS", str(root))
    return root, opts


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_model_rewards_score_with_gradients(env, name):
    _, opts = env
    extra = {"version": "v2.0"} if name == "hpsv2" else {}  # the tiny checkpoint is written as HPS v2.0
    reward = reward_class(name)(device="cpu", **extra, **opts.get(name, {}))
    assert reward.differentiable
    _check(reward, PROMPTS)
    mods = [m for m in vars(reward).values() if isinstance(m, torch.nn.Module)]
    assert mods and not any(p.requires_grad for m in mods for p in m.parameters())  # the reward is never trained


def test_shapes_pref_and_brightness_score_with_gradients():
    pref = build_reward("shapes_pref", torch.device("cpu"), {})
    g = _check(pref, ["a small red circle at the top left", "a large blue square in the center", "a green triangle"])
    assert not any(p.requires_grad for p in pref.net.parameters())
    g = _check(build_reward("brightness", torch.device("cpu"), {}), ["a", "b", "c"])
    torch.testing.assert_close(g, torch.full_like(g, 1.0 / (3 * 32 * 32)))  # d mean / d pixel


def test_weighted_sum_has_a_gradient_path_only_unnormalised_over_differentiable_parts():
    dev = torch.device("cpu")
    both = build_reward("brightness=2.0,shapes_pref=0.5", dev, {})
    assert both.differentiable
    x = _images()
    prompts = ["a red circle", "a blue square", "a green triangle"]
    parts = 2.0 * build_reward("brightness", dev, {}).score_grad(x, prompts, None) + \
        0.5 * build_reward("shapes_pref", dev, {}).score_grad(x, prompts, None)
    torch.testing.assert_close(both.score_grad(x, prompts, None), parts)
    _check(both, prompts)
    assert not build_reward("brightness=1.0", dev, {}, normalize="zscore").differentiable
    assert not build_reward("brightness=1.0,jpeg_compressibility=1.0", dev, {}).differentiable


@pytest.mark.parametrize("spec", ["shapes_attr", "jpeg_compressibility", "brightness=1.0,shapes_attr=1.0"])
def test_rewards_without_a_gradient_path_are_refused(spec):
    reward = build_reward(spec, torch.device("cpu"), {})
    assert not getattr(reward, "differentiable", False)
    with pytest.raises(UsageError, match="no gradient path"):
        check_reward_gradient(reward, "refl")
