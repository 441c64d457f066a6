"""The one place for compatibility fixes the reward packages need on the pinned stack.

1. ``fix_torchvision()``: torchvision 0.28.0 wheels carry CUDA-built ops; on a CPU torch build their
   load fails silently and ``import torchvision`` then dies with ``operator torchvision::nms does not
   exist`` (it registers fake kernels for ops whose schema was never defined). open_clip, timm and
   transformers' image utilities import torchvision, so every CLIP-based reward needs the fix. It
   defines the two schemas when they are missing and is a no-op where the compiled ops load (matching
   CUDA torch) or where the schemas were already defined (e.g. by ``bench``'s own import hook).
   Call it before torchvision is first imported.

2. ``import_image_reward()``: ImageReward 1.5 (``pip install --no-deps image-reward==1.5``) was
   written for transformers 4.2x. On transformers 5 its BLIP text encoder (``ImageReward.models.BLIP.
   med``) fails to import and to build:
     - ``transformers.modeling_utils`` no longer exports ``apply_chunking_to_forward``,
       ``prune_linear_layer`` (both moved to ``transformers.pytorch_utils``) and
       ``find_pruneable_heads_and_indices`` (removed): added back to ``modeling_utils`` if missing;
     - ``PreTrainedModel`` lost ``invert_attention_mask`` and ``get_head_mask``: added to the
       package's own ``BertPreTrainedModel`` only (with transformers 4.x semantics);
     - a model calling ``self.init_weights()`` without ``post_init()`` lacks attributes transformers 5
       sets in ``post_init``: the package's ``init_weights`` now runs ``post_init`` once.
   Also, ``import ImageReward`` runs its ``__init__``, which imports the training script (needs
   ``datasets``) and the CLIP/aesthetic baselines (need the ``clip`` module): none of that is needed
   to score, so the package and its ``models`` sub-package are registered as bare namespace modules
   and only the scoring modules (``ImageReward.ImageReward``, ``models.BLIP.*``) are imported.
   ImageReward pins timm 0.6.13; its ``vit.py`` imports only names timm 1.0.x still provides (through
   deprecated aliases), so it runs in-process on timm 1.0.31 — no worker subprocess is needed.

Every function is idempotent and changes nothing when the installed versions do not need the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings


def fix_torchvision() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas if missing (before torchvision is imported).
    The fix itself lives in ``bench._torchvision_fix`` (one copy for the whole project)."""
    from bench._torchvision_fix import define_missing_ops

    define_missing_ops()


# ---------------------------------------------------------------------------------------------------
# ImageReward on transformers 5


def _find_pruneable_heads_and_indices(heads, n_heads: int, head_size: int, already_pruned_heads):
    """transformers 4.x helper (removed in 5): heads still to prune and the kept row indices."""
    import torch

    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        # heads before this one that were already pruned shift its index down
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    mask = mask.view(-1).contiguous().eq(1)
    index = torch.arange(len(mask))[mask].long()
    return heads, index


def _invert_attention_mask(self, encoder_attention_mask):
    """transformers 4.x ``ModuleUtilsMixin.invert_attention_mask``: 1 = keep -> 0, 0 -> dtype min."""
    import torch

    if encoder_attention_mask.dim() == 3:
        ext = encoder_attention_mask[:, None, :, :]
    elif encoder_attention_mask.dim() == 2:
        ext = encoder_attention_mask[:, None, None, :]
    else:
        raise ValueError(f"attention mask must be 2-D or 3-D, got {tuple(encoder_attention_mask.shape)}")
    ext = ext.to(dtype=self.dtype)
    return (1.0 - ext) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    """transformers 4.x ``ModuleUtilsMixin.get_head_mask``: None -> a None per layer."""
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    head_mask = head_mask.to(dtype=self.dtype)
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask


def _init_weights_via_post_init(self) -> None:
    from transformers.modeling_utils import PreTrainedModel

    if not hasattr(self, "all_tied_weights_keys"):
        PreTrainedModel.post_init(self)  # calls init_weights again, now with post_init's attributes set
    else:
        PreTrainedModel.init_weights(self)


def _bare_package(name: str) -> None:
    """Register package ``name`` without running its ``__init__`` (submodules import normally)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError(f"package {name!r} is not installed", name=name.partition(".")[0])
    mod = types.ModuleType(name)
    mod.__path__ = list(spec.submodule_search_locations)
    mod.__spec__ = spec
    mod.__package__ = name
    sys.modules[name] = mod


def import_image_reward() -> types.SimpleNamespace:
    """Import ImageReward 1.5's scoring modules on the pinned stack (see the module docstring).

    Returns a namespace with ``med`` (BLIP's BERT with cross-attention), ``vit`` (BLIP's ViT),
    ``blip`` (``ImageReward.models.BLIP.blip``), ``blip_pretrain`` and ``image_reward`` (the module
    holding the ``ImageReward`` and ``MLP`` classes).
    """
    fix_torchvision()
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        mu.find_pruneable_heads_and_indices = getattr(pu, "find_pruneable_heads_and_indices",
                                                      _find_pruneable_heads_and_indices)
    _bare_package("ImageReward")
    _bare_package("ImageReward.models")
    _bare_package("ImageReward.models.BLIP")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecated-alias FutureWarnings
        med = importlib.import_module("ImageReward.models.BLIP.med")
        vit = importlib.import_module("ImageReward.models.BLIP.vit")
        blip = importlib.import_module("ImageReward.models.BLIP.blip")
        blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
        image_reward = importlib.import_module("ImageReward.ImageReward")
    base = med.BertPreTrainedModel
    if not getattr(base, "_treebench_patched", False):
        from transformers.modeling_utils import PreTrainedModel

        if not hasattr(PreTrainedModel, "invert_attention_mask"):
            base.invert_attention_mask = _invert_attention_mask
        if not hasattr(PreTrainedModel, "get_head_mask"):
            base.get_head_mask = _get_head_mask
        import transformers

        if int(transformers.__version__.split(".")[0]) >= 5:
            base.init_weights = _init_weights_via_post_init
        base._treebench_patched = True
    return types.SimpleNamespace(med=med, vit=vit, blip=blip, blip_pretrain=blip_pretrain,
                                 image_reward=image_reward)
