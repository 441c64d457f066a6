"""Model families: what differs between treebench's own pipelines, SD3, FLUX and SD 1.x, in one small
object each (prompt encoding, the denoiser's call signature, loading details), so that the runtime
``Policy`` and the loaders never branch on a family name.

``family_for(name)`` returns the object; ``REAL_PIPELINES`` maps a diffusers pipeline class to its
family; ``is_unet`` is the one test of "is this denoiser a UNet?".
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

#: LoRA target modules (peft suffix match) per denoiser kind: Flow-GRPO's SD3 list (also used for FLUX,
#: whose double blocks have the same projections) and DDPO's UNet attention projections.
LORA_TARGETS = {
    "transformer": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
}


def is_unet(denoiser: nn.Module) -> bool:
    """UNets (DDPO's SD 1.x, the tiny epsilon model) take ``sample=`` and no pooled projection; a peft
    wrapper keeps ``conv_in`` reachable, so the attribute decides when the class name does not."""
    return type(denoiser).__name__.startswith("UNet") or hasattr(denoiser, "conv_in")


def denoiser_kind(denoiser: nn.Module) -> str:
    """"unet" or "transformer": the folder name in a pipeline directory and the LoRA target list."""
    return "unet" if is_unet(denoiser) else "transformer"


class Family:
    """Defaults shared by the diffusers-pipeline families; ``Treebench`` overrides encoding."""

    name: ClassVar[str]
    prediction: ClassVar[str] = "flow"
    default_resolution: ClassVar[int] = 512
    max_length: ClassVar[int] = 77
    optional_components: ClassVar[tuple[str, ...]] = ()

    def encode(self, policy: Any, prompts: list[str]) -> dict[str, Tensor]:
        """Named conditioning tensors [P, ...] (float32) for ``prompts``."""
        raise NotImplementedError

    def forward(self, policy: Any, module: nn.Module, x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
        """The denoiser's output [B, C, h, w] for latents x [B, C, h, w] and model timesteps t [B]."""
        if is_unet(policy.denoiser):
            return module(sample=x, timestep=t, encoder_hidden_states=c["encoder_hidden_states"],
                          return_dict=False)[0]
        return module(hidden_states=x, timestep=t, return_dict=False, **c)[0]

    def load_kwargs(self, index: dict[str, Any], absent: set[str], use_t5: bool) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments of the diffusers pipeline class."""
        return {}

    def lora_pipeline(self, denoiser: nn.Module) -> str:
        """The diffusers pipeline class whose ``save_lora_weights`` writes this denoiser's adapter."""
        return "StableDiffusionPipeline" if is_unet(denoiser) else "StableDiffusion3Pipeline"


class Treebench(Family):
    """treebench's own format (embedded shapes model, tiny test models): one CLIP text encoder."""

    name = "treebench"

    def encode(self, policy: Any, prompts: list[str]) -> dict[str, Tensor]:
        tok = policy.tokenizer(prompts, padding="max_length", max_length=policy.max_length, truncation=True,
                               return_tensors="pt")
        out = policy.text_encoder(input_ids=tok["input_ids"].to(policy.device))
        tensors = {"encoder_hidden_states": out.last_hidden_state.float()}
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        if pooled is not None and not is_unet(policy.denoiser):
            tensors["pooled_projections"] = pooled.float()
        return tensors


class SD3(Family):
    """StableDiffusion3Pipeline: CLIP-L + CLIP-G (+ T5-XXL when present; zeros in its place otherwise)."""

    name = "sd3"
    default_resolution, max_length = 1024, 256
    optional_components = ("text_encoder_3", "tokenizer_3")

    def encode(self, policy: Any, prompts: list[str]) -> dict[str, Tensor]:
        emb, _, pooled, _ = policy.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=policy.device, do_classifier_free_guidance=False,
            max_sequence_length=policy.max_length)
        return {"encoder_hidden_states": emb.float(), "pooled_projections": pooled.float()}

    def load_kwargs(self, index: dict[str, Any], absent: set[str], use_t5: bool) -> dict[str, Any]:
        if absent or not use_t5 or index.get("text_encoder_3", [None])[0] is None:
            return {"text_encoder_3": None, "tokenizer_3": None}  # SD3 without T5
        return {}


class Flux(Family):
    """FluxPipeline (FLUX.1-dev): CLIP pooled + T5 sequence, guidance-distilled, 2x2-packed latents."""

    name = "flux"
    default_resolution, max_length = 1024, 512

    def encode(self, policy: Any, prompts: list[str]) -> dict[str, Tensor]:
        emb, pooled, _ = policy.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=policy.device,
                                                       max_sequence_length=policy.max_length)
        return {"encoder_hidden_states": emb.float(), "pooled_projections": pooled.float()}

    def forward(self, policy: Any, module: nn.Module, x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
        """Packs 2x2 patches into tokens [B, hw/4, 4C], feeds positional ids, the distilled guidance scale
        and timestep = sigma (FluxPipeline divides its sigma*1000 timesteps by 1000), unpacks the velocity."""
        B, C, h, w = x.shape
        packed = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(x.dtype)
        txt_ids = torch.zeros(c["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
        cfg = getattr(policy.denoiser, "config", None)
        guidance = (torch.full((B,), float(policy.options.guidance_embedding), device=x.device, dtype=torch.float32)
                    if getattr(cfg, "guidance_embeds", False) else None)
        out = module(hidden_states=packed, timestep=t.to(x.dtype) / 1000.0, guidance=guidance,
                     pooled_projections=c["pooled_projections"], encoder_hidden_states=c["encoder_hidden_states"],
                     txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)

    def lora_pipeline(self, denoiser: nn.Module) -> str:
        return "FluxPipeline"


class SD(Family):
    """StableDiffusionPipeline (SD 1.x, DDPO's setting): CLIP-L, epsilon-prediction UNet, sampled with DDIM."""

    name = "sd"
    prediction = "epsilon"

    def encode(self, policy: Any, prompts: list[str]) -> dict[str, Tensor]:
        emb, _ = policy.pipeline.encode_prompt(prompts, policy.device, 1, False)
        return {"encoder_hidden_states": emb.float()}

    def load_kwargs(self, index: dict[str, Any], absent: set[str], use_t5: bool) -> dict[str, Any]:
        kw: dict[str, Any] = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if "image_encoder" in index:
            kw["image_encoder"] = None
        return kw


FAMILIES: dict[str, Family] = {f.name: f for f in (Treebench(), SD3(), Flux(), SD())}
#: diffusers pipeline classes the loaders understand -> family name
REAL_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "StableDiffusionPipeline": "sd"}


def family_for(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]
