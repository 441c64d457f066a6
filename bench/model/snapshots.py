"""Named snapshots of the policy's trainable weights, for algorithms that sample or evaluate with
weights other than the ones they train.

DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) samples its rollouts with an "old" policy that trails
the trained one by an exponential moving average, and evaluates that old policy again inside its loss
(``scripts/train_nft_sd3.py`` keeps it as a second LoRA adapter, ``set_adapter("old")``). treebench keeps
such weights here, beside the engine that calls the denoiser, so that any algorithm can name them:

* an algorithm declares the snapshots it needs in its class attribute ``snapshots`` (e.g. ``("old",)``);
  the runner creates each one as a copy of the initial trainable weights, checkpoints them with the
  policy and restores them on resume;
* a ``RolloutPlan`` with ``weights="old"`` is sampled with the snapshot, ``RolloutEngine.predict(...,
  weights="old")`` evaluates it inside an update;
* ``blend(name, decay)`` moves a snapshot towards the trained weights: s <- decay s + (1 - decay) theta.

Using a snapshot swaps the parameters' storage (``p.data``) for the duration of a no-grad call: no copy
of the weights is made, and the parameters themselves (optimizer state, gradient hooks) are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from bench.model.fsdp import copy_full_into, full, is_sharded, reshard
from bench.types import CURRENT, PREFIX, REFERENCE, check_name  # noqa: F401  (re-exported names of snapshots)


class WeightSnapshots:
    """Named copies of a policy's trainable parameters. ``params`` returns them by name
    (``Policy.named_trainable_parameters``); it is called when the first snapshot is made, so an engine
    whose algorithm keeps none never asks."""

    def __init__(self, params: Callable[[], Mapping[str, nn.Parameter]],
                 module: Callable[[], nn.Module | None] = lambda: None):
        self._params_fn = params
        self._module_fn = module  # the module owning the parameters (resharded around swaps under FSDP)
        self._params: dict[str, nn.Parameter] | None = None
        self._saved: dict[str, dict[str, Tensor]] = {}

    @property
    def params(self) -> dict[str, nn.Parameter]:
        if self._params is None:
            self._params = dict(self._params_fn())
        return self._params

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._saved)

    def add(self, name: str) -> None:
        """A new snapshot ``name`` equal to the current trainable weights (an existing one is kept)."""
        check_name(name)
        if name not in self._saved:
            self._saved[name] = {n: p.detach().clone() for n, p in self.params.items()}

    def declare(self, algorithm: object) -> None:
        """Create the snapshots an algorithm declares in its class attribute ``snapshots`` (none: nothing)."""
        for name in getattr(algorithm, "snapshots", ()):
            self.add(name)

    def _get(self, name: str) -> dict[str, Tensor]:
        if name not in self._saved:
            have = ", ".join(self._saved) or "none"
            raise KeyError(f"no weight snapshot {name!r} (have: {have}); an algorithm declares the snapshots it "
                           f"samples or evaluates with in its class attribute `snapshots`")
        return self._saved[name]

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Within the block the trainable parameters hold snapshot ``name`` (``"current"``: unchanged).
        Only for forward passes without gradients."""
        if name == CURRENT:
            yield
            return
        if torch.is_grad_enabled():
            raise RuntimeError(f"weight snapshot {name!r} is for forward passes without gradients")
        snap = self._get(name)
        if any(is_sharded(p) for p in self.params.values()):
            yield from self._use_sharded(snap)
            return
        original = {n: p.data for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                p.data = snap[n]
            yield
        finally:
            for n, p in self.params.items():
                p.data = original[n]

    def _use_sharded(self, snap: Mapping[str, Tensor]) -> Iterator[None]:
        """Sharded parameters (bench/model/fsdp.py): copy into the shards (FSDP gathers from its own buffers, so
        replacing ``.data`` would not reach the forward), resharded before and after."""
        module = self._module_fn()
        if module is not None:
            reshard(module)
        kept = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                p.copy_(snap[n])
            yield
        finally:
            if module is not None:
                reshard(module)
            for n, p in self.params.items():
                p.copy_(kept[n])

    @torch.no_grad()
    def blend(self, name: str, decay: float) -> None:
        """s <- decay * s + (1 - decay) * theta for every trainable tensor (decay 0: s = theta)."""
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"snapshot decay must be in [0, 1], got {decay!r}")
        snap = self._get(name)
        for n, p in self.params.items():
            snap[n].mul_(float(decay)).add_(p.detach().to(snap[n].dtype), alpha=1.0 - float(decay))

    def state_dict(self) -> dict[str, Tensor]:
        """Flat whole tensors for a checkpoint: ``snapshot/<name>/<parameter>`` (gathered from every rank's
        shard when the weights are sharded: then every rank calls it)."""
        return {f"{PREFIX}{s}/{n}": full(t) for s, ts in self._saved.items() for n, t in ts.items()}

    @torch.no_grad()
    def load_state_dict(self, tensors: Mapping[str, Tensor], where: str = "checkpoint") -> None:
        """Restore every declared snapshot from ``tensors`` (keys as ``state_dict``); a declared snapshot
        missing from them, or one of another shape, is an error naming ``where``."""
        found = {k for k in tensors if k.startswith(PREFIX)}
        for s, ts in self._saved.items():
            for n, t in ts.items():
                key = f"{PREFIX}{s}/{n}"
                if key not in tensors:
                    raise ValueError(f"{where} has no weight snapshot {s!r} (tensor {key}); it was written by a "
                                     f"run whose algorithm kept no such snapshot")
                src = tensors[key]
                if tuple(src.shape) != tuple(t.shape):  # a sharded tensor reports its whole shape
                    raise ValueError(f"{where}: snapshot tensor {key} has shape {tuple(src.shape)}, the model "
                                     f"has {tuple(t.shape)}")
                copy_full_into(t, src)
                found.discard(key)
        if found:
            raise ValueError(f"{where} holds weight snapshots this run does not declare: {sorted(found)[:3]}")
