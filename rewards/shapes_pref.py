"""shapes_pref: a learned CLIP-style image-text scorer of the shapes world (the stand-in for HPS/CLIPScore).

A tiny dual encoder trained contrastively (CLIP, Radford et al. 2021, arXiv:2103.00020, eq. in Fig. 3)
on procedural data by ``scripts/train_shapes_pref.py``: renders of the train split, hard-negative prompts
(one attribute changed) and degraded images (noise, blur, colour shifts, ghosted second objects, empty
canvases) as negatives, so that a prompt prefers its clean, correct image over flawed ones.

Score = cosine similarity of the L2-normalised image and text embeddings, unscaled (scale 1; range
[-1, 1]; the learned temperature is used only in training). Like HPS and CLIPScore it is a smooth,
imperfect proxy: ``shapes_attr`` is the exact checker used to expose reward hacking.

  image encoder: 5 conv layers (3x3, GELU; strides 1, 2, 1, 2, 2) on 32 x 32 inputs scaled to
                 (x - 0.5) / 0.25 (other resolutions are area-resized to 32), flatten, 2-layer MLP
  text encoder:  sum of word embeddings over the world's vocabulary (unknown words ignored), 2-layer MLP
  weights:       rewards/weights/shapes_pref/{config.json, model.safetensors}
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.types import RewardOutput

WEIGHTS_DIR = Path(__file__).parent / "weights" / "shapes_pref"
_WORD = re.compile(r"[a-z]+")


class ShapesPrefNet(nn.Module):
    """Image encoder + bag-of-words text encoder into a shared embedding space."""

    def __init__(self, vocabulary: Sequence[str], width: int = 32, embed_dim: int = 64, resolution: int = 32):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.index = {w: i + 1 for i, w in enumerate(self.vocabulary)}  # 0 = padding / unknown
        self.resolution = resolution
        c1, c2, c3 = width, 2 * width, 4 * width
        self.conv = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.GELU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c3, c3, 3, stride=2, padding=1), nn.GELU(),
        )
        flat = c3 * (resolution // 8) ** 2
        self.image_head = nn.Sequential(nn.Linear(flat, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, embed_dim))
        self.words = nn.Embedding(len(self.vocabulary) + 1, 2 * embed_dim, padding_idx=0)
        self.text_head = nn.Sequential(nn.GELU(), nn.Linear(2 * embed_dim, 2 * embed_dim), nn.GELU(),
                                       nn.Linear(2 * embed_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.3))  # exp(2.3) ~ 10, CLIP-style learned temperature

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Word ids [P, n] (0-padded)."""
        ids = [[self.index.get(w, 0) for w in _WORD.findall(p.lower())] for p in prompts]
        n = max(1, max((len(i) for i in ids), default=1))
        return torch.tensor([i + [0] * (n - len(i)) for i in ids], dtype=torch.long)

    def encode_images(self, images: Tensor) -> Tensor:
        """images [L, 3, H, W] in [0, 1] -> unit embeddings [L, D]."""
        x = images.float()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        x = self.conv((x - 0.5) / 0.25)
        return F.normalize(self.image_head(x.flatten(1)), dim=-1)

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """prompts -> unit embeddings [P, D]."""
        ids = self.tokenize(prompts).to(self.words.weight.device)
        return F.normalize(self.text_head(self.words(ids).sum(1)), dim=-1)

    def config(self) -> dict[str, Any]:
        return {"vocabulary": self.vocabulary, "width": self.conv[0].out_channels,
                "embed_dim": self.image_head[-1].out_features, "resolution": self.resolution}


def load_net(path: str | Path = WEIGHTS_DIR, device: str | torch.device = "cpu") -> ShapesPrefNet:
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, w_file = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not w_file.is_file():
        raise FileNotFoundError(f"shapes_pref weights not found: expected {cfg_file} and {w_file}; rebuild them "
                                f"with `python scripts/train_shapes_pref.py --out {path}`")
    cfg = json.loads(cfg_file.read_text())
    net = ShapesPrefNet(cfg["vocabulary"], cfg["width"], cfg["embed_dim"], cfg["resolution"])
    net.load_state_dict(load_file(str(w_file)))
    return net.to(device).eval().requires_grad_(False)


def save_net(net: ShapesPrefNet, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**net.config(), **(extra or {})}, indent=2) + "\n")


class ShapesPref:
    """Learned image-text scorer; score = cosine similarity (scale 1) of image and prompt embeddings."""

    name = "shapes_pref"
    version = "1"
    #: ``score_grad`` back-propagates into the images (direct-gradient algorithms: ReFL, DRaFT-K)
    differentiable = True

    def __init__(self, device: str = "cpu", weights: str | None = None, batch_size: int = 512, **options: Any):
        if options:
            raise ValueError(f"shapes_pref takes only 'weights' and 'batch_size', got {sorted(options)}")
        self.device = torch.device(device)
        self.net = load_net(weights or WEIGHTS_DIR, self.device)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str],
                 meta: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"shapes_pref expects images [L, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"shapes_pref got {images.shape[0]} images but {len(prompts)} prompts")
        out = []
        for lo in range(0, images.shape[0], self.batch_size):
            im = self.net.encode_images(images[lo:lo + self.batch_size].to(self.device).clamp(0, 1))
            tx = self.net.encode_text(prompts[lo:lo + self.batch_size])
            out.append((im * tx).sum(-1).float().cpu())
        return RewardOutput(scores=torch.cat(out) if out else torch.zeros(0))

    def score_grad(self, images: Tensor, prompts: Sequence[str],
                   meta: Sequence[Mapping[str, Any]] | None = None) -> Tensor:
        """Scores [L] (on the reward's device) differentiable with respect to ``images``; the scorer's own
        weights are frozen."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"shapes_pref expects images [L, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"shapes_pref got {images.shape[0]} images but {len(prompts)} prompts")
        self.net.requires_grad_(False)
        out = []
        with torch.enable_grad():
            for lo in range(0, images.shape[0], self.batch_size):
                im = self.net.encode_images(images[lo:lo + self.batch_size].to(self.device).clamp(0, 1))
                tx = self.net.encode_text(prompts[lo:lo + self.batch_size])
                out.append((im * tx).sum(-1).float())
        return torch.cat(out) if out else images.new_zeros(0)
