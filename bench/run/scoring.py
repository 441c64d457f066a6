"""Rewards as the runner uses them: built from a spec, called on a batch, failures captured.

A reward spec is a registry name, a ``module:Class`` spec or a weighted sum "a=1.0,b=0.5" (itself a
reward). A reward's own ``ValueError`` at construction (bad option) is a usage error; a
``MissingWeightsError`` stays one. Any other exception while scoring becomes a ``RewardError`` whose
message names the file where the batch's prompts and the traceback were saved.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any, Mapping

import torch

from bench.engine.trace import CallRecorder, record_reward
from bench.errors import RewardError, UsageError, is_out_of_memory
from bench.registry import WEIGHTED_REWARD, is_spec, load_object, reward_class, rewards
from bench.rundir import failpoints
from bench.types import PromptBatch, RewardOutput


def missing_modules(name: str) -> list[str]:
    """Python modules reward ``name`` needs that are not installed (first of the two preflight checks)."""
    import importlib.util

    entry = rewards().get(name)  # the registry's entry lists them (``Entry.requires``)
    required = entry.requires if entry is not None else ()
    return [m for m in required if importlib.util.find_spec(m) is None]


def check_packages(name: str) -> None:
    """Refuse reward ``name`` when a module it needs is missing, with the install command."""
    missing = missing_modules(name)
    if missing:
        hint = load_object("rewards.cli:INSTALL_HINT")
        raise UsageError(f"reward {name!r}: python modules not installed: {', '.join(missing)}; install with: "
                         f"{hint}")


def check_weights(reward: Any) -> None:
    """Find a reward's weight files now (``_locate``; the parts of a weighted sum too), so a missing file is
    reported before the model loads or a run directory exists, not on the first scored batch. Raises the
    reward's ``MissingWeightsError``."""
    for _, _, part in getattr(reward, "parts", ()):
        check_weights(part)
    locate = getattr(reward, "_locate", None)
    if callable(locate):
        locate()


def _build_one(name: str, device: torch.device, options: Mapping[str, Any]) -> Any:
    if not is_spec(name):
        if name not in rewards():
            reward_class(name)  # refuses an unknown name with did-you-mean
        check_packages(name)
    reward = reward_class(name)(device=device, **dict(options.get(name, {})))
    check_weights(reward)
    return reward


def build_reward(spec: str, device: torch.device, options: Mapping[str, Any], normalize: str = "none") -> Any:
    """A reward from a name or a weighted spec "a=1.0,b=0.5" (itself a reward), checked in the order
    ``bench rewards check`` uses: the name, its packages, its options, its weight files."""
    if not is_spec(spec) and ("=" in spec or "," in spec):
        parse = load_object("rewards.combine:parse_reward_spec")
        try:
            parts = parse(spec)
        except ValueError as e:
            raise UsageError(str(e)) from None
        built = [(name, w, _build_one(name, device, options)) for name, w in parts]
        return load_object(WEIGHTED_REWARD)(built, normalize=normalize)
    return _build_one(spec, device, options)


def build_reward_checked(spec: str, device: torch.device, options: Mapping[str, Any],
                         normalize: str = "none") -> Any:
    """``build_reward`` with a reward's own ValueError (bad option) as a usage error."""
    try:
        return build_reward(spec, device, options, normalize)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(f"reward {spec!r}: {e}") from None


def build_rewards(spec: Any, eval_names: tuple[str, ...], device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The training reward and the held-out rewards by name (the training reward object is reused when
    it is also evaluated). ``spec``: a ``bench.spec.RewardSpec``."""
    reward = build_reward_checked(spec.name, device, spec.options, spec.normalize)
    evals = {name: reward if name == spec.name else build_reward_checked(name, device, spec.options)
             for name in eval_names}
    return reward, evals


#: the built-in rewards with a gradient path (``differentiable = True``), named in the usage error below
DIFFERENTIABLE_HINT = ("shapes_pref, brightness, pickscore, hpsv2, clip_score, image_reward, aesthetic, and weighted "
                       "sums of them with reward.normalize none")


def check_reward_gradient(reward: Any, algo_name: str) -> None:
    """An algorithm that back-propagates the reward into the policy (class attribute ``reward_gradient``:
    ReFL, DRaFT-K) needs a reward with a gradient path (``differentiable`` and ``score_grad``)."""
    if getattr(reward, "differentiable", False) and callable(getattr(reward, "score_grad", None)):
        return
    name = getattr(reward, "name", type(reward).__name__)
    raise UsageError(f"algorithm {algo_name!r} back-propagates the reward into the policy, but reward {name!r} has "
                     f"no gradient path; differentiable rewards: {DIFFERENTIABLE_HINT}")


def score(reward: Any, images: torch.Tensor, batch: PromptBatch, leaf_prompts: torch.Tensor, *,
          out_dir: Path, iteration: int, stage: str, recorder: CallRecorder | None = None) -> RewardOutput:
    """Scores [L] (float32, CPU) of images [L, 3, H, W] whose prompts are ``batch.prompts[leaf_prompts]``;
    the call goes to ``recorder`` (the call trace) when one is given."""
    idx = leaf_prompts.tolist()
    if recorder is not None:
        record_reward(recorder, getattr(reward, "name", type(reward).__name__), images.shape[0],
                      "reward" if stage == "train" else "eval")
    try:
        failpoints.hit("reward")  # a reward reading its weights or a cache from a failing disk
        out = reward(images, [batch.prompts[i] for i in idx], [batch.metadata[i] for i in idx])
        return RewardOutput(out.scores.detach().float().cpu(), {k: v.detach().float().cpu()
                                                                  for k, v in out.components.items()},
                            dict(getattr(out, "weights", {}) or {}))
    except UsageError:  # including a reward's MissingWeightsError on its first call
        raise
    except Exception as e:  # every reward failure is reported the same way
        if is_out_of_memory(e):
            raise
        path = _save_failed_batch(out_dir, reward, batch, idx, images, iteration, stage, e)
        name = getattr(reward, "name", type(reward).__name__)
        raise RewardError(f"reward {name!r} failed while scoring the {stage} batch of iteration {iteration}: "
                          f"{type(e).__name__}: {e}\n  the batch's prompts and the traceback are saved in "
                          f"{path}") from e


def _save_failed_batch(out_dir: Path, reward: Any, batch: PromptBatch, idx: list[int], images: torch.Tensor,
                       iteration: int, stage: str, e: BaseException) -> Path:
    d = out_dir / "debug"
    d.mkdir(exist_ok=True)
    path = d / f"failed_{'batch' if stage == 'train' else stage}_{iteration:06d}.json"
    obj = {"iteration": iteration, "stage": stage, "reward": getattr(reward, "name", type(reward).__name__),
           "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
           "prompts": list(batch.prompts), "prompt_ids": list(batch.prompt_ids),
           "metadata": [dict(m) for m in batch.metadata], "image_prompt_index": idx,
           "images": {"shape": list(images.shape), "dtype": str(images.dtype),
                      "finite": bool(torch.isfinite(images).all())}}
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path
