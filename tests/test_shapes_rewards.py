"""Rewards of the shapes world: exact checker vs renderer, learned scorer accuracy, toy rewards."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.shapes import world
from bench.types import RewardOutput
from rewards.shapes_attr import ShapesAttr, detect
from rewards.shapes_pref import WEIGHTS_DIR, ShapesPref
from rewards.toy import Brightness, JpegCompressibility

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _batch(combos, rng=None):
    return torch.from_numpy(world.render_batch(combos, rng)), [c.prompt for c in combos], [c.as_dict() for c in combos]


def test_checker_scores_ground_truth_renders():
    combos = world.all_combinations()
    out = ShapesAttr()(*_batch(combos))
    assert isinstance(out, RewardOutput) and out.scores.dtype == torch.float32 and out.scores.shape == (240,)
    assert set(out.components) == {"colour", "shape", "size", "position", "all"}
    assert float(out.scores.mean()) >= 0.95 and float(out.components["all"].mean()) >= 0.95
    jit = ShapesAttr()(*_batch(combos, np.random.default_rng(0)))
    assert float(jit.components["all"].mean()) >= 0.95


def test_checker_gives_noise_and_blank_images_zero():
    prompts = [c.prompt for c in world.all_combinations()[:64]]
    g = torch.Generator().manual_seed(0)
    noise = ShapesAttr()(torch.rand(64, 3, 32, 32, generator=g), prompts, [{}] * 64)
    assert float(noise.scores.mean()) <= 0.2
    blank = torch.tensor(world.BACKGROUND).view(1, 3, 1, 1).expand(4, 3, 32, 32)
    assert ShapesAttr()(blank, prompts[:4], [{}] * 4).scores.tolist() == [0.0] * 4
    assert not detect(torch.rand(3, 32, 32, generator=g).numpy()).clean


def test_checker_wrong_attributes_score_low():
    combos = world.split("eval")
    images, prompts, _ = _batch(combos)
    colours = list(world.COLOURS)
    wrong = [world.Attributes(colours[(colours.index(c.colour) + 1) % 6], c.shape, c.size, c.position) for c in combos]
    out = ShapesAttr()(images, [w.prompt for w in wrong], [w.as_dict() for w in wrong])
    assert float(out.components["colour"].mean()) == 0.0 and float(out.components["all"].mean()) == 0.0
    assert float(out.scores.mean()) <= 0.76  # the three other attributes are still right
    moved = [world.Attributes(c.colour, c.shape, c.size, "left" if c.position != "left" else "right") for c in combos]
    out = ShapesAttr()(images, prompts, [m.as_dict() for m in moved])  # meta wins over the prompt text
    assert float(out.components["position"].mean()) == 0.0


def test_learned_scorer_ranks_matching_prompts_on_heldout_renders():
    ev = _script("train_shapes_pref").evaluate(ShapesPref().net, per_combo=2)
    # measured with the shipped weights (see rewards/weights/shapes_pref/config.json "heldout")
    assert ev["acc_random"] >= 0.95
    assert ev["acc_hard"] >= 0.85
    assert ev["acc_degraded"] >= 0.85


def test_learned_scorer_contract_and_prefers_clean_images():
    combos = world.split("eval")[:16]
    images, prompts, meta = _batch(combos)
    r = ShapesPref()
    assert r.name == "shapes_pref" and r.version
    out = r(images, prompts, meta)
    assert out.scores.shape == (16,) and out.scores.dtype == torch.float32
    assert float(out.scores.min()) >= -1 and float(out.scores.max()) <= 1
    noisy = (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert float(r(noisy, prompts, meta).scores.mean()) < float(out.scores.mean())
    cfg = json.loads((WEIGHTS_DIR / "config.json").read_text())
    assert cfg["vocabulary"] == list(world.VOCABULARY)


def test_learned_scorer_training_script_runs(tmp_path):
    _script("train_shapes_pref").main(["--out", str(tmp_path / "pref"), "--steps", "2", "--batch-size", "8",
                                       "--per-combo", "1", "--eval-per-combo", "1"])
    out = ShapesPref(weights=str(tmp_path / "pref"))(*_batch(world.split("train")[:3]))
    assert out.scores.shape == (3,)
    with pytest.raises(FileNotFoundError, match="train_shapes_pref"):
        ShapesPref(weights=str(tmp_path / "missing"))


def test_brightness_known_answer():
    img = torch.zeros(2, 3, 4, 4)
    img[0] = 0.25
    img[1, 0] = 1.0  # one channel full: mean 1/3
    out = Brightness()(img, ["a", "b"], [{}, {}])
    torch.testing.assert_close(out.scores, torch.tensor([0.25, 1 / 3]))


def test_jpeg_compressibility_prefers_flat_images():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    r = JpegCompressibility()
    s_flat, s_noise = float(r(flat, ["x"], [{}]).scores), float(r(noise, ["x"], [{}]).scores)
    assert s_noise < s_flat < 0  # negative size in kB; noise is larger
    assert r.name == "jpeg_compressibility" and Brightness.name == "brightness"
    with pytest.raises(ValueError, match="prompts"):
        r(flat, ["x", "y"], [{}])
