"""Models built in-process: real architectures with random weights (``bench/presets/*.json``, speed and
memory measurements without downloading weights; ``REDUCED`` shrinks them to CPU-test size) and tiny
random text-to-image pipelines saved in treebench's format (tests and smoke runs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from bench.errors import UsageError
from bench.model.families import denoiser_kind

TREEBENCH_CLASS = "TreebenchPipeline"


def quiet_libraries() -> None:
    """No per-file progress bars from diffusers/transformers when loading small components."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


# ---- random-weight real architectures ----------------------------------------------------------
PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"


def random_preset_spec(name: str) -> dict[str, Any]:
    f = PRESET_DIR / f"{name}.json"
    if not f.is_file():
        valid = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise UsageError(f"no random-architecture config {f}; valid: {', '.join(valid)}")
    return json.loads(f.read_text())


def build_random_pipeline(spec: dict[str, Any], device: str | torch.device = "cpu",
                          overrides: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> Any:
    """The pipeline object of a random-architecture spec (``bench/presets/*.json``), random weights,
    built directly on ``device`` (no weights file is read or written).

    spec: {"pipeline": class name, "<component>": {"class": ..., "config": {...}}, ...}; tokenizers are
    word-level tokenizers built in-process (token ids only feed embedding lookups of random encoders).
    ``overrides`` patches component configs (tests shrink the architectures with it)."""
    import diffusers
    import transformers

    overrides = overrides or {}
    torch.manual_seed(seed)
    comps: dict[str, Any] = {}
    device = torch.device(device)
    for name, c in spec["components"].items():
        cfg = {**c.get("config", {}), **overrides.get(name, {})}
        kind = c["class"]
        if kind == "word_tokenizer":
            comps[name] = word_tokenizer(TINY_WORDS, int(cfg.get("max_length", 77)))
        elif c["library"] == "diffusers" and "Scheduler" in kind:
            comps[name] = getattr(diffusers, kind).from_config(cfg)
        elif c["library"] == "diffusers":
            with device:
                comps[name] = getattr(diffusers, kind).from_config(cfg)
        else:
            config_cls = getattr(transformers, c["config_class"])
            with device:
                comps[name] = getattr(transformers, kind)(config_cls(**cfg))
        if name.startswith("text_encoder") and isinstance(comps[name], nn.Module):
            comps[name].eval()
    for name in spec.get("absent", ()):
        comps[name] = None
    return getattr(diffusers, spec["pipeline"])(**comps, **spec.get("extra", {}))


_TINY_CLIP = {"vocab_size": 1000, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "projection_dim": 16}
_TINY_VAE = {"block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2,
             "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 4}
#: Per pipeline class: config patches that shrink a random-architecture spec to CPU-test size while
#: keeping every component's class and the shapes that connect them (32 px images).
REDUCED: dict[str, dict[str, dict[str, Any]]] = {
    "StableDiffusion3Pipeline": {
        "transformer": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
                        "caption_projection_dim": 16, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                        "pos_embed_max_size": 16, "sample_size": 16, "dual_attention_layers": [0]},
        "text_encoder": _TINY_CLIP, "text_encoder_2": _TINY_CLIP, "vae": _TINY_VAE},
    "FluxPipeline": {
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                        "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": [4, 6, 6]},
        "text_encoder": _TINY_CLIP,
        "text_encoder_2": {"vocab_size": 1000, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2},
        "vae": _TINY_VAE},
    "StableDiffusionPipeline": {
        "unet": {"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
                 "cross_attention_dim": 16, "attention_head_dim": 8, "sample_size": 16,
                 "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]},
        "text_encoder": {k: v for k, v in _TINY_CLIP.items() if k != "projection_dim"}, "vae": _TINY_VAE},
}


# ---- saving and tiny models -------------------------------------------------------------------
def save_pipeline(out_dir: str | os.PathLike, *, denoiser: nn.Module, text_encoder: nn.Module,
                  tokenizer: Any, scheduler: Any, meta: dict[str, Any], vae: nn.Module | None = None) -> Path:
    """Write a pipeline in treebench's diffusers-style format (safetensors everywhere)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dname = denoiser_kind(denoiser)
    denoiser.save_pretrained(out / dname, safe_serialization=True)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    if vae is not None:
        vae.save_pretrained(out / "vae", safe_serialization=True)
    import diffusers

    index = {
        "_class_name": TREEBENCH_CLASS,
        "_diffusers_version": diffusers.__version__,
        dname: ["diffusers", type(denoiser).__name__],
        "text_encoder": ["transformers", type(text_encoder).__name__],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "vae": ["diffusers", type(vae).__name__] if vae is not None else [None, None],
        "treebench": meta,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def word_tokenizer(words: Sequence[str], max_length: int) -> Any:
    """A word-level tokenizer trained in-process (``tokenizers``), wrapped for transformers.

    Ids: 0 <pad>, 1 <unk>, 3 <eos> (not 2: CLIPTextModel pools at the first eos_token_id unless it is 2),
    every sequence ends with <eos> (the empty CFG prompt too)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>", bos_token="<bos>", model_max_length=max_length)


TINY_WORDS = ("a small large red green blue yellow purple orange white black circle square triangle "
              "diamond star on the left right top bottom centre center of and two one cat dog photo").split()


def build_tiny_pipeline(out_dir: str | os.PathLike, prediction: str = "flow", resolution: int = 16,
                        seed: int = 0, words: Sequence[str] = TINY_WORDS) -> Path:
    """Build and save a tiny random text-to-image pipeline (pixel space, 3 channels) for tests and
    smoke runs: an SD3 transformer + flow-matching scheduler, or a UNet + DDIM for epsilon models."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    max_length = 12
    tok = word_tokenizer(words, max_length)
    tcfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=max_length, projection_dim=32,
                          eos_token_id=3, pad_token_id=0, bos_token_id=2)
    meta: dict[str, Any] = {"prediction": prediction, "resolution": resolution, "latent_channels": 3,
                            "max_length": max_length}
    if prediction == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        text = CLIPTextModelWithProjection(tcfg)
        den = SD3Transformer2DModel(sample_size=resolution, patch_size=2, in_channels=3, out_channels=3,
                                    num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                                    pos_embed_max_size=resolution // 2)
        sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        meta["defaults"] = {"sampler.steps": 6, "sampler.guidance": 1.0, "sampler.noise_level": 0.7}
    elif prediction == "epsilon":
        from diffusers import DDIMScheduler, UNet2DConditionModel

        text = CLIPTextModel(tcfg)
        den = UNet2DConditionModel(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
                                   block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                                   attention_head_dim=8,
                                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        meta["defaults"] = {"sampler.steps": 6, "sampler.guidance": 1.0, "sampler.noise_level": 1.0}
    else:
        raise UsageError(f"unknown prediction type {prediction!r}; valid: flow, epsilon")
    return save_pipeline(out_dir, denoiser=den, text_encoder=text, tokenizer=tok, scheduler=sch, meta=meta)


def tiny_pipeline_dir(prediction: str = "flow", seed: int = 0) -> Path:
    """Build (once) and return a cached tiny random pipeline directory."""
    root = Path(os.environ.get("TREEBENCH_CACHE", Path.home() / ".cache" / "treebench"))
    out = root / f"tiny-{prediction}-s{seed}-v1"
    if not (out / "model_index.json").is_file():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build_tiny_pipeline(tmp, prediction=prediction, seed=seed)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out
