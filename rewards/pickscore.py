"""PickScore: a CLIP-H/14 fine-tuned on Pick-a-Pic human preferences.

What it measures: which of several images generated for a prompt a user would pick (preference
given the prompt). Score = ``logit_scale.exp() * cos(image_embedding, text_embedding)``, exactly the
authors' inference snippet, so scores are ~100x cosine: typically 18-24 for generated images; only
differences between images for the same prompt are meaningful (a softmax over them gives the
preference probability). Higher is better.
Paper: Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation", NeurIPS 2023, arXiv 2305.01569. MixGRPO reports it.

Implementation: transformers ``CLIPModel`` (weights ``yuvalkirstain/PickScore_v1``) and the
``CLIPProcessor`` of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (what the authors load). The
processor's image settings (shorter side 224 bicubic, centre crop 224, CLIP normalisation) are applied
to tensors; text is padded/truncated to 77 tokens. Precision: fp16 autocast on CUDA.

Options: ``path`` (model directory), ``processor`` (processor directory; default: ``<path>/../processor``
or the model directory if it holds the processor files), ``batch_size`` (16), ``dtype`` ("auto").
Weights (never downloaded here): ``$TREEBENCH_WEIGHTS/pickscore/model/`` (config.json + weights) and
``$TREEBENCH_WEIGHTS/pickscore/processor/`` (preprocessor_config.json + tokenizer files), or the HF
cache of both repositories.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from rewards._common import (
    LazyReward,
    autocast,
    hf_clip_image_cfg,
    hf_clip_image_embeds,
    hf_clip_preprocess,
    hf_clip_text_embeds,
)
from rewards._paths import Finder

PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MIN_TOKENS = 1000  # a real CLIP tokenizer has 49408; an offline hub fallback can yield 2-5


class PickScore(LazyReward):
    """See the module docstring."""

    name = "pickscore"
    _base_version = "pickscore-v1"
    differentiable = True  # score_grad: scores with gradients to the images (ReFL, DRaFT-K)

    def __init__(self, device: str | torch.device = "cpu", path: str | None = None, processor: str | None = None,
                 batch_size: int = 16, dtype: str | None = "auto") -> None:
        super().__init__(device=device, batch_size=batch_size, dtype=dtype)
        self.path, self.processor_path = path, processor

    def _locate(self) -> list[Path]:
        finder = Finder(self.name)
        model = finder.directory(self.path, ["model"], hub_repos=[PICKSCORE_REPO], must_contain=("config.json",))
        proc_explicit = self.processor_path
        if proc_explicit is None and model is not None:
            for cand in (model.parent / "processor", model):
                if (((cand / "preprocessor_config.json").is_file() or (cand / "processor_config.json").is_file())
                        and (cand / "tokenizer_config.json").is_file()):
                    proc_explicit = str(cand)
                    break
        proc = finder.directory(proc_explicit, ["processor"], hub_repos=[PROCESSOR_REPO],
                                must_contain=("preprocessor_config.json|processor_config.json", "tokenizer_config.json"))
        if model is None or proc is None:
            raise finder.missing(
                f"the PickScore model directory ({PICKSCORE_REPO}: config.json + model weights) and the CLIP "
                f"processor directory ({PROCESSOR_REPO}: preprocessor_config.json + tokenizer files)",
                f"on a machine with network: `huggingface-cli download {PICKSCORE_REPO} --local-dir "
                f"$TREEBENCH_WEIGHTS/pickscore/model` and `huggingface-cli download {PROCESSOR_REPO} "
                f"preprocessor_config.json tokenizer.json tokenizer_config.json vocab.json merges.txt "
                f"special_tokens_map.json --local-dir $TREEBENCH_WEIGHTS/pickscore/processor`.")
        return [model, proc]

    def _load(self) -> None:
        from rewards._compat import fix_torchvision

        fix_torchvision()
        from transformers import AutoTokenizer, CLIPModel

        model_dir, proc_dir = self._files
        self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(proc_dir), local_files_only=True)
        if len(self.tokenizer) < MIN_TOKENS:
            raise ValueError(f"tokenizer at {proc_dir} has only {len(self.tokenizer)} tokens: not a CLIP tokenizer")
        self.image_cfg = hf_clip_image_cfg(proc_dir)
        self.max_length = min(77, int(self.model.config.text_config.max_position_embeddings))

    def preprocess(self, images: Tensor) -> Tensor:
        return hf_clip_preprocess(images, self.image_cfg)

    def _score(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        with autocast(self.device, self.dtype):
            img = hf_clip_image_embeds(self.model, self.preprocess(images)).float()
            txt = hf_clip_text_embeds(self.model, tok.input_ids, tok.attention_mask).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        cos = (img * txt).sum(-1)
        return self.model.logit_scale.exp().float() * cos, {"cosine": cos}
