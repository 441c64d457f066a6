"""Held-out evaluation: fixed prompts, fixed noise, deterministic (all-ODE) sampling, every eval reward;
timed but outside the training budget; flags possible reward hacking."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.run import evalcache
from bench.run.parts import RunParts
from bench.run.progress import eval_line
from bench.run.scoring import score
from bench.rundir.layout import SAMPLES
from bench.rundir.runlog import reward_hacking_flag, save_grid, sustained_fall
from bench.types import CURRENT, RewardOutput, Rollout, RolloutPlan, SamplerSpec


def eval_plan(sampler: SamplerSpec, images_per_prompt: int = 1, weights: str = CURRENT) -> RolloutPlan:
    """Deterministic chains with the sampler's steps and guidance: ``images_per_prompt`` per eval prompt,
    each from its own noise (shared_noise=False), sampled with ``weights`` (the trained weights, or the
    weight snapshot an algorithm evaluates with: its ``eval_weights``, e.g. Flow-GRPO's EMA)."""
    T = sampler.steps
    return RolloutPlan(num_steps=T, modes=("ode",) * T, branch=(1,) * T, trees_per_prompt=images_per_prompt,
                       shared_noise=False, guidance=sampler.guidance, keep_latents=False, weights=weights)


def _eval_rollout(r: RunParts) -> Rollout:
    if r.eval_conditioning is None:
        r.eval_conditioning = r.policy.encode_prompts(r.eval_batch.prompts)
    e = r.spec.eval
    # noise from eval.seed, not the run seed: the same prompts and noise for every run whatever its seed
    weights = getattr(r.algo, "eval_weights", CURRENT)
    return r.engine.run(eval_plan(r.spec.sampler, e.images_per_prompt, weights), r.eval_batch, 0, stage="eval",
                        conditioning=r.eval_conditioning, seed=e.seed)


def _images_and_scores(r: RunParts, iteration: int, png: Path) -> tuple[Rollout, dict[str, RewardOutput]]:
    """Sample the eval images, score them with every eval reward (reward name -> RewardOutput) and save
    their grid to ``png``."""
    e = r.spec.eval
    roll = _eval_rollout(r)
    scored: dict[str, RewardOutput] = {}
    with torch.no_grad():
        for name, reward in r.eval_rewards.items():
            scored[name] = score(reward, roll.images, r.eval_batch, roll.leaf_prompts(), out_dir=r.out,
                                 iteration=iteration, stage="eval", recorder=r.engine.recorder)
    # one row per prompt when there are several images per prompt, so a grid shows their spread
    save_grid(roll.images[: e.grid], png, ncol=e.images_per_prompt if e.images_per_prompt > 1 else 8)
    return roll, scored


def image_scores(r: RunParts, roll: Rollout, iteration: int, scored: dict[str, RewardOutput]) -> list[dict[str, Any]]:
    """The lines of eval_scores.jsonl for one evaluation: one per image, in the rollout's leaf order, with
    the run's cumulative training totals, the image's prompt (index into the eval prompts) and its index
    among that prompt's images (its noise: the same in every run of a comparison), and every reward's
    score and component (``scored``: reward name -> its RewardOutput)."""
    t = r.state.totals
    prompts = roll.leaf_prompts().tolist()
    seen: dict[int, int] = {}
    lines = []
    for leaf, j in enumerate(prompts):
        k = seen.get(j, 0)
        seen[j] = k + 1
        scores: dict[str, float] = {}
        for name, out in scored.items():
            scores[name] = float(out.scores[leaf])
            for c, v in out.components.items():
                scores[f"{name}/{c}"] = float(v[leaf])
        lines.append({"iteration": iteration, "nfe": t.nfe, "samples": t.samples, "seconds": t.seconds,
                      "prompt_index": int(j), "image_index": k, "prompt": r.eval_batch.prompts[int(j)],
                      "scores": scores})
    return lines


def evaluate(r: RunParts, iteration: int, point: float | None = None) -> dict[str, Any]:
    """Evaluate run ``r`` (a ``bench.run.runner.Run``) after ``iteration`` completed iterations; appends the
    record to ``r.state.evals`` and evals.jsonl, each image's scores to eval_scores.jsonl, and saves a sample
    grid. ``point``: the multiple of ``eval.every`` this evaluation stands for (None: the end of the run)."""
    if not r.dist.is_main:  # rank 0 evaluates and logs ...
        if r.dist.fsdp:  # ... but a sharded denoiser needs every rank in each of its forward passes
            _eval_rollout(r)
            r.state.evals.append({"iteration": iteration})  # keeps the ranks' "already evaluated" checks equal
        return {"iteration": iteration}
    t0 = time.perf_counter()
    e = r.spec.eval
    grid_dir = r.out / SAMPLES
    grid_dir.mkdir(exist_ok=True)
    png = grid_dir / f"eval_{iteration:06d}.png"
    # the images, their scores and grid; iteration 0's from the evaluation cache with eval.cache set
    roll, scored, cached = evalcache.evaluate_images(r, iteration, png, _images_and_scores)
    rec: dict[str, Any] = {"iteration": iteration, "samples_total": r.state.totals.samples,
                           "nfe_total": r.state.totals.nfe, "seconds_total": r.state.totals.seconds,
                           "eval_images": len(roll.leaf_prompts()), "eval_point": point}
    for name, out in scored.items():
        rec[f"eval/{name}"] = float(out.scores.mean())
        rec[f"eval/{name}/std"] = float(out.scores.std(unbiased=False))
        for k, v in out.components.items():
            rec[f"eval/{name}/{k}"] = float(v.mean())
    rec["samples_png"] = str(png.relative_to(r.out))
    rec["samples_prompts"] = [r.eval_batch.prompts[int(j)] for j in roll.leaf_prompts()[: e.grid]]
    r.state.evals.append(rec)
    train_name = r.spec.reward.name
    held = [f"eval/{n}" for n in r.eval_rewards if n != train_name]
    recent = reward_hacking_flag(r.state.evals, f"eval/{train_name}", held)
    rec["heldout_below_start"] = sustained_fall(r.state.evals, f"eval/{train_name}", held)
    rec["reward_hacking"] = bool(recent or rec["heldout_below_start"])
    rec["t_eval_s"] = time.perf_counter() - t0
    if cached:
        rec["cached"] = True  # from eval.cache (bench.run.evalcache); t_eval_s is the lookup's time
    rec.update(r.drain_calls(iteration, "eval"))  # the evaluation's calls, outside the training budget
    if rec["heldout_below_start"]:
        names = ", ".join(k.split("/", 1)[-1] for k in rec["heldout_below_start"])
        now = ", ".join(f"{k.split('/', 1)[-1]} {r.state.evals[0][k]:.3f} -> {rec[k]:.3f}" for k in rec["heldout_below_start"])
        print(f"warning: possible reward hacking at iteration {iteration}: the training reward rose above its "
              f"iteration-0 value during the run while held-out {names} stays below its iteration-0 value by more than its resolution "
              f"({now}; see {rec['samples_png']})", file=sys.stderr)
    elif rec["reward_hacking"]:
        print(f"warning: possible reward hacking at iteration {iteration}: training reward rising while a "
              f"held-out reward fell over the last 3 evaluations (see {rec['samples_png']})", file=sys.stderr)
    # the images' scores first: a process killed between the two writes leaves lines that no evals.jsonl
    # record names, and resume keeps only the lines of the checkpoint's evaluations (bench.rundir.resume)
    r.log.eval_scores(image_scores(r, roll, iteration, scored))
    r.log.evaluation(rec)
    r.trackers.evaluation(rec, r.out, list(r.eval_batch.prompts[: r.spec.eval.grid]))
    print(eval_line(rec, r.state.evals[0]), flush=True)  # the result where the user looks (bench.run.progress)
    return rec
