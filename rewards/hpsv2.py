"""HPSv2 / HPSv2.1: Human Preference Score v2.

What it measures: how much humans would prefer an image for a prompt. A CLIP ViT-H/14 (open_clip)
fine-tuned on HPDv2, 798k human pairwise choices among images generated for the same prompt.
Score = cosine similarity of the L2-normalised image and text embeddings (no logit scale), as in
``hpsv2.score``. Scale: roughly 0.20-0.35 for generated images (v2.1 runs about 0.02 higher than
v2.0 on the same images); differences of 0.01 are meaningful. Higher is better.
Paper: Wu et al., "Human Preference Score v2: A Solid Benchmark for Evaluating Human Preferences of
Text-to-Image Synthesis", arXiv 2306.09341. TreeGRPO trains on HPSv2.1 (alone and + CLIPScore);
MixGRPO and DanceGRPO report it.

Implementation: the ``hpsv2`` module (package ``hpsv2x`` 1.2.0, same module as ``hpsv2`` 1.2.0, with
the BPE vocabulary file that ``hpsv2``'s wheel lacks) and its bundled open_clip. The model is built
from the open_clip config ``ViT-H-14`` without pretrained weights (the HPS checkpoint holds the whole
fine-tuned CLIP, so the LAION weights ``hpsv2.score`` loads first are overwritten anyway) and the HPS
checkpoint's ``state_dict`` is loaded strictly. Preprocessing = HPS's evaluation transform
(``light_augmentation=True``): the longer side resized to 224 (bicubic, antialiased), centred zero
padding to a square, OpenAI CLIP normalisation. Text: open_clip's CLIP tokenizer, 77 tokens.
Precision: fp16 autocast on CUDA, like ``hpsv2.score``'s ``torch.cuda.amp.autocast``.

Weights (never downloaded here):
    ``$TREEBENCH_WEIGHTS/hpsv2/HPS_v2_compressed.pt``     (version "v2.0")
    ``$TREEBENCH_WEIGHTS/hpsv2/HPS_v2.1_compressed.pt``   (version "v2.1", the default)
  (or ``.safetensors`` conversions of them, same stem), or the option ``path=...`` (file, or directory
  holding it), ``$HPS_ROOT`` / ``~/.cache/hpsv2``
  (the hpsv2 package's own cache), or the HF cache of ``xswu/HPSv2``. Obtain with
  ``huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt`` on a machine with network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from rewards._common import CLIP_MEAN, CLIP_STD, LazyReward, autocast, normalize, resize_longest_pad
from rewards._paths import Finder

HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_HUB_REPO = "xswu/HPSv2"


def load_hps_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The ``state_dict`` of an HPS checkpoint (a ``torch.save``'d dict with key ``state_dict``, read
    with ``weights_only=True``), or of a ``.safetensors`` conversion of it."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # e.g. pickled objects other than tensors
        raise ValueError(
            f"cannot read HPS checkpoint {path} with torch.load(weights_only=True): {e}\nIf you trust the file, "
            f"convert it once to safetensors and pass path=<the .safetensors file>: python -c \"import torch; "
            f"from safetensors.torch import save_file; sd = torch.load('{path}', weights_only=False)['state_dict']; "
            f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path}.safetensors')\"") from e
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict with a 'state_dict' entry, got {type(ckpt).__name__}")  # noqa: TRY004
    return {k.removeprefix("module."): v for k, v in sd.items()}


class HPSv2(LazyReward):
    """Options: ``version`` "v2.0" | "v2.1" (default), ``path`` (checkpoint file or directory),
    ``arch`` (open_clip config name, default "ViT-H-14"), ``batch_size`` (16), ``dtype`` ("auto")."""

    name = "hpsv2"
    differentiable = True  # score_grad: scores with gradients to the images (ReFL, DRaFT-K)

    def __init__(self, device: str | torch.device = "cpu", version: str = "v2.1", path: str | None = None,
                 arch: str = "ViT-H-14", batch_size: int = 16, dtype: str | None = "auto") -> None:
        super().__init__(device=device, batch_size=batch_size, dtype=dtype)
        if version not in HPS_FILES:
            raise ValueError(f"unknown HPS version {version!r}; valid: {', '.join(HPS_FILES)}")
        self.hps_version = version
        self.path = path
        self.arch = arch
        self._base_version = f"hpsv2-{version}:{arch}:hpsv2x-1.2.0"

    def _locate(self) -> list[Path]:
        fname = HPS_FILES[self.hps_version]
        finder = Finder(self.name)
        pkg_root = Path(os.environ.get("HPS_ROOT") or "~/.cache/hpsv2").expanduser()
        hit = finder.file(self.path, [fname, fname.replace(".pt", ".safetensors")], hub=[(HPS_HUB_REPO, fname)],
                          extra_dirs=[pkg_root])
        if hit is None:
            raise finder.missing(
                f"{fname} (HPS {self.hps_version} checkpoint, ~1.7 GB, a dict with 'state_dict' of an "
                f"open_clip {self.arch})",
                f"on a machine with network: `huggingface-cli download {HPS_HUB_REPO} {fname} --local-dir "
                f"$TREEBENCH_WEIGHTS/hpsv2` (https://huggingface.co/{HPS_HUB_REPO}); the open_clip "
                f"ViT-H-14 base weights are NOT needed.")
        return [hit]

    def _load(self) -> None:
        from rewards._compat import fix_torchvision

        fix_torchvision()
        from hpsv2.src.open_clip import create_model, get_tokenizer

        model = create_model(self.arch, pretrained=None, precision="fp32", device="cpu", jit=False,
                             output_dict=True)
        missing, _unexpected = model.load_state_dict(load_hps_checkpoint(self._files[0]), strict=False)
        if missing:
            raise ValueError(f"{self._files[0]}: not an HPS checkpoint for {self.arch}: missing "
                             f"{len(missing)} keys, e.g. {missing[:3]}")
        self.model = model.to(self.device).eval()
        self.tokenizer = get_tokenizer(self.arch)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(getattr(model.visual, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(model.visual, "image_std", None) or CLIP_STD)

    def preprocess(self, images: Tensor) -> Tensor:
        """HPS evaluation transform on [B, 3, H, W] in [0, 1] (see the module docstring)."""
        return normalize(resize_longest_pad(images, self.image_size, fill=0.0), self.mean, self.std)

    def _score(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        pixels = self.preprocess(images)
        text = self.tokenizer(list(prompts)).to(self.device)
        with autocast(self.device, self.dtype):
            out = self.model(pixels, text)
            img, txt = out["image_features"].float(), out["text_features"].float()
        # diag(image_features @ text_features.T) of hpsv2.score, one prompt per image
        return (img * txt).sum(-1), {}
