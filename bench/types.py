"""Typed records that flow one way through the training loop.

    PromptBatch -> Algorithm.plan -> RolloutPlan -> RolloutEngine.run -> Rollout
      -> Reward -> RewardOutput -> Algorithm.advantages -> Advantages -> Algorithm.update -> UpdateStats

Shape letters (used in every docstring and comment of the package):

    P  prompts in the iteration's batch
    G  group size: trees (roots) per prompt
    L  leaves = images produced by one rollout
    N  nodes = every latent visited by the rollout (roots, internal nodes, leaves)
    T  denoising steps; step i maps sigma index i to i + 1 (i = 0 is the noisiest)
    C, h, w  latent channels / height / width
    H, W     image height / width in pixels
    S, D     text sequence length / text embedding width

A batch of independent chains is a tree that never branches, so one record describes every algorithm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

# ---- weight snapshot names (bench/model/snapshots.py holds the weights) ----
#: the weights being trained; every other name is a snapshot
CURRENT = "current"
#: the frozen base model under LoRA (``Policy.reference``), evaluated for KL terms
REFERENCE = "reference"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: prefix of snapshot tensors inside a checkpoint's policy.safetensors
PREFIX = "snapshot/"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in (CURRENT, REFERENCE):
        raise ValueError(f"a weight snapshot is named by a lower-case identifier other than {CURRENT!r} and "
                         f"{REFERENCE!r}, got {name!r}")
    return name


#: Step modes a plan may ask for. "ode": deterministic Euler (flow) / DDIM eta=0 (epsilon);
#: "sde": stochastic step with a log-prob; "dpm2": deterministic 2nd-order multistep DPM-Solver++
#: (MixGRPO-Flash post-window steps, flow models only).
STEP_MODES = ("ode", "sde", "dpm2")
#: SDE families for flow models: "flow_grpo" = Flow-GRPO's ``sde_step_with_logprob`` (flow_grpo,
#: flow_grpo/diffusers_patch/sd3_sde_with_logprob.py); "dance" = DanceGRPO's ``flux_step`` with
#: ``sde_solver`` (DanceGRPO, fastvideo/train_grpo_flux.py); "cps" = coefficients-preserving sampling
#: (the same flow_grpo function with ``sde_type='cps'``, ``bench.engine.sde.cps_sde_step``). Epsilon models
#: always use DDIM.
SDE_TYPES = ("flow_grpo", "dance", "cps")
#: What a rollout decodes into its images (``sampler.final_image``): "sample" = the last sampled latent
#: (Flow-GRPO, DDPO, MixGRPO, TreeGRPO); "x0" = the data prediction of the last denoiser evaluation
#: (DanceGRPO decodes ``pred_original`` of its last step, whose SDE noise never reaches the reward).
FINAL_IMAGES = ("sample", "x0")
#: How a branching step's children are scored when they were drawn with a scaled noise
#: (``RolloutPlan.split_noise_scale``): with the step's std ("step") or the std they were drawn with.
SPLIT_LOGP_STDS = ("step", "sampling")


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one iteration.

    prompts:    [P] prompt strings
    metadata:   [P] per-prompt metadata (e.g. the shapes world's attributes), passed to rewards
    prompt_ids: [P] index of each prompt in its prompt set (DDPO's per-prompt statistics key on text)
    """

    prompts: tuple[str, ...]
    metadata: tuple[Mapping[str, Any], ...] = ()
    prompt_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("PromptBatch needs at least one prompt")
        if not self.metadata:
            object.__setattr__(self, "metadata", tuple({} for _ in self.prompts))
        if not self.prompt_ids:
            object.__setattr__(self, "prompt_ids", tuple(range(len(self.prompts))))
        if not (len(self.metadata) == len(self.prompt_ids) == len(self.prompts)):
            raise ValueError("prompts, metadata and prompt_ids must have the same length")

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class RolloutPlan:
    """What an algorithm asks the engine to sample (the algorithm describes, the engine executes).

    num_steps:        T, number of denoising steps
    modes:            [T] mode of step i, one of STEP_MODES
    branch:           [T] children created per node at step i (1 = no branching; > 1 needs mode "sde")
    trees_per_prompt: G, independent roots per prompt (the group size of chain algorithms)
    shared_noise:     all roots of one prompt start from the same initial noise (never shared across
                      prompts)
    noise_level:      SDE noise level (Flow-GRPO "a" / DanceGRPO "eta"; DDIM eta for epsilon models)
    sde_type:         "flow_grpo", "dance" or "cps" (flow models; ignored by epsilon models, which use DDIM)
    guidance:         classifier-free guidance scale; <= 1 disables CFG (one NFE per evaluation)
    sigmas:           optional explicit sigma schedule [T+1] (1 -> 0) overriding the model's default;
                      MixGRPO-Flash uses it for its compressed post-window schedule
    keep_latents:     keep every node's latent in the Rollout (needed to recompute log-probs)
    keep_means:       also keep the mean of every SDE step (``Rollout.means``): GRPO-Guard's RatioNorm
                      compares the trained policy's step means with the sampling-time ones
    final_image:      "sample" (decode the last sampled latent) or "x0" (decode the last evaluation's data
                      prediction), see FINAL_IMAGES; identical for a last ODE step to sigma = 0
    log_std_range:    optional (lo, hi): flow SDE step stds are clamped to [e^lo, e^hi] (TreeGRPO's code)
    split_noise_scale: the children of a branching step (branch > 1) are sampled as mean + scale * std * z
                      (BranchGRPO's ``tree_split_noise_scale``); 1 = the step's own distribution
    split_logp_std:   the std the log-prob of such a child is scored with: "step" (the step's std, as
                      BranchGRPO's code, whatever the scale) or "sampling" (scale * std, the distribution
                      the child was drawn from); see SPLIT_LOGP_STDS
    cfg_uncond_grad:  False: in the update's guided evaluations (``RolloutEngine.logp``) the unconditional
                      branch is detached, so gradients flow through the conditional branch only (Flow-GRPO's
                      ``train_sd3.py::compute_log_prob``); True (default): through both
    weights:          the weights the rollout samples with: "current" (the trained ones) or the name of a
                      weight snapshot the algorithm declares (``bench.model.snapshots``; DiffusionNFT samples
                      with its EMA "old" policy)
    info:             algorithm-specific scalars describing the plan, logged with the iteration under
                      namespaced keys (e.g. {"treegrpo/window_start": 3})
    """

    num_steps: int
    modes: tuple[str, ...]
    branch: tuple[int, ...]
    trees_per_prompt: int = 1
    shared_noise: bool = False
    noise_level: float = 0.7
    sde_type: str = "flow_grpo"
    guidance: float = 1.0
    sigmas: tuple[float, ...] | None = None
    keep_latents: bool = True
    keep_means: bool = False
    final_image: str = "sample"
    log_std_range: tuple[float, float] | None = None
    split_noise_scale: float = 1.0
    split_logp_std: str = "step"
    cfg_uncond_grad: bool = True
    weights: str = "current"
    info: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        T = self.num_steps
        if T < 1:
            raise ValueError(f"num_steps must be >= 1, got {T}")
        if len(self.modes) != T or len(self.branch) != T:
            raise ValueError(f"modes and branch must have num_steps={T} entries")
        for i, (m, k) in enumerate(zip(self.modes, self.branch)):
            if m not in STEP_MODES:
                raise ValueError(f"step {i}: unknown mode {m!r}; valid: {STEP_MODES}")
            if k < 1:
                raise ValueError(f"step {i}: branch factor must be >= 1, got {k}")
            if k > 1 and m != "sde":
                raise ValueError(f"step {i}: branching (k={k}) needs an 'sde' step, got {m!r}")
        if self.trees_per_prompt < 1:
            raise ValueError("trees_per_prompt must be >= 1")
        if self.sde_type not in SDE_TYPES:
            raise ValueError(f"unknown sde_type {self.sde_type!r}; valid: {SDE_TYPES}")
        if self.final_image not in FINAL_IMAGES:
            raise ValueError(f"unknown final_image {self.final_image!r}; valid: {FINAL_IMAGES}")
        if self.log_std_range is not None and not (len(self.log_std_range) == 2
                                                   and self.log_std_range[0] <= self.log_std_range[1]):
            raise ValueError(f"log_std_range must be (lo, hi) with lo <= hi, got {self.log_std_range!r}")
        if not float(self.split_noise_scale) > 0:
            raise ValueError(f"split_noise_scale must be > 0, got {self.split_noise_scale!r}")
        if self.split_logp_std not in SPLIT_LOGP_STDS:
            raise ValueError(f"unknown split_logp_std {self.split_logp_std!r}; valid: {SPLIT_LOGP_STDS}")
        if self.weights != CURRENT:
            check_name(self.weights)
        if self.sigmas is not None and len(self.sigmas) != T + 1:
            raise ValueError(f"sigmas must have num_steps + 1 = {T + 1} entries, got {len(self.sigmas)}")

    @property
    def leaves_per_tree(self) -> int:
        n = 1
        for k in self.branch:
            n *= k
        return n

    def nodes_per_level(self) -> list[int]:
        """Number of latents per tree at each sigma index 0..T (level 0 = the root)."""
        out = [1]
        for k in self.branch:
            out.append(out[-1] * k)
        return out

    def evaluations_per_tree(self) -> int:
        """Denoiser evaluations per tree (one per node at levels 0..T-1), before CFG doubling."""
        return sum(self.nodes_per_level()[:-1])

    def cfg_factor(self) -> int:
        return 2 if self.guidance > 1.0 else 1


@dataclass
class Rollout:
    """One tree-shaped record of everything a rollout visited.

    Node n's latent sits at sigma index ``level[n]`` (0 = pure noise, T = final sample). The edge
    parent(n) -> n is produced by step ``level[n] - 1`` from ``latents[parent[n]]``.

    latents:    [N, C, h, w] float32 every visited latent (None when the plan did not keep them)
    parent:     [N] long, parent node id, -1 for roots
    level:      [N] long, sigma index of the node's latent
    prompt:     [N] long, index of the node's prompt in the PromptBatch
    tree:       [N] long, global id of the node's tree (root)
    logp_old:   [N] float32, sampling-time log-prob of the edge parent -> n (NaN for roots and for
                deterministic ODE/DPM edges)
    trainable:  [N] bool, the edge parent -> n is stochastic and can carry a policy-gradient term
    leaves:     [L] long, node ids of the final samples, in image order
    images:     [L, 3, H, W] float32 in [0, 1]
    sigmas:     [T+1] float32, the schedule the rollout used (flow models) or the timestep grid
                (epsilon models: alpha_bar values at each level)
    timesteps:  [T] float32, the timestep value the denoiser saw at each step
    nfe:        denoiser forward passes spent (a CFG-guided evaluation counts 2)
    plan:       the plan that produced it
    iteration:  training iteration the rollout belongs to
    conditioning: the encoded prompts [P] (a ``bench.model.policy.Conditioning``) the engine reuses to
                recompute log-probs
    batch:      the PromptBatch the rollout was sampled for (prompt texts and metadata, which a
                direct-gradient update passes to the reward; None in merged/split views)
    means:      [N, C, h, w] float32 sampling-time mean of the step parent -> n (NaN for roots and
                deterministic edges), kept only when the plan asks (``keep_means``), else None
    """

    latents: Tensor | None
    parent: Tensor
    level: Tensor
    prompt: Tensor
    tree: Tensor
    logp_old: Tensor
    trainable: Tensor
    leaves: Tensor
    images: Tensor
    sigmas: Tensor
    timesteps: Tensor
    nfe: int
    plan: RolloutPlan
    iteration: int = 0
    conditioning: Any = None
    batch: PromptBatch | None = None
    means: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.parent.numel())

    @property
    def num_leaves(self) -> int:
        return int(self.leaves.numel())

    def leaf_prompts(self) -> Tensor:
        """[L] prompt index of every leaf."""
        return self.prompt[self.leaves]

    def children(self) -> list[list[int]]:
        """Children lists for every node (python lists; cheap for trees of a few thousand nodes)."""
        out: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for n, p in enumerate(self.parent.tolist()):
            if p >= 0:
                out[p].append(n)
        return out

    def leaf_of_node(self) -> Tensor:
        """[N] long: for chain rollouts, the leaf index (0..L-1) each node leads to; -1 if ambiguous
        (a node with several leaves below it)."""
        N = self.num_nodes
        out = torch.full((N,), -1, dtype=torch.long)
        count = torch.zeros(N, dtype=torch.long)
        for li, n in enumerate(self.leaves.tolist()):
            while n >= 0:
                count[n] += 1
                out[n] = li
                n = int(self.parent[n])
        out[count != 1] = -1
        return out


@dataclass(frozen=True)
class RewardOutput:
    """Scores of L images.

    scores:     [L] float32, the reward the algorithm optimises
    components: named [L] float32 tensors logged separately (e.g. each term of a weighted sum, or
                the per-attribute checks of shapes_attr)
    weights:    the weight of each component that is a term of ``scores`` (a weighted sum's parts,
                e.g. {"hpsv2": 1.0, "clip_score": 0.5}); empty for a single reward. MixGRPO's
                ``advantage_aggr`` weighs the per-part advantages with these, normalised to sum 1
    """

    scores: Tensor
    components: Mapping[str, Tensor] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.dim() != 1:
            raise ValueError(f"reward scores must be [L], got shape {tuple(self.scores.shape)}")
        missing = sorted(set(self.weights) - set(self.components))
        if missing:
            raise ValueError(f"reward weights name components that are not there: {missing}")


@dataclass(frozen=True)
class Advantages:
    """Per-edge advantages.

    edge:    [N] float32, advantage of the edge parent(n) -> n (NaN for roots; chain algorithms
             broadcast a leaf's advantage along its path, TreeGRPO gives each edge its own value)
    leaf:    [L] float32, the normalised advantage of every leaf
    metrics: scalar diagnostics to log (e.g. the fraction of groups whose rewards have zero spread),
             algorithm-specific keys namespaced "algo/key"
    """

    edge: Tensor
    leaf: Tensor
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateStats:
    """What one policy update did.

    loss:            mean loss over the trained terms
    approx_kl:       0.5 * mean((logp_new - logp_old)^2) over trained edges (DDPO's diagnostic)
    clip_frac:       fraction of trained edges whose ratio left [1 - eps, 1 + eps] (an update with
                     another surrogate counts the terms it reports as clipped, e.g. Flow-DPPO's masked ones)
    grad_norm:       gradient norm before clipping (last optimizer step)
    first_ratio:     mean importance ratio exp(logp_new - logp_old) of the first micro-batch, before
                     any optimizer step (should be 1 up to numerics)
    edges:           number of edge loss terms
    optimizer_steps: optimizer steps taken
    micro_batches:   denoiser calls with gradients (forward+backward micro-batches)
    kl:              mean KL to the reference (0 when beta = 0)
    nfe:             denoiser forward passes the update spent (recomputed log-probs and reference
                     evaluations; a guided evaluation counts 2, the backward pass is not counted)
    metrics:         algorithm-specific scalars, keys namespaced "algo/key"
    """

    loss: float
    approx_kl: float
    clip_frac: float
    grad_norm: float
    first_ratio: float
    edges: int
    optimizer_steps: int
    micro_batches: int
    kl: float = 0.0
    nfe: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplerSpec:
    """Resolved sampling settings an algorithm is constructed with (from model preset, algorithm
    preset, config file and --set, in that order).

    steps:       T
    guidance:    CFG scale (<= 1 disables CFG)
    noise_level: SDE noise level
    sde_type:    "flow_grpo" | "dance" | "cps"
    shift:       time shift of the flow schedule (sigma' = s*sigma / (1 + (s-1)*sigma))
    prediction:  "flow" (velocity) or "epsilon" (DDIM models)
    schedule:    flow schedule, "scheduler" or "linspace" (``bench.engine.sde.FLOW_SCHEDULES``)
    final_image: "sample" | "x0", or None = the algorithm's reference behaviour
    sigmas:      the resolved base schedule [T+1] of flow models (None: algorithms that need it
                 rebuild it from schedule/shift)
    """

    steps: int
    guidance: float
    noise_level: float
    sde_type: str = "flow_grpo"
    shift: float = 1.0
    prediction: str = "flow"
    schedule: str = "scheduler"
    final_image: str | None = None
    sigmas: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TrainSpec:
    """Resolved training settings an algorithm's ``update`` needs (from the ``train.*`` config section).

    micro_batch:      max rows in one denoiser call with gradients (a CFG-guided evaluation takes 2
                      rows); the algorithm splits its trained edges into micro-batches of at most this
                      and accumulates gradients
    optimizer_steps:  optimizer steps per iteration (the trained edges are split into this many
                      mini-batches; gradient accumulation = micro-batches per mini-batch)
    max_grad_norm:    gradient clipping threshold (<= 0 disables clipping)
    """

    micro_batch: int = 64
    optimizer_steps: int = 1
    max_grad_norm: float = 1.0
