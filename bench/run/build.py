"""The one builder of a run's training parts from its ``RunSpec``: the algorithm, the rollout engine around a
policy, the optimizer. ``bench.run.runner.Run`` builds the run with them and ``bench.cost.estimate.simulate``
(``bench plan``) builds its weightless twin of the run with the same calls, so both make the same call trace.
The policy (``bench.model.models.build_policy``) and the rewards (``bench.run.scoring.build_rewards``) have
their own builders, which the runner and the profiler share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from bench.engine import trace as trace_mod
from bench.engine.rollout import RolloutEngine
from bench.errors import algorithm_settings
from bench.model.policy import Policy
from bench.protocols import Algorithm
from bench.registry import algorithm_class
from bench.run.faults import refuse_nonfinite_step
from bench.spec import OptimizerSpec, RunSpec


class FrozenAdamW(torch.optim.AdamW):
    """AdamW for ``train.frozen=true`` (the null arm of ``bench compare --controls``): the algorithm's update
    runs unchanged (loss, gradients, clipping, the same forward passes), and ``step()`` is called as often
    and runs the optimizer's hooks (non-finite check, call trace, so the modeled cost is the same), but it
    changes no parameter and keeps no moments, only each parameter's step count (a non-empty state, as
    sharded checkpoints expect). Its learning rate is 0, which is what ``lr`` in iterations.jsonl records.
    (AdamW with lr 0 is not enough: ``p + 0 * x`` turns a weight of -0.0 into +0.0, so the weights would
    not be bit-identical.)"""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state["step"] = state.get("step", torch.zeros((), dtype=torch.float32)) + 1
        return loss


def build_algorithm(spec: RunSpec) -> Algorithm:
    """The algorithm of ``spec`` (its registry name and its own frozen Config); a Config that refuses its
    settings raises ``AlgorithmSettingsError``."""
    with algorithm_settings(spec.algo_name):
        algo: Algorithm = algorithm_class(spec.algo_name)(spec.algo_config, spec.sampler, spec.train, spec.seed)
    return algo


def build_engine(spec: RunSpec, policy: Policy, algo: Algorithm, seed: int, reward: Any = None) -> RolloutEngine:
    """The rollout engine around ``policy``, drawing noise from ``seed``, with the weight snapshots ``algo``
    declares (copies of the initial weights) and, for a direct-gradient algorithm (``reward_gradient``:
    ReFL, DRaFT-K), the training ``reward`` its update scores with (``engine.reward_grad``)."""
    engine = RolloutEngine(policy, max_micro_batch=spec.train.micro_batch, seed=seed, shift=spec.sampler.shift,
                           schedule=spec.sampler.schedule)
    engine.snapshots.declare(algo)
    if getattr(algo, "reward_gradient", False):
        engine.attach_reward(reward)
    return engine


def build_optimizer(o: OptimizerSpec, params: Iterable[torch.nn.Parameter], recorder: trace_mod.CallRecorder
                    ) -> torch.optim.Optimizer:
    """AdamW over ``params`` with the spec's settings (``train.frozen``: the null arm of a comparison, every
    step still called, hooks and trace included, none moves a weight); NaN/inf steps are never applied, and
    every step is a call in ``recorder``'s trace."""
    adamw = FrozenAdamW if o.frozen else torch.optim.AdamW
    optimizer = adamw(params, lr=0.0 if o.frozen else o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                      weight_decay=o.weight_decay)
    optimizer.register_step_pre_hook(refuse_nonfinite_step)
    trace_mod.attach_optimizer(optimizer, recorder)
    return optimizer
