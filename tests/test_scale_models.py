"""Real pipeline classes (SD3, FLUX, SD1.5) through ``load_policy``, random-architecture presets.

Every pipeline here is a tiny random instance of the real diffusers/transformers classes, built
in-process from the shipped random-architecture specs shrunk with ``policy.REDUCED`` and saved with
``save_pretrained``; nothing is downloaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bench import config
from bench.errors import MissingWeightsError
from bench.model import models
from bench.model.families import REAL_PIPELINES
from bench.model.models import build_random_policy, load_policy
from bench.model.policy import ModelOptions
from bench.model.random_models import REDUCED, build_random_pipeline, random_preset_spec
from bench.registry import MODELS
from bench.run import runner
from bench.spec import ModelSpec

SPECS = {"sd3": "sd3.5-medium-random", "flux": "flux.1-dev-random", "sd": "sd1.5-random"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> directory of a tiny real-class pipeline saved with save_pretrained."""
    out = {}
    for fam, name in SPECS.items():
        spec = random_preset_spec(name)
        pipe = build_random_pipeline(spec, "cpu", REDUCED[spec["pipeline"]])
        d = tmp_path_factory.mktemp(fam)
        pipe.save_pretrained(d, safe_serialization=True)
        out[fam] = d
    return out


def _inputs(pol, n=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *pol.latent_shape), generator=g)
    t = pol.timestep_values(torch.tensor([0.7, 0.3])) if pol.prediction == "flow" else torch.tensor([700.0, 300.0])
    return x, t


@pytest.mark.parametrize("family", ["sd3", "flux", "sd"])
def test_real_class_loader_matches_in_memory_pipeline(saved, family):
    d = saved[family]
    index = json.loads((d / "model_index.json").read_text())
    assert REAL_PIPELINES[index["_class_name"]] == family
    pol = load_policy(d, options=ModelOptions(resolution=32))
    ref = build_random_policy(SPECS[family], reduced=True)  # same seed -> same random weights
    assert pol.family == family and type(pol.denoiser) is type(ref.denoiser)
    assert pol.prediction == ("epsilon" if family == "sd" else "flow")
    C = {"sd3": 16, "flux": 16, "sd": 4}[family]
    assert pol.latent_shape == (C, 16, 16)  # 32 px through a 2x VAE (the reduced VAE has two blocks)
    cond = pol.encode_prompts(["a red circle", "a dog on the left"])
    keys = {"encoder_hidden_states"} | ({"pooled_projections"} if family != "sd" else set())
    assert set(cond.tensors) == keys and len(cond) == 2
    assert all(v.dtype == torch.float32 for v in cond.tensors.values())
    if family == "sd3":  # CLIP-L + CLIP-G (77 tokens) + T5 zeros (256 tokens) as in diffusers
        assert cond.tensors["encoder_hidden_states"].shape[1] == 77 + 256
    x, t = _inputs(pol)
    with torch.no_grad():
        out = pol.predict(x, t, cond)
        out_ref = ref.predict(x, t, ref.encode_prompts(["a red circle", "a dog on the left"]))
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-4)
    img = pol.decode(x)
    assert img.shape == (2, 3, 32, 32) and float(img.min()) >= 0 and float(img.max()) <= 1
    if family == "sd":
        ab, ts = pol.ddim_alpha_bars(5)  # the DDIM scheduler replaced the saved one
        assert type(pol.scheduler).__name__ == "DDIMScheduler" and ab.shape == (6,) and ts.shape == (5,)


def test_missing_weights_name_the_paths(saved, tmp_path):
    d = tmp_path / "sd3"
    shutil.copytree(saved["sd3"], d)
    for f in (d / "transformer").glob("*.safetensors"):
        f.unlink()
    shutil.rmtree(d / "text_encoder_2")
    with pytest.raises(MissingWeightsError) as e:
        load_policy(d)
    msg = str(e.value)
    assert str(d / "transformer") in msg and str(d / "text_encoder_2") in msg and "--model-path" in msg
    with pytest.raises(MissingWeightsError, match="model_index.json"):
        load_policy(tmp_path / "nothing")


def test_flux_guidance_embedding_changes_output(saved):
    pol = load_policy(saved["flux"], options=ModelOptions(resolution=32, guidance_embedding=3.5))
    pol2 = load_policy(saved["flux"], options=ModelOptions(resolution=32, guidance_embedding=1.0))
    cond = pol.encode_prompts(["a cat"] * 2)
    x, t = _inputs(pol)
    with torch.no_grad():
        assert not torch.allclose(pol.predict(x, t, cond), pol2.predict(x, t, cond))


@pytest.mark.parametrize("name,cls,params", [
    ("sd3.5-medium-random", "SD3Transformer2DModel", 2.243e9),
    ("sd3.5-large-random", "SD3Transformer2DModel", 8.057e9),
    ("flux.1-dev-random", "FluxTransformer2DModel", 11.901e9),
    ("sd1.5-random", "UNet2DConditionModel", 0.8595e9),
])
def test_random_presets_full_size_architecture(name, cls, params):
    """The shipped configs give the published denoiser sizes (built on the meta device: no memory)."""
    pipe = build_random_pipeline(random_preset_spec(name), device="meta")
    den = getattr(pipe, "transformer", None) or pipe.unet
    assert type(den).__name__ == cls
    assert sum(p.numel() for p in den.parameters()) == pytest.approx(params, rel=1e-3)
    assert MODELS[name].source == f"random:{name}"


def test_model_presets_carry_paper_defaults():
    cfg = config.resolve({}, flags={"algo.name": "treegrpo", "model.name": "sd3.5-medium-random"})
    assert (cfg["sampler"]["steps"], cfg["sampler"]["guidance"], cfg["sampler"]["shift"]) == (10, 4.5, 3.0)
    assert (cfg["model"]["resolution"], cfg["model"]["lora_rank"], cfg["model"]["mixed_precision"]) == (512, 32, "bf16")
    flux = config.resolve({}, flags={"algo.name": "mixgrpo", "model.name": "flux.1-dev"})
    assert (flux["sampler"]["steps"], flux["sampler"]["guidance"], flux["model"]["resolution"]) == (25, 1.0, 720)
    sd = config.resolve({}, flags={"algo.name": "ddpo", "model.name": "sd1.5"})
    assert (sd["sampler"]["steps"], sd["sampler"]["guidance"], sd["sampler"]["noise_level"]) == (50, 5.0, 1.0)
    with pytest.raises(Exception, match="lora_rank"):
        config.resolve({"model.lora_rank": -1}, flags={"algo.name": "grpo"})


@pytest.mark.parametrize("family,algo,model", [("sd3", "treegrpo", "sd3.5-medium"), ("sd", "ddpo", "sd1.5")])
def test_bench_run_on_real_class_pipeline(saved, tmp_path, family, algo, model):
    """The runner end to end on a real-class pipeline dir: preset defaults (LoRA, bf16), model path."""
    sets = {"model.path": str(saved[family]), "model.resolution": 32, "sampler.steps": 3, "model.lora_rank": 2,
            "reward.name": "brightness", "eval.rewards": ["brightness"], "eval.num_prompts": 1,
            "train.prompts_per_iteration": 1, "run.checkpoint_every": 0, "eval.at_start": False}
    sets.update({"algo.k": 2, "algo.d": 1} if algo == "treegrpo" else
                {"sampler.guidance": 1.0, "algo.group_size": 2, "model.mixed_precision": "no"})
    cfg = config.resolve(sets, flags={"algo.name": algo, "model.name": model, "budget": "1it",
                                      "out": str(tmp_path / "run"), "run.progress": False})
    s = runner.run(cfg)
    assert s.stop_reason == "budget_iterations" and s.iterations == 1
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["model"]["prediction"] == ("epsilon" if family == "sd" else "flow")


@pytest.mark.parametrize("name,cls", [("sd3.5-medium-random-reduced", "SD3Transformer2DModel"),
                                      ("flux.1-dev-random-reduced", "FluxTransformer2DModel"),
                                      ("sd1.5-random-reduced", "UNet2DConditionModel")])
def test_reduced_random_presets_build_through_the_runner(name, cls):
    """The CPU-size twins of the random presets load through models.build_policy with the presets' LoRA."""
    cfg = config.resolve({"model.device": "cpu"}, flags={"algo.name": "grpo", "model.name": name})
    spec = ModelSpec.from_config(cfg)
    assert spec.prediction == ("epsilon" if name.startswith("sd1.5") else "flow")
    pol = models.build_policy(spec, torch.device("cpu"))
    assert type(pol.denoiser).__name__ == cls and pol.is_lora and pol.resolution == 32
    assert pol.autocast_dtype == torch.bfloat16 and pol.text_encoder.dtype == torch.bfloat16


def test_model_path_may_be_a_hub_id_in_the_local_cache(saved, tmp_path, monkeypatch):
    """model.path "org/name" resolves offline through the Hugging Face cache; absent -> MissingWeightsError."""
    import huggingface_hub.constants as hc

    from bench.model.models import resolve_model_path

    repo = tmp_path / "hub" / "models--org--tiny-sd3"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(saved["sd3"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("org/tiny-sd3") == snap
    assert load_policy("org/tiny-sd3", options=ModelOptions(resolution=32)).family == "sd3"
    with pytest.raises(MissingWeightsError, match="huggingface-cli download org/absent"):
        resolve_model_path("org/absent")
