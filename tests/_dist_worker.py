"""Worker for tests/test_scale_distributed.py, run under ``accelerate launch`` with 2 CPU processes.

1. Advantages: every rank samples the same global rollout (same seed), keeps its shard
   (``split_rollout``), computes advantages through ``Dist.advantages`` (gather, merge, algorithm,
   localize); the gathered local results must equal a single process's advantages on the whole rollout.
2. Training: ``runner.run`` for 2 iterations with LoRA under DDP; the trained weights must be identical on
   both ranks, totals global, and only rank 0 writes the run directory.
Rank 0 writes a JSON report to argv[1].
"""

import hashlib
import json
import math
import sys

import torch

import bench  # noqa: F401  (torchvision fix)
from bench import config
from bench.engine.rollout import RolloutEngine
from bench.model.models import load_policy
from bench.model.random_models import tiny_pipeline_dir
from bench.registry import algorithm_class
from bench.run import runner
from bench.run.distributed import Dist, split_rollout
from bench.rundir.resume import trainable_state
from bench.types import PromptBatch, RewardOutput

torch.set_num_threads(1)
PROMPTS = ("a red circle", "a blue square", "a green triangle", "a small dog")


def make_algo(name: str, cfg: dict):
    cls = algorithm_class(name)
    s = cfg["sampler"]
    from bench.types import SamplerSpec, TrainSpec

    sampler = SamplerSpec(steps=int(s["steps"]), guidance=float(s["guidance"]), noise_level=float(s["noise_level"]),
                          sde_type=s["sde"], shift=float(s["shift"]),
                          prediction="epsilon" if name == "ddpo" else "flow")
    return cls(config.algorithm_config(cfg), sampler, TrainSpec(), 0)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(torch.isnan(a), torch.isnan(b))) and bool(
        torch.allclose(torch.nan_to_num(a), torch.nan_to_num(b), atol=1e-6))


def check_advantages(dist: Dist) -> dict:
    out = {}
    cases = {"grpo": "flow", "dancegrpo": "flow", "mixgrpo": "flow", "treegrpo": "flow", "ddpo": "epsilon"}
    for name, pred in cases.items():
        model = "tiny-random" if pred == "flow" else "tiny-random-ddim"
        sets = {"algo.k": 2, "algo.d": 2} if name == "treegrpo" else {}
        cfg = config.resolve(sets, flags={"algo.name": name, "model.name": model})
        policy = load_policy(tiny_pipeline_dir(pred))
        batch = PromptBatch(PROMPTS)
        single, multi = make_algo(name, cfg), make_algo(name, cfg)
        ok = True
        for it in range(2):  # two iterations: DDPO's per-prompt buffers must evolve identically
            plan = single.plan(it)
            roll = RolloutEngine(policy, seed=0).run(plan, batch, it)
            scores = roll.images.mean(dim=(1, 2, 3)) + 0.01 * torch.arange(roll.num_leaves) % 7
            rew = RewardOutput(scores, {"a": scores * 2})
            ref = single.advantages(batch, roll, rew)
            local, lrew = split_rollout(roll, rew, dist.world_size, dist.rank)
            lbatch = dist.shard(batch)
            adv, view = dist.advantages(multi, batch, lbatch, local, lrew)
            parts = dist.gather((view.local_nodes, adv.edge, view.local_leaves, adv.leaf))
            edge = torch.full((roll.num_nodes,), float("inf"))
            leaf = torch.full((roll.num_leaves,), float("inf"))
            for ids, e, lids, lv in parts:
                edge[ids] = e
                leaf[lids] = lv
            ok = ok and same(edge, ref.edge.float()) and same(leaf, ref.leaf.float())
            ok = ok and all(math.isclose(float(v), float(ref.metrics[k]), abs_tol=1e-6) or (
                math.isnan(float(v)) and math.isnan(float(ref.metrics[k]))) for k, v in adv.metrics.items())
        out[name] = ok
    return out


def check_training(dist: Dist, out_dir: str) -> dict:
    holder = {}
    orig = runner.Run

    class Capture(orig):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            holder["run"] = self

    runner.Run = Capture
    cfg = config.resolve({"train.prompts_per_iteration": 4, "eval.every": 1, "eval.num_prompts": 2,
                          "model.device": "cpu", "model.lora_rank": 4, "train.lr": 1e-2, "algo.group_size": 2, "sampler.steps": 3},
                         flags={"algo.name": "grpo", "model.name": "tiny-random", "budget": "2it", "out": out_dir,
                                "run.overwrite": True, "run.progress": False})
    summary = runner.run(cfg)
    runner.Run = orig
    r = holder["run"]
    h = hashlib.sha256()
    for n, p in sorted(trainable_state(r.policy).items()):
        h.update(n.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    hashes = dist.gather(h.hexdigest())
    changed = any(float(p.abs().max()) > 0 for n, p in trainable_state(r.policy).items() if "lora_B" in n)
    return {"weights_equal": len(set(hashes)) == 1, "weights_changed": changed, "samples_total": summary.samples_total,
            "nfe_total": summary.nfe_total, "iterations": summary.iterations,
            "ddp": type(r.policy.train_module).__name__, "lora": r.policy.is_lora}


def main() -> None:
    report_path, out_dir = sys.argv[1], sys.argv[2]
    cfg = config.resolve({"model.device": "cpu"}, flags={"algo.name": "grpo", "model.name": "tiny-random"})
    dist = Dist.launch(cfg["model"]["distributed"], torch.device("cpu"))
    report = {"world_size": dist.world_size, "advantages": check_advantages(dist),
              "training": check_training(dist, out_dir)}
    if dist.is_main:
        with open(report_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
