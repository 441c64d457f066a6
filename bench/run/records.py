"""The typed iteration record, and the glossary of every key a run directory's logs hold.

``IterationRecord`` is one line of ``iterations.jsonl``; its field documentation *is* the glossary
(``METRICS``), completed by the evaluation keys below and by the keys each algorithm declares on its
class (``log_keys``, read through the registry). A test checks every key a run writes is documented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

PHASES = ("rollout", "reward", "advantage", "update")


def _doc(text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class IterationRecord:
    """One training iteration (docs/RUNDIR.md). Statistics of the update are NaN (counts 0) when the
    update was skipped because of a non-finite batch."""

    iteration: int = _doc("0-based iteration index (evals: completed training iterations at eval time)")
    samples: int = _doc("images scored this iteration")
    samples_total: int = _doc("cumulative images scored (budget currency 'samples')")
    nfe_rollout: int = _doc("denoiser forward passes of this iteration's rollout (a CFG-guided evaluation counts 2)")
    nfe_update: int = _doc("denoiser forward passes of this iteration's update (recomputed log-probs; backward not "
                           "counted)")
    nfe_total: int = _doc("cumulative rollout + update forward passes (budget currency 'nfe')")
    seconds_total: float = _doc("cumulative training seconds: rollout + reward + advantage + update (budget "
                                "currency 's')")
    t_rollout_s: float = _doc("seconds in the rollout (sampling, decoding)")
    t_reward_s: float = _doc("seconds scoring the images")
    t_advantage_s: float = _doc("seconds computing advantages")
    t_update_s: float = _doc("seconds in the policy update (forward + backward + optimizer)")
    t_iteration_s: float = _doc("sum of the four phases")
    reward_mean: float = _doc("mean training reward of this iteration's images")
    reward_std: float = _doc("population std of the training reward")
    reward_min: float = _doc("min training reward")
    reward_max: float = _doc("max training reward")
    reward_components: Mapping[str, float] = field(default_factory=dict, metadata={
        "doc": "mean of a reward component (weighted parts, per-attribute checks)", "key": "reward/<component>"})
    loss: float = _doc("mean PPO loss over trained edge terms", math.nan)
    approx_kl: float = _doc("0.5 * mean((logp_new - logp_old)^2) over trained edges", math.nan)
    clip_frac: float = _doc("fraction of trained edges whose ratio left [1 - clip, 1 + clip] "
                            "(Flow-DPPO: the fraction its KL mask dropped)", math.nan)
    grad_norm: float = _doc("gradient norm before clipping (last optimizer step)", math.nan)
    first_ratio: float = _doc("mean importance ratio of the first update micro-batch (should be 1)", math.nan)
    kl: float = _doc("mean KL to the frozen reference (0 when beta = 0)", math.nan)
    lr: float = _doc("learning rate")
    peak_mem_mb: float = _doc("peak memory in MiB: CUDA max allocated, or the process's peak RSS on CPU")
    flops: float | None = _doc("FLOPs of this iteration's training calls on all devices, from each call kind's count "
                               "on the meta device (bench.engine.flops: matrix products, convolutions and attention; "
                               "AdamW by hand); null when run.flops is off or counting failed (manifest 'flops')")
    flops_total: float | None = _doc("cumulative flops")
    mfu: float | None = _doc("model FLOPs utilisation: flops / (t_iteration_s x peak FLOP/s per device x devices); "
                             "peak from run.peak_flops or the known-device table for the run's precision; null "
                             "without a known peak (CPU: set run.peak_flops)")
    flops_uncounted_calls: int = _doc("training calls of kinds with no FLOP count (0 FLOPs in flops)", 0)
    edges: int = _doc("edge loss terms trained this iteration (all ranks)", 0)
    optimizer_steps: int = _doc("optimizer steps this iteration", 0)
    micro_batches: int = _doc("forward+backward micro-batches this iteration (gradient accumulation)", 0)
    zero_spread_frac: float = _doc("fraction of prompts whose images all got the same reward (no learning signal)")
    algorithm: Mapping[str, float] = field(default_factory=dict, metadata={
        "doc": "algorithm-specific keys, namespaced by the algorithm's registry name (its class's log_keys)",
        "key": None})
    cost: Mapping[str, Any] = field(default_factory=dict, metadata={
        "doc": "the iteration's call trace and modeled seconds (bench.engine.pricing.COST_KEYS)", "key": None})
    nonfinite: str | None = _doc("only on an iteration with NaN/inf: where (reward | logp | grad | loss); its "
                                 "update was not applied")

    def to_json(self) -> dict[str, Any]:
        """The flat record written to iterations.jsonl (components as ``reward/<k>``, algorithm keys as
        themselves, ``nonfinite`` only when set)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "reward_components":
                out.update({f"reward/{k}": x for k, x in v.items()})
            elif f.name in ("algorithm", "cost"):
                out.update(v)
            elif f.name != "nonfinite" or v is not None:
                out[f.name] = v
        return out

    def finite(self) -> bool:
        """The statistics a NaN batch would poison are finite."""
        # approx_kl is NaN for likelihood-free algorithms (no log-probs); a NaN log-prob already makes the loss NaN
        return all(math.isfinite(getattr(self, k)) for k in ("reward_mean", "loss", "grad_norm"))


#: Keys of evals.jsonl besides the cumulative totals it shares with iterations.jsonl.
EVAL_KEYS: dict[str, str] = {
    "t_eval_s": "seconds spent in this evaluation (outside the training budget)",
    "eval/<reward>": "mean held-out reward over the eval prompts (deterministic ODE sampling, fixed noise)",
    "eval/<reward>/std": "population std of the held-out reward",
    "eval/<reward>/<component>": "mean of a held-out reward component",
    "samples_png": "sample grid of this evaluation, relative to the run directory",
    "reward_hacking": "possible reward hacking at this evaluation: the training reward rose while a held-out reward "
                      "fell over the last 3 evaluations, or heldout_below_start is not empty",
    "heldout_below_start": "held-out eval keys judged on the whole curve: the training reward's eval score has been "
                           "above its iteration-0 value at some evaluation of the run, and this held-out reward is below "
                           "its iteration-0 value at this and the previous evaluation after iteration 0, each by more "
                           "than the iteration-0 standard error (a collapse that stays is flagged at every later "
                           "evaluation; [] otherwise)",
    "eval_images": "images scored in this evaluation (eval.num_prompts x eval.images_per_prompt)",
    "samples_prompts": "prompt of each image of the sample grid, in grid order (row-major)",
    "eval_point": "the multiple of eval.every (in its currency: iterations, samples, NFE or seconds) this evaluation "
                  "is the first iteration boundary at or past; 0 at the start, null for the end-of-run evaluation",
}

#: Keys of each line of eval_scores.jsonl (one line per evaluated image; docs/RUNDIR.md).
EVAL_SCORE_KEYS: dict[str, str] = {
    "iteration": "completed training iterations at the evaluation (its evals.jsonl record has the same)",
    "nfe": "cumulative training NFE at the evaluation (evals.jsonl nfe_total)",
    "samples": "cumulative training samples at the evaluation (evals.jsonl samples_total)",
    "seconds": "cumulative training seconds at the evaluation (evals.jsonl seconds_total; wall clock)",
    "prompt_index": "index of the image's prompt in the eval prompt set (the first eval.num_prompts)",
    "image_index": "index of the image among its prompt's eval.images_per_prompt images (its noise, from eval.seed)",
    "prompt": "the prompt text",
    "scores": "{<reward>: score, <reward>/<component>: component} for every eval reward",
}

#: Wall-clock and memory fields: differ between two otherwise identical runs.
TIMING_KEYS = ("t_rollout_s", "t_reward_s", "t_advantage_s", "t_update_s", "t_iteration_s", "seconds_total",
               "peak_mem_mb", "t_eval_s", "mfu")


def record_glossary() -> dict[str, str]:
    """The fields of ``IterationRecord``, the eval keys and the cost keys, by logged key."""
    from bench.engine.pricing import COST_KEYS

    out = dict(COST_KEYS)
    for f in fields(IterationRecord):
        key = f.metadata.get("key", f.name)
        if key is not None:
            out[key] = f.metadata["doc"]
    return {**out, **EVAL_KEYS}


def glossary() -> dict[str, str]:
    """Every documented key: the record's, the evaluation's and every registered algorithm's ``log_keys``
    (patterns: ``<x>`` stands for a name)."""
    from bench.registry import algorithm_log_keys

    return {**record_glossary(), **algorithm_log_keys()}


def metric_documented(key: str, metrics: Mapping[str, str] | None = None) -> bool:
    """True if ``key`` matches a glossary entry (``<x>`` matches one or more path segments)."""
    metrics = glossary() if metrics is None else metrics
    if key in metrics:
        return True
    parts = key.split("/")
    for pat in metrics:
        pp = pat.split("/")
        if len(pp) == len(parts) and all(a == b or a.startswith("<") for a, b in zip(pp, parts)):
            return True
        if len(parts) > len(pp) >= 2 and pp[-1].startswith("<") and all(
                a == b or a.startswith("<") for a, b in zip(pp[:-1], parts)):
            return True
    return False


def zero_spread_fraction(scores: Any, leaf_prompts: Any) -> float:
    """Fraction of prompts whose images all got the same reward (scores [L], leaf_prompts [L])."""
    import torch

    groups = torch.unique(leaf_prompts)
    flat = sum(1 for g in groups if float(scores[leaf_prompts == g].float().std(unbiased=False)) == 0.0)
    return flat / max(1, len(groups))
