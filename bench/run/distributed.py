"""Multi-process training with ``accelerate`` (one process per device; docs/SCALE.md).

Launch any ``bench run`` under ``accelerate launch``; with ``model.distributed=auto`` (the default) the
runner then trains data-parallel:

* **Prompts are sharded, groups are not.** Every rank draws the same global prompt batch (seeded by
  iteration) and keeps a contiguous slice of ``P / world_size`` prompts, so each prompt's whole group
  (or tree) is sampled, rewarded and updated on one rank.
* **Advantages from gathered data.** Each rank gathers every rank's rollout structure (parent, level,
  prompt, tree, log-probs; no latents) and rewards, merges them into exactly the node order a single
  process would have produced for the global batch (level-major, prompt order), calls the algorithm's
  ``advantages`` on that global view (so cross-prompt statistics such as DDPO's batch fallback and any
  algorithm state are identical on every rank and equal to a single process's), then keeps its own
  nodes' advantages for its local update.
* **Gradients** are averaged by DDP (``accelerator.prepare`` wraps the denoiser; forward passes with
  gradients go through the wrapper, no-grad rollouts call the bare module). Each rank's loss is the
  mean over its own edges; with equal shards the DDP average is the global mean.
* **Budgets count globally**: samples and NFE are summed over ranks, seconds are the slowest rank's;
  every rank therefore takes the same stop decision. A non-finite batch on any rank skips the update on
  all ranks.
* **Only rank 0 writes** the run directory (manifest, logs, evaluations, checkpoints); other ranks get a
  ``NullLog``. Evaluation runs on rank 0 only.

With ``model.distributed=fsdp`` (or ``accelerate launch --use_fsdp``) the denoiser is sharded instead of
replicated (FSDP2, ``bench/model/fsdp.py``): for full fine-tuning of models that do not fit one device. The
prompts, advantages and budgets work as above; every rank then also runs the evaluation's forwards.

CPU test recipe (STACK.md): ``accelerate launch --multi_gpu --num_processes 2 --num_machines 1
--mixed_precision no --dynamo_backend no SCRIPT`` with ``Accelerator(cpu=True)`` (``--cpu`` alone runs a
single process).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.engine.seeding import derive_seed
from bench.errors import UsageError
from bench.types import Advantages, PromptBatch, RewardOutput, Rollout

#: launcher prefix for ``accelerate launch`` from this venv: the launcher process gets the torchvision
#: import fix (bench/_torchvision_fix.py) even where the .pth hook of scripts/install.sh is absent
_LAUNCHER = ("import bench._torchvision_fix as f; f.install(); import sys; "
             "from accelerate.commands.accelerate_cli import main; sys.argv[0] = 'accelerate'; main()")
ACCELERATE_CLI = ("-c", _LAUNCHER)


def launch_command(script: Sequence[str], num_processes: int = 2, cpu: bool = True) -> list[str]:
    """argv of ``accelerate launch`` running ``script`` (a list: path + arguments) on
    ``num_processes`` local processes (the real multi-process CPU recipe when ``cpu``)."""
    cmd = [sys.executable, *ACCELERATE_CLI, "launch", "--num_processes", str(num_processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        # with Accelerator(cpu=True) in the script: gloo on CPU; a free port, so that several launches on
        # one machine (concurrent jobs, or one right after another) never meet on accelerate's default 29500
        cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
    elif cpu:
        cmd.append("--cpu")
    return [*cmd, *script]


_TEARDOWN_REGISTERED = False


def destroy_process_group() -> None:
    """Destroy the default process group if one is initialised (a no-op otherwise)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def destroy_at_exit() -> None:
    """Destroy the process group when the interpreter exits, while it is still fully alive (``atexit`` runs
    after the main thread returned and before finalisation). Left to interpreter shutdown, a gloo group's
    worker threads may still hold work objects whose tensors need the GIL while the interpreter is torn
    down: the process aborts with "terminate called without an active exception" (pytorch/pytorch issue
    #190489; the teardown order explained in pytorch/pytorch PR #179291). Registered once per process."""
    global _TEARDOWN_REGISTERED
    if not _TEARDOWN_REGISTERED:
        import atexit

        atexit.register(destroy_process_group)
        _TEARDOWN_REGISTERED = True


def free_port() -> int:
    """A TCP port that is free on this machine now (bound to port 0 and released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launched_world_size() -> int:
    """Number of processes of the launch this process belongs to (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---- the process group view ------------------------------------------------------------------------
class NullLog:
    """Stands in for ``RunLog`` on ranks other than 0: every method does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@dataclass(frozen=True)
class GlobalView:
    """The iteration's data as one process would have it: the merged rollout (no latents, no images),
    rewards of every leaf, and where this rank's nodes and leaves sit in it."""

    rollout: Rollout
    rewards: RewardOutput
    local_nodes: Tensor   # [N_local] long: global node id of each local node
    local_leaves: Tensor  # [L_local] long: global leaf index of each local leaf


class Dist:
    """Data-parallel helpers for the runner. ``Dist.single()`` is the one-process no-op."""

    def __init__(self, accelerator: Any = None, fsdp: bool = False):
        self.accelerator = accelerator
        #: the denoiser is sharded (bench/model/fsdp.py): every rank takes part in every forward pass
        self.fsdp = bool(fsdp) and accelerator is not None
        self.world_size = int(accelerator.num_processes) if accelerator is not None else 1
        self.rank = int(accelerator.process_index) if accelerator is not None else 0
        self.is_main = self.rank == 0

    @classmethod
    def single(cls) -> Dist:
        return cls(None)

    @classmethod
    def launch(cls, mode: str, device: torch.device) -> Dist:
        """One process unless launched with several and ``mode`` (``model.distributed``, the run spec's
        ``model.distributed``) is ``auto`` or ``fsdp``."""
        if mode == "fsdp" and launched_world_size() <= 1:
            raise UsageError("model.distributed=fsdp shards the denoiser over the processes of a launch; this is "
                             "one process: start it with accelerate launch --multi_gpu --num_processes N "
                             "(docs/SCALE.md), or drop the setting")
        if mode == "off" or launched_world_size() <= 1:
            return cls.single()
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        # broadcast_buffers=False: DDP must not issue collectives in the no-grad forward passes that only
        # some ranks make (rank-0 evaluation); the denoisers' buffers are constants
        acc = Accelerator(cpu=device.type == "cpu", mixed_precision="no",
                          kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        destroy_at_exit()
        fsdp = mode == "fsdp" or acc.distributed_type == DistributedType.FSDP
        return cls(acc, fsdp=fsdp)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launch."""
        if self.active and device.type == "cuda":
            return self.accelerator.device
        return device

    def rollout_seed(self, seed: int) -> int:
        """Noise seed of this rank's rollouts: rank 0 keeps the run seed (a one-process run is unchanged),
        other ranks get independent streams."""
        return seed if self.rank == 0 else derive_seed(seed, self.rank, "rank") & 0x7FFFFFFF

    # ---- set-up ----
    def prepare_policy(self, policy: Any) -> None:
        """Wrap the denoiser for gradient averaging (before the optimizer is built)."""
        if not self.active:
            return
        if not policy.trainable_parameters():
            raise UsageError("multi-process training needs trainable denoiser parameters")
        if self.fsdp:  # sharded in place: forwards with and without gradients call the same module
            from bench.model.fsdp import shard_denoiser

            shard_denoiser(policy.denoiser)
            policy.train_module = None
            policy.pin_trainable_parameters()
            return
        import warnings

        with warnings.catch_warnings():  # accelerate forwards broadcast_buffers to DDP, which calls it deprecated
            warnings.simplefilter("ignore", FutureWarning)
            policy.train_module = self.accelerator.prepare_model(policy.denoiser)

    # ---- per iteration ----
    def shard(self, batch: PromptBatch) -> PromptBatch:
        """This rank's contiguous slice of the global prompt batch."""
        if not self.active:
            return batch
        P, W = len(batch), self.world_size
        if P % W:
            raise UsageError(f"train.prompts_per_iteration={P} must be a multiple of the number of processes "
                             f"({W}) so that every rank samples whole prompt groups")
        n = P // W
        s = slice(self.rank * n, (self.rank + 1) * n)
        return PromptBatch(batch.prompts[s], batch.metadata[s], batch.prompt_ids[s])

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def global_view(self, rollout: Rollout, rewards: RewardOutput) -> GlobalView:
        parts = self.gather((_structure(rollout), _rewards_cpu(rewards)))
        merged, maps = merge_rollouts([p[0] for p in parts], rollout)
        rew = merge_rewards([p[1] for p in parts])
        leaf_off = sum(int(p[0]["leaves"].numel()) for p in parts[:self.rank])
        local_leaves = torch.arange(leaf_off, leaf_off + rollout.num_leaves)
        return GlobalView(merged, rew, maps[self.rank], local_leaves)

    def advantages(self, algo: Any, global_batch: PromptBatch, batch: PromptBatch, rollout: Rollout,
                   rewards: RewardOutput) -> tuple[Advantages, GlobalView | None]:
        """The algorithm's advantages computed on every rank's data, restricted to this rank's nodes."""
        if not self.active:
            return algo.advantages(batch, rollout, rewards), None
        view = self.global_view(rollout, rewards)
        adv = algo.advantages(global_batch, view.rollout, view.rewards)
        return localize(adv, view), view

    def any_flag(self, flag: str | None) -> str | None:
        """The first rank's non-None flag, the same on every rank (e.g. "non-finite reward")."""
        if not self.active:
            return flag
        return next((f for f in self.gather(flag) if f is not None), None)

    def totals(self, samples: int, nfe_rollout: int, nfe_update: int, seconds: dict[str, float], edges: int = 0
               ) -> tuple[int, int, int, dict[str, float], int]:
        """Global iteration totals: samples, NFE and trained edge terms summed, phase seconds of the slowest
        rank."""
        if not self.active:
            return samples, nfe_rollout, nfe_update, seconds, edges
        parts = self.gather((samples, nfe_rollout, nfe_update, seconds, edges))
        secs = {k: max(p[3].get(k, 0.0) for p in parts) for k in set().union(*(p[3] for p in parts))}
        return (sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts), secs,
                sum(p[4] for p in parts))

    def barrier(self) -> None:
        if self.active:
            self.accelerator.wait_for_everyone()


# ---- merging per-rank rollouts into the single-process order -----------------------------------------
_STRUCT = ("parent", "level", "prompt", "tree", "logp_old", "trainable", "leaves")


def _structure(r: Rollout) -> dict[str, Any]:
    d = {k: getattr(r, k).detach().cpu() for k in _STRUCT}
    d["num_prompts"] = int(r.prompt.max()) + 1 if r.num_nodes else 0
    d["num_roots"] = int((r.parent < 0).sum())
    return d


def _rewards_cpu(r: RewardOutput) -> RewardOutput:
    return RewardOutput(r.scores.detach().float().cpu(), {k: v.detach().float().cpu() for k, v in r.components.items()},
                        dict(r.weights))


def merge_rewards(parts: Sequence[RewardOutput]) -> RewardOutput:
    keys = parts[0].components.keys()
    return RewardOutput(torch.cat([p.scores for p in parts]),
                        {k: torch.cat([p.components[k] for p in parts]) for k in keys}, dict(parts[0].weights))


def merge_rollouts(parts: Sequence[dict[str, Any]], like: Rollout) -> tuple[Rollout, list[Tensor]]:
    """Merge per-rank rollout structures (rank order = prompt order) into the rollout one process would
    have produced for all prompts: nodes level-major, within a level rank by rank (= prompt order), so
    node ids, leaves and trees coincide with a single-process run. Returns the merged rollout (no
    latents, empty images) and, per rank, the global id of each of its nodes."""
    counts = [int(p["parent"].numel()) for p in parts]
    W = len(parts)
    maxn = max(counts) + 1
    level = torch.cat([p["level"] for p in parts])
    rank = torch.cat([torch.full((c,), r, dtype=torch.long) for r, c in enumerate(counts)])
    local = torch.cat([torch.arange(c) for c in counts])
    order = torch.argsort(level * (W * maxn) + rank * maxn + local)   # global position -> flat index
    glob = torch.empty_like(order)
    glob[order] = torch.arange(order.numel())                          # flat index -> global id
    starts = [sum(counts[:r]) for r in range(W)]
    maps = [glob[s:s + c] for s, c in zip(starts, counts)]
    prompt_off = [sum(p["num_prompts"] for p in parts[:r]) for r in range(W)]
    tree_off = [sum(p["num_roots"] for p in parts[:r]) for r in range(W)]

    def cat(key: str, shift: Any = None) -> Tensor:
        vals = []
        for r, p in enumerate(parts):
            v = p[key]
            vals.append(shift(r, v) if shift else v)
        return torch.cat(vals)[order]

    parent = cat("parent", lambda r, v: torch.where(v >= 0, maps[r][v.clamp_min(0)], v))
    merged = Rollout(
        latents=None, parent=parent, level=level[order],
        prompt=cat("prompt", lambda r, v: v + prompt_off[r]), tree=cat("tree", lambda r, v: v + tree_off[r]),
        logp_old=cat("logp_old"), trainable=cat("trainable"),
        leaves=torch.cat([maps[r][p["leaves"]] for r, p in enumerate(parts)]),
        images=torch.empty(sum(int(p["leaves"].numel()) for p in parts), 0), sigmas=like.sigmas,
        timesteps=like.timesteps, nfe=0, plan=like.plan, iteration=like.iteration, conditioning=None)
    return merged, maps


def split_rollout(rollout: Rollout, rewards: RewardOutput, world_size: int, rank: int
                  ) -> tuple[Rollout, RewardOutput]:
    """The part of a one-process rollout that ``rank`` would own under ``shard`` (its contiguous slice
    of prompts), renumbered locally: the inverse of ``merge_rollouts`` (tests, diagnostics)."""
    P = int(rollout.prompt.max()) + 1
    if P % world_size:
        raise ValueError(f"{P} prompts cannot be split evenly over {world_size} ranks")
    n = P // world_size
    lo, hi = rank * n, (rank + 1) * n
    keep = (rollout.prompt >= lo) & (rollout.prompt < hi)
    ids = torch.nonzero(keep).flatten()
    new_id = torch.full((rollout.num_nodes,), -1, dtype=torch.long)
    new_id[ids] = torch.arange(ids.numel())
    par = rollout.parent[ids]
    roots = torch.nonzero(rollout.parent < 0).flatten()
    tree_lo = int((rollout.prompt[roots] < lo).sum())
    leaf_mask = keep[rollout.leaves]
    cond = rollout.conditioning.take(torch.arange(lo, hi)) if rollout.conditioning is not None else None
    local = Rollout(
        latents=rollout.latents[ids] if rollout.latents is not None else None,
        parent=torch.where(par >= 0, new_id[par.clamp_min(0)], par), level=rollout.level[ids],
        prompt=rollout.prompt[ids] - lo, tree=rollout.tree[ids] - tree_lo, logp_old=rollout.logp_old[ids],
        trainable=rollout.trainable[ids], leaves=new_id[rollout.leaves[leaf_mask]],
        images=rollout.images[leaf_mask], sigmas=rollout.sigmas, timesteps=rollout.timesteps, nfe=rollout.nfe,
        plan=rollout.plan, iteration=rollout.iteration, conditioning=cond,
        means=rollout.means[ids] if rollout.means is not None else None)
    rew = RewardOutput(rewards.scores[leaf_mask], {k: v[leaf_mask] for k, v in rewards.components.items()},
                       dict(rewards.weights))
    return local, rew


def localize(adv: Advantages, view: GlobalView) -> Advantages:
    """Advantages of the global view restricted to this rank's nodes and leaves."""
    return Advantages(edge=adv.edge[view.local_nodes], leaf=adv.leaf[view.local_leaves], metrics=adv.metrics)
