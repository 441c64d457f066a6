"""The only training loop: plan -> rollout -> reward -> advantages -> update -> log, under a budget.

``run(cfg)`` alone reads the clock, checks the budget at iteration boundaries, records the stop
reason and writes the run directory (docs/RUNDIR.md). Evaluation is timed but outside the training
budget. Same config + seed on CPU gives an identical iterations.jsonl apart from timing fields.
"""

from __future__ import annotations

import contextlib
import math
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from bench import config as config_mod
from bench.budget import Budget, Totals
from bench.policy import Policy, load_policy, tiny_pipeline_dir, weights_hash
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
        return Path(m["path"]).expanduser()
    source = model_preset(m["name"]).source
    if source.startswith("package:"):
        return Path(__file__).resolve().parent / source.split(":", 1)[1]
    if source == "tiny-random":
        return tiny_pipeline_dir("flow")
    if source == "tiny-random-ddim":
        return tiny_pipeline_dir("epsilon")
    raise UsageError(f"model preset {m['name']!r} loads from a local directory: pass --model-path DIR "
                     f"(a diffusers pipeline directory you downloaded)")


def build_policy(cfg: Mapping[str, Any], device: torch.device) -> Policy:
    mp = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["model"]["mixed_precision"]]
    return load_policy(model_dir(cfg), device=device, autocast_dtype=mp)


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


def prepare_out_dir(cfg: Mapping[str, Any]) -> Path:
    out = cfg.get("out") or f"runs/{cfg['algo']['name']}_{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        if not cfg["run"]["overwrite"]:
            raise UsageError(f"run directory {out} already exists and is not empty; pass --overwrite to replace "
                             f"it or choose another --out")
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

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.seed = int(cfg["seed"])
        self.budget = Budget.parse(str(cfg["budget"]))
        self.device = resolve_device(cfg["model"]["device"])
        algo_cls = algorithm_class(cfg["algo"]["name"])
        algo_cfg = config_mod.algorithm_config(cfg)
        self.train_prompts: PromptSet = load_prompt_set(cfg["data"]["train_prompts"])
        self.eval_prompts: PromptSet = load_prompt_set(cfg["data"]["eval_prompts"])
        self.out = prepare_out_dir(cfg)
        torch.manual_seed(self.seed)
        self.policy = build_policy(cfg, self.device)
        s = cfg["sampler"]
        self.sampler = SamplerSpec(steps=int(s["steps"]), guidance=float(s["guidance"]),
                                   noise_level=float(s["noise_level"]), sde_type=s["sde"], shift=float(s["shift"]),
                                   prediction=self.policy.prediction)
        t = cfg["train"]
        self.train = TrainSpec(micro_batch=int(t["micro_batch"]), optimizer_steps=int(t["optimizer_steps"]),
                               max_grad_norm=float(t["max_grad_norm"]))
        try:
            self.algo = algo_cls(algo_cfg, self.sampler, self.train, self.seed)
        except ValueError as e:
            raise UsageError(f"invalid settings for algorithm {cfg['algo']['name']!r}: {e}") from None
        r = cfg["reward"]
        self.reward = build_reward(r["name"], self.device, r["options"], r["normalize"])
        self.eval_rewards = {name: (self.reward if name == r["name"] else
                                    build_reward(name, self.device, r["options"]))
                             for name in cfg["eval"]["rewards"]}
        self.engine = RolloutEngine(self.policy, max_micro_batch=self.train.micro_batch, seed=self.seed,
                                    shift=self.sampler.shift)
        params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=float(t["lr"]), betas=(float(t["beta1"]), float(t["beta2"])),
                                           eps=float(t["adam_eps"]), weight_decay=float(t["weight_decay"]))
        self.log = RunLog(self.out, tensorboard=bool(cfg["run"]["tensorboard"]))
        self.totals = Totals()
        self.evals: list[dict[str, Any]] = []
        self.eval_batch = self.eval_prompts.head(int(cfg["eval"]["num_prompts"]))
        self.eval_cond = None
        self.first_plan = self.algo.plan(0)
        self.arith = batch_arithmetic(self.first_plan, int(t["prompts_per_iteration"]), self.train.micro_batch,
                                      self.train.optimizer_steps)

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
            "prompts": {"train": self.train_prompts.describe(), "eval": self.eval_prompts.describe()},
        }

    # ---- one iteration ----
    def iteration(self, i: int) -> dict[str, Any]:
        timer = PhaseTimer(self.device)
        batch = self.train_prompts.sample(int(self.cfg["train"]["prompts_per_iteration"]), self.seed, i)
        nfe_r0, nfe_u0 = self.engine.nfe_rollout, self.engine.nfe_update
        with timer("rollout"):
            plan = self.algo.plan(i)
            rollout: Rollout = self.engine.run(plan, batch, i)
        with timer("reward"):
            rewards = _score(self.reward, rollout.images, batch, rollout.leaf_prompts())
        with timer("advantage"):
            adv = self.algo.advantages(batch, rollout, rewards)
        with timer("update"):
            self.policy.train(True)
            stats = self.algo.update(self.policy, self.engine, self.optimizer, batch, rollout, adv)
            self.policy.train(False)
        nfe_r = self.engine.nfe_rollout - nfe_r0
        nfe_u = self.engine.nfe_update - nfe_u0
        secs = sum(timer.seconds.get(p, 0.0) for p in PHASES)
        self.totals = Totals(seconds=self.totals.seconds + secs, samples=self.totals.samples + rollout.num_leaves,
                             nfe=self.totals.nfe + nfe_r + nfe_u, iterations=i + 1)
        sc = rewards.scores
        rec: dict[str, Any] = {
            "iteration": i, "samples": rollout.num_leaves, "samples_total": self.totals.samples,
            "nfe_rollout": nfe_r, "nfe_update": nfe_u, "nfe_total": self.totals.nfe,
            "seconds_total": self.totals.seconds,
            **{f"t_{p}_s": timer.seconds.get(p, 0.0) for p in PHASES}, "t_iteration_s": secs,
            "reward_mean": float(sc.mean()), "reward_std": float(sc.std(unbiased=False)),
            "reward_min": float(sc.min()), "reward_max": float(sc.max()),
            **{f"reward/{k}": float(v.float().mean()) for k, v in rewards.components.items()},
            "loss": stats.loss, "approx_kl": stats.approx_kl, "clip_frac": stats.clip_frac,
            "grad_norm": stats.grad_norm, "first_ratio": stats.first_ratio, "kl": stats.kl,
            "lr": self.optimizer.param_groups[0]["lr"], "peak_mem_mb": peak_mem_mb(self.device),
            "edges": stats.edges, "optimizer_steps": stats.optimizer_steps, "micro_batches": stats.micro_batches,
            "zero_spread_frac": zero_spread_fraction(sc, rollout.leaf_prompts()),
            **dict(plan.info), **dict(adv.metrics), **dict(stats.metrics),
        }
        return rec

    # ---- evaluation ----
    def evaluate(self, iteration: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        T = self.sampler.steps
        plan = RolloutPlan(num_steps=T, modes=("ode",) * T, branch=(1,) * T, trees_per_prompt=1,
                           guidance=self.sampler.guidance, keep_latents=False)
        if self.eval_cond is None:
            self.eval_cond = self.policy.encode_prompts(self.eval_batch.prompts)
        roll = self.engine.run(plan, self.eval_batch, 0, stage="eval", conditioning=self.eval_cond)
        rec: dict[str, Any] = {"iteration": iteration, "samples_total": self.totals.samples,
                               "nfe_total": self.totals.nfe, "seconds_total": self.totals.seconds}
        with torch.no_grad():
            for name, reward in self.eval_rewards.items():
                out = _score(reward, roll.images, self.eval_batch, roll.leaf_prompts())
                rec[f"eval/{name}"] = float(out.scores.mean())
                rec[f"eval/{name}/std"] = float(out.scores.std(unbiased=False))
                for k, v in out.components.items():
                    rec[f"eval/{name}/{k}"] = float(v.mean())
        grid_dir = self.out / "samples"
        grid_dir.mkdir(exist_ok=True)
        png = grid_dir / f"eval_{iteration:06d}.png"
        save_grid(roll.images[: int(self.cfg["eval"]["grid"])], png)
        rec["samples_png"] = str(png.relative_to(self.out))
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


def _check_finite(rec: Mapping[str, Any]) -> bool:
    return all(math.isfinite(rec[k]) for k in ("reward_mean", "loss", "grad_norm", "approx_kl"))


def run(cfg: Mapping[str, Any], on_iteration: Callable[[dict], None] | None = None,
        on_eval: Callable[[dict], None] | None = None, progress: bool | None = None) -> RunSummary:
    """Train under the budget and write the run directory. ``cfg`` is a resolved config
    (``bench.config.resolve``); callbacks may raise ``StopRun`` to stop early."""
    cfg = dict(cfg)
    r = Run(cfg)
    show = cfg["run"]["progress"] if progress is None else progress
    r.log.write_manifest(r.manifest())
    _announce(r)
    every = int(cfg["eval"]["every"])
    stop_reason, error = None, None
    records: list[dict[str, Any]] = []
    bar = _progress_bar(r) if show else None
    wall0 = time.perf_counter()
    last_eval_it = -1
    try:
        if cfg["eval"]["at_start"]:
            rec = r.evaluate(0)
            last_eval_it = 0
            if on_eval:
                on_eval(rec)
        i = 0
        while True:
            stop_reason = r.budget.exhausted(r.totals)
            if stop_reason:
                break
            rec = r.iteration(i)
            r.log.iteration(rec)
            records.append(rec)
            if i == 0 and abs(rec["first_ratio"] - 1.0) > 1e-3:
                print(f"warning: first importance ratio {rec['first_ratio']:.6f} != 1: rollout and update "
                      f"log-probs disagree (mixed precision or nondeterministic kernels?)", file=sys.stderr)
            if bar is not None:
                _advance(bar, r, rec)
            i += 1
            if not _check_finite(rec):
                stop_reason = "nonfinite"
                break
            if on_iteration:
                on_iteration(rec)
            if every and i % every == 0:
                ev = r.evaluate(i)
                last_eval_it = i
                if on_eval:
                    on_eval(ev)
    except StopRun as e:
        stop_reason = e.reason
    except KeyboardInterrupt:
        stop_reason = "interrupted"
    except Exception as e:  # recorded in final.json, then re-raised
        stop_reason, error = "error", f"{type(e).__name__}: {e}"
        raise
    finally:
        if bar is not None:
            bar.close()
        final_eval = None
        if error is None and stop_reason != "nonfinite":
            with contextlib.suppress(Exception):
                final_eval = r.evals[-1] if last_eval_it == r.totals.iterations else r.evaluate(r.totals.iterations)
        summary = _final(r, stop_reason or "error", error, final_eval, time.perf_counter() - wall0)
        r.log.final(summary)
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
           "final_eval": final_eval, "best_eval": best, "finished": now_iso()}
    if error:
        out["error"] = error
    return out


def _announce(r: Run) -> None:
    a = r.arith
    print(f"treebench: {r.cfg['algo']['name']} on {r.cfg['model']['name']} ({r.device}), reward "
          f"{r.cfg['reward']['name']}, budget {r.budget.spec}, seed {r.seed}\n"
          f"  per iteration: {a['prompts']} prompts x {a['trees_per_prompt']} trees x {a['leaves_per_tree']} "
          f"leaves = {a['images']} images, {a['rollout_nfe']} rollout NFE\n"
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
