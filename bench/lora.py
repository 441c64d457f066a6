"""Export trained weights for use outside treebench: ``bench export-lora RUN_DIR --out DIR [--merge]``.

* LoRA runs (``model.lora_rank > 0``): ``DIR/pytorch_lora_weights.safetensors`` in the diffusers format
  (keys ``transformer.*`` / ``unet.*``, with the adapter's rank/alpha/targets as metadata), loadable with
  ``pipe.load_lora_weights(DIR)`` on the base pipeline. With ``--merge`` also
  ``DIR/merged/<transformer|unet>/``: the denoiser with the adapter fused into its weights, a drop-in
  replacement for the same folder of the base pipeline.
* Full fine-tuning runs (``model.lora_rank = 0``): ``DIR/<transformer|unet>/``, the trained denoiser.

The base model is rebuilt in float32 from the run's manifest (``model.path`` must still point at it)
and the trained weights come from the run's newest valid checkpoint (or ``--checkpoint N``); a run that kept
an EMA of its weights (``algo.ema``: Flow-GRPO, DiffusionNFT) exports the EMA, as the reference trainers'
checkpoints hold it (``--weights trained`` for the optimised weights).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.errors import UsageError
from bench.model.families import denoiser_kind
from bench.rundir.layout import MANIFEST
from bench.types import PREFIX as SNAPSHOT_PREFIX

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _pipeline_saver(policy: Any) -> tuple[Any, str]:
    """The diffusers pipeline class whose ``save_lora_weights`` writes this denoiser's family, and the
    keyword of its LoRA layers."""
    import diffusers

    return getattr(diffusers, policy.family_impl.lora_pipeline(policy.denoiser)), denoiser_kind(policy.denoiser)


def save_lora(policy: Any, out_dir: str | Path) -> Path:
    """Write the denoiser's LoRA adapter in the diffusers format (DIR/pytorch_lora_weights.safetensors)."""
    from peft.utils import get_peft_model_state_dict

    den = policy.denoiser
    if not getattr(den, "_hf_peft_config_loaded", False):
        raise UsageError("the model has no LoRA adapter (model.lora_rank = 0): export the full denoiser instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(den).items()}
    cls, key = _pipeline_saver(policy)
    meta = den.peft_config["default"].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    cls.save_lora_weights(out, **{f"{key}_lora_layers": layers, f"{key}_lora_adapter_metadata": meta},
                          weight_name=LORA_WEIGHT_NAME)
    return out / LORA_WEIGHT_NAME


def save_merged(policy: Any, out_dir: str | Path) -> Path:
    """Fuse the LoRA adapter into a copy of the base weights and save the plain denoiser
    (``DIR/<transformer|unet>/``). The policy's own denoiser is left unchanged."""
    import copy

    den = copy.deepcopy(policy.denoiser)
    if getattr(den, "_hf_peft_config_loaded", False):
        den.fuse_lora(lora_scale=1.0)
        den.unload_lora()
    out = Path(out_dir) / denoiser_kind(policy.denoiser)
    den.save_pretrained(out, safe_serialization=True)
    return out


EXPORT_WEIGHTS = ("auto", "trained", "ema")


def load_trained_policy(run_dir: str | Path, checkpoint: int | None = None, device: str = "cpu",
                        weights: str = "auto") -> Any:
    """Rebuild a run's policy (base model + adapter) and load its weights from a checkpoint: ``weights``
    "trained" (the optimised ones), "ema" (the EMA snapshot "eval_ema" an algorithm keeps with ``algo.ema``, what
    Flow-GRPO's and DiffusionNFT's ``save_ckpt`` write) or "auto" (the EMA when the checkpoint holds one)."""
    from bench.model.models import build_policy
    from bench.rundir import checkpoint as ckpt_mod
    from bench.spec import ModelSpec

    run_dir = Path(run_dir)
    man = run_dir / MANIFEST
    if not man.is_file():
        raise UsageError(f"{run_dir} is not a run directory (no manifest.json)")
    cfg = json.loads(man.read_text())["config"]
    if checkpoint is None:
        ck = ckpt_mod.load_latest(run_dir)
        if ck is None:
            raise UsageError(f"{run_dir} has no checkpoint to export (run.checkpoint_every > 0 writes them)")
    else:
        path = ckpt_mod.step_dir(run_dir, int(checkpoint))
        if not path.is_dir():
            have = ", ".join(p.name for p in ckpt_mod.list_checkpoints(run_dir)) or "none"
            raise UsageError(f"no checkpoint {path}; available: {have}")
        ck = ckpt_mod.load(path)
    # the base model in float32 whatever the run's mixed precision: merges are exact, outputs comparable
    cfg["model"] = {**cfg["model"], "mixed_precision": "no", "compile": False, "gradient_checkpointing": False}
    policy = build_policy(ModelSpec.from_config(cfg), torch.device(device))
    params = {n: p for n, p in policy.denoiser.named_parameters() if p.requires_grad}
    if weights not in EXPORT_WEIGHTS:
        raise UsageError(f"--weights must be one of {', '.join(EXPORT_WEIGHTS)}, got {weights!r}")
    ema_prefix = f"{SNAPSHOT_PREFIX}eval_ema/"  # algorithms.common.EMA_SNAPSHOT (bench/ stays below algorithms/)
    has_ema = any(k.startswith(ema_prefix) for k in ck.policy)
    if weights == "ema" and not has_ema:
        raise UsageError(f"checkpoint {ck.path} holds no EMA weights (the run did not set algo.ema)")
    prefix = ema_prefix if weights == "ema" or (weights == "auto" and has_ema) else ""
    missing = sorted(n for n in params if prefix + n not in ck.policy)
    if missing:
        raise UsageError(f"checkpoint {ck.path} does not match the model rebuilt from {man} "
                         f"(missing {missing[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ck.policy[prefix + n].to(p.device, p.dtype))
    return policy


def export(run_dir: str | Path, out_dir: str | Path, checkpoint: int | None = None, merge: bool = False,
           device: str = "cpu", weights: str = "auto") -> list[Path]:
    policy = load_trained_policy(run_dir, checkpoint, device, weights)
    if not policy.is_lora:
        return [save_merged(policy, out_dir)]
    written = [save_lora(policy, out_dir)]
    if merge:
        written.append(save_merged(policy, Path(out_dir) / "merged"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench export-lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--checkpoint", type=int, default=None, help="iteration of the checkpoint (default: newest)")
    p.add_argument("--merge", action="store_true", help="also write the denoiser with the adapter fused in")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", choices=EXPORT_WEIGHTS, default="auto",
                   help="trained weights or the EMA (algo.ema); auto: the EMA when the run kept one")
    a = p.parse_args(argv)
    for path in export(a.run_dir, a.out, a.checkpoint, a.merge, a.device, a.weights):
        print(f"wrote {path}")
    return 0
