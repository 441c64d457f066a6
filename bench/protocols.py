"""The two contracts every plug-in implements: ``Algorithm`` and ``Reward``.

Algorithm lifecycle (driven only by ``bench.run.runner.run``)::

    algo = AlgoClass(config, sampler=SamplerSpec, train=TrainSpec, seed=int)  # config: frozen Config
    algo.load_state_dict(state)                                 # only when resuming
    for iteration in 0, 1, ...:
        plan = algo.plan(iteration)                             # RolloutPlan (pure, seeded)
        rollout = engine.run(plan, batch, iteration)            # runner -> engine, no gradients
        rewards = reward(rollout.images, prompts, meta)         # runner -> reward
        adv = algo.advantages(batch, rollout, rewards)          # Advantages per edge
        stats = algo.update(policy, engine, optimizer, rollout, adv)  # UpdateStats (with its NFE)
    algo.state_dict()                                           # checkpoints

Rules: an algorithm never reads a clock, the budget or the reward model and never writes logs;
it draws randomness only from ``bench.engine.seeding.generator(seed, iteration, stage)``; every hook
returns a value and stashes nothing on another stage. ``update`` may call ``engine.logp`` (the only
way to get log-probs with gradients), ``engine.predict`` (model outputs at latents the algorithm builds,
for likelihood-free losses), ``engine.snapshots.blend`` (move a declared weight snapshot towards the
trained weights), ``optimizer.zero_grad/step`` and ``torch.nn.utils.clip_grad_norm_`` on
``policy.trainable_parameters()``. Every denoiser call goes through the engine, so NFE and the call trace
stay exact for every paradigm.

An algorithm may declare ``snapshots`` (a tuple of names, default none): named copies of the initial
trainable weights the runner creates, checkpoints and restores (``bench.model.snapshots``); a plan samples
with one through ``RolloutPlan.weights``, ``engine.predict(..., weights=name)`` evaluates one.
Likelihood-free algorithms declare ``likelihood_free = True`` (default False) and report
``UpdateStats.approx_kl``, ``clip_frac`` and ``first_ratio`` as NaN (there is no importance ratio).
Direct-gradient algorithms (ReFL, DRaFT-K) declare ``reward_gradient = True`` (default False): the runner
then requires a reward with a gradient path (``differentiable = True`` and ``score_grad(images, prompts,
meta) -> Tensor [L]``, scores differentiable in the images) and attaches it to the engine; the update
reaches it only through ``engine.decode_grad`` and ``engine.reward_grad``, which the call trace records
(``vae_decode_backward``, ``reward_backward``). This is the one exception to "never reads the reward model".

Each algorithm class also declares what the core and sweeps read through the registry: ``log_keys``
(the keys it adds to iterations.jsonl, with their meaning), ``search_space`` (its sweepable settings, in
the space-file format of docs/SWEEPS.md) and ``search_default`` (the ones swept when ``--space`` is not
given).

Reward lifecycle: constructed by ``bench.run.scoring.build_reward`` from a registry name, an entry point or
a ``module:Class`` spec, as ``RewardClass(device=..., **options)``; heavy weights load on the first call,
never at import. ``__call__`` runs under ``torch.no_grad`` and returns float32 scores. A reward may also
offer a gradient path (``differentiable = True`` and ``score_grad``, see above).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Protocol, Sequence, runtime_checkable

from torch import Tensor
from torch.optim import Optimizer

from bench.engine.rollout import RolloutEngine
from bench.model.policy import Policy
from bench.types import Advantages, PromptBatch, RewardOutput, Rollout, RolloutPlan, UpdateStats


@runtime_checkable
class Algorithm(Protocol):
    """An RL post-training algorithm (see the module docstring for the lifecycle)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    log_keys: ClassVar[dict[str, str]]
    search_space: ClassVar[dict[str, Any]]
    search_default: ClassVar[tuple[str, ...]]

    def plan(self, iteration: int) -> RolloutPlan:
        """What to sample this iteration (modes per step, branching, group size, noise)."""
        ...

    def advantages(self, batch: PromptBatch, rollout: Rollout, rewards: RewardOutput) -> Advantages:
        """Per-edge advantages from the leaves' rewards."""
        ...

    def update(self, policy: Policy, engine: RolloutEngine, optimizer: Optimizer, rollout: Rollout,
               adv: Advantages) -> UpdateStats:
        """One policy update on this iteration's rollout; ``UpdateStats.nfe`` = the forward passes it spent."""
        ...

    def state_dict(self) -> dict:
        """JSON-serialisable state that must survive a resume (e.g. DDPO's per-prompt buffers)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ...


@runtime_checkable
class Reward(Protocol):
    """A reward model: images in [0, 1] -> float32 scores.

    name:    registry name
    version: changes whenever the scores would change (weights, preprocessing, formula); reports
             refuse to plot runs with different versions on one axis
    """

    name: str
    version: str

    def __call__(self, images: Tensor, prompts: Sequence[str], meta: Sequence[Mapping[str, Any]]
                 ) -> RewardOutput:
        """images: [L, 3, H, W] float in [0, 1]; prompts/meta: [L]. Returns scores [L] float32."""
        ...
