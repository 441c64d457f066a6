"""Model-based rewards on tiny random checkpoints in each package's real format: parity with the
upstream packages' own scoring code on the same weights, the offline lookup, the missing-weights error,
lazy loading, and a GPU throughput check (opt-in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _rewards_tiny as T
import numpy as np
import pytest
import torch

from bench.registry import REWARDS, reward_class

MODEL_REWARDS = ("hpsv2", "image_reward", "clip_score", "pickscore", "aesthetic")
PROMPTS = ["a red cat on the left", "a small blue circle", "photo of a city at night"]




@pytest.fixture
def env(weights, monkeypatch):
    root, opts = weights
    monkeypatch.setenv("TREEBENCH_WEIGHTS", str(root))
    return root, opts


def _quantised(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Images on the 8-bit grid, so the PIL path of the packages sees exactly the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255.0


def _pil(img: torch.Tensor):
    from PIL import Image

    return Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output


# --- parity with the packages' own code ---------------------------------------------------------

def test_image_reward_matches_package(env):
    root, _ = env
    d = root / "image_reward"
    ours = reward_class("image_reward")(device="cpu")
    with T.package_image_reward_classes(d / "bert-base-uncased", T.TINY_MED["hidden_size"]) as ir:
        pkg = ir.image_reward.ImageReward(med_config=str(d / "med_config.json"), device="cpu")
        pkg.load_state_dict(torch.load(d / "ImageReward.pt", weights_only=True), strict=False)
        pkg.preprocess = ir.image_reward._transform(T.TINY_VIT["img_size"])  # the package hard-codes 224
        pkg.eval()
        for size, tol in (((32, 32), 1e-4), ((48, 40), 0.02)):  # resize: PIL vs tensor bicubic
            x = _quantised(3, *size)
            with torch.no_grad():
                ref = torch.tensor([pkg.score(p, _pil(img)) for p, img in zip(PROMPTS, x)])
            got = ours(x, PROMPTS, [{}] * 3).scores
            assert torch.allclose(got, ref, atol=tol, rtol=0), (size, got, ref)
        # the package's batched ranking path agrees too
        x = _quantised(3, 32, 32, seed=1)
        with torch.no_grad():
            _, ref_rank = pkg.inference_rank(PROMPTS[0], [_pil(img) for img in x])
        got = ours(x, [PROMPTS[0]] * 3, None).scores
        assert torch.allclose(got, torch.tensor(ref_rank), atol=1e-4)


def test_hpsv2_matches_package(env):
    _, opts = env
    import hpsv2.src.open_clip as hoc

    ours = reward_class("hpsv2")(device="cpu", version="v2.0", **opts["hpsv2"])
    model, _, preprocess_val = hoc.create_model_and_transforms(
        T.TINY_HPS_ARCH, None, precision="fp32", device="cpu", light_augmentation=True, output_dict=True)
    ckpt = torch.load(env[0] / "hpsv2" / "HPS_v2_compressed.pt", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    tokenizer = hoc.get_tokenizer(T.TINY_HPS_ARCH)
    for size in ((32, 32), (48, 40), (24, 60)):  # HPS resizes float tensors: same op as ours
        x = _quantised(3, *size)
        ref = []
        with torch.no_grad():
            for p, img in zip(PROMPTS, x):  # hpsv2.img_score.score, per image
                out = model(preprocess_val(_pil(img)).unsqueeze(0), tokenizer([p]))
                ref.append(torch.diagonal(out["image_features"] @ out["text_features"].T)[0])
        got = ours(x, PROMPTS, None).scores
        assert torch.allclose(got, torch.stack(ref), atol=1e-5), (size, got, ref)


def test_clip_score_matches_open_clip(env):
    _, opts = env
    import open_clip

    ours = reward_class("clip_score")(device="cpu", **opts["clip_score"])
    ours.ensure_loaded()
    model, _, preprocess = open_clip.create_model_and_transforms(T.TINY_CLIP_ARCH, pretrained=str(ours._files[0]))
    model.eval()
    tokenizer = open_clip.get_tokenizer(T.TINY_CLIP_ARCH)
    for size, tol in (((32, 32), 1e-5), ((48, 40), 5e-3)):
        x = _quantised(3, *size)
        with torch.no_grad():
            img = model.encode_image(torch.stack([preprocess(_pil(i)) for i in x]), normalize=True)
            txt = model.encode_text(tokenizer(PROMPTS), normalize=True)
        ref = (img * txt).sum(-1)
        out = ours(x, PROMPTS, None)
        assert torch.allclose(out.scores, ref, atol=tol), (size, out.scores, ref)
        assert torch.allclose(out.components["clip_s"], 2.5 * out.scores.clamp(min=0))


def test_pickscore_matches_reference_snippet(env):
    root, _ = env
    from transformers import AutoProcessor, CLIPModel

    ours = reward_class("pickscore")(device="cpu")
    processor = AutoProcessor.from_pretrained(str(root / "pickscore" / "processor"))
    model = CLIPModel.from_pretrained(str(root / "pickscore" / "model")).eval()
    for size, tol in (((32, 32), 1e-3), ((48, 40), 0.05)):
        x = _quantised(3, *size)
        ref = []
        with torch.no_grad():  # the PickScore model card's inference code, one prompt per image
            for p, img in zip(PROMPTS, x):
                ii = processor(images=[_pil(img)], return_tensors="pt")
                ti = processor(text=[p], padding=True, truncation=True, max_length=77, return_tensors="pt")
                ie = _features(model.get_image_features(**ii))
                te = _features(model.get_text_features(**ti))
                ie, te = ie / ie.norm(dim=-1, keepdim=True), te / te.norm(dim=-1, keepdim=True)
                ref.append((model.logit_scale.exp() * te @ ie.T)[0, 0])
        got = ours(x, PROMPTS, None).scores
        assert torch.allclose(got, torch.stack(ref), atol=tol), (size, got, ref)


def test_aesthetic_matches_ddpo_scorer(env):
    root, _ = env
    from transformers import CLIPModel, CLIPProcessor

    from rewards.aesthetic import AestheticMLP

    ours = reward_class("aesthetic")(device="cpu")
    d = root / "aesthetic"
    clip = CLIPModel.from_pretrained(str(d / "clip-vit-large-patch14")).eval()
    processor = CLIPProcessor.from_pretrained(str(d / "clip-vit-large-patch14")) if (
        d / "clip-vit-large-patch14" / "tokenizer_config.json").exists() else None
    from transformers import CLIPImageProcessor

    improc = processor.image_processor if processor else CLIPImageProcessor.from_pretrained(str(d / "clip-vit-large-patch14"))
    mlp = AestheticMLP(16)
    mlp.load_state_dict(torch.load(d / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True))
    mlp.eval()
    x = _quantised(4, 32, 32)
    with torch.no_grad():  # ddpo_pytorch.aesthetic_scorer.AestheticScorer.__call__
        inputs = improc(images=[_pil(i) for i in x], return_tensors="pt")
        emb = _features(clip.get_image_features(**inputs))
        emb = emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
        ref = mlp(emb).squeeze(1)
    got = ours(x, ["ignored"] * 4, None).scores
    assert torch.allclose(got, ref, atol=1e-3), (got, ref)


# --- lookup, versions, errors, laziness ----------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_missing_weights_error_names_files_and_remedy(name, tmp_path, monkeypatch):
    from rewards._paths import MissingWeightsError

    monkeypatch.setenv("TREEBENCH_WEIGHTS", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hps"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    r = reward_class(name)(device="cpu")  # constructing never looks for weights
    assert r.version.endswith("+weights-missing")
    with pytest.raises(MissingWeightsError) as e:
        r(torch.rand(1, 3, 32, 32), ["a cat"], [{}])
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert f"reward {name!r}: weights not found" in msg
    assert str(tmp_path / "empty" / name) in msg  # where it looked
    assert "HF cache" in msg and "How to obtain" in msg and "download" in msg
    expected = {"hpsv2": "HPS_v2.1_compressed.pt", "image_reward": "ImageReward.pt",
                "clip_score": "open_clip_model.safetensors", "pickscore": "yuvalkirstain/PickScore_v1",
                "aesthetic": "sac+logos+ava1-l14-linearMSE.pth"}[name]
    assert expected in msg
    if name == "hpsv2":
        print("\n" + msg)  # shown with -s: the message a user sees


def test_explicit_path_without_file_is_an_error_not_a_fallback(env, tmp_path):
    from rewards._paths import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="HPS_v2.1_compressed.pt"):
        reward_class("hpsv2")(path=str(tmp_path), **env[1]["hpsv2"])(torch.rand(1, 3, 8, 8), ["x"], None)


def test_hf_cache_lookup(env, tmp_path, monkeypatch):
    """A file in the HF cache layout is found with TREEBENCH_WEIGHTS unset (local lookup only)."""
    root, opts = env
    monkeypatch.delenv("TREEBENCH_WEIGHTS")
    monkeypatch.setenv("HPS_ROOT", str(tmp_path / "hps"))
    cache = tmp_path / "hub"
    repo = cache / "models--xswu--HPSv2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "HPS_v2.1_compressed.pt").write_bytes((root / "hpsv2" / "HPS_v2.1_compressed.pt").read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    r = reward_class("hpsv2")(**opts["hpsv2"])
    r.ensure_loaded()
    assert r._files[0] == snap / "HPS_v2.1_compressed.pt"


def test_versions_change_with_weights_and_options(env):
    _, opts = env
    v20 = reward_class("hpsv2")(version="v2.0", **opts["hpsv2"]).version
    v21 = reward_class("hpsv2")(version="v2.1", **opts["hpsv2"]).version
    assert v20 != v21 and "+sha256:" in v20 and v20.startswith("hpsv2-v2.0")
    for name in MODEL_REWARDS:
        r = reward_class(name)(**opts[name])
        assert r.name == name and "+sha256:" in r.version
    with pytest.raises(ValueError, match="unknown HPS version"):
        reward_class("hpsv2")(version="v3")


def test_bad_inputs_are_rejected(env):
    r = reward_class("clip_score")(**env[1]["clip_score"])
    with pytest.raises(ValueError, match=r"\[L, 3, H, W\]"):
        r(torch.rand(3, 32, 32), ["a"], None)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        r(torch.rand(2, 3, 32, 32), ["a"], None)


def test_bf16_autocast_close_to_fp32(env):
    opts = env[1]["clip_score"]
    x = _quantised(4, 32, 32)
    a = reward_class("clip_score")(dtype="fp32", **opts)(x, PROMPTS + ["x"], None).scores
    b = reward_class("clip_score")(dtype="bf16", **opts)(x, PROMPTS + ["x"], None).scores
    assert b.dtype == torch.float32 and torch.allclose(a, b, atol=0.05)


def test_import_loads_nothing_heavy():
    code = ("import sys, rewards.hpsv2, rewards.image_reward, rewards.clip_score, rewards.pickscore, "
            "rewards.aesthetic, rewards.combine, rewards.cli\n"
            "heavy = [m for m in ('open_clip', 'hpsv2', 'ImageReward', 'torchvision', 'timm', 'transformers') "
            "if m in sys.modules]\nprint(heavy)\nassert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stdout + res.stderr


def test_compat_fixes_are_idempotent():
    from rewards._compat import fix_torchvision, import_image_reward

    fix_torchvision()
    fix_torchvision()
    a, b = import_image_reward(), import_image_reward()
    assert a.med is b.med
    import transformers.modeling_utils as mu

    heads, index = mu.find_pruneable_heads_and_indices({1}, 3, 2, set())
    assert heads == {1} and index.tolist() == [0, 1, 4, 5]


# --- GPU throughput (opt-in: pytest -m gpu -s) ----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_gpu_throughput(name):
    """Scores 32 images at 512 px with the real weights ($TREEBENCH_WEIGHTS) and prints images/s."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from rewards._paths import MissingWeightsError

    r = reward_class(name)(device="cuda", batch_size=32)
    x = torch.rand(32, 3, 512, 512, device="cuda")
    prompts = ["a photo of an astronaut riding a horse on the moon"] * 32
    try:
        r(x[:2], prompts[:2], None)  # load + warm-up
    except MissingWeightsError as e:
        pytest.skip(str(e).splitlines()[0])
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        out = r(x, prompts, None)
    torch.cuda.synchronize()
    ips = 3 * 32 / (time.perf_counter() - t)
    print(f"\n{name}: {ips:.1f} images/s (32 x 512 px, batch 32, {torch.cuda.get_device_name()}, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB) mean score {out.scores.mean():.4f}")
    line = json.dumps({"reward": name, "images_per_s": round(ips, 1), "device": torch.cuda.get_device_name()})
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(Path(out_dir) / "reward_throughput.jsonl", "a") as f:
            f.write(line + "\n")
    assert out.scores.shape == (32,) and torch.isfinite(out.scores).all()


def test_every_model_reward_is_registered():
    for name in MODEL_REWARDS:
        assert name in REWARDS


# --- full-size architecture (opt-in: pytest -m slow) ----------------------------------------------

#: BLIP's ``med_config.json`` as shipped with ImageReward (BERT-base with cross-attention).
BLIP_MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                   "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
                   "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
                   "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
                   "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}


@pytest.mark.slow
def test_image_reward_full_size_architecture_matches_package(tmp_path, monkeypatch):
    """The package's real ImageReward (ViT-L/16 at 224, BERT-base, MLP(768)) with random weights: our
    loader infers the same architecture from the checkpoint (strict key/shape match) and scores equal."""
    d = tmp_path / "image_reward"
    T.write_bert_tokenizer(d / "bert-base-uncased")
    (d / "med_config.json").write_text(json.dumps(BLIP_MED_CONFIG))
    from rewards._compat import import_image_reward

    ir = import_image_reward()
    saved = ir.blip_pretrain.init_tokenizer
    from transformers import BertTokenizer

    ir.blip_pretrain.init_tokenizer = lambda: BertTokenizer.from_pretrained(str(d / "bert-base-uncased"))
    try:
        torch.manual_seed(0)
        pkg = ir.image_reward.ImageReward(med_config=str(d / "med_config.json"), device="cpu").eval()
    finally:
        ir.blip_pretrain.init_tokenizer = saved
    torch.save(pkg.state_dict(), d / "ImageReward.pt")
    monkeypatch.setenv("TREEBENCH_WEIGHTS", str(tmp_path))
    ours = reward_class("image_reward")(device="cpu")
    ours.ensure_loaded()
    ref_sd, our_sd = pkg.state_dict(), ours.net.state_dict()
    assert set(our_sd) <= set(ref_sd)
    assert all(our_sd[k].shape == ref_sd[k].shape for k in our_sd)
    assert ours.net.blip.visual_encoder.blocks[0].attn.num_heads == 16 and ours.image_size == 224
    x = _quantised(2, 224, 224)
    with torch.no_grad():
        ref = torch.tensor([pkg.score(p, _pil(img)) for p, img in zip(PROMPTS[:2], x)])
    assert torch.allclose(ours(x, PROMPTS[:2], None).scores, ref, atol=1e-3)


# --- bench rewards check ----------------------------------------------------------------------------

def test_rewards_check_cli(env, capsys, tmp_path, monkeypatch):
    from bench.errors import UsageError
    from rewards.cli import main

    _, opts = env
    assert main(["check", "--json", "aesthetic", "pickscore", "image_reward"]) == 0
    res = {r["reward"]: r for r in json.loads(capsys.readouterr().out)}
    assert all(r["ok"] and r["status"] == "ok" and r["files"] for r in res.values())
    assert main(["check", "brightness"]) == 0 and "built-in" in capsys.readouterr().out

    monkeypatch.setenv("TREEBENCH_WEIGHTS", str(tmp_path / "none"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert main(["check", "aesthetic"]) == 1
    out = capsys.readouterr().out
    assert "missing-weights" in out and "sac+logos+ava1-l14-linearMSE.pth" in out
    with pytest.raises(UsageError, match="did you mean|Did you mean"):
        main(["check", "hpsv"])


def test_hpsv2_accepts_a_safetensors_conversion(env, tmp_path):
    from safetensors.torch import save_file

    root, opts = env
    sd = torch.load(root / "hpsv2" / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "HPS_v2.1_compressed.safetensors"))
    x = _quantised(2, 32, 32)
    a = reward_class("hpsv2")(**opts["hpsv2"])(x, PROMPTS[:2], None).scores
    r = reward_class("hpsv2")(path=str(tmp_path), **opts["hpsv2"])
    assert torch.equal(r(x, PROMPTS[:2], None).scores, a)
    assert r._files[0].suffix == ".safetensors"
