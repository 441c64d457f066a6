"""Fitting a configuration to a GPU without changing the algorithm (``bench plan --gpu-mem``, ``bench run
--fit``; docs/COST.md "Fitting a GPU").

What may change: the execution settings ``train.micro_batch`` (rows per denoiser call, rollout and update)
and ``model.gradient_checkpointing``, and the number of GPUs the prompts are split over. What must not:
the algorithm, summarised by its **invariants** (group size, images per iteration, optimizer steps per
iteration, images per optimizer step, trained denoiser rows and NFE per iteration), read from the
simulated call trace of the configuration before and after; a candidate whose invariants differ is a bug
and raises. Why micro-batching keeps the algorithm: each optimizer step's loss is normalised by its
mini-batch (the parents of that step), not by the micro-batch, so splitting a step into more micro-batches
whose gradients accumulate gives the same gradient (up to float rounding); checkpointing recomputes the
same activations; ``train.prompts_per_iteration`` is global, so more or fewer GPUs only change how many
prompts each GPU samples (DDP averages the gradients of equal shards).

The search: for checkpointing off and on (unless the user set it), the largest candidate micro-batch (up
to the configured one) whose modeled peak fits; of those, the one with the fewer modeled seconds per
iteration. Nothing fits: ``NoFit`` (a usage error, exit 2) naming the smallest configuration and the
memory it needs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import config as config_mod
from bench.cost.estimate import simulate
from bench.cost.memory import MIB, MemoryModel
from bench.engine import pricing as cost_mod
from bench.engine.trace import Call
from bench.errors import UsageError

CANDIDATE_MICRO_BATCHES = (64, 48, 32, 24, 16, 12, 8, 6, 4, 2, 1)
#: settings that change how an iteration is executed, not what the algorithm computes
EXECUTION_KEYS = frozenset({"train.micro_batch", "model.gradient_checkpointing", "model.compile", "model.device",
                            "model.distributed", "model.mixed_precision", "seed", "out", "budget"})
EXECUTION_PREFIXES = ("run.", "eval.", "data.eval_prompts")
#: iterations simulated to screen a candidate's memory (the full --iterations price the finalists)
SCREEN_ITERATIONS = 1
DEFAULT_HEADROOM_MIB = 1024.0


class NoFit(UsageError):
    """No configuration that keeps the algorithm fits the GPU memory."""


_MEM = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gib|gb|mib|mb|g|m)?\s*$", re.IGNORECASE)


def parse_mem(text: str, what: str = "--gpu-mem", zero_ok: bool = False) -> float:
    """MiB of "80GB" (10^9 bytes, as GPUs are sold), "79.6GiB", "24000MiB", "24000MB"; a bare number is GB."""
    m = _MEM.match(str(text))
    if not m:
        raise UsageError(f"{what} {text!r}: expected a size such as 80GB, 79.6GiB or 24000MiB")
    v, unit = float(m.group(1)), (m.group(2) or "gb").lower()
    scale = {"gb": 1e9, "g": 1e9, "gib": 2**30, "mb": 1e6, "m": 1e6, "mib": 2**20}[unit]
    if v < 0 or (v == 0 and not zero_ok):
        raise UsageError(f"{what} must be > 0, got {text!r}")
    return v * scale / MIB


def gib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"


def is_algorithmic(key: str) -> bool:
    return key not in EXECUTION_KEYS and not key.startswith(EXECUTION_PREFIXES)


def invariants(traces: Sequence[Sequence[Call]], prompts: int) -> dict[str, float]:
    """What the algorithm does per iteration, from its call trace (means over the simulated iterations)."""
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    images = [float(sum(c.rows for c in t if c.kind == "reward" and c.phase == "reward")) for t in traces]
    steps = [float(sum(1 for c in t if c.kind == "optimizer_step")) for t in traces]
    trained = [float(sum(c.rows for c in t if c.grad)) for t in traces]
    nfe = [float(sum(c.rows for c in t if c.component == "denoiser" and c.phase in ("rollout", "update")))
           for t in traces]
    return {"group_size": mean(images) / prompts, "images_per_iteration": mean(images),
            "optimizer_steps_per_iteration": mean(steps),
            "images_per_optimizer_step": mean([i / s for i, s in zip(images, steps) if s]) if any(steps) else 0.0,
            "trained_rows_per_iteration": mean(trained), "nfe_per_iteration": mean(nfe)}


def rank_config(cfg: Mapping[str, Any], gpus: int) -> dict[str, Any]:
    """``cfg`` as one of ``gpus`` data-parallel processes sees it: its share of the global prompts."""
    p = int(cfg["train"]["prompts_per_iteration"])
    if gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {gpus}")
    if p % gpus:
        near = sorted({d for d in range(1, p + 1) if p % d == 0}, key=lambda d: (abs(d - gpus), d))[:2]
        raise UsageError(f"--gpus {gpus}: train.prompts_per_iteration={p} does not split evenly over {gpus} GPUs (a "
                         f"prompt's group stays on one GPU); use --gpus {' or '.join(map(str, sorted(near)))} "
                         f"(changing train.prompts_per_iteration would change the algorithm)")
    return with_settings(cfg, {"train.prompts_per_iteration": p // gpus})


def with_settings(cfg: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    for key, value in settings.items():
        sec, name = key.split(".", 1)
        out[sec] = {**out[sec], name: value}
    return out


@dataclass
class Candidate:
    micro_batch: int
    checkpointing: bool
    peaks: dict[str, dict[str, Any]]
    peak_mib: float
    traces: list[list[Call]]
    nodes: int
    seconds: float | None = None
    grad_calls_per_step: float = 0.0

    @property
    def settings(self) -> dict[str, Any]:
        return {"train.micro_batch": self.micro_batch, "model.gradient_checkpointing": self.checkpointing}

    def phase(self) -> str:
        return max(self.peaks, key=lambda p: self.peaks[p]["peak_mib"])


def evaluate(cfg_rank: Mapping[str, Any], mm: MemoryModel, micro_batch: int, checkpointing: bool,
             iterations: int) -> Candidate:
    cfg = with_settings(cfg_rank, {"train.micro_batch": micro_batch, "model.gradient_checkpointing": checkpointing})
    stats: list[dict[str, int]] = []
    traces = simulate(cfg, iterations, stats=stats)
    nodes = max(s["nodes"] for s in stats)
    peaks = mm.phase_peaks(traces, nodes)
    unmodeled = sorted({k for p in peaks.values() for k in p["unmodeled"]})
    if unmodeled:
        raise UsageError(f"the memory of {', '.join(unmodeled)} is not modeled ({'; '.join(mm.missing.get(k, '?') for k in unmodeled)}): "
                         f"cannot check that a configuration fits")
    grad = [sum(1 for c in t if c.grad) for t in traces]
    steps = [sum(1 for c in t if c.kind == "optimizer_step") for t in traces]
    return Candidate(micro_batch, checkpointing, peaks, max(p["peak_mib"] for p in peaks.values()), traces, nodes,
                     grad_calls_per_step=max((g / s for g, s in zip(grad, steps) if s), default=0.0))


@dataclass
class FitResult:
    gpu_mem_mib: float
    usable_mib: float
    gpus: int
    before: Candidate
    chosen: Candidate
    changes: list[dict[str, Any]] = field(default_factory=list)
    invariants: dict[str, float] = field(default_factory=dict)
    resident: dict[str, float] = field(default_factory=dict)
    latent_mib: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        c = self.chosen
        return {"gpu_mem_mb": self.gpu_mem_mib, "usable_mb": self.usable_mib, "gpus": self.gpus,
                "settings": c.settings, "peak_mem_mb": c.peak_mib, "fits": c.peak_mib <= self.usable_mib,
                "phases": {p: {"peak_mem_mb": v["peak_mib"], "activation_mb": v["activation_mib"],
                               "largest_call": v["call"]} for p, v in c.peaks.items()},
                "resident_mb": dict(self.resident), "rollout_latents_mb": c.nodes * self.latent_mib,
                "changes": self.changes, "invariants": self.invariants,
                "modeled_seconds_per_iteration_before": self.before.seconds,
                "modeled_seconds_per_iteration": c.seconds, "peak_mem_mb_before": self.before.peak_mib}


def _price(profile: cost_mod.CostProfile, counts: Any, traces: Sequence[Sequence[Call]]) -> float:
    return sum(cost_mod.price(profile, t, counts).total for t in traces) / len(traces)


def fit(cfg: Mapping[str, Any], profile: cost_mod.CostProfile, counts: Any, mm: MemoryModel, gpu_mem_mib: float,
        gpus: int = 1, headroom_mib: float = DEFAULT_HEADROOM_MIB, user_keys: Sequence[str] = (),
        iterations: int = 20) -> FitResult:
    """The fastest configuration that keeps the algorithm of ``cfg`` and whose modeled peak fits
    ``gpu_mem_mib - headroom_mib`` on each of ``gpus`` GPUs (see the module docstring); ``user_keys``: the
    settings the user gave, which the search keeps. Raises ``NoFit`` naming the nearest fit."""
    usable = gpu_mem_mib - headroom_mib
    if usable <= 0:
        raise UsageError(f"--headroom {gib(headroom_mib)} leaves nothing of {gib(gpu_mem_mib)}")
    rank = rank_config(cfg, gpus)
    mb0, ck0 = int(cfg["train"]["micro_batch"]), bool(cfg["model"]["gradient_checkpointing"])
    can_ckpt = "forward_backward_checkpointed" in mm.fits
    cks = [ck0] if "model.gradient_checkpointing" in user_keys or not can_ckpt else sorted({ck0, True})
    mbs = [mb0] if "train.micro_batch" in user_keys else sorted({mb0, *(m for m in CANDIDATE_MICRO_BATCHES
                                                                       if m < mb0)}, reverse=True)
    screen = min(iterations, SCREEN_ITERATIONS)
    before = evaluate(rank, mm, mb0, ck0, screen)
    found: list[Candidate] = []
    smallest: Candidate | None = None
    seen: dict[tuple[int, bool], Candidate] = {(mb0, ck0): before}

    def at(mb: int, ck: bool) -> Candidate:
        nonlocal smallest
        if (mb, ck) not in seen:
            seen[(mb, ck)] = evaluate(rank, mm, mb, ck, screen)
        c = seen[(mb, ck)]
        if smallest is None or c.peak_mib < smallest.peak_mib:
            smallest = c
        return c

    first: dict[bool, int] = {}
    for ck in cks:  # the peak grows with the micro-batch: bisect for the largest one that fits
        lo, hi = 0, len(mbs) - 1  # mbs descending; find the first index that fits
        if at(mbs[hi], ck).peak_mib > usable:
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if at(mbs[mid], ck).peak_mib <= usable:
                hi = mid
            else:
                lo = mid + 1
        found.append(at(mbs[lo], ck))
        first[ck] = lo
    if not found:
        assert smallest is not None
        need = smallest.peak_mib + headroom_mib
        kept = [k for k in ("train.micro_batch", "model.gradient_checkpointing") if k in user_keys]
        raise NoFit(
            f"nothing that keeps the algorithm fits {gib(gpu_mem_mib)} per GPU ({gib(usable)} after "
            f"{gib(headroom_mib)} headroom): the smallest configuration, "
            f"{' '.join(f'{k}={str(v).lower()}' for k, v in smallest.settings.items())}, peaks at "
            f"{gib(smallest.peak_mib)} in the {smallest.phase()} ({smallest.peaks[smallest.phase()]['call']}; "
            f"resident {gib(sum(mm.resident.values()))}). Nearest fit: --gpu-mem {math.ceil(need * MIB / 1e9)}GB"
            + (f" (or drop your {', '.join(kept)} so the search may change it)" if kept else ""))
    full: dict[tuple[int, bool], Candidate] = {}
    fitting: list[Candidate] = []
    for ck, i in first.items():  # the screened iteration(s) may miss a larger call: check all iterations
        while i < len(mbs):
            c = evaluate(rank, mm, mbs[i], ck, iterations)
            c.seconds = _price(profile, counts, c.traces)
            full[(c.micro_batch, ck)] = c
            if c.peak_mib <= usable:
                fitting.append(c)
                break
            i += 1
    if not fitting:
        raise NoFit(f"nothing that keeps the algorithm fits {gib(gpu_mem_mib)} per GPU over {iterations} simulated "
                    f"iterations (the screened ones fitted); try more --headroom or fewer --iterations")
    chosen = min(fitting, key=lambda c: (c.seconds, c.checkpointing))
    before = full.get((mb0, ck0)) or evaluate(rank, mm, mb0, ck0, iterations)
    if before.seconds is None:
        before.seconds = _price(profile, counts, before.traces)
    prompts = int(cfg["train"]["prompts_per_iteration"])
    inv_before = invariants(before.traces if gpus == 1 else simulate(cfg, iterations), prompts)
    inv_after = invariants(chosen.traces if gpus == 1 else simulate(with_settings(cfg, chosen.settings), iterations),
                           prompts)
    if any(not math.isclose(inv_before[k], inv_after[k], rel_tol=1e-9) for k in inv_before):
        raise AssertionError(f"fitting changed the algorithm: {inv_before} -> {inv_after}")
    res = FitResult(gpu_mem_mib, usable, gpus, before, chosen, invariants=inv_after, resident=dict(mm.resident),
                    latent_mib=mm.latent_mib)
    res.changes = describe_changes(before, chosen, usable, gpus, int(cfg["train"]["prompts_per_iteration"]))
    return res


def describe_changes(before: Candidate, after: Candidate, usable: float, gpus: int, prompts: int
                     ) -> list[dict[str, Any]]:
    """One line per changed setting: what changed and why the algorithm is unchanged."""
    out = []
    if after.micro_batch != before.micro_batch:
        out.append({"key": "train.micro_batch", "from": before.micro_batch, "to": after.micro_batch, "why": (
            f"the largest micro-batch whose modeled peak ({gib(after.peak_mib)}, {after.phase()}) fits {gib(usable)} "
            f"(was {gib(before.peak_mib)}, {before.phase()}); an optimizer step now accumulates the gradients of up "
            f"to {after.grad_calls_per_step:.0f} forward+backward micro-batches instead of "
            f"{before.grad_calls_per_step:.0f}, and its loss is normalised by the step's mini-batch, not the "
            f"micro-batch: same gradient, same group size, images per optimizer step and optimizer steps")})
    if after.checkpointing != before.checkpointing:
        a0 = before.peaks["update"]["activation_mib"]
        a1 = after.peaks["update"]["activation_mib"]
        out.append({"key": "model.gradient_checkpointing", "from": before.checkpointing, "to": after.checkpointing,
                    "why": (f"the update's activations {gib(a0)} -> {gib(a1)} (largest call "
                            f"{after.peaks['update']['call']}); the backward recomputes the same activations, so the "
                            f"gradients and the algorithm are unchanged; it costs time (modeled below)")})
    if gpus > 1:
        out.append({"key": "gpus", "from": 1, "to": gpus, "why": (
            f"{prompts // gpus} of train.prompts_per_iteration={prompts} prompts per GPU (global: unchanged); every "
            f"GPU takes the same optimizer steps on gradients averaged over all GPUs (DDP), so images per optimizer "
            f"step are unchanged; memory and modeled seconds are per GPU")})
    return out


def override_warnings(cfg: Mapping[str, Any], preset_cfg: Mapping[str, Any], preset: str, user: Mapping[str, Any],
                      iterations: int = SCREEN_ITERATIONS) -> list[str]:
    """Warnings for the user's own settings that change the algorithm relative to its preset: each such key
    with its preset value, and the invariants that moved."""
    flat, flat0 = config_mod.flatten(cfg), config_mod.flatten(preset_cfg)
    keys = [k for k in user if is_algorithmic(k) and k in flat and flat.get(k) != flat0.get(k)]
    if not keys:
        return []
    inv = invariants(simulate(cfg, iterations), int(cfg["train"]["prompts_per_iteration"]))
    inv0 = invariants(simulate(preset_cfg, iterations), int(preset_cfg["train"]["prompts_per_iteration"]))
    moved = [f"{k.replace('_', ' ')} {inv0[k]:g} -> {inv[k]:g}" for k in inv if not math.isclose(inv[k], inv0[k],
                                                                                                 rel_tol=1e-9)]
    what = f"; the algorithm's {', '.join(moved)}" if moved else ""
    return [f"warning: {k}={flat[k]!r} (your setting) changes the algorithm relative to preset {preset} "
            f"({flat0.get(k)!r}){what}" for k in keys]


def fit_run_config(cfg: Mapping[str, Any], user: Mapping[str, Any], gpu_mem: str | None,
                   headroom: str = "1GiB", iterations: int = 5, out: Any = None) -> dict[str, Any]:
    """``bench run --fit``: ``cfg`` with the micro-batch and checkpointing ``fit`` chooses for this machine's
    GPU (``gpu_mem``, else the CUDA device's total memory) and the data-parallel world size (``WORLD_SIZE``),
    priced and checked with the run's cost profile (``run.cost_profile`` / ``run.clock``); the changes are
    printed to ``out`` (stderr)."""
    import os
    import sys

    from bench.cost.estimate import memory_for, model_counts
    from bench.cost.memory import needs_tracked_denoiser

    out = out or sys.stderr
    spec = cost_mod.profile_spec(cfg)
    if not spec:
        raise UsageError("--fit needs a cost profile with measured peak memory for the model: --set "
                         "run.cost_profile=sd3.5-medium-h200 (or --clock PROFILE); docs/COST.md")
    profile = cost_mod.load_profile(spec)
    if gpu_mem:
        mem = parse_mem(gpu_mem)
    else:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--fit without CUDA needs --gpu-mem SIZE (the memory of the GPU to fit)")
        mem = torch.cuda.get_device_properties(0).total_memory / MIB
    gpus = int(os.environ.get("WORLD_SIZE", "1") or 1)
    counts, batch, notes = model_counts(dict(cfg), denoiser_memory=needs_tracked_denoiser(profile))
    if counts is None:
        raise UsageError(f"--fit needs the model's parameter and activation counts: {'; '.join(notes)}")
    mm = memory_for(dict(cfg), profile, counts, batch, gpus)
    res = fit(cfg, profile, counts, mm, mem, gpus, parse_mem(headroom, "--headroom", zero_ok=True), list(user), iterations)
    print(f"fit: {gib(mem)} per GPU x {gpus}: modeled peak {gib(res.chosen.peak_mib)} "
          f"({res.chosen.phase()}) with " + " ".join(f"{k}={str(v).lower()}" for k, v in res.chosen.settings.items())
          + f" (cost profile {profile.name})", file=out)
    for ch in res.changes:
        print(f"fit: {ch['key']} {str(ch['from']).lower()} -> {str(ch['to']).lower()}: {ch['why']}", file=out)
    return with_settings(cfg, res.chosen.settings)
