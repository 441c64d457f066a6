"""CLIPScore: image-text cosine similarity of a CLIP model (open_clip).

What it measures: text-image alignment only (not aesthetics): the cosine similarity of the
L2-normalised CLIP image and text embeddings. ``scores`` = the cosine, in [-1, 1] (typically
0.15-0.40 for generated images with a ViT-H/14; higher is better); component ``clip_s`` = Hessel et
al.'s rescaled CLIP-S = 2.5 * max(cos, 0), in [0, 2.5]. TreeGRPO trains on HPSv2.1 + CLIPScore.
Paper: Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
EMNLP 2021, arXiv 2104.08718 (CLIP: Radford et al., arXiv 2103.00020).

Implementation: ``open_clip.create_model(model, pretrained=<local checkpoint file>)``; the pretrained
tag selects the hub repository to look for in the HF cache and the tag's preprocessing and QuickGELU
settings. Preprocessing = the model's ``preprocess_cfg`` (for the LAION/OpenAI CLIPs: shorter side
to 224 bicubic, centre crop, CLIP normalisation). Text: the model's open_clip tokenizer.
Precision: fp16 autocast on CUDA.

Options: ``model`` ("ViT-H-14"), ``pretrained`` ("laion2b_s32b_b79k", or a checkpoint file path),
``path`` (checkpoint file or directory holding it), ``batch_size`` (16), ``dtype`` ("auto").
Weights (never downloaded here): ``$TREEBENCH_WEIGHTS/clip_score/<model>/<pretrained>/`` holding
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``, or the HF cache of the tag's hub
repository (e.g. ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from rewards._common import (
    CLIP_MEAN,
    CLIP_STD,
    LazyReward,
    autocast,
    normalize,
    resize_bicubic,
    resize_longest_pad,
    resize_shortest_center_crop,
)
from rewards._paths import Finder

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _tag_cfg(model: str, pretrained: str) -> dict:
    from rewards._compat import fix_torchvision

    fix_torchvision()
    import open_clip

    try:
        return dict(open_clip.get_pretrained_cfg(model, pretrained) or {})
    except Exception:  # noqa: BLE001 - unknown model/tag: no preset
        return {}


class ClipScore(LazyReward):
    """See the module docstring."""

    name = "clip_score"
    differentiable = True  # score_grad: scores with gradients to the images (ReFL, DRaFT-K)

    def __init__(self, device: str | torch.device = "cpu", model: str = "ViT-H-14",
                 pretrained: str = "laion2b_s32b_b79k", path: str | None = None, batch_size: int = 16,
                 dtype: str | None = "auto") -> None:
        super().__init__(device=device, batch_size=batch_size, dtype=dtype)
        self.model_name, self.pretrained, self.path = model, pretrained, path
        tag = Path(pretrained).name if Path(pretrained).exists() else pretrained
        self._base_version = f"clipscore:open_clip-{self._open_clip_version()}:{model}:{tag}"

    @staticmethod
    def _open_clip_version() -> str:
        try:
            from importlib.metadata import version

            return version("open_clip_torch")
        except Exception:  # noqa: BLE001
            return "unknown"

    def _locate(self) -> list[Path]:
        finder = Finder(self.name)
        explicit = self.path or (self.pretrained if Path(self.pretrained).exists() else None)
        hub_repo = _tag_cfg(self.model_name, self.pretrained).get("hf_hub", "").strip("/") if not explicit else ""
        layout = [f"{self.model_name}/{self.pretrained}/{f}" for f in OPEN_CLIP_FILES]
        hit = finder.file(explicit, layout, hub=[(hub_repo, f) for f in OPEN_CLIP_FILES] if hub_repo else [])
        if hit is None:
            src = f"https://huggingface.co/{hub_repo}" if hub_repo else "the open_clip model's release page"
            raise finder.missing(
                f"an open_clip checkpoint for model {self.model_name!r}, pretrained {self.pretrained!r} "
                f"({' or '.join(OPEN_CLIP_FILES)})",
                f"download it on a machine with network from {src} into "
                f"$TREEBENCH_WEIGHTS/clip_score/{self.model_name}/{self.pretrained}/ "
                f"(e.g. `huggingface-cli download {hub_repo or '<repo>'} open_clip_model.safetensors "
                f"--local-dir ...`), or pass path=<checkpoint file>.")
        return [hit]

    def _load(self) -> None:
        from rewards._compat import fix_torchvision

        fix_torchvision()
        import open_clip

        cfg = _tag_cfg(self.model_name, self.pretrained)
        force_pp = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
        model = open_clip.create_model(self.model_name, pretrained=str(self._files[0]), device="cpu",
                                       force_quick_gelu=bool(cfg.get("quick_gelu", False)),
                                       force_preprocess_cfg=force_pp or None, weights_only=True)
        self.model = model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = pp.get("size", model.visual.image_size)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.mean = tuple(pp.get("mean", CLIP_MEAN))
        self.std = tuple(pp.get("std", CLIP_STD))
        self.resize_mode = pp.get("resize_mode", "shortest")
        if pp.get("interpolation", "bicubic") != "bicubic":
            raise NotImplementedError(f"only bicubic preprocessing is implemented, model wants {pp['interpolation']}")

    def preprocess(self, images: Tensor) -> Tensor:
        h, w = self.image_size
        if self.resize_mode == "shortest":
            x = resize_shortest_center_crop(images, (h, w) if h != w else h, clamp=True)
        elif self.resize_mode == "longest" and h == w:
            x = resize_longest_pad(images, h).clamp(0.0, 1.0)
        elif self.resize_mode == "squash":
            x = resize_bicubic(images, (h, w)).clamp(0.0, 1.0)
        else:
            raise NotImplementedError(f"open_clip resize_mode {self.resize_mode!r} at size {self.image_size}")
        return normalize(x, self.mean, self.std)

    def _score(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        text = self.tokenizer(list(prompts)).to(self.device)
        with autocast(self.device, self.dtype):
            img = self.model.encode_image(self.preprocess(images)).float()
            txt = self.model.encode_text(text).float()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return cos, {"clip_s": 2.5 * cos.clamp(min=0.0)}
