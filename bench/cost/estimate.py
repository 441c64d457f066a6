"""``bench plan``: price a configuration before it runs, without loading any weights.

    bench plan --algo treegrpo --preset treegrpo-paper --model sd3.5-medium --prompts 8 \\
               --profile sd3.5-medium-h200 [--budget 24h] [--json]

The call trace is not re-derived by formulas: the real algorithm (plan, advantages, update) and the
real rollout engine run on a *shadow policy* with the model's interface and one-element latents, so
every denoiser, VAE, text-encoder, reward and optimizer call is recorded exactly as a real run with
the same configuration and seed records it (tests/test_cost.py compares the two on the tiny model).
The trace is then priced with a cost profile (``bench.engine.pricing``), both as treebench makes the calls and
the way the released trainers make them (reference-trainer mode). Modeled seconds are labelled as
such everywhere: they are a model built from measured per-call costs, not a measurement of the plan.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from bench import config as config_mod
from bench.budget import Budget
from bench.engine import pricing as cost_mod
from bench.engine import trace as trace_mod
from bench.errors import UsageError
from bench.registry import MODELS, model_preset
from bench.types import RewardOutput


class ShadowPolicy:
    """The ``Policy`` interface the engine and the algorithms use, with no weights: latents [B, 1, 1, 1],
    one trainable scalar (so the update's backward and optimizer steps really happen), the model's
    prediction type, VAE presence and training options. Outputs are meaningless; only calls count."""

    latent_shape = (1, 1, 1)

    def __init__(self, prediction: str, has_vae: bool, options: Any):
        self.prediction = prediction
        self.vae = object() if has_vae else None  # the engine only asks whether there is one
        self.options = options
        self.device = torch.device("cpu")
        self.weight = nn.Parameter(torch.ones(()))

    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        from bench.model.policy import Conditioning

        return Conditioning({"encoder_hidden_states": torch.zeros(len(prompts), 1, 1)})

    def empty_conditioning(self) -> Any:
        return self.encode_prompts([""])

    def timestep_values(self, sigma_or_t: torch.Tensor) -> torch.Tensor:
        return sigma_or_t * 1000.0 if self.prediction == "flow" else sigma_or_t

    def predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: Any) -> torch.Tensor:
        return 0.1 * x * self.weight

    def decode(self, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad):  # images that depend on the latents, so a backward reaches them
            return (0.0 * latents.reshape(latents.shape[0], -1)[:, :1]).reshape(-1, 1, 1, 1).expand(-1, 3, 1, 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.weight]

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    def train(self, mode: bool = True) -> None:
        return None

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        if self.options.lora_rank <= 0:  # as Policy.reference: a real run fails the same way
            raise NotImplementedError("a frozen reference for KL needs a LoRA-wrapped denoiser (model.lora_rank > 0)")
        yield

    def ddim_alpha_bars(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        levels = torch.linspace(0.05, 0.999, num_steps + 1)
        return levels, torch.linspace(999.0, 0.0, num_steps + 1)[:num_steps]


class ShadowReward:
    """The training reward of a direct-gradient algorithm (``reward_gradient``) for ``simulate``: a score
    with a gradient path and the reward's name (so its calls are traced as a real run traces them)."""

    differentiable = True

    def __init__(self, name: str):
        self.name = name

    def score_grad(self, images: torch.Tensor, prompts: Sequence[str], meta: Any = None) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))


def _twin(cfg: dict[str, Any]) -> str | None:
    """The random-weight architecture standing in for the configured model (None: it has files to read)."""
    m = cfg["model"]
    src = model_preset(m["name"]).source
    if m.get("path"):
        return None
    if src.startswith("random:"):
        return src.split(":")[1]
    return f"{m['name']}-random" if src == "path" and f"{m['name']}-random" in MODELS else None


def _schedule_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with a weightless model named by its random twin, whose scheduler config gives the schedule."""
    twin = _twin(cfg)
    if twin is None or model_preset(cfg["model"]["name"]).source.startswith("random:"):
        return cfg
    return {**cfg, "model": {**cfg["model"], "name": twin}}


def model_facts(cfg: dict[str, Any]) -> tuple[str, bool]:
    """(prediction, has_vae) of the configured model, read from its model_index.json or its random-weight
    twin's architecture spec: nothing is loaded."""
    from bench.model.models import index_prediction, model_dir, read_model_index, resolve_model_path
    from bench.model.random_models import random_preset_spec

    m = cfg["model"]
    twin = _twin(cfg)
    if m.get("path"):
        index = read_model_index(resolve_model_path(m["path"]))
    elif twin is not None:
        spec = random_preset_spec(twin)
        return index_prediction({"_class_name": spec["pipeline"]}), "vae" in spec.get("components", {})
    else:
        index = read_model_index(model_dir(m["name"], m.get("path")))
    vae = index.get("vae")
    return index_prediction(index), bool(vae and vae[0] is not None)


def simulate(cfg: dict[str, Any], iterations: int = 1, stats: list[dict[str, int]] | None = None
             ) -> list[list[trace_mod.Call]]:
    """The calls of the first ``iterations`` training iterations of ``cfg`` (one list per iteration), made
    by the real algorithm and engine on a :class:`ShadowPolicy`; same order as a real run's trace.
    ``stats`` (a list) receives each iteration's rollout size: {"nodes", "leaves"}."""
    from diffusers.configuration_utils import FrozenDict

    from bench.engine.prompts import load_prompt_set
    from bench.engine.seeding import generator
    from bench.model.models import model_scheduler
    from bench.run.build import build_algorithm, build_engine, build_optimizer
    from bench.spec import RunSpec

    _, has_vae = model_facts(cfg)
    # the typed spec of the run, its weightless model named by its random twin: the twin's model index and
    # scheduler config give the prediction and the schedule (model_facts reads the same index); the estimator
    # prices with its own profile, so the run's cost profile is not loaded
    spec = RunSpec.from_config(_schedule_cfg(cfg), cost_profile=False)
    seed, prediction = spec.seed, spec.model.prediction
    # the run's own builders (bench.run.build), around the shadow policy and reward
    algo = build_algorithm(spec)
    policy = ShadowPolicy(prediction, has_vae, spec.model.options)
    if prediction == "flow":
        policy.scheduler = SimpleNamespace(config=FrozenDict(model_scheduler(spec.model.name, spec.model.path)[1]))
    engine = build_engine(spec, policy, algo, seed, ShadowReward(spec.reward.name))  # type: ignore[arg-type]
    optimizer = build_optimizer(spec.optimizer, policy.trainable_parameters(), engine.recorder)
    prompts = load_prompt_set(spec.train_prompts)
    reward_name = spec.reward.name
    out = []
    for i in range(iterations):  # the runner's iteration, minus timing, logging and fault handling
        batch = prompts.sample(spec.prompts_per_iteration, seed, i)
        rollout = engine.run(algo.plan(i), batch, i)
        trace_mod.record_reward(engine.recorder, reward_name, rollout.num_leaves, "reward")
        scores = torch.rand(rollout.num_leaves, generator=generator(seed, i, "plan_reward"))
        adv = algo.advantages(batch, rollout, RewardOutput(scores, {}))
        algo.update(policy, engine, optimizer, rollout, adv)
        out.append(engine.recorder.drain())
        if stats is not None:
            stats.append({"nodes": rollout.num_nodes, "leaves": rollout.num_leaves})
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


# ---- FLOP counts and the memory model of a configuration -----------------------------------------------
#: the T5 v1.1 XXL encoder (SD3's text_encoder_3) is not in the SD3 random twins; its config is FLUX's
T5_SOURCE = "flux.1-dev-random"


def _twin_spec(cfg: dict[str, Any], twin: str) -> tuple[dict[str, Any], list[str]]:
    """The twin's architecture spec, with T5-XXL added where the real pipeline would load it."""
    from bench.model.random_models import REDUCED, random_preset_spec

    spec = random_preset_spec(twin)
    source = model_preset(cfg["model"]["name"]).source
    if source.startswith("random:") and "reduced" in source.split(":")[2:]:  # the CPU-size copy of the classes
        patch = REDUCED[spec["pipeline"]]
        comps = {k: ({**c, "config": {**c.get("config", {}), **patch.get(k, {})}} if k in patch else c)
                 for k, c in spec["components"].items()}
        return {**spec, "components": comps, "resolution": 32}, []
    real = source == "path"
    if real and cfg["model"].get("use_t5", True) and "text_encoder_3" in spec.get("absent", ()):
        t5 = random_preset_spec(T5_SOURCE)["components"]["text_encoder_2"]
        comps = {**spec["components"], "text_encoder_3": t5,
                 "tokenizer_3": {"library": "transformers", "class": "word_tokenizer", "config": {"max_length": 256}}}
        spec = {**spec, "components": comps, "absent": [a for a in spec["absent"] if not a.endswith("_3")]}
        return spec, [f"T5-XXL (text_encoder_3, {T5_SOURCE}'s T5 v1.1 XXL encoder config) is counted: the published "
                      f"SD3.5 pipelines ship it and model.use_t5=true loads it (--set model.use_t5=false leaves it out)"]
    return spec, []


def model_counts(cfg: dict[str, Any], denoiser_memory: bool = False, use_cache: bool = True
                 ) -> tuple[Any, dict[str, int], list[str]]:
    """(``bench.engine.flops.ModelCounts`` of ``cfg``'s model and training reward, or None; the reward's
    images per internal batch; notes). Counted on the meta device from the random-weight twin's
    architecture (real presets), or from the model itself for treebench-format directories (the embedded
    and tiny models, small enough to load on the CPU); cached (bench.engine.flops)."""
    from bench.engine import flops

    notes: list[str] = []
    name = str(cfg["reward"]["name"])
    try:
        rewards = flops.meta_rewards(name, cfg["reward"]["options"])
    except Exception as e:  # noqa: BLE001 - a reward that cannot be built here is reported, not fatal
        rewards = {}
        notes.append(f"reward {name!r} has no FLOP count: {type(e).__name__}: {e}")
    batch = {f"reward:{n}": int(r.batch_size) for n, r in rewards.items() if getattr(r, "batch_size", None)}
    twin = _twin(cfg)
    m = cfg["model"]
    if twin is None and m.get("path") and f"{m['name']}-random" in MODELS:  # a local copy of a real preset
        twin = f"{m['name']}-random"
        notes.append(f"FLOPs and parameters counted from {twin}, the published architecture of {m['name']}, not "
                     f"from the configs in {m['path']}")
    if twin is not None:
        spec, more = _twin_spec(cfg, twin)
        return (flops.planner_counts(cfg, twin, rewards, denoiser_memory=denoiser_memory, spec=spec,
                                     use_cache=use_cache), batch, notes + more)
    from bench.model.models import build_policy, model_dir, read_model_index, resolve_model_path
    from bench.model.random_models import TREEBENCH_CLASS
    from bench.spec import ModelSpec

    path = resolve_model_path(m["path"]) if m.get("path") else model_dir(m["name"], None)
    if read_model_index(path).get("_class_name") != TREEBENCH_CLASS:
        return None, batch, notes + [f"no FLOP counts for {m['name']}: a pipeline directory without a random-weight "
                                     f"twin preset (its weights are not loaded to count them)"]
    policy = build_policy(ModelSpec.from_config({**cfg, "model": {**m, "device": "cpu"}}), torch.device("cpu"))
    return flops.count_model(policy, rewards, denoiser_memory=denoiser_memory, use_cache=use_cache), batch, notes


def memory_for(cfg: dict[str, Any], profile: cost_mod.CostProfile, counts: Any, batch: dict[str, int],
               gpus: int = 1) -> Any:
    from bench.cost.memory import memory_model

    return memory_model(profile, counts, cfg, gpus, batch)


def _kind_table(profile: cost_mod.CostProfile, traces: Sequence[Sequence[trace_mod.Call]],
                ours: Sequence[cost_mod.Priced]) -> dict[str, dict[str, Any]]:
    """Per kind: calls, rows, modeled seconds and FLOPs per iteration (means), and where its price comes from."""
    n = len(traces)
    out: dict[str, dict[str, Any]] = {}
    for calls, q in zip(traces, ours):
        for c in calls:
            label = cost_mod.kind_label(c)
            k = out.setdefault(label, {"calls_per_iteration": 0.0, "rows_per_iteration": 0.0,
                                       "seconds_per_iteration": 0.0, "flops_per_iteration": None,
                                       "source": ("measured" if profile.table_for(c) is not None else
                                                  "estimated" if label in q.estimated else "unpriced")})
            k["calls_per_iteration"] += 1 / n
            k["rows_per_iteration"] += c.rows / n
        for label, sec in q.kind_seconds.items():
            out[label]["seconds_per_iteration"] += sec / n
        for label, f in q.kind_flops.items():
            out[label]["flops_per_iteration"] = (out[label]["flops_per_iteration"] or 0.0) + f / n
    return dict(sorted(out.items()))


def plan_report(cfg: dict[str, Any], profile: cost_mod.CostProfile, iterations: int = 20,
                budget: str | None = None, clock: str = "modeled", counts: Any = None, memory: Any = None,
                gpus: int = 1) -> dict[str, Any]:
    """Everything ``bench plan`` prints, as one JSON-able object (keys documented in docs/COST.md).
    ``counts`` (FLOP counts) prices the kinds the profile did not measure; ``memory`` (a
    ``bench.cost.memory.MemoryModel``) adds the modeled peak per phase; with ``gpus`` > 1 the calls and
    seconds are one GPU's (its share of the prompts), images and NFE all GPUs'."""
    from bench.cost.fit import rank_config

    rank = rank_config(cfg, gpus) if gpus > 1 else cfg
    stats: list[dict[str, int]] = []
    traces = simulate(rank, iterations, stats=stats)
    ours = [cost_mod.price(profile, c, counts) for c in traces]
    ref = [cost_mod.price(profile, cost_mod.reference_calls(c), counts) for c in traces]
    images = [gpus * sum(c.rows for c in calls if c.kind == "reward") for calls in traces]
    nfe = [gpus * trace_mod.nfe(c) for c in traces]
    phases = {p: _mean([q.phases[p] for q in ours]) for p in cost_mod.PHASES}
    ref_phases = {p: _mean([q.phases[p] for q in ref]) for p in cost_mod.PHASES}
    s_it, r_it = _mean([q.total for q in ours]), _mean([q.total for q in ref])
    mems = [q.peak_mem_mb for q in ours if q.peak_mem_mb is not None]
    lora = int(cfg["model"]["lora_rank"] or 0) > 0
    kinds = _kind_table(profile, traces, ours)
    flops = [sum(q.kind_flops.values()) for q in ours] if counts is not None else []
    out: dict[str, Any] = {
        "algo": cfg["algo"]["name"], "model": cfg["model"]["name"],
        "prompts_per_iteration": int(cfg["train"]["prompts_per_iteration"]), "seed": int(cfg["seed"]), "gpus": gpus,
        "settings": {k: v for k, v in config_mod.flatten(cfg).items()
                     if k.startswith(("algo.", "sampler.", "train.micro_batch", "train.optimizer_steps",
                                      "model.lora_rank", "model.gradient_checkpointing"))},
        "profile": profile.describe(), "clock": "modeled seconds (cost model from measured per-call costs)",
        "iterations_simulated": iterations,
        "modeled_seconds_per_iteration": s_it, "reference_modeled_seconds_per_iteration": r_it,
        "speedup_vs_reference": r_it / s_it if s_it > 0 else math.nan,
        "modeled_phases": phases, "reference_modeled_phases": ref_phases,
        "modeled_seconds_iteration0": ours[0].total,
        "nfe_per_iteration": _mean(nfe), "nfe_iteration0": nfe[0],
        "images_per_iteration": _mean(images), "trace": trace_mod.summarize(traces[0]),
        "reference_trace": trace_mod.summarize(cost_mod.reference_calls(traces[0])),
        "kinds": kinds, "flops_per_iteration": _mean(flops) if flops else None,
        "modeled_peak_mem_mb": max(mems) if mems else None, "unpriced_calls_per_iteration": dict(ours[0].unpriced),
        "estimated_calls_per_iteration": dict(ours[0].estimated),
        "notes": _notes(profile, ours[0], lora, cfg["model"]["name"], counts),
    }
    if counts is not None:
        out["estimated_at_flops_per_second"] = cost_mod.FlopEstimator(profile, counts).flops_per_second
        out["parameters"] = dict(counts.parameters)
    if memory is not None:
        nodes = max(st["nodes"] for st in stats)
        ph = memory.phase_peaks(traces, nodes)
        out["memory"] = {"peak_mem_mb": max(v["peak_mib"] for v in ph.values()),
                         "phases": {p: {"peak_mem_mb": v["peak_mib"], "activation_mb": v["activation_mib"],
                                        "largest_call": v["call"], "unmodeled": v["unmodeled"]} for p, v in ph.items()},
                         "resident_mb": dict(memory.resident), "rollout_latents_mb": nodes * memory.latent_mib,
                         "activation_fits": {k: {"slope_mb_per_row": f.slope, "intercept_mb": f.intercept,
                                                 "source": f.source} for k, f in memory.fits.items()}}
    if budget:
        out["budget"] = budget_buys(Budget.parse(budget, clock=clock), s_it, r_it, out["images_per_iteration"],
                                    out["nfe_per_iteration"])
    return out


def _notes(profile: cost_mod.CostProfile, priced: cost_mod.Priced, lora: bool, model: str,
           counts: Any = None) -> list[str]:
    notes = []
    if profile.models and model not in profile.models:
        notes.append(f"the profile was measured for {', '.join(profile.models)}, not {model}: these are the "
                     f"calls of {model} priced as if that model made them")
    if priced.unpriced:
        notes.append("unpriced (0 s, the profile has no measurement and no FLOP count prices it): " + ", ".join(
            f"{k} x{n}" for k, n in priced.unpriced.items()))
    if priced.estimated:
        from bench.engine.pricing import FlopEstimator

        rate = FlopEstimator(profile, counts).flops_per_second if counts is not None else None
        notes.append("estimated (not measured: FLOPs counted on the meta device, priced at the measured forward's "
                     f"{(rate or 0):.3g} FLOP/s): " + ", ".join(
                         f"{k} x{n}" for k, n in priced.estimated.items()))
    if counts is not None and counts.uncounted:
        notes += [f"not counted: {k}: {v}" for k, v in counts.uncounted.items()]
    if lora and "full" in profile.trainable:
        notes.append(f"the profile's backward was measured with {profile.trainable}; this LoRA run's "
                     f"backward is priced with it (see the profile's assumptions)")
    return notes


def budget_buys(b: Budget, s_it: float, r_it: float, images: float, nfe: float) -> dict[str, Any]:
    """Iterations and images a budget buys at the modeled cost (the runner stops at the first iteration
    boundary where a limit is reached, hence the ceilings)."""
    caps = []
    if b.iterations is not None:
        caps.append(b.iterations)
    if b.samples is not None:
        caps.append(math.ceil(b.samples / images))
    if b.nfe is not None:
        caps.append(math.ceil(b.nfe / nfe))
    out: dict[str, Any] = {"spec": b.spec, "clock": b.clock}
    for name, per_it in (("treebench", s_it), ("reference", r_it)):
        c = list(caps)
        if b.seconds is not None:
            if b.clock != "modeled":
                out["note"] = "a wall-clock seconds budget cannot be priced; give --clock modeled (the default)"
            else:
                c.append(math.ceil(b.seconds / per_it))
        its = min(c) if c else None
        out[name] = {"iterations": its, "images": None if its is None else its * images,
                     "modeled_seconds": None if its is None else its * per_it}
    return out


# ---- command line ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench plan", description="Price one iteration of a configuration with a "
                                "measured cost profile, without loading any weights (modeled seconds).")
    p.add_argument("--algo", required=True, help="algorithm (bench list), or several comma-separated: then a "
                                                 "comparison table with ratios to DanceGRPO (and the TreeGRPO "
                                                 "paper's, on sd3.5-medium) follows")
    p.add_argument("--preset", default=None, help="algorithm preset (bench list --presets) for every algorithm, or "
                                                  "per algorithm: treegrpo=treegrpo-paper,dancegrpo=dancegrpo-paper")
    p.add_argument("--model", default=None, help="model preset (default shapes)")
    p.add_argument("--model-path", default=None, help="local pipeline directory (only its model_index.json is read)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per iteration (train.prompts_per_iteration)")
    p.add_argument("--profile", required=True,
                   help=f"cost profile: a shipped name ({', '.join(cost_mod.shipped_profiles())}) or a JSON file")
    p.add_argument("--budget", default=None, help="what this budget buys, e.g. 24h (modeled seconds), 5000samples")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--iterations", type=int, default=20,
                   help="iterations simulated; per-iteration numbers are their mean (plans whose window moves "
                        "or is random cost different amounts per iteration; default 20)")
    p.add_argument("--config", default=None, help="YAML config file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpu-mem", default=None, metavar="SIZE",
                   help="GPU memory per GPU, e.g. 80GB, 24GB, 79.6GiB: choose the largest micro-batch and the "
                        "gradient checkpointing whose modeled peak fits, keeping the algorithm (exit 2, naming the "
                        "nearest fit, when nothing fits)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs the prompts are split over (default 1): "
                                                      "memory and modeled seconds are per GPU")
    p.add_argument("--headroom", default="1GiB", metavar="SIZE",
                   help="memory kept free for the CUDA context and allocator slack with --gpu-mem (default 1GiB)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _fmt(rep: dict[str, Any]) -> str:
    pr = rep["profile"]
    ph, rph = rep["modeled_phases"], rep["reference_modeled_phases"]
    lines = [(f"{rep['algo']} on {rep['model']}, {rep['prompts_per_iteration']} prompts/iteration, seed {rep['seed']}: "
              f"MODELED seconds from cost profile {pr['name']} ({pr['device']}); not a measurement of this plan"),
             (f"  per iteration (mean of {rep['iterations_simulated']} simulated): {rep['images_per_iteration']:g} "
              f"images, {rep['nfe_per_iteration']:g} NFE"),
             "  iteration 0 call trace: " + ", ".join(
                 f"{k.split('/')[1]} {rep['trace'][k]} calls / {rep['trace'][k[:-5] + 'rows']} rows"
                 for k in rep["trace"] if k.endswith("/calls")),
             f"  {'':<22}{'rollout':>9}{'reward':>9}{'update':>9}{'total s':>10}",
             (f"  {'treebench (batched)':<22}{ph['rollout']:9.2f}{ph['reward']:9.2f}{ph['update']:9.2f}"
              f"{rep['modeled_seconds_per_iteration']:10.2f}"),
             (f"  {'reference trainers':<22}{rph['rollout']:9.2f}{rph['reward']:9.2f}{rph['update']:9.2f}"
              f"{rep['reference_modeled_seconds_per_iteration']:10.2f}"),
             f"  engine speed-up over the reference trainers' batch-1 calls: {rep['speedup_vs_reference']:.2f}x"]
    kinds = rep.get("kinds") or {}
    if kinds:
        def one(k: str, v: dict[str, Any]) -> str:
            f = v["flops_per_iteration"]
            return (f"{k} {v['seconds_per_iteration']:.2f} s ({v['source']}"
                    + (f", {f:.3g} FLOPs" if f is not None else "") + ")")
        lines.append(f"  per kind per iteration{' and GPU' if rep.get('gpus', 1) > 1 else ''}: "
                     + ", ".join(one(k, v) for k, v in kinds.items()))
    if rep.get("flops_per_iteration") is not None:
        lines.append(f"  FLOPs per iteration{' and GPU' if rep.get('gpus', 1) > 1 else ''}: "
                     f"{rep['flops_per_iteration']:.4g} (counted on the meta device)")
    mem = rep.get("memory")
    if mem is not None:
        from bench.cost.fit import gib

        lines.append("  modeled peak memory per GPU: " + ", ".join(
            f"{p} {gib(v['peak_mem_mb'])} ({v['largest_call']})" for p, v in mem["phases"].items())
            + "; resident " + ", ".join(f"{k} {gib(v)}" for k, v in mem["resident_mb"].items())
            + f", rollout latents {gib(mem['rollout_latents_mb'])}")
    elif rep.get("modeled_peak_mem_mb") is not None:
        lines.append(f"  modeled peak memory of the largest call: {rep['modeled_peak_mem_mb'] / 1024:.1f} GiB")
    b = rep.get("budget")
    if b:
        for who in ("treebench", "reference"):
            x = b[who]
            if x["iterations"] is not None:
                lines.append(f"  budget {b['spec']} ({b['clock']} clock) buys {who}: {x['iterations']} iterations, "
                             f"{x['images']:g} images, {x['modeled_seconds']:.0f} modeled s")
        if "note" in b:
            lines.append(f"  note: {b['note']}")
    lines += [f"  note: {n}" for n in rep["notes"]]
    fit = rep.get("fit")
    if fit is not None:
        from bench.cost.fit import gib

        head = (f"  fit: {gib(fit['gpu_mem_mb'])} per GPU x {fit['gpus']} (usable {gib(fit['usable_mb'])}): modeled "
                f"peak {gib(fit['peak_mem_mb'])} with "
                + " ".join(f"{k}={str(v).lower()}" for k, v in fit["settings"].items()))
        inv = fit["invariants"]
        lines.insert(1, head)
        lines.insert(2, (f"  kept (the algorithm): group size {inv['group_size']:g}, {inv['images_per_iteration']:g} "
                         f"images/iteration, {inv['optimizer_steps_per_iteration']:g} optimizer steps/iteration, "
                         f"{inv['images_per_optimizer_step']:g} images per optimizer step, "
                         f"{inv['trained_rows_per_iteration']:g} trained rows and {inv['nfe_per_iteration']:g} NFE per "
                         f"iteration"))
        for i, ch in enumerate(fit["changes"]):
            lines.insert(3 + i, f"  changed: {ch['key']} {str(ch['from']).lower()} -> {str(ch['to']).lower()}: {ch['why']}")
    for i, w in enumerate(rep.get("warnings", [])):
        lines.insert(1 + i, f"  {w}")
    return "\n".join(lines)


def _presets(spec: str | None, algos: list[str]) -> dict[str, str | None]:
    if not spec or "=" not in spec:
        return {a: spec for a in algos}
    out: dict[str, str | None] = {a: None for a in algos}
    for item in spec.split(","):
        algo, eq, preset = (x.strip() for x in item.partition("="))
        if not eq or algo not in out:
            raise UsageError(f"--preset {spec!r}: expected ALGO=PRESET for algorithms of --algo ({', '.join(algos)})")
        out[algo] = preset
    return out


def comparison(reps: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per algorithm: modeled s/iteration (batched and reference trainers), ratios to DanceGRPO when
    it is planned, and beside them the TreeGRPO paper's s/iteration on sd3.5-medium (8 GPUs, wall-clock)."""
    from bench.cost.perf import PAPER_S_PER_ITER

    base = reps.get("dancegrpo")
    rows = []
    for algo, r in reps.items():
        paper = PAPER_S_PER_ITER.get(algo) if str(r["model"]).startswith("sd3.5-medium") else None
        s, ref = r["modeled_seconds_per_iteration"], r["reference_modeled_seconds_per_iteration"]
        rows.append({"algo": algo, "preset": r.get("preset"), "modeled_seconds_per_iteration": s,
                     "ratio_to_dancegrpo": s / base["modeled_seconds_per_iteration"] if base else None,
                     "reference_modeled_seconds_per_iteration": ref,
                     "reference_ratio_to_dancegrpo": (ref / base["reference_modeled_seconds_per_iteration"]
                                                      if base else None),
                     "speedup_vs_reference": r["speedup_vs_reference"], "paper_s_per_iteration_8gpu": paper,
                     "paper_ratio_to_dancegrpo": (paper / PAPER_S_PER_ITER["dancegrpo"]
                                                  if paper and base else None)})
    return rows


def _fmt_comparison(rows: list[dict[str, Any]], profile: str) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"comparison: MODELED seconds per iteration (cost profile {profile}); paper = the TreeGRPO paper's "
             f"wall-clock s/iteration on 8 GPUs (sd3.5-medium only)",
             f"{'algorithm':<10} {'preset':<16} {'modeled':>8} {'x Dance':>8} {'paper':>7} {'paper x':>8} "
             f"{'reference':>10} {'x Dance':>8} {'speed-up':>9}"]
    for r in rows:
        lines.append(f"{r['algo']:<10} {str(r['preset'] or '-'):<16} {r['modeled_seconds_per_iteration']:8.2f} "
                     f"{f(r['ratio_to_dancegrpo'], '8.2f'):>8} {f(r['paper_s_per_iteration_8gpu'], '7.1f'):>7} "
                     f"{f(r['paper_ratio_to_dancegrpo'], '8.2f'):>8} {r['reference_modeled_seconds_per_iteration']:10.2f} "
                     f"{f(r['reference_ratio_to_dancegrpo'], '8.2f'):>8} {r['speedup_vs_reference']:8.2f}x")
    return "\n".join(lines)


def _user_keys(sets: dict[str, Any], config_file: str | None) -> dict[str, Any]:
    """The settings the user gave (``--set``, ``--prompts``, the config file), flattened."""
    out = dict(config_mod.load_config_file(config_file)) if config_file else {}
    out.update(sets)
    return out


def plan_one(cfg: dict[str, Any], profile: cost_mod.CostProfile, a: argparse.Namespace, user: dict[str, Any],
             preset: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    """One algorithm's report: counts, the fit (with --gpu-mem), warnings about algorithm-changing overrides."""
    from bench.cost import fit as fit_mod
    from bench.cost.memory import needs_tracked_denoiser

    want_memory = a.gpu_mem is not None
    counts, batch, more = model_counts(cfg, denoiser_memory=want_memory and needs_tracked_denoiser(profile))
    if want_memory and counts is None:
        raise UsageError(f"--gpu-mem needs the model's parameter and activation counts: {'; '.join(more)}")
    mm = memory_for(cfg, profile, counts, batch, a.gpus) if counts is not None and (
        want_memory or not needs_tracked_denoiser(profile)) else None
    warnings: list[str] = []
    if preset:
        preset_cfg = config_mod.resolve({}, preset=preset, flags=flags)
        warnings = fit_mod.override_warnings(cfg, preset_cfg, preset, user)
    fit = None
    if want_memory:
        try:
            fit = fit_mod.fit(cfg, profile, counts, mm, fit_mod.parse_mem(a.gpu_mem),
                              a.gpus, fit_mod.parse_mem(a.headroom, "--headroom", zero_ok=True), list(user), a.iterations)
        except fit_mod.NoFit as e:
            raise fit_mod.NoFit(f"{cfg['algo']['name']}: {e}") from None
        cfg = fit_mod.with_settings(cfg, fit.chosen.settings)
    rep = plan_report(cfg, profile, a.iterations, a.budget, counts=counts, memory=mm, gpus=a.gpus)
    rep["notes"] = more + rep["notes"]
    rep["warnings"] = warnings
    if fit is not None:
        rep["fit"] = fit.as_dict()
    return rep


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(list(argv or []))
    algos = [x.strip() for x in a.algo.split(",") if x.strip()]
    if not algos:
        raise UsageError("--algo: give at least one algorithm")
    if a.iterations < 1:
        raise UsageError(f"--iterations must be >= 1, got {a.iterations}")
    if a.prompts is not None and a.prompts < 1:
        raise UsageError(f"--prompts must be >= 1, got {a.prompts}")
    if a.gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {a.gpus}")
    if a.gpu_mem is not None:
        from bench.cost.fit import parse_mem

        parse_mem(a.gpu_mem)
        parse_mem(a.headroom, "--headroom", zero_ok=True)
    profile = cost_mod.load_profile(a.profile)
    sets = config_mod.parse_sets(a.sets)
    if a.prompts is not None:
        sets["train.prompts_per_iteration"] = a.prompts
    if a.budget:
        Budget.parse(a.budget)  # a bad budget is a usage error before any work
    presets = _presets(a.preset, algos)
    flags = {algo: {"algo.name": algo, "model.name": a.model, "model.path": a.model_path, "seed": a.seed}
             for algo in algos}
    cfgs = {algo: config_mod.resolve(dict(sets), config_file=a.config, preset=presets[algo], flags=flags[algo])
            for algo in algos}  # all checked before any work
    user = _user_keys(sets, a.config)
    if a.gpus > 1:
        from bench.cost.fit import rank_config

        for cfg in cfgs.values():
            rank_config(cfg, a.gpus)
    reps = {algo: {**plan_one(cfg, profile, a, user, presets[algo], flags[algo]), "preset": presets[algo]}
            for algo, cfg in cfgs.items()}
    if len(reps) == 1:
        rep = reps[algos[0]]
        print(json.dumps(rep, indent=1) if a.json else _fmt(rep))
        return 0
    rows = comparison(reps)
    if a.json:
        print(json.dumps({"plans": reps, "comparison": rows}, indent=1))
    else:
        print("\n\n".join(_fmt(r) for r in reps.values()) + "\n\n" + _fmt_comparison(rows, profile.name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
