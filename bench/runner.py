"""The only training loop: plan -> rollout -> reward -> advantages -> update -> log, under a budget.

``run(cfg)`` alone reads the clock, checks the budget at iteration boundaries, records the stop
reason and writes the run directory (docs/RUNDIR.md). Evaluation is timed but outside the training
budget. Same config + seed on CPU gives an identical iterations.jsonl apart from timing fields.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from bench import checkpoint as ckpt_mod
from bench import config as config_mod
from bench.budget import Budget, Totals
from bench.distributed import Dist, NullLog
from bench.policy import Policy, load_policy, read_model_index, tiny_pipeline_dir, weights_hash
from bench.prompts import PromptSet, load_prompt_set
from bench.registry import WEIGHTED_REWARD, UsageError, algorithm_class, load_object, model_preset, reward_class
from bench.rollout import RolloutEngine
from bench.runlog import (RunLog, device_info, git_state, host_info, now_iso, package_versions,
                          reward_hacking_flag)
from bench.types import PromptBatch, RewardOutput, Rollout, RolloutPlan, SamplerSpec, TrainSpec

PHASES = ("rollout", "reward", "advantage", "update")


@dataclass
class RunSummary:
    out_dir: Path
    stop_reason: str
    iterations: int
    samples_total: int
    nfe_total: int
    seconds_total: float
    final_eval: dict[str, Any] | None = None
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)


class StopRun(Exception):
    """Raised by an ``on_iteration`` / ``on_eval`` callback to stop the run early (e.g. a pruned sweep
    trial); ``reason`` becomes the stop reason."""

    def __init__(self, reason: str = "stopped"):
        super().__init__(reason)
        self.reason = reason


class RunFailure(RuntimeError):
    """A run stopped by a fault with a clear cause (the CLI prints the message, exits 1, no traceback)."""


class RewardError(RunFailure):
    """The reward model raised; the message names the file holding the batch's prompts."""


class OutOfMemory(RunFailure):
    """The device ran out of memory; the message says which settings lower memory."""


class NonFiniteGrad(Exception):
    """Raised before an optimizer step whose gradients hold NaN/inf, so the step is never applied."""


class _Interrupted(Exception):
    """SIGINT/SIGTERM seen at a phase boundary before the update: the state is still consistent."""


def _is_missing_weights(e: BaseException) -> bool:
    """Rewards define their own ``MissingWeightsError(ValueError)`` (bench may not import rewards)."""
    return any(c.__name__ == "MissingWeightsError" for c in type(e).__mro__)


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
                                  and "cuda" in str(e).lower())


# ---- building blocks --------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"model.device={name!r} but CUDA is not available on this machine (use cpu or auto)")
    return dev


def model_dir(cfg: Mapping[str, Any]) -> Path:
    m = cfg["model"]
    if m.get("path"):
        from bench.policy import resolve_model_path  # (scale) a local dir or a hub id in the offline cache

        return resolve_model_path(m["path"])
    source = model_preset(m["name"]).source
    if source.startswith("package:"):
        return Path(__file__).resolve().parent / source.split(":", 1)[1]
    if source == "tiny-random":
        return tiny_pipeline_dir("flow")
    if source == "tiny-random-ddim":
        return tiny_pipeline_dir("epsilon")
    raise UsageError(f"model preset {m['name']!r} loads from a local directory: pass --model-path DIR "
                     f"(a diffusers pipeline directory you downloaded)")


def model_prediction(cfg: Mapping[str, Any]) -> str:
    """(scale) "flow" or "epsilon", read before the model loads (treebench, real and random pipelines)."""
    from bench.policy import index_prediction, random_preset_spec

    m = cfg["model"]
    source = model_preset(m["name"]).source
    if source.startswith("random:") and not m.get("path"):
        return index_prediction({"_class_name": random_preset_spec(source.split(":")[1])["pipeline"]})
    return index_prediction(read_model_index(model_dir(cfg)))


def build_policy(cfg: Mapping[str, Any], device: torch.device) -> Policy:
    # (scale) real and random-architecture presets, LoRA, precision options: bench.policy / docs/SCALE.md
    from bench.policy import build_random_policy, model_options

    m = cfg["model"]
    mp = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[m["mixed_precision"]]
    opts = model_options(m, device)
    source = model_preset(m["name"]).source
    if source.startswith("random:") and not m.get("path"):
        _, name, *flags = source.split(":")
        return build_random_policy(name, device=device, autocast_dtype=mp, options=opts, reduced="reduced" in flags)
    return load_policy(model_dir(cfg), device=device, autocast_dtype=mp, options=opts)


def build_reward(spec: str, device: torch.device, options: Mapping[str, Any], normalize: str = "none") -> Any:
    """A reward from a name or a weighted spec "a=1.0,b=0.5" (itself a reward)."""
    if "=" in spec or "," in spec:
        parse = load_object("rewards.combine:parse_reward_spec")
        try:
            parts = parse(spec)
        except ValueError as e:
            raise UsageError(str(e)) from None
        built = [(name, w, reward_class(name)(device=device, **dict(options.get(name, {})))) for name, w in parts]
        return load_object(WEIGHTED_REWARD)(built, normalize=normalize)
    return reward_class(spec)(device=device, **dict(options.get(spec, {})))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss / 1024.0


class PhaseTimer:
    """Times named phases with device synchronisation at the boundaries."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def out_path(cfg: Mapping[str, Any]) -> Path:
    out = cfg.get("out") or f"runs/{cfg['algo']['name']}_{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(out).expanduser()


def check_out_dir(cfg: Mapping[str, Any], resume: bool = False) -> Path:
    """Validate the run directory before anything is built or deleted."""
    out = out_path(cfg)
    if resume:
        if not (out / "manifest.json").is_file():
            raise UsageError(f"--resume {out}: not a run directory (no manifest.json); nothing to resume")
        if not os.access(out, os.W_OK):
            raise UsageError(f"cannot write to run directory {out}: permission denied")
        return out
    if out.exists() and not out.is_dir():
        raise UsageError(f"run directory {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not cfg["run"]["overwrite"]:
        if (out / "manifest.json").is_file():
            it_file = out / "iterations.jsonl"
            done = it_file.read_bytes().count(b"\n") if it_file.is_file() else 0
            cks = ckpt_mod.list_checkpoints(out)
            where = f"newest checkpoint {cks[0].name}" if cks else "no checkpoint"
            raise UsageError(f"run directory {out} already holds a run ({done} iterations logged, {where}); "
                             f"pass --resume {out} to continue it, --overwrite to replace it, or choose "
                             f"another --out")
        raise UsageError(f"run directory {out} already exists and is not empty; pass --overwrite to replace "
                         f"it or choose another --out")
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK):
        why = "is not a directory" if not anc.is_dir() else "is not writable"
        raise UsageError(f"cannot create run directory {out}: {anc} {why}; choose another --out")
    return out


def prepare_out_dir(cfg: Mapping[str, Any]) -> Path:
    """Check, then create (or with run.overwrite replace) the run directory."""
    out = check_out_dir(cfg)
    return create_out_dir(out, bool(cfg["run"]["overwrite"]))


def create_out_dir(out: Path, overwrite: bool) -> Path:
    if out.is_dir() and any(out.iterdir()) and overwrite:
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to run directory {out}: {e.strerror or e}") from None
    return out


def zero_spread_fraction(scores: torch.Tensor, leaf_prompts: torch.Tensor) -> float:
    groups = torch.unique(leaf_prompts)
    flat = sum(1 for g in groups if float(scores[leaf_prompts == g].float().std(unbiased=False)) == 0.0)
    return flat / max(1, len(groups))


def batch_arithmetic(plan: RolloutPlan, prompts: int, micro_batch: int, optimizer_steps: int) -> dict[str, Any]:
    """What one iteration costs and how it is split, derived from the first plan."""
    cfg = plan.cfg_factor()
    trees = prompts * plan.trees_per_prompt
    levels = plan.nodes_per_level()
    sde_parents = sum(n for n, m in zip(levels[:-1], plan.modes) if m == "sde")
    rows = max(1, micro_batch // cfg)
    return {
        "prompts": prompts, "trees_per_prompt": plan.trees_per_prompt, "leaves_per_tree": plan.leaves_per_tree,
        "images": trees * plan.leaves_per_tree, "rollout_nfe": trees * plan.evaluations_per_tree() * cfg,
        "rollout_calls_per_level": [math.ceil(trees * n / rows) for n in levels[:-1]],
        "micro_batch_rows": micro_batch, "evaluations_per_call": rows, "cfg_factor": cfg,
        "max_trainable_parents": trees * sde_parents, "optimizer_steps": optimizer_steps,
        "grad_accumulation_max": math.ceil(trees * sde_parents / max(1, optimizer_steps) / rows),
    }


def save_grid(images: torch.Tensor, path: Path, ncol: int = 8) -> None:
    from PIL import Image

    L, _, H, W = images.shape
    nrow = math.ceil(L / ncol)
    scale = max(1, 64 // max(H, W))
    grid = torch.ones(3, nrow * (H + 2), min(L, ncol) * (W + 2))
    for i in range(L):
        r, c = divmod(i, ncol)
        grid[:, r * (H + 2) + 1:r * (H + 2) + 1 + H, c * (W + 2) + 1:c * (W + 2) + 1 + W] = images[i]
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def _score(reward: Any, images: torch.Tensor, batch: PromptBatch, leaf_prompts: torch.Tensor) -> RewardOutput:
    idx = leaf_prompts.tolist()
    out = reward(images, [batch.prompts[i] for i in idx], [batch.metadata[i] for i in idx])
    return RewardOutput(out.scores.detach().float().cpu(), {k: v.detach().float().cpu()
                                                              for k, v in out.components.items()})


# ---- the run -----------------------------------------------------------------------------------------
class Run:
    """State of one training run (built by ``run``; split into stages so each stays short)."""

    def __init__(self, cfg: dict[str, Any], resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.seed = int(cfg["seed"])
        self.budget = Budget.parse(str(cfg["budget"]))
        self.device = resolve_device(cfg["model"]["device"])
        # (scale) one process, or data-parallel under `accelerate launch` (bench/distributed.py)
        self.dist = Dist.from_config(cfg, self.device)
        self.device = self.dist.device(self.device)
        algo_cls = algorithm_class(cfg["algo"]["name"])
        algo_cfg = config_mod.algorithm_config(cfg)
        self.train_prompts: PromptSet = load_prompt_set(cfg["data"]["train_prompts"])
        self.eval_prompts: PromptSet = load_prompt_set(cfg["data"]["eval_prompts"])
        # everything is validated before the run directory is created, replaced or resumed
        self.out = check_out_dir(cfg, resume) if self.dist.is_main else out_path(cfg)
        if resume:
            ckpt_mod.check_resume_config(self.out, ckpt_mod.saved_config(self.out), cfg)
        # the algorithm and the rewards are checked before the (possibly large) model is loaded
        prediction = model_prediction(cfg)
        s = cfg["sampler"]
        self.sampler = SamplerSpec(steps=int(s["steps"]), guidance=float(s["guidance"]),
                                   noise_level=float(s["noise_level"]), sde_type=s["sde"], shift=float(s["shift"]),
                                   prediction=prediction)
        t = cfg["train"]
        self.train = TrainSpec(micro_batch=int(t["micro_batch"]), optimizer_steps=int(t["optimizer_steps"]),
                               max_grad_norm=float(t["max_grad_norm"]))
        try:
            self.algo = algo_cls(algo_cfg, self.sampler, self.train, self.seed)
        except ValueError as e:
            raise UsageError(f"invalid settings for algorithm {cfg['algo']['name']!r}: {e}") from None
        r = cfg["reward"]
        self.reward = _build_reward_checked(r["name"], self.device, r["options"], r["normalize"])
        self.eval_rewards = {name: (self.reward if name == r["name"] else
                                    _build_reward_checked(name, self.device, r["options"]))
                             for name in cfg["eval"]["rewards"]}
        torch.manual_seed(self.seed)
        self.policy = build_policy(cfg, self.device)
        if self.policy.prediction != prediction:
            raise UsageError(f"{self.policy.path}: the model predicts {self.policy.prediction!r} but its "
                             f"model_index.json says {prediction!r}")
        self.dist.prepare_policy(self.policy)  # (scale) DDP wrapper for the update's forward passes
        self.engine = RolloutEngine(self.policy, max_micro_batch=self.train.micro_batch,
                                    seed=self.dist.rollout_seed(self.seed), shift=self.sampler.shift)
        params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=float(t["lr"]), betas=(float(t["beta1"]), float(t["beta2"])),
                                           eps=float(t["adam_eps"]), weight_decay=float(t["weight_decay"]))
        # NaN/inf gradients never reach the weights: the step is refused before it is applied
        self.optimizer.register_step_pre_hook(self._check_grads)
        self.first_plan = self.algo.plan(0)
        self.arith = batch_arithmetic(self.first_plan, int(t["prompts_per_iteration"]), self.train.micro_batch,
                                      self.train.optimizer_steps)
        if not resume and self.dist.is_main:
            create_out_dir(self.out, bool(cfg["run"]["overwrite"]))
        self.log = RunLog(self.out, tensorboard=bool(cfg["run"]["tensorboard"])) if self.dist.is_main else NullLog()
        self.totals = Totals()
        self.evals: list[dict[str, Any]] = []
        self.eval_batch = self.eval_prompts.head(int(cfg["eval"]["num_prompts"]))
        self.eval_cond = None
        self.stop_requested: str | None = None   # name of the signal asking for a clean stop
        self.in_update = False                   # inside advantages/update: state not checkpointable
        self.last_checkpoint: int | None = None
        self.checkpoint_seconds = 0.0
        self.wall_before = 0.0                   # wall seconds of earlier processes (resumed runs)
        self.resumed_from: str | None = None

    def manifest(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "created": now_iso(), "run_name": self.out.name, "config": cfg,
            "algorithm": {"name": cfg["algo"]["name"], "config": asdict(config_mod.algorithm_config(cfg))},
            "model": {"name": cfg["model"]["name"], "path": str(self.policy.path),
                      "weights_sha256": weights_hash(self.policy.path), "prediction": self.policy.prediction},
            "reward": {"spec": cfg["reward"]["name"], "name": getattr(self.reward, "name", cfg["reward"]["name"]),
                       "version": str(getattr(self.reward, "version", "unknown"))},
            "eval_rewards": [{"name": n, "version": str(getattr(r, "version", "unknown"))}
                             for n, r in self.eval_rewards.items()],
            "budget": self.budget.to_dict(), "seed": self.seed, "git": git_state(), "packages": package_versions(),
            "device": device_info(self.device), "host": host_info(), "batch": self.arith,
            "world_size": self.dist.world_size,  # (scale) processes training data-parallel
            "prompts": {"train": self.train_prompts.describe(), "eval": self.eval_prompts.describe()},
        }

    # ---- start / resume ----
    def start(self) -> list[dict[str, Any]]:
        """Write the manifest; when resuming, restore the newest valid checkpoint and cut the logs back
        to it. Returns the iteration records already in the run directory."""
        if not self.dist.is_main:  # (scale) other ranks only restore the state; rank 0 owns the files
            ck = ckpt_mod.load_latest(self.out) if self.resume else None
            if ck is not None:
                self.restore(ck)
            return []
        if not self.resume:
            self.log.write_manifest(self.manifest())
            return []
        man_path = self.out / "manifest.json"
        manifest = json.loads(man_path.read_text())
        self._check_same_inputs(manifest)
        ck = ckpt_mod.load_latest(self.out)
        if ck is None:
            ckpt_mod.warn(f"{self.out} has no checkpoint: the run restarts from iteration 0")
            kept = ckpt_mod.repair_logs(self.out, 0, [])
        else:
            self.restore(ck)
            kept = ckpt_mod.repair_logs(self.out, ck.iteration, self.evals)
            self.resumed_from = ck.path.name
        manifest.pop("schema_version", None)
        old_budget = manifest.get("config", {}).get("budget")
        manifest["resumes"] = [*manifest.get("resumes", []), {
            "time": now_iso(), "checkpoint": self.resumed_from, "iteration": self.totals.iterations,
            "budget": {"before": old_budget, "after": self.cfg["budget"]}, "git": git_state(),
            "micro_batch": self.cfg["train"]["micro_batch"], "host": host_info()}]
        manifest["config"] = self.cfg
        manifest["budget"] = self.budget.to_dict()
        manifest["batch"] = self.arith
        self.log.write_manifest(manifest)
        t = self.totals
        print(f"resuming {self.out} from {self.resumed_from or 'the start'}: {t.iterations} iterations, "
              f"{t.samples} samples, {t.nfe} NFE, {t.seconds:.1f} s training already done", flush=True)
        return kept

    def _check_same_inputs(self, manifest: Mapping[str, Any]) -> None:
        """A resumed run must see the same prompts, model weights and reward versions."""
        changed = []
        for split, ps in (("train", self.train_prompts), ("eval", self.eval_prompts)):
            old = manifest.get("prompts", {}).get(split, {}).get("sha256")
            if old and old != ps.sha256:
                changed.append(f"the {split} prompt set {ps.name!r} (sha256 {old[:12]}... -> {ps.sha256[:12]}...)")
        old_w = manifest.get("model", {}).get("weights_sha256")
        if old_w and old_w != weights_hash(self.policy.path):
            changed.append(f"the model weights in {self.policy.path}")
        old_r = {e.get("name"): e.get("version") for e in manifest.get("eval_rewards", [])}
        old_r[manifest.get("reward", {}).get("spec")] = manifest.get("reward", {}).get("version")
        for name, rw in {self.cfg["reward"]["name"]: self.reward, **self.eval_rewards}.items():
            v = str(getattr(rw, "version", "unknown"))
            if old_r.get(name) not in (None, v):
                changed.append(f"the version of reward {name!r} ({old_r[name]} -> {v})")
        if changed:
            raise UsageError(f"cannot resume {self.out}: {'; '.join(changed)} changed since the run started, so "
                             f"the resumed iterations would not continue the same run. Restore them or start "
                             f"a new run.")
        old_git, git = manifest.get("git", {}), git_state()
        if old_git.get("commit") and git.get("commit") and old_git["commit"] != git["commit"]:
            ckpt_mod.warn(f"the code changed since the run started (git {old_git['commit'][:10]} -> "
                          f"{git['commit'][:10]}); results may differ from an uninterrupted run")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.policy.denoiser.named_parameters() if p.requires_grad}

    def checkpoint(self) -> Path:
        """Save the state after ``totals.iterations`` completed iterations (outside the budget)."""
        if not self.dist.is_main:  # (scale) the state is identical on every rank; rank 0 writes it
            self.last_checkpoint = self.totals.iterations
            return self.out
        t0 = time.perf_counter()
        state = {"totals": asdict(self.totals), "evals": self.evals, "algorithm": self.algo.state_dict(),
                 "engine": {"nfe_rollout": self.engine.nfe_rollout, "nfe_update": self.engine.nfe_update,
                            "nfe_eval": self.engine.nfe_eval},
                 "wall_seconds": self.wall_before + time.perf_counter() - self._wall0,
                 "checkpoint_seconds": self.checkpoint_seconds}
        path = ckpt_mod.save(self.out, self.totals.iterations, policy=self.trainable_state(),
                             optimizer=self.optimizer.state_dict(), state=state,
                             keep=int(self.cfg["run"]["keep_checkpoints"]))
        self.last_checkpoint = self.totals.iterations
        self.checkpoint_seconds += time.perf_counter() - t0
        return path

    def restore(self, ck: ckpt_mod.Checkpoint) -> None:
        params = self.trainable_state()
        missing, extra = sorted(set(params) - set(ck.policy)), sorted(set(ck.policy) - set(params))
        if missing or extra:
            raise UsageError(f"checkpoint {ck.path} does not match the model's trainable parameters "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, p in params.items():
                if tuple(ck.policy[n].shape) != tuple(p.shape):
                    raise UsageError(f"checkpoint {ck.path}: parameter {n} has shape {tuple(ck.policy[n].shape)}, "
                                     f"the model has {tuple(p.shape)}")
                p.copy_(ck.policy[n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(ck.optimizer)
        self.algo.load_state_dict(ck.state.get("algorithm", {}))
        self.totals = Totals(**ck.state["totals"])
        self.evals = [dict(e) for e in ck.state.get("evals", [])]
        eng = ck.state.get("engine", {})
        self.engine.nfe_rollout = int(eng.get("nfe_rollout", 0))
        self.engine.nfe_update = int(eng.get("nfe_update", 0))
        self.engine.nfe_eval = int(eng.get("nfe_eval", 0))
        self.wall_before = float(ck.state.get("wall_seconds", 0.0))
        self.checkpoint_seconds = float(ck.state.get("checkpoint_seconds", 0.0))
        self.last_checkpoint = ck.iteration
        ckpt_mod.set_rng_state(ck.rng_tensors, ck.rng_json)

    # ---- faults ----
    def _check_grads(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            raise NonFiniteGrad("non-finite gradient")

    def _check_stop(self) -> None:
        if self.stop_requested is not None:
            raise _Interrupted(self.stop_requested)

    def _score(self, reward: Any, images: torch.Tensor, batch: PromptBatch, leaf_prompts: torch.Tensor,
               iteration: int, stage: str) -> RewardOutput:
        try:
            return _score(reward, images, batch, leaf_prompts)
        except UsageError:
            raise
        except Exception as e:  # every reward failure is reported the same way
            if _is_missing_weights(e):
                raise UsageError(str(e)) from None
            if _is_oom(e):
                raise
            path = self._save_failed_batch(reward, batch, leaf_prompts, images, iteration, stage, e)
            name = getattr(reward, "name", type(reward).__name__)
            raise RewardError(f"reward {name!r} failed while scoring the {stage} batch of iteration {iteration}: "
                              f"{type(e).__name__}: {e}\n  the batch's prompts and the traceback are saved in "
                              f"{path}") from e

    def _save_failed_batch(self, reward: Any, batch: PromptBatch, leaf_prompts: torch.Tensor, images: torch.Tensor,
                           iteration: int, stage: str, e: BaseException) -> Path:
        d = self.out / "debug"
        d.mkdir(exist_ok=True)
        path = d / f"failed_{'batch' if stage == 'train' else stage}_{iteration:06d}.json"
        idx = leaf_prompts.tolist()
        obj = {"iteration": iteration, "stage": stage, "reward": getattr(reward, "name", type(reward).__name__),
               "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
               "prompts": list(batch.prompts), "prompt_ids": list(batch.prompt_ids),
               "metadata": [dict(m) for m in batch.metadata], "image_prompt_index": idx,
               "images": {"shape": list(images.shape), "dtype": str(images.dtype),
                          "finite": bool(torch.isfinite(images).all())}}
        path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        return path

    # ---- one iteration ----
    def iteration(self, i: int) -> dict[str, Any]:
        timer = PhaseTimer(self.device)
        global_batch = self.train_prompts.sample(int(self.cfg["train"]["prompts_per_iteration"]), self.seed, i)
        batch = self.dist.shard(global_batch)  # (scale) this rank's prompts (all of them in one process)
        nfe_r0, nfe_u0 = self.engine.nfe_rollout, self.engine.nfe_update
        self._check_stop()
        with timer("rollout"):
            plan = self.algo.plan(i)
            rollout: Rollout = self.engine.run(plan, batch, i)
        self._check_stop()
        with timer("reward"):
            rewards = self._score(self.reward, rollout.images, batch, rollout.leaf_prompts(), i, "train")
        self._check_stop()
        nonfinite = None
        logp = rollout.logp_old[rollout.trainable]
        if not bool(torch.isfinite(rewards.scores).all()):
            nonfinite = "reward"
        elif logp.numel() and not bool(torch.isfinite(logp).all()):
            nonfinite = "logp"
        nonfinite = self.dist.any_flag(nonfinite)  # (scale) one rank's bad batch is skipped by all
        adv, stats, view = None, None, None
        if nonfinite is None:
            self.in_update = True  # from here the algorithm's state changes: not checkpointable until done
            with timer("advantage"):
                # (scale) computed on every rank's data (the single-process result), local part kept
                adv, view = self.dist.advantages(self.algo, global_batch, batch, rollout, rewards)
            with timer("update"):
                self.policy.train(True)
                try:
                    stats = self.algo.update(self.policy, self.engine, self.optimizer, batch, rollout, adv)
                except NonFiniteGrad:
                    nonfinite = "grad"
                    self.optimizer.zero_grad(set_to_none=True)
                finally:
                    self.policy.train(False)
        nfe_r = self.engine.nfe_rollout - nfe_r0
        nfe_u = self.engine.nfe_update - nfe_u0
        # (scale) budgets count globally: samples and NFE of all ranks, seconds of the slowest
        n_samples, nfe_r, nfe_u, timer.seconds = self.dist.totals(rollout.num_leaves, nfe_r, nfe_u, timer.seconds)
        if view is not None:
            rollout, rewards = view.rollout, view.rewards
        secs = sum(timer.seconds.get(p, 0.0) for p in PHASES)
        self.totals = Totals(seconds=self.totals.seconds + secs, samples=self.totals.samples + n_samples,
                             nfe=self.totals.nfe + nfe_r + nfe_u, iterations=i + 1)
        sc = rewards.scores
        nan = float("nan")
        rec: dict[str, Any] = {
            "iteration": i, "samples": n_samples, "samples_total": self.totals.samples,
            "nfe_rollout": nfe_r, "nfe_update": nfe_u, "nfe_total": self.totals.nfe,
            "seconds_total": self.totals.seconds,
            **{f"t_{p}_s": timer.seconds.get(p, 0.0) for p in PHASES}, "t_iteration_s": secs,
            "reward_mean": float(sc.mean()), "reward_std": float(sc.std(unbiased=False)),
            "reward_min": float(sc.min()), "reward_max": float(sc.max()),
            **{f"reward/{k}": float(v.float().mean()) for k, v in rewards.components.items()},
            "loss": stats.loss if stats else nan, "approx_kl": stats.approx_kl if stats else nan,
            "clip_frac": stats.clip_frac if stats else nan, "grad_norm": stats.grad_norm if stats else nan,
            "first_ratio": stats.first_ratio if stats else nan, "kl": stats.kl if stats else nan,
            "lr": self.optimizer.param_groups[0]["lr"], "peak_mem_mb": peak_mem_mb(self.device),
            "edges": stats.edges if stats else 0, "optimizer_steps": stats.optimizer_steps if stats else 0,
            "micro_batches": stats.micro_batches if stats else 0,
            "zero_spread_frac": zero_spread_fraction(sc, rollout.leaf_prompts()),
            **dict(plan.info), **(dict(adv.metrics) if adv else {}), **(dict(stats.metrics) if stats else {}),
        }
        if nonfinite is None and not _check_finite(rec):
            nonfinite = "loss"
        if nonfinite is not None:
            rec["nonfinite"] = nonfinite
        self.in_update = False
        return rec

    # ---- evaluation ----
    def evaluate(self, iteration: int) -> dict[str, Any]:
        if not self.dist.is_main:  # (scale) rank 0 evaluates and logs
            return {"iteration": iteration}
        t0 = time.perf_counter()
        T = self.sampler.steps
        e = self.cfg["eval"]
        # several images per prompt, each from its own noise (shared_noise=False), all drawn from
        # eval.seed: the same prompts and noise for every run whatever its training seed
        plan = RolloutPlan(num_steps=T, modes=("ode",) * T, branch=(1,) * T,
                           trees_per_prompt=int(e["images_per_prompt"]), shared_noise=False,
                           guidance=self.sampler.guidance, keep_latents=False)
        if self.eval_cond is None:
            self.eval_cond = self.policy.encode_prompts(self.eval_batch.prompts)
        roll = self.engine.run(plan, self.eval_batch, 0, stage="eval", conditioning=self.eval_cond,
                               seed=int(e["seed"]))
        rec: dict[str, Any] = {"iteration": iteration, "samples_total": self.totals.samples,
                               "nfe_total": self.totals.nfe, "seconds_total": self.totals.seconds,
                               "eval_images": int(roll.images.shape[0])}
        with torch.no_grad():
            for name, reward in self.eval_rewards.items():
                out = self._score(reward, roll.images, self.eval_batch, roll.leaf_prompts(), iteration, "eval")
                rec[f"eval/{name}"] = float(out.scores.mean())
                rec[f"eval/{name}/std"] = float(out.scores.std(unbiased=False))
                for k, v in out.components.items():
                    rec[f"eval/{name}/{k}"] = float(v.mean())
        grid_dir = self.out / "samples"
        grid_dir.mkdir(exist_ok=True)
        png = grid_dir / f"eval_{iteration:06d}.png"
        # one row per prompt when there are several images per prompt, so a grid shows their spread
        n_grid, ipp = int(e["grid"]), int(e["images_per_prompt"])
        save_grid(roll.images[:n_grid], png, ncol=ipp if ipp > 1 else 8)
        rec["samples_png"] = str(png.relative_to(self.out))
        rec["samples_prompts"] = [self.eval_batch.prompts[int(j)] for j in roll.leaf_prompts()[:n_grid]]
        self.evals.append(rec)
        train_name = self.cfg["reward"]["name"]
        rec["reward_hacking"] = reward_hacking_flag(
            self.evals, f"eval/{train_name}", [f"eval/{n}" for n in self.eval_rewards if n != train_name])
        rec["t_eval_s"] = time.perf_counter() - t0
        if rec["reward_hacking"]:
            print(f"warning: possible reward hacking at iteration {iteration}: training reward rising while a "
                  f"held-out reward fell over the last 3 evaluations (see {rec['samples_png']})", file=sys.stderr)
        self.log.evaluation(rec)
        return rec


def _build_reward_checked(spec: str, device: torch.device, options: Mapping[str, Any],
                          normalize: str = "none") -> Any:
    """``build_reward`` with a reward's own ValueError (bad option, missing weights) as a usage error."""
    try:
        return build_reward(spec, device, options, normalize)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(f"reward {spec!r}: {e}") from None


def _check_finite(rec: Mapping[str, Any]) -> bool:
    return all(math.isfinite(rec[k]) for k in ("reward_mean", "loss", "grad_norm", "approx_kl"))


@contextlib.contextmanager
def _stop_signals(r: Run):
    """SIGINT/SIGTERM ask for a clean stop: the run finishes the current phase (or the update, once
    started), writes a checkpoint and stops with reason "interrupted". A second signal stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if r.stop_requested is not None:
            raise KeyboardInterrupt
        r.stop_requested = name
        print(f"\n{name}: stopping cleanly after the current phase and writing a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _oom_failure(r: Run, e: BaseException) -> OutOfMemory:
    t = r.cfg["train"]
    return OutOfMemory(
        f"out of memory on {r.device} at iteration {r.totals.iterations} ({str(e).splitlines()[0][:200]}).\n"
        f"  Lower train.micro_batch (now {t['micro_batch']} rows per denoiser call, e.g. --set "
        f"train.micro_batch={max(1, int(t['micro_batch']) // 2)}): it changes memory, not results, and may be "
        f"changed on --resume.\n  Or lower train.prompts_per_iteration (now {t['prompts_per_iteration']}; this "
        f"changes the algorithm's batch) or use model.mixed_precision=bf16."
        + (f"\n  The run can continue from its last checkpoint: bench run --resume {r.out} --set "
           f"train.micro_batch=N" if r.last_checkpoint is not None else ""))


def run(cfg: Mapping[str, Any], on_iteration: Callable[[dict], None] | None = None,
        on_eval: Callable[[dict], None] | None = None, progress: bool | None = None,
        resume: bool = False) -> RunSummary:
    """Train under the budget and write the run directory. ``cfg`` is a resolved config
    (``bench.config.resolve``; for ``resume=True`` normally ``bench.checkpoint.resume_config``);
    callbacks may raise ``StopRun`` to stop early. With ``resume`` the run continues in ``cfg['out']``
    from its newest valid checkpoint."""
    cfg = dict(cfg)
    r = Run(cfg, resume=resume)
    r._wall0 = time.perf_counter()
    records = r.start()
    show = (cfg["run"]["progress"] if progress is None else progress) and r.dist.is_main
    if r.dist.is_main:
        _announce(r)
    every = int(cfg["eval"]["every"])
    ckpt_every = int(cfg["run"]["checkpoint_every"])
    skip_nonfinite = cfg["run"]["on_nonfinite"] == "skip"
    stop_reason, error, failure = None, None, None
    bar = _progress_bar(r) if show else None
    last_eval_it = r.evals[-1]["iteration"] if r.evals else -1
    with _stop_signals(r):
        try:
            if cfg["eval"]["at_start"] and r.totals.iterations == 0 and not r.evals:
                rec = r.evaluate(0)
                last_eval_it = 0
                if on_eval:
                    on_eval(rec)
            i = r.totals.iterations
            while True:
                stop_reason = r.budget.exhausted(r.totals)
                if stop_reason:
                    break
                r._check_stop()
                rec = r.iteration(i)
                r.log.iteration(rec)
                records.append(rec)
                if i == 0 and abs(rec["first_ratio"] - 1.0) > 1e-3:
                    print(f"warning: first importance ratio {rec['first_ratio']:.6f} != 1: rollout and update "
                          f"log-probs disagree (mixed precision or nondeterministic kernels?)", file=sys.stderr)
                if bar is not None:
                    _advance(bar, r, rec)
                i += 1
                if "nonfinite" in rec:
                    what = {"reward": "rewards", "logp": "rollout log-probs", "grad": "gradients",
                            "loss": "loss statistics"}[rec["nonfinite"]]
                    if not skip_nonfinite:
                        print(f"error: NaN/inf in the {what} of iteration {i - 1}; stopping (stop_reason "
                              f"nonfinite). The weights were not updated with it; the last checkpoint "
                              f"({r.last_checkpoint if r.last_checkpoint is not None else 'none'}) is valid. Set "
                              f"run.on_nonfinite=skip to skip such batches.", file=sys.stderr, flush=True)
                        stop_reason = "nonfinite"
                        break
                    print(f"warning: NaN/inf in the {what} of iteration {i - 1}; batch skipped "
                          f"(run.on_nonfinite=skip)", file=sys.stderr, flush=True)
                if on_iteration:
                    on_iteration(rec)
                if every and i % every == 0:
                    ev = r.evaluate(i)
                    last_eval_it = i
                    if on_eval:
                        on_eval(ev)
                if ckpt_every and i % ckpt_every == 0:
                    r.checkpoint()
        except StopRun as e:
            stop_reason = e.reason
        except (_Interrupted, KeyboardInterrupt):
            stop_reason = "interrupted"
        except Exception as e:  # noqa: BLE001 - recorded in final.json, then re-raised
            failure = e
            if _is_oom(e):
                failure = _oom_failure(r, e)
                failure.__cause__ = e
            stop_reason, error = "error", f"{type(failure).__name__}: {failure}"
        if bar is not None:
            bar.close()
        # a checkpoint at the stop, unless the state is mid-update or must not move past a NaN batch
        want = stop_reason == "interrupted" or (ckpt_every > 0 and stop_reason not in ("nonfinite",))
        if want and not r.in_update and r.last_checkpoint != r.totals.iterations:
            try:
                r.checkpoint()
            except Exception as e:  # noqa: BLE001 - the run's outcome matters more than this checkpoint
                ckpt_mod.warn(f"could not write the final checkpoint: {type(e).__name__}: {e}")
        if stop_reason == "interrupted":
            if r.in_update:
                ckpt_mod.warn(f"interrupted during an update: no checkpoint of the partial iteration; resume "
                              f"continues from iteration {r.last_checkpoint}")
            print(f"interrupted: resume with  bench run --resume {r.out}", file=sys.stderr, flush=True)
        final_eval = None
        if error is None and stop_reason not in ("nonfinite", "interrupted"):
            with contextlib.suppress(Exception):
                final_eval = r.evals[-1] if last_eval_it == r.totals.iterations else r.evaluate(r.totals.iterations)
        wall = r.wall_before + time.perf_counter() - r._wall0
        summary = _final(r, stop_reason or "error", error, final_eval, wall)
        r.log.final(summary)
    if failure is not None:
        raise failure
    if r.dist.is_main:
        print(f"run finished ({stop_reason}): {r.totals.iterations} iterations, {r.totals.samples} samples, "
              f"{r.totals.nfe} NFE, {r.totals.seconds:.1f} s training -> {r.out}")
    return RunSummary(out_dir=r.out, stop_reason=stop_reason or "error", iterations=r.totals.iterations,
                      samples_total=r.totals.samples, nfe_total=r.totals.nfe, seconds_total=r.totals.seconds,
                      final_eval=final_eval, records=records)


def _final(r: Run, stop_reason: str, error: str | None, final_eval: dict | None, wall: float) -> dict[str, Any]:
    best = None
    if r.evals:
        key = f"eval/{next(iter(r.eval_rewards))}"
        top = max(r.evals, key=lambda e: e.get(key, float("-inf")))
        best = {"key": key, "value": top.get(key), "iteration": top["iteration"]}
    out = {"stop_reason": stop_reason, "iterations": r.totals.iterations, "samples_total": r.totals.samples,
           "nfe_total": r.totals.nfe, "seconds_total": r.totals.seconds, "wall_seconds": wall,
           "final_eval": final_eval, "best_eval": best, "finished": now_iso(),
           "checkpoint": (str(ckpt_mod.step_dir(Path("."), r.last_checkpoint))
                          if r.last_checkpoint is not None else None),
           "checkpoint_seconds": r.checkpoint_seconds}
    if error:
        out["error"] = error
    return out


def _announce(r: Run) -> None:
    a = r.arith
    print(f"treebench: {r.cfg['algo']['name']} on {r.cfg['model']['name']} ({r.device}), reward "
          f"{r.cfg['reward']['name']}, budget {r.budget.spec}, seed {r.seed}\n"
          f"  per iteration: {a['prompts']} prompts x {a['trees_per_prompt']} trees x {a['leaves_per_tree']} "
          f"leaves = {a['images']} images, {a['rollout_nfe']} rollout NFE in iteration 0 (plans that move a "
          f"window change it)\n"
          f"  denoiser micro-batch {a['micro_batch_rows']} rows ({a['evaluations_per_call']} evaluations with "
          f"CFG x{a['cfg_factor']}); update: <= {a['max_trainable_parents']} trained parents in "
          f"{a['optimizer_steps']} optimizer step(s), gradient accumulation <= {a['grad_accumulation_max']}\n"
          f"  run directory: {r.out}", flush=True)


def _progress_bar(r: Run) -> Any:
    from tqdm import tqdm

    return tqdm(total=1000, desc="budget", unit="‰", dynamic_ncols=True, file=sys.stderr,
                bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")


def _advance(bar: Any, r: Run, rec: Mapping[str, Any]) -> None:
    target = int(1000 * r.budget.fraction(r.totals))
    bar.update(max(0, target - bar.n))
    bar.set_postfix_str(f"it {rec['iteration']} reward {rec['reward_mean']:.4f} nfe {rec['nfe_total']}")
