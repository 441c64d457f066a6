"""Fully sharded training of the denoiser (FSDP2, ``torch.distributed.fsdp.fully_shard``) under an
``accelerate launch`` (``model.distributed=fsdp``, or ``accelerate launch --use_fsdp``); docs/SCALE.md.

What sharding changes, and how treebench keeps every path working:

* **Every forward on every rank.** A sharded forward all-gathers each block's parameters, so every rank
  must make the same denoiser calls in the same order: the rollouts and updates already do (each rank
  holds an equal shard of the prompts and the same plan); the held-out evaluation, which rank 0 alone
  runs under DDP, is run by every rank on the whole evaluation batch (same prompts, same noise); rank 0
  alone scores and writes it. The duplicated evaluation compute is the price of not gathering an
  unsharded copy of a model that does not fit one device.
* **Parameters are read and written sharded.** Before a checkpoint, a restore or a weight snapshot swap
  every unit is resharded (``reshard``: FSDP2 leaves the root unit gathered after a no-grad forward), and
  snapshots are swapped in by copying into the shards, not by replacing ``.data`` (FSDP2 gathers from
  its own shard buffers).
* **Checkpoints hold full tensors.** Every rank gathers each trainable parameter, each weight snapshot
  and the optimizer state (``DTensor.full_tensor``, ``get_optimizer_state_dict(full_state_dict=True)``);
  rank 0 writes them in the ordinary format, so a sharded run's checkpoint can be resumed, exported or
  read like any other. On resume every rank reads the checkpoint and keeps its own shard
  (``distribute_tensor``, ``set_optimizer_state_dict``).
* **Mixed precision as on one device.** Parameters stay float32 and are sharded as such; the forward
  runs under the same ``torch.autocast`` as a single-device run (no FSDP ``MixedPrecisionPolicy``), so
  the numerics match the single-device path's bf16 autocast semantics.
* **Sharding units**: every module of the outermost ``nn.ModuleList``s of the denoiser (the transformer blocks of
  SD3/FLUX, the UNet's down/up blocks), then the denoiser itself for the remaining parameters. Frozen
  base weights under LoRA are sharded with their blocks.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn


def is_sharded(t: Any) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def full(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly) sharded one; collective for a sharded tensor: every rank calls it."""
    return t.full_tensor() if is_sharded(t) else t


def scalar(t: Any) -> float:
    """A Python float of a (possibly sharded) 0-d tensor (collective when sharded)."""
    return float(full(t)) if isinstance(t, Tensor) else float(t)


@torch.no_grad()
def copy_full_into(dst: Tensor, src: Tensor) -> None:
    """dst <- src, where src is the whole tensor and dst possibly this rank's shard of it (every rank
    holds the same src)."""
    if is_sharded(dst):
        from torch.distributed.tensor import distribute_tensor

        dst.copy_(distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements))
    else:
        dst.copy_(src.to(dst.device, dst.dtype))


def shard_denoiser(denoiser: nn.Module) -> int:
    """Shard ``denoiser`` in place with FSDP2: every module of its outermost ``nn.ModuleList``s (blocks
    nested inside a block go with it), then the root. Returns the number of sharding units."""
    from torch.distributed.fsdp import fully_shard

    lists = [n for n, m in denoiser.named_modules() if isinstance(m, nn.ModuleList)]
    outer = [n for n in lists if not any(n != o and n.startswith(o + ".") for o in lists)]
    units = 0
    for name in outer:
        for block in denoiser.get_submodule(name):
            if any(True for _ in block.parameters()):
                fully_shard(block)
                units += 1
    fully_shard(denoiser)
    return units + 1


def reshard(module: nn.Module) -> None:
    """Return every sharded unit of ``module`` to its sharded state. FSDP2 keeps the root unit's
    parameters gathered after a forward without gradients (nothing triggers its reshard), and while they
    are gathered the module holds other parameter objects than the optimizer's: call this before reading
    or writing the parameters (checkpoints, weight snapshots)."""
    for m in module.modules():
        if callable(getattr(m, "reshard", None)) and hasattr(m, "unshard"):
            m.reshard()


def full_optimizer_state(module: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state with whole tensors, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(module: nn.Module, optimizer: Any, state: Mapping[str, Any]) -> None:
    """Load ``full_optimizer_state``'s output (every rank passes the same) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, optim_state_dict=dict(state),
                             options=StateDictOptions(full_state_dict=True))
