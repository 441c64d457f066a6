"""Tiny random checkpoints in each reward package's real on-disk format, for the reward tests.

Every builder writes files laid out as ``$TREEBENCH_WEIGHTS/<reward>/...`` expects (see each reward's
module docstring) under ``root`` and returns the constructor options that point at them. Nothing is
downloaded: the CLIP BPE vocabulary comes from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz``.
"""

from __future__ import annotations

import gzip
import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

TINY_HPS_ARCH = "treebench-tiny-hps"
TINY_CLIP_ARCH = "treebench-tiny-clip"
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_BERT_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "red", "green", "blue", "yellow", "black", "white", "small", "large", "big", "cat", "dog", "circle", "square", "triangle", "diamond", "photo", "painting", "left", "right", "top", "bottom", "center", "house", "tree", "car", "sky", "sun", "moon", "city", "river", "mountain", "flower", "bird", "horse", "man", "woman", "child"]


def _register_open_clip_config(module, name: str, root: Path) -> None:
    cfg_dir = root / f"open_clip_cfg_{module.__name__.replace('.', '_')}"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    path = cfg_dir / f"{name}.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    module.add_model_config(path)


def build_hpsv2(root: Path, seed: int = 0) -> dict:
    """HPS checkpoints (``torch.save({'state_dict': ...})`` of the hpsv2 open_clip model)."""
    from rewards._compat import fix_torchvision

    fix_torchvision()
    import hpsv2.src.open_clip as hoc

    _register_open_clip_config(hoc, TINY_HPS_ARCH, root)
    d = root / "hpsv2"
    d.mkdir(parents=True, exist_ok=True)
    for i, fname in enumerate(("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt")):
        torch.manual_seed(seed + i)
        model = hoc.create_model(TINY_HPS_ARCH, pretrained=None, output_dict=True)
        torch.save({"state_dict": model.state_dict(), "epoch": 1}, d / fname)
    return {"arch": TINY_HPS_ARCH}


def build_clip_score(root: Path, seed: int = 0) -> dict:
    """An open_clip checkpoint (``open_clip_model.safetensors``) of a tiny registered config."""
    from rewards._compat import fix_torchvision

    fix_torchvision()
    import open_clip
    from safetensors.torch import save_file

    _register_open_clip_config(open_clip, TINY_CLIP_ARCH, root)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_ARCH, pretrained=None)
    d = root / "clip_score" / TINY_CLIP_ARCH / "tiny"
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return {"model": TINY_CLIP_ARCH, "pretrained": "tiny"}


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict, list[str]]:
    """CLIP's byte-level BPE vocab (49408 tokens) and merges, rebuilt from open_clip's bundled file."""
    import open_clip.tokenizer as tk

    with gzip.open(tk.default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(tk.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def write_clip_tokenizer(d: Path) -> None:
    from rewards._compat import fix_torchvision

    fix_torchvision()
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(d), model_max_length=77)
    assert len(tok) == 49408, len(tok)
    tok.save_pretrained(str(d))


def _tiny_hf_clip(seed: int, projection_dim: int = 16):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": 49407,
                     "bos_token_id": 49406, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=projection_dim, logit_scale_init_value=2.6592)
    return CLIPModel(cfg).eval()


def _write_image_processor(d: Path, size: int = 32) -> None:
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(str(d))


def build_pickscore(root: Path, seed: int = 0) -> dict:
    """``pickscore/model`` (CLIPModel.save_pretrained) and ``pickscore/processor`` (CLIP processor)."""
    from rewards._compat import fix_torchvision

    fix_torchvision()
    d = root / "pickscore"
    _tiny_hf_clip(seed).save_pretrained(str(d / "model"))
    write_clip_tokenizer(d / "processor")
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=CLIPTokenizer.from_pretrained(str(d / "processor"))).save_pretrained(str(d / "processor"))
    return {}


def build_aesthetic(root: Path, seed: int = 0) -> dict:
    """``aesthetic/sac+logos+ava1-l14-linearMSE.pth`` (MLP state dict) + a tiny CLIP directory."""
    from rewards._compat import fix_torchvision

    fix_torchvision()
    from rewards.aesthetic import AestheticMLP

    d = root / "aesthetic"
    clip_dir = d / "clip-vit-large-patch14"
    _tiny_hf_clip(seed).save_pretrained(str(clip_dir))
    _write_image_processor(clip_dir)
    torch.manual_seed(seed + 1)
    mlp = AestheticMLP(16)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.save(mlp.state_dict(), d / "sac+logos+ava1-l14-linearMSE.pth")
    return {}


# --- ImageReward ------------------------------------------------------------------------------------

TINY_VIT = {"img_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 1, "num_heads": 1}
TINY_MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert",
            "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
            "vocab_size": 0, "encoder_width": 64, "add_cross_attention": True}


def write_bert_tokenizer(d: Path) -> int:
    from rewards._compat import fix_torchvision

    fix_torchvision()
    from transformers import BertTokenizer

    d.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = specials + chars + ["##" + c for c in chars] + list(TINY_BERT_WORDS)
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer.from_pretrained(str(d))
    tok.save_pretrained(str(d))
    return len(words) + 2  # + [DEC] and [ENC], added by ImageReward's init_tokenizer


@contextmanager
def package_image_reward_classes(tokenizer_dir: Path, mlp_in: int):
    """Let the package's own ``ImageReward.ImageReward`` class build at tiny size: its ViT ('large'),
    hub tokenizer ('bert-base-uncased') and head width (768) are hard-coded, so those three factory
    names are swapped for the duration; everything else is the package's code."""
    from rewards._compat import import_image_reward

    ir = import_image_reward()
    saved = (ir.blip_pretrain.create_vit, ir.blip_pretrain.init_tokenizer, ir.image_reward.MLP)
    orig_mlp = saved[2]

    def tiny_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        v = TINY_VIT
        return ir.vit.VisionTransformer(img_size=v["img_size"], patch_size=v["patch_size"], embed_dim=v["embed_dim"],
                                        depth=v["depth"], num_heads=v["num_heads"],
                                        use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                                        drop_path_rate=drop_path_rate), v["embed_dim"]

    def local_tokenizer():
        from transformers import BertTokenizer

        tok = BertTokenizer.from_pretrained(str(tokenizer_dir))
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        return tok

    ir.blip_pretrain.create_vit = tiny_vit
    ir.blip_pretrain.init_tokenizer = local_tokenizer
    ir.image_reward.MLP = lambda _input_size: orig_mlp(mlp_in)
    try:
        yield ir
    finally:
        ir.blip_pretrain.create_vit, ir.blip_pretrain.init_tokenizer, ir.image_reward.MLP = saved


def build_image_reward(root: Path, seed: int = 0) -> dict:
    """``ImageReward.pt`` (state dict of the package's ImageReward model), ``med_config.json`` and a
    ``bert-base-uncased/`` tokenizer directory, all tiny."""
    d = root / "image_reward"
    n_tokens = write_bert_tokenizer(d / "bert-base-uncased")
    med = dict(TINY_MED, vocab_size=n_tokens)
    d.mkdir(parents=True, exist_ok=True)
    (d / "med_config.json").write_text(json.dumps(med))
    with package_image_reward_classes(d / "bert-base-uncased", med["hidden_size"]) as ir:
        torch.manual_seed(seed)
        model = ir.image_reward.ImageReward(med_config=str(d / "med_config.json"), device="cpu")
        for p in model.mlp.parameters():  # the package's init makes the head nearly constant
            torch.nn.init.normal_(p, std=0.2)
        torch.save(model.state_dict(), d / "ImageReward.pt")
    return {}


BUILDERS = {"hpsv2": build_hpsv2, "image_reward": build_image_reward, "clip_score": build_clip_score,
            "pickscore": build_pickscore, "aesthetic": build_aesthetic}


@lru_cache(maxsize=1)
def shared_weights() -> tuple[Path, dict]:
    """All tiny checkpoints, built once per test process (removed at exit): (root, options per reward)."""
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="treebench-reward-weights-"))
    atexit.register(shutil.rmtree, root, True)
    return root, {name: build(root) for name, build in BUILDERS.items()}
