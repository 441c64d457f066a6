"""ImageReward (v1.0 weights, package ``image-reward`` 1.5).

What it measures: human preference for an image given its prompt (text-image alignment, fidelity,
harmlessness), learned from 137k expert comparisons. BLIP (ViT-L/16 image encoder, BERT-base text
encoder with cross-attention to the image) reads prompt and image; an MLP on the [CLS] feature gives
a scalar, standardised with the training set's mean 0.1672 and std 1.0333. Scale: roughly -2..+2,
mean ~0 over the training distribution of generated images; higher is better.
Paper: Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation", NeurIPS 2023, arXiv 2304.05977. MixGRPO reports it.

Implementation: the package's own modules (BLIP ViT ``ImageReward.models.BLIP.vit``, BERT
``ImageReward.models.BLIP.med``, head ``ImageReward.ImageReward.MLP``), imported with the transformers-5
fixes of :mod:`rewards._compat` and assembled exactly as ``ImageReward.ImageReward`` does, so the
checkpoint's keys (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) load
unchanged. Differences from ``ImageReward.load(...)``: no hub access (tokenizer and config are local),
``torch.load(weights_only=True)``, batched scoring of tensors, and the ViT size read from the
checkpoint (ViT-L/16 at 224 px for the real weights; heads = width / 64 as in BLIP) so that tiny test
checkpoints go through the same code. ``tests/test_rewards_backends.py`` checks equality with the
package's ``ImageReward.score`` on the same (tiny random) weights. It runs in-process: ImageReward pins
timm 0.6.13 but its ViT works unchanged on timm 1.0.31, so no worker subprocess is needed.
Preprocessing = the package's: shorter side to 224 (bicubic), centre crop 224, CLIP normalisation.
Text: bert-base-uncased tokenizer, padded/truncated to 35 tokens. Precision: fp16 autocast on CUDA.

Weights (never downloaded here), under ``$TREEBENCH_WEIGHTS/image_reward/`` (or option ``path=DIR``,
or the package's ``~/.cache/ImageReward``, or the HF cache):
    ``ImageReward.pt``        from https://huggingface.co/THUDM/ImageReward
    ``med_config.json``       from the same repository
    ``bert-base-uncased/``    tokenizer files (``vocab.txt``, ``tokenizer_config.json``) of
                              https://huggingface.co/google-bert/bert-base-uncased (HF cache also works)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from rewards._common import CLIP_MEAN, CLIP_STD, LazyReward, autocast, normalize, resize_shortest_center_crop
from rewards._paths import Finder

IR_HUB_REPO = "THUDM/ImageReward"
BERT_HUB_REPOS = ("google-bert/bert-base-uncased", "bert-base-uncased")
#: Standardisation of the raw MLP output (``ImageReward.ImageReward.__init__``: self.mean / self.std).
IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072
#: Prompt length of ``ImageReward.score`` (``max_length=35``).
IR_MAX_LENGTH = 35
#: BLIP's ViTs use 64-dimensional heads (base: 768/12, large: 1024/16).
BLIP_HEAD_DIM = 64


def _vit_shape(sd: dict[str, Tensor], prefix: str = "blip.visual_encoder.") -> dict[str, int]:
    """ViT hyper-parameters of a BLIP visual encoder read off its state dict."""
    try:
        pos = sd[prefix + "pos_embed"]          # [1, 1 + (S/p)^2, D]
        proj = sd[prefix + "patch_embed.proj.weight"]   # [D, 3, p, p]
    except KeyError as e:
        raise ValueError(f"not an ImageReward checkpoint: no {e.args[0]!r}") from None
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    grid = round((pos.shape[1] - 1) ** 0.5)
    depth = 1 + max(int(k[len(prefix):].split(".")[1]) for k in sd if k.startswith(prefix + "blocks."))
    return {"img_size": grid * patch, "patch_size": patch, "embed_dim": dim, "depth": depth,
            "num_heads": max(1, dim // BLIP_HEAD_DIM)}


class ImageRewardNet(nn.Module):
    """``ImageReward.ImageReward`` without its hub tokenizer: ``blip.visual_encoder``,
    ``blip.text_encoder`` and ``mlp`` with the package's classes."""

    def __init__(self, med_config: str | Path, vit: dict[str, int], mlp_in: int) -> None:
        super().__init__()
        from rewards._compat import import_image_reward

        ir = import_image_reward()
        self.blip = nn.Module()
        self.blip.visual_encoder = ir.vit.VisionTransformer(
            img_size=vit["img_size"], patch_size=vit["patch_size"], embed_dim=vit["embed_dim"],
            depth=vit["depth"], num_heads=vit["num_heads"], use_grad_checkpointing=False, ckpt_layer=0,
            drop_path_rate=0.0)
        config = ir.med.BertConfig.from_json_file(str(med_config))
        config.encoder_width = vit["embed_dim"]
        self.blip.text_encoder = ir.med.BertModel(config=config, add_pooling_layer=False)
        self.mlp = ir.image_reward.MLP(mlp_in)

    def raw_score(self, input_ids: Tensor, attention_mask: Tensor, pixels: Tensor,
                  dtype: torch.dtype = torch.float32) -> Tensor:
        """[B] standardised reward (``ImageReward.score`` for a batch)."""
        with autocast(pixels.device, dtype):
            image_embeds = self.blip.visual_encoder(pixels)                      # [B, 1 + n, D]
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
            out = self.blip.text_encoder(input_ids, attention_mask=attention_mask,
                                         encoder_hidden_states=image_embeds,
                                         encoder_attention_mask=image_atts, return_dict=True)
        feat = out.last_hidden_state[:, 0, :].float()                           # [B, hidden] ([CLS])
        return ((self.mlp(feat) - IR_MEAN) / IR_STD).squeeze(-1)


class ImageRewardScorer(LazyReward):
    """Options: ``path`` (directory holding ImageReward.pt + med_config.json, or the .pt file itself),
    ``med_config`` (file), ``tokenizer`` (directory of the bert-base-uncased tokenizer),
    ``batch_size`` (16), ``dtype`` ("auto")."""

    name = "image_reward"
    _base_version = "image-reward-1.5:ImageReward-v1.0"
    differentiable = True  # score_grad: scores with gradients to the images (ReFL, DRaFT-K)

    def __init__(self, device: str | torch.device = "cpu", path: str | None = None, med_config: str | None = None,
                 tokenizer: str | None = None, batch_size: int = 16, dtype: str | None = "auto") -> None:
        super().__init__(device=device, batch_size=batch_size, dtype=dtype)
        self.path, self.med_config, self.tokenizer_path = path, med_config, tokenizer

    def _locate(self) -> list[Path]:
        finder = Finder(self.name)
        pkg_root = [Path("~/.cache/ImageReward").expanduser()]
        pt = finder.file(self.path, ["ImageReward.pt"], hub=[(IR_HUB_REPO, "ImageReward.pt")], extra_dirs=pkg_root)
        cfg_dir = self.med_config or (str(Path(self.path).parent if Path(self.path).is_file() else self.path)
                                      if self.path else None)
        cfg = finder.file(cfg_dir, ["med_config.json"], hub=[(IR_HUB_REPO, "med_config.json")],
                          extra_dirs=pkg_root)
        tok_default = None
        if self.tokenizer_path is None and self.path:
            cand = (Path(self.path).parent if Path(self.path).is_file() else Path(self.path)) / "bert-base-uncased"
            tok_default = str(cand) if cand.is_dir() else None
        tok = finder.directory(self.tokenizer_path or tok_default, ["bert-base-uncased"], hub_repos=BERT_HUB_REPOS,
                               must_contain=("vocab.txt",))
        if pt is None or cfg is None or tok is None:
            raise finder.missing(
                "ImageReward.pt (~1.8 GB) and med_config.json from THUDM/ImageReward, plus the "
                "bert-base-uncased tokenizer (directory with vocab.txt)",
                f"on a machine with network: `huggingface-cli download {IR_HUB_REPO} ImageReward.pt "
                f"med_config.json --local-dir $TREEBENCH_WEIGHTS/image_reward` and `huggingface-cli "
                f"download google-bert/bert-base-uncased vocab.txt tokenizer_config.json config.json "
                f"--local-dir $TREEBENCH_WEIGHTS/image_reward/bert-base-uncased`.")
        return [pt, cfg, tok]

    def _load(self) -> None:
        from rewards._compat import fix_torchvision

        fix_torchvision()
        from transformers import BertTokenizer

        pt, cfg, tok_dir = self._files
        sd = torch.load(pt, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        mlp_in = int(sd["mlp.layers.0.weight"].shape[1])
        net = ImageRewardNet(cfg, _vit_shape(sd), mlp_in)
        missing, _unexpected = net.load_state_dict(sd, strict=False)  # the checkpoint also holds BLIP's
        missing = [k for k in missing if not k.endswith("position_ids")]  # projections; unused here
        if missing:
            raise ValueError(f"{pt}: not an ImageReward checkpoint: missing {len(missing)} keys, e.g. {missing[:3]}")
        self.net = net.to(self.device).eval()
        tokenizer = BertTokenizer.from_pretrained(str(tok_dir))
        # as ImageReward.models.BLIP.blip.init_tokenizer (does not change how prompts tokenize)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        vocab_rows = self.net.blip.text_encoder.embeddings.word_embeddings.num_embeddings
        if not 50 <= len(tokenizer) <= vocab_rows:
            raise ValueError(f"tokenizer at {tok_dir} has {len(tokenizer)} tokens; the checkpoint's text "
                             f"encoder has {vocab_rows} rows (expected the bert-base-uncased tokenizer)")
        self.tokenizer = tokenizer
        self.image_size = int(self.net.blip.visual_encoder.patch_embed.img_size[0])

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize(224, bicubic) + CenterCrop(224) + CLIP normalisation on [B, 3, H, W] in [0, 1]."""
        return normalize(resize_shortest_center_crop(images, self.image_size, clamp=True), CLIP_MEAN, CLIP_STD)

    def _score(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=IR_MAX_LENGTH,
                             return_tensors="pt").to(self.device)
        return self.net.raw_score(tok.input_ids, tok.attention_mask, self.preprocess(images), self.dtype), {}
