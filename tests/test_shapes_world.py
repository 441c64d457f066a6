"""The shapes world: grammar, parser, splits, prompt files, renderer (known answers)."""

import json

import numpy as np
import pytest

from bench.shapes import world


def test_vocabulary_sizes():
    assert len(world.COLOURS) >= 6
    assert {"circle", "square", "triangle", "diamond"} <= set(world.SHAPES)
    assert set(world.SIZES) == {"small", "large"}
    assert set(world.POSITIONS) == {"left", "right", "top", "bottom", "centre"}
    assert len(world.all_combinations()) == 6 * 4 * 2 * 5


def test_prompt_grammar_and_parser_round_trip():
    a = world.Attributes("red", "circle", "small", "left")
    assert a.prompt == "a small red circle on the left"
    assert world.Attributes("blue", "diamond", "large", "centre").prompt == "a large blue diamond in the centre"
    for c in world.all_combinations():
        assert world.parse_prompt(c.prompt) == c
    assert world.parse_prompt("A LARGE Green square in the CENTER.") == world.Attributes("green", "square", "large",
                                                                                         "centre")
    with pytest.raises(ValueError, match="shape"):
        world.parse_prompt("a small red thing on the left")
    with pytest.raises(ValueError, match="colour"):
        world.Attributes("pink", "circle", "small", "left")


def test_split_is_disjoint_complete_and_deterministic():
    tr, ev = world.split("train"), world.split("eval")
    assert len(tr) == 192 and len(ev) == 48
    assert not set(tr) & set(ev)
    assert set(tr) | set(ev) == set(world.all_combinations())
    assert world.split("eval") == ev  # same partition on every call
    for attr in world.ATTRIBUTES:  # every attribute value occurs in both splits
        assert {getattr(c, attr) for c in tr} == {getattr(c, attr) for c in ev}
    with pytest.raises(ValueError):
        world.split("test")


def test_shipped_prompt_files_match_split():
    for name in ("train", "eval"):
        lines = world.prompt_file(name).read_text().splitlines()
        assert [json.loads(x) for x in lines] == world.prompt_records(name)
        rec = json.loads(lines[0])
        assert set(rec) == {"prompt", "colour", "shape", "size", "position"}


def test_render_known_answers():
    img = world.render(world.Attributes("red", "square", "large", "centre"))
    assert img.shape == (3, 32, 32) and img.dtype == np.float32
    assert img.min() >= 0 and img.max() <= 1
    # the square spans 0.42 * 32 = 13.4 px around the centre: its middle is the palette colour
    want = np.round(np.asarray(world.COLOURS["red"]) * 255) / 255
    np.testing.assert_allclose(img[:, 16, 16], want, atol=1e-6)
    np.testing.assert_allclose(img[:, 0, 0], np.round(np.asarray(world.BACKGROUND) * 255) / 255, atol=1e-6)
    # a small object on the left leaves the right half as background
    left = world.render("a small blue circle on the left")
    assert np.abs(left[:, :, 17:] - left[:, 0:1, 31:32]).max() < 1e-6
    assert np.abs(left[:, 16, 8] - np.round(np.asarray(world.COLOURS["blue"]) * 255) / 255).max() < 1e-6


def test_render_is_deterministic_and_accepts_meta():
    a = world.Attributes("orange", "triangle", "small", "top")
    np.testing.assert_array_equal(world.render(a), world.render(a.prompt))
    np.testing.assert_array_equal(world.render(a), world.render(a.as_dict()))
    j1 = world.render(a, np.random.default_rng(3))
    j2 = world.render(a, np.random.default_rng(3))
    np.testing.assert_array_equal(j1, j2)
    assert not np.array_equal(j1, world.render(a))
    assert world.render_batch([a, a]).shape == (2, 3, 32, 32)
