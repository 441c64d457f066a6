"""Plan arithmetic: what one iteration costs and how it is split into denoiser calls and optimizer
steps, derived from a plan before anything runs (announced at start, stored in the manifest)."""

from __future__ import annotations

import math
from typing import Any

from bench.types import RolloutPlan


def batch_arithmetic(plan: RolloutPlan, prompts: int, micro_batch: int, optimizer_steps: int) -> dict[str, Any]:
    """Images, rollout NFE, calls per tree level, trained parents and gradient accumulation of ``plan``."""
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
