"""LAION aesthetic predictor ("improved aesthetic predictor", v2, linear-MSE head).

What it measures: how aesthetically pleasing an image is, independent of the prompt: an MLP on the
L2-normalised CLIP ViT-L/14 (OpenAI) image embedding, trained to regress mean human ratings (SAC,
LAION-Logos, AVA). Scale: the 1-10 rating scale, typically 4-7 for generated images; higher is better.
Used as a reward by DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning",
arXiv 2305.13301), whose scorer this follows (transformers ``openai/clip-vit-large-patch14`` +
the MLP ``sac+logos+ava1-l14-linearMSE.pth``). Predictor: C. Schuhmann, LAION,
https://github.com/christophschuhmann/improved-aesthetic-predictor (there is no paper; the LAION-5B
paper, arXiv 2210.08402, describes its use).

Implementation: the MLP layout of the original (Linear 768-1024, Dropout, 1024-128, Dropout, 128-64,
Dropout, 64-16, 16-1; no activations), its state dict loaded with ``weights_only=True`` (``.pth`` or
``.safetensors``); the input width is read from the checkpoint. Preprocessing = the CLIP processor's
(shorter side 224 bicubic, centre crop 224, CLIP normalisation) on tensors. The prompt is ignored.
Precision: fp16 autocast on CUDA for the CLIP tower; the MLP runs in fp32.

Options: ``path`` (the MLP file, or a directory holding it), ``clip`` (CLIP model directory),
``batch_size`` (16), ``dtype`` ("auto").
Weights (never downloaded here): ``$TREEBENCH_WEIGHTS/aesthetic/sac+logos+ava1-l14-linearMSE.pth``
(or ``.safetensors``) and ``$TREEBENCH_WEIGHTS/aesthetic/clip-vit-large-patch14/`` (or the HF cache of
``openai/clip-vit-large-patch14``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from rewards._common import LazyReward, autocast, hf_clip_image_cfg, hf_clip_image_embeds, hf_clip_preprocess
from rewards._paths import Finder

MLP_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "sac+logos+ava1-l14-linearMSE.safetensors")
MLP_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
           "sac%2Blogos%2Bava1-l14-linearMSE.pth")
CLIP_REPO = "openai/clip-vit-large-patch14"


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head (keys ``layers.{0,2,4,6,7}.*``)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: Tensor) -> Tensor:
        return self.layers(embed)


def load_mlp_state(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


class Aesthetic(LazyReward):
    """See the module docstring."""

    name = "aesthetic"
    _base_version = "laion-aesthetic-v2:sac+logos+ava1-l14-linearMSE"
    differentiable = True  # score_grad: scores with gradients to the images (ReFL, DRaFT-K)

    def __init__(self, device: str | torch.device = "cpu", path: str | None = None, clip: str | None = None,
                 batch_size: int = 16, dtype: str | None = "auto") -> None:
        super().__init__(device=device, batch_size=batch_size, dtype=dtype)
        self.path, self.clip_path = path, clip

    def _locate(self) -> list[Path]:
        finder = Finder(self.name)
        mlp = finder.file(self.path, list(MLP_FILES))
        clip_explicit = self.clip_path
        if clip_explicit is None and self.path:
            base = Path(self.path) if Path(self.path).is_dir() else Path(self.path).parent
            cand = base / "clip-vit-large-patch14"
            clip_explicit = str(cand) if cand.is_dir() else None
        clip = finder.directory(clip_explicit, ["clip-vit-large-patch14"], hub_repos=[CLIP_REPO],
                                must_contain=("config.json",))
        if mlp is None or clip is None:
            raise finder.missing(
                f"the aesthetic MLP ({MLP_FILES[0]}, 3.7 MB) and the CLIP ViT-L/14 directory ({CLIP_REPO}: "
                f"config.json, model weights, preprocessor_config.json)",
                f"on a machine with network: download {MLP_URL} into $TREEBENCH_WEIGHTS/aesthetic/ and "
                f"`huggingface-cli download {CLIP_REPO} config.json model.safetensors preprocessor_config.json "
                f"--local-dir $TREEBENCH_WEIGHTS/aesthetic/clip-vit-large-patch14`.")
        return [mlp, clip]

    def _load(self) -> None:
        from rewards._compat import fix_torchvision

        fix_torchvision()
        from transformers import CLIPModel

        mlp_path, clip_dir = self._files
        sd = load_mlp_state(Path(mlp_path))
        if "layers.0.weight" not in sd:
            raise ValueError(f"{mlp_path}: not an aesthetic-predictor state dict (no 'layers.0.weight')")
        mlp = AestheticMLP(int(sd["layers.0.weight"].shape[1]))
        mlp.load_state_dict(sd)
        self.mlp = mlp.to(self.device).eval()
        self.model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).to(self.device).eval()
        if self.model.config.projection_dim != mlp.layers[0].in_features:
            raise ValueError(f"CLIP projection dim {self.model.config.projection_dim} != MLP input "
                             f"{mlp.layers[0].in_features} ({clip_dir} vs {mlp_path})")
        self.image_cfg = hf_clip_image_cfg(clip_dir)

    def preprocess(self, images: Tensor) -> Tensor:
        return hf_clip_preprocess(images, self.image_cfg)

    def _score(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        with autocast(self.device, self.dtype):
            emb = hf_clip_image_embeds(self.model, self.preprocess(images)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb).squeeze(-1), {}
