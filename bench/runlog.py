"""The run directory writer (format: docs/RUNDIR.md) and the glossary of every logged key."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

SCHEMA_VERSION = 1

#: Every key written to iterations.jsonl / evals.jsonl. Patterns: "<x>" stands for a name.
METRICS: dict[str, str] = {
    "iteration": "0-based iteration index (evals: completed training iterations at eval time)",
    "samples": "images scored this iteration",
    "samples_total": "cumulative images scored (budget currency 'samples')",
    "nfe_rollout": "denoiser forward passes of this iteration's rollout (a CFG-guided evaluation counts 2)",
    "nfe_update": "denoiser forward passes of this iteration's update (recomputed log-probs; backward not counted)",
    "nfe_total": "cumulative rollout + update forward passes (budget currency 'nfe')",
    "seconds_total": "cumulative training seconds: rollout + reward + advantage + update (budget currency 's')",
    "t_rollout_s": "seconds in the rollout (sampling, decoding)",
    "t_reward_s": "seconds scoring the images",
    "t_advantage_s": "seconds computing advantages",
    "t_update_s": "seconds in the policy update (forward + backward + optimizer)",
    "t_iteration_s": "sum of the four phases",
    "reward_mean": "mean training reward of this iteration's images",
    "reward_std": "population std of the training reward",
    "reward_min": "min training reward",
    "reward_max": "max training reward",
    "reward/<component>": "mean of a reward component (weighted parts, per-attribute checks)",
    "loss": "mean PPO loss over trained edge terms",
    "approx_kl": "0.5 * mean((logp_new - logp_old)^2) over trained edges",
    "clip_frac": "fraction of trained edges whose ratio left [1 - clip, 1 + clip]",
    "grad_norm": "gradient norm before clipping (last optimizer step)",
    "first_ratio": "mean importance ratio of the first update micro-batch (should be 1)",
    "kl": "mean KL to the frozen reference (0 when beta = 0)",
    "lr": "learning rate",
    "peak_mem_mb": "peak memory in MiB: CUDA max allocated, or the process's peak RSS on CPU",
    "edges": "edge loss terms trained this iteration",
    "optimizer_steps": "optimizer steps this iteration",
    "micro_batches": "forward+backward micro-batches this iteration (gradient accumulation)",
    "zero_spread_frac": "fraction of prompts whose images all got the same reward (no learning signal)",
    # algorithm-specific keys (namespaced by the algorithm's registry name)
    "ddpo/trained_steps": "DDPO: denoising steps trained per chain (int(T * timestep_fraction))",
    "ddpo/tracked_prompt_frac": "DDPO: fraction of this batch's prompts normalised with their own history",
    "ddpo/tracked_prompts_total": "DDPO: prompts with a statistics buffer so far",
    "dancegrpo/trained_steps": "DanceGRPO: steps trained per chain (int((T - 1) * timestep_fraction))",
    "mixgrpo/window_start": "MixGRPO: first step of the SDE window",
    "mixgrpo/window_size": "MixGRPO: SDE steps in the window this iteration (shrinks near the end)",
    "mixgrpo/sampling_steps": "MixGRPO: denoising steps actually sampled (fewer with Flash's compressed schedule)",
    "treegrpo/window_start": "TreeGRPO: first step of the SDE window",
    "treegrpo/window": "TreeGRPO: SDE window length",
    "treegrpo/branch_start": "TreeGRPO: first branching step",
    "treegrpo/leaves": "TreeGRPO: leaves (images) per tree, k^d",
    "treegrpo/edge_adv_abs_mean": "TreeGRPO: mean |edge advantage| over trained edges",
    "treegrpo/softmax_weight_max": "TreeGRPO: largest softmax_logprob sibling weight (1/k = uniform)",
    "nonfinite": "only on an iteration with NaN/inf: where (reward | logp | grad | loss); its update was not applied",
    "t_eval_s": "seconds spent in this evaluation (outside the training budget)",
    "eval/<reward>": "mean held-out reward over the eval images (deterministic ODE sampling from eval.seed noise)",
    "eval/<reward>/std": "population std of the held-out reward",
    "eval/<reward>/<component>": "mean of a held-out reward component",
    "eval_images": "images scored in this evaluation (eval.num_prompts x eval.images_per_prompt)",
    "samples_prompts": "prompt of each image of the sample grid, in grid order (row-major)",
    "samples_png": "sample grid of this evaluation, relative to the run directory",
    "reward_hacking": "training reward rose while a held-out reward fell over the last 3 evaluations",
}

TIMING_KEYS = ("t_rollout_s", "t_reward_s", "t_advantage_s", "t_update_s", "t_iteration_s", "seconds_total",
               "peak_mem_mb", "t_eval_s")


def metric_documented(key: str) -> bool:
    """True if ``key`` matches a METRICS entry (``<x>`` matches one or more path segments)."""
    if key in METRICS:
        return True
    parts = key.split("/")
    for pat in METRICS:
        pp = pat.split("/")
        if len(pp) == len(parts) and all(a == b or a.startswith("<") for a, b in zip(pp, parts)):
            return True
        if len(parts) > len(pp) >= 2 and pp[-1].startswith("<") and all(
                a == b or a.startswith("<") for a, b in zip(pp[:-1], parts)):
            return True
    return False


def reward_hacking_flag(evals: Sequence[Mapping[str, Any]], train_key: str, heldout_keys: Sequence[str],
                        window: int = 3) -> bool:
    """Over the last ``window`` evaluations the training reward strictly increases while some held-out
    reward strictly decreases."""
    if len(evals) < window:
        return False
    last = evals[-window:]

    def series(k: str) -> list[float] | None:
        vals = [e.get(k) for e in last]
        return None if any(v is None for v in vals) else [float(v) for v in vals]

    tr = series(train_key)
    if tr is None or not all(b > a for a, b in zip(tr, tr[1:])):
        return False
    for k in heldout_keys:
        s = series(k)
        if s is not None and all(b < a for a, b in zip(s, s[1:])):
            return True
    return False


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Mapping):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=5).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("treebench", "torch", "diffusers", "transformers", "accelerate", "peft", "numpy", "open-clip-torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLog:
    """Appends records to a run directory; optionally mirrors them to TensorBoard."""

    def __init__(self, out: Path, tensorboard: bool = False):
        self.out = out
        self.iter_path = out / "iterations.jsonl"
        self.eval_path = out / "evals.jsonl"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                from bench.registry import UsageError

                raise UsageError(f"run.tensorboard=true needs the tensorboard package ({e}); "
                                 f"pip install tensorboard") from None
            self._tb = SummaryWriter(str(out / "tensorboard"))

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        atomic_write_json(self.out / "manifest.json", {"schema_version": SCHEMA_VERSION, **manifest})

    def _append(self, path: Path, record: Mapping[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
            f.flush()

    def iteration(self, record: Mapping[str, Any]) -> None:
        self._append(self.iter_path, record)
        self._mirror(record, "train", int(record["iteration"]))

    def evaluation(self, record: Mapping[str, Any]) -> None:
        self._append(self.eval_path, record)
        self._mirror(record, "", int(record["samples_total"]))

    def _mirror(self, record: Mapping[str, Any], prefix: str, step: int) -> None:
        if self._tb is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration":
                self._tb.add_scalar(f"{prefix}/{k}" if prefix else k, v, step)
        self._tb.flush()

    def final(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.out / "final.json", summary)
        if self._tb is not None:
            self._tb.close()


def device_info(device: Any) -> dict[str, Any]:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": 1,
            "threads": torch.get_num_threads()}


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def host_info() -> dict[str, Any]:
    return {"hostname": platform.node(), "platform": platform.platform(), "argv": sys.argv}
