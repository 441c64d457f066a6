"""Multi-process training (bench/run/distributed.py): merging per-rank rollouts reproduces the
single-process rollout; a real 2-process accelerate run gives single-process advantages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _launch import run_launch

from bench.engine.rollout import RolloutEngine
from bench.errors import UsageError
from bench.model.models import load_policy
from bench.model.random_models import tiny_pipeline_dir
from bench.run.distributed import (
    Dist,
    _structure,
    merge_rewards,
    merge_rollouts,
    split_rollout,
)
from bench.types import PromptBatch, RewardOutput, RolloutPlan

PROMPTS = PromptBatch(("a red circle", "a blue square", "a green triangle", "a small dog"))


@pytest.fixture(scope="module")
def tree_rollout():
    pol = load_policy(tiny_pipeline_dir("flow"))
    plan = RolloutPlan(4, ("ode", "sde", "sde", "ode"), (1, 2, 3, 1), trees_per_prompt=2, guidance=1.0)
    roll = RolloutEngine(pol, seed=0).run(plan, PROMPTS, 0)
    scores = roll.images.mean(dim=(1, 2, 3))
    return roll, RewardOutput(scores, {"c": -scores})


@pytest.mark.parametrize("world", [1, 2, 4])
def test_split_then_merge_is_the_single_process_rollout(tree_rollout, world):
    roll, rew = tree_rollout
    parts = [split_rollout(roll, rew, world, r) for r in range(world)]
    for local, lrew in parts:  # each part is a valid rollout of its prompts
        assert int(local.prompt.max()) + 1 == 4 // world
        assert local.num_leaves == lrew.scores.numel() == roll.num_leaves // world
        assert bool((local.parent < local.num_nodes).all())
    merged, maps = merge_rollouts([_structure(p[0]) for p in parts], roll)
    for key in ("parent", "level", "prompt", "tree", "trainable", "leaves"):
        assert torch.equal(getattr(merged, key), getattr(roll, key)), key
    assert torch.equal(torch.isnan(merged.logp_old), torch.isnan(roll.logp_old))
    torch.testing.assert_close(torch.nan_to_num(merged.logp_old), torch.nan_to_num(roll.logp_old))
    mrew = merge_rewards([p[1] for p in parts])
    assert torch.equal(mrew.scores, rew.scores) and torch.equal(mrew.components["c"], rew.components["c"])
    assert torch.equal(torch.sort(torch.cat(maps)).values, torch.arange(roll.num_nodes))


class _FakeAccelerator:
    num_processes, process_index = 2, 1


def test_shard_keeps_whole_prompts_and_checks_divisibility():
    d = Dist(_FakeAccelerator())
    assert d.active and not d.is_main
    assert d.shard(PROMPTS).prompts == PROMPTS.prompts[2:]
    assert d.shard(PROMPTS).prompt_ids == (2, 3)
    with pytest.raises(UsageError, match="multiple of the number of processes"):
        d.shard(PromptBatch(("a", "b", "c")))
    assert d.rollout_seed(7) != 7 and Dist.single().rollout_seed(7) == 7


def test_fsdp_without_a_launch_is_a_usage_error(tmp_path):
    from bench import config
    from bench.errors import UsageError
    from bench.run import runner

    cfg = config.resolve({"model.distributed": "fsdp", "run.progress": False},
                         flags={"algo.name": "grpo", "model.name": "tiny-random", "budget": "1it",
                                "out": str(tmp_path / "r")})
    with pytest.raises(UsageError, match="model.distributed=fsdp shards the denoiser"):
        runner.run(cfg)
    assert not (tmp_path / "r").exists()  # refused before the run directory was made


def test_single_process_dist_is_a_no_op():
    d = Dist.single()
    assert d.shard(PROMPTS) is PROMPTS and d.any_flag(None) is None
    assert d.totals(3, 4, 5, {"rollout": 1.0}, 6) == (3, 4, 5, {"rollout": 1.0}, 6)
    assert d.totals(3, 4, 5, {"rollout": 1.0}) == (3, 4, 5, {"rollout": 1.0}, 0)


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_process_accelerate_matches_single_process(tmp_path):
    # opt-in (-m slow): every algorithm's advantages; the fast 2-process runs CI makes (budgets counted once,
    # kill and resume) are tests/test_multiproc.py
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): advantages of every algorithm
    equal a single process's on the same data; DDP keeps LoRA weights identical; rank 0 alone logs."""
    report = tmp_path / "report.json"
    run_dir = tmp_path / "run"
    worker = Path(__file__).with_name("_dist_worker.py")
    res = run_launch([], tmp_path / "logs", 600, script=[str(worker), str(report), str(run_dir)])
    assert res.returncode == 0, res.tail()
    rep = json.loads(report.read_text())
    assert rep["world_size"] == 2
    assert rep["advantages"] == {a: True for a in ("grpo", "dancegrpo", "mixgrpo", "treegrpo", "ddpo")}
    tr = rep["training"]
    assert tr["weights_equal"] and tr["weights_changed"] and tr["ddp"] == "DistributedDataParallel" and tr["lora"]
    # budgets count globally: 2 iterations x 4 prompts x 2 chains, over both ranks
    assert tr["iterations"] == 2 and tr["samples_total"] == 16
    lines = (run_dir / "iterations.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["samples_total"] == 16
