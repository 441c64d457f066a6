"""The shipped shapes model: loads through the common loader, samples images, trains in a test."""

import json
from pathlib import Path

import pytest
import torch

from bench.model.models import load_policy
from bench.shapes import train_model, world
from bench.shapes.sampling import sample_images

MODEL = Path(world.__file__).parent / "model"


@pytest.fixture(scope="module")
def shapes_policy():
    return load_policy(MODEL)


def test_shipped_model_is_small_and_well_formed():
    total = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert total <= 12 * 2**20
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "TreebenchPipeline"
    meta = index["treebench"]
    assert meta["prediction"] == "flow" and meta["resolution"] == 32 and meta["latent_channels"] == 3
    assert set(meta["defaults"]) == {"sampler.steps", "sampler.guidance", "sampler.noise_level", "sampler.shift"}


def test_shipped_model_loads_and_samples(shapes_policy):
    p = shapes_policy
    assert p.prediction == "flow" and p.latent_shape == (3, 32, 32)
    assert len(p.tokenizer) == len(world.VOCABULARY) + 4
    # every prompt ends with <eos> (id 3, which the text encoder pools at), the empty CFG prompt too
    ids = p.tokenizer(["a small red circle on the left", ""], padding="max_length", max_length=p.max_length,
                      return_tensors="pt")["input_ids"]
    assert ids[0, 7] == 3 and ids[1, 0] == 3 and 1 not in ids[0].tolist()
    prompts = ["a small red circle on the left", "a large blue square at the top"]
    a = sample_images(p, prompts, steps=3, seed=1)
    b = sample_images(p, prompts, steps=3, seed=1)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b)


def test_training_script_runs_a_few_steps(tmp_path):
    out = tmp_path / "model"
    assert train_model.main(["--out", str(out), "--minutes", "5", "--steps", "2", "--batch-size", "4",
                             "--per-combo", "1"]) == 0
    assert json.loads((out / "training.json").read_text())["steps"] == 2
    p = load_policy(out)
    assert p.default_settings()["sampler.steps"] == 10
    assert sample_images(p, ["a large green diamond in the centre"], steps=2).shape == (1, 3, 32, 32)


@pytest.mark.slow
def test_shipped_model_is_imperfect_but_competent(shapes_policy):
    from rewards.shapes_attr import ShapesAttr

    recs = world.prompt_records("eval")
    prompts = [r["prompt"] for r in recs for _ in range(2)]
    meta = [r for r in recs for _ in range(2)]
    out = ShapesAttr()(sample_images(shapes_policy, prompts, seed=0), prompts, meta)
    assert 0.2 <= float(out.components["all"].mean()) <= 0.75
    assert float(out.components["colour"].mean()) >= 0.8
