"""WeightedSum and the reward-spec parser: known answers computed by hand."""

from __future__ import annotations

import pytest
import torch

from bench.types import RewardOutput
from rewards.combine import WeightedSum, format_reward_spec, parse_reward_spec


class Fixed:
    """A reward returning fixed scores (and one component) whatever the images."""

    def __init__(self, name: str, scores, comp=None, version: str = "1"):
        self.name, self.version = name, version
        self.scores = torch.tensor(scores, dtype=torch.float32)
        self.comp = comp
        self.calls = 0

    def __call__(self, images, prompts, meta):
        self.calls += 1
        comps = {"part": torch.tensor(self.comp, dtype=torch.float32)} if self.comp is not None else {}
        return RewardOutput(scores=self.scores.clone(), components=comps)


IMGS = torch.zeros(3, 3, 4, 4)
PROMPTS = ["a", "b", "c"]


def test_parse_reward_spec():
    assert parse_reward_spec("hpsv2=1.0,clip_score=1.0") == [("hpsv2", 1.0), ("clip_score", 1.0)]
    assert parse_reward_spec(" hpsv2 = 0.7 , clip_score=-0.25 ") == [("hpsv2", 0.7), ("clip_score", -0.25)]
    assert parse_reward_spec("hpsv2") == [("hpsv2", 1.0)]
    assert parse_reward_spec("a=1e-1") == [("a", 0.1)]
    assert format_reward_spec(parse_reward_spec("a=1,b=0.5")) == "a=1.0,b=0.5"


@pytest.mark.parametrize("spec, match", [
    ("", "empty reward spec"),
    ("hpsv2=1.0,", "item 2 is empty"),
    ("=1.0", "no reward name"),
    ("hpsv2=abc", "weight 'abc' of 'hpsv2' is not a number"),
    ("hpsv2=nan", "must be finite"),
    ("hpsv2=1,hpsv2=2", "appears twice"),
    ("hp sv2=1", "not a valid reward name"),
])
def test_parse_reward_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_reward_spec(spec)


def test_weighted_sum_known_answer():
    a = Fixed("a", [1.0, 2.0, 3.0], comp=[0.0, 1.0, 0.0], version="va")
    b = Fixed("b", [10.0, 0.0, -10.0], version="vb")
    r = WeightedSum([("a", 1.0, a), ("b", 0.5, b)])
    out = r(IMGS, PROMPTS, [{}] * 3)
    # 1*[1,2,3] + 0.5*[10,0,-10] = [6, 2, -2]
    assert out.scores.tolist() == [6.0, 2.0, -2.0]
    assert out.scores.dtype == torch.float32
    assert set(out.components) == {"a", "b", "a/part"}
    assert out.components["a"].tolist() == [1.0, 2.0, 3.0]
    assert out.components["b"].tolist() == [10.0, 0.0, -10.0]
    assert out.components["a/part"].tolist() == [0.0, 1.0, 0.0]
    assert r.name == "a=1.0,b=0.5"
    assert r.version == "weighted[none](a=1.0@va;b=0.5@vb)"
    assert a.calls == b.calls == 1


def test_weighted_sum_zscore_known_answer():
    a = Fixed("a", [1.0, 2.0, 3.0])        # mean 2, population std sqrt(2/3)
    b = Fixed("b", [10.0, 10.0, 10.0])     # zero spread -> contributes 0
    c = Fixed("c", [0.0, 0.0, 30.0])       # mean 10, std sqrt(200)
    out = WeightedSum([("a", 2.0, a), ("b", 1.0, b), ("c", 1.0, c)], normalize="zscore")(IMGS, PROMPTS, None)
    s = (2.0 / 3.0) ** 0.5
    za = torch.tensor([-1 / s, 0.0, 1 / s])
    zc = torch.tensor([-10.0, -10.0, 20.0]) / 200 ** 0.5
    assert torch.allclose(out.scores, 2.0 * za + zc, atol=1e-6)
    assert out.components["b"].tolist() == [10.0, 10.0, 10.0]  # components stay raw


def test_weighted_sum_version_follows_parts_and_options():
    a, b = Fixed("a", [1.0, 2.0, 3.0], version="1"), Fixed("b", [0.0, 0.0, 0.0])
    v1 = WeightedSum([("a", 1.0, a), ("b", 1.0, b)]).version
    a.version = "2"
    v2 = WeightedSum([("a", 1.0, a), ("b", 1.0, b)]).version
    v3 = WeightedSum([("a", 1.0, a), ("b", 1.0, b)], normalize="zscore").version
    v4 = WeightedSum([("a", 2.0, a), ("b", 1.0, b)]).version
    assert len({v1, v2, v3, v4}) == 4


def test_weighted_sum_rejects_bad_parts():
    a = Fixed("a", [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least one part"):
        WeightedSum([])
    with pytest.raises(ValueError, match="distinct names"):
        WeightedSum([("a", 1.0, a), ("a", 2.0, a)])
    with pytest.raises(ValueError, match="unknown normalize"):
        WeightedSum([("a", 1.0, a)], normalize="minmax")


def test_from_spec_builds_through_a_factory():
    made = {}

    def make(name):
        made[name] = Fixed(name, [1.0, 1.0, 1.0])
        return made[name]

    r = WeightedSum.from_spec("x=2,y=0.5", make)
    assert r.name == "x=2.0,y=0.5" and set(made) == {"x", "y"}
    assert r(IMGS, PROMPTS, None).scores.tolist() == [2.5, 2.5, 2.5]
