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
from bench.errors import UsageError, algorithm_settings
from bench.registry import MODELS, algorithm_class, model_preset
from bench.types import RewardOutput, TrainSpec


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


def simulate(cfg: dict[str, Any], iterations: int = 1) -> list[list[trace_mod.Call]]:
    """The calls of the first ``iterations`` training iterations of ``cfg`` (one list per iteration), made
    by the real algorithm and engine on a :class:`ShadowPolicy`; same order as a real run's trace."""
    from diffusers.configuration_utils import FrozenDict

    from bench.engine.prompts import load_prompt_set
    from bench.engine.rollout import RolloutEngine
    from bench.engine.seeding import generator
    from bench.model.models import model_options, model_scheduler
    from bench.spec import sampler_spec

    prediction, has_vae = model_facts(cfg)
    t, seed = cfg["train"], int(cfg["seed"])
    sched_cfg = _schedule_cfg(cfg)
    sampler = sampler_spec(sched_cfg, prediction)
    train = TrainSpec(micro_batch=int(t["micro_batch"]), optimizer_steps=int(t["optimizer_steps"]),
                      max_grad_norm=float(t["max_grad_norm"]))
    with algorithm_settings(cfg["algo"]["name"]):
        algo = algorithm_class(cfg["algo"]["name"])(config_mod.algorithm_config(cfg), sampler, train, seed)
    policy = ShadowPolicy(prediction, has_vae, model_options(cfg["model"]))
    if prediction == "flow":
        policy.scheduler = SimpleNamespace(config=FrozenDict(
            model_scheduler(sched_cfg["model"]["name"], sched_cfg["model"].get("path"))[1]))
    engine = RolloutEngine(policy, max_micro_batch=train.micro_batch, seed=seed, shift=sampler.shift,  # type: ignore[arg-type]
                           schedule=sampler.schedule)
    engine.snapshots.declare(algo)
    if getattr(algo, "reward_gradient", False):
        engine.attach_reward(ShadowReward(str(cfg["reward"]["name"])))
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    trace_mod.attach_optimizer(optimizer, engine.recorder)
    prompts = load_prompt_set(cfg["data"]["train_prompts"])
    reward_name = str(cfg["reward"]["name"])
    out = []
    for i in range(iterations):  # the runner's iteration, minus timing, logging and fault handling
        batch = prompts.sample(int(t["prompts_per_iteration"]), seed, i)
        rollout = engine.run(algo.plan(i), batch, i)
        trace_mod.record_reward(engine.recorder, reward_name, rollout.num_leaves, "reward")
        scores = torch.rand(rollout.num_leaves, generator=generator(seed, i, "plan_reward"))
        adv = algo.advantages(batch, rollout, RewardOutput(scores, {}))
        algo.update(policy, engine, optimizer, rollout, adv)
        out.append(engine.recorder.drain())
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def plan_report(cfg: dict[str, Any], profile: cost_mod.CostProfile, iterations: int = 20,
                budget: str | None = None, clock: str = "modeled") -> dict[str, Any]:
    """Everything ``bench plan`` prints, as one JSON-able object (keys documented in docs/COST.md)."""
    traces = simulate(cfg, iterations)
    ours = [cost_mod.price(profile, c) for c in traces]
    ref = [cost_mod.price(profile, cost_mod.reference_calls(c)) for c in traces]
    images = [sum(c.rows for c in calls if c.kind == "reward") for calls in traces]
    nfe = [trace_mod.nfe(c) for c in traces]
    phases = {p: _mean([q.phases[p] for q in ours]) for p in cost_mod.PHASES}
    ref_phases = {p: _mean([q.phases[p] for q in ref]) for p in cost_mod.PHASES}
    s_it, r_it = _mean([q.total for q in ours]), _mean([q.total for q in ref])
    mems = [q.peak_mem_mb for q in ours if q.peak_mem_mb is not None]
    lora = int(cfg["model"]["lora_rank"] or 0) > 0
    out: dict[str, Any] = {
        "algo": cfg["algo"]["name"], "model": cfg["model"]["name"],
        "prompts_per_iteration": int(cfg["train"]["prompts_per_iteration"]), "seed": int(cfg["seed"]),
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
        "modeled_peak_mem_mb": max(mems) if mems else None, "unpriced_calls_per_iteration": dict(ours[0].unpriced),
        "notes": _notes(profile, ours[0], lora, cfg["model"]["name"]),
    }
    if budget:
        out["budget"] = budget_buys(Budget.parse(budget, clock=clock), s_it, r_it, out["images_per_iteration"],
                                    out["nfe_per_iteration"])
    return out


def _notes(profile: cost_mod.CostProfile, priced: cost_mod.Priced, lora: bool, model: str) -> list[str]:
    notes = []
    if profile.models and model not in profile.models:
        notes.append(f"the profile was measured for {', '.join(profile.models)}, not {model}: these are the "
                     f"calls of {model} priced as if that model made them")
    if priced.unpriced:
        notes.append("unpriced (0 s, the profile has no measurement): " + ", ".join(
            f"{k} x{n}" for k, n in priced.unpriced.items()))
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
    if rep.get("modeled_peak_mem_mb") is not None:
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


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(list(argv or []))
    algos = [x.strip() for x in a.algo.split(",") if x.strip()]
    if not algos:
        raise UsageError("--algo: give at least one algorithm")
    if a.iterations < 1:
        raise UsageError(f"--iterations must be >= 1, got {a.iterations}")
    if a.prompts is not None and a.prompts < 1:
        raise UsageError(f"--prompts must be >= 1, got {a.prompts}")
    profile = cost_mod.load_profile(a.profile)
    sets = config_mod.parse_sets(a.sets)
    if a.prompts is not None:
        sets["train.prompts_per_iteration"] = a.prompts
    if a.budget:
        Budget.parse(a.budget)  # a bad budget is a usage error before any work
    presets = _presets(a.preset, algos)
    cfgs = {algo: config_mod.resolve(dict(sets), config_file=a.config, preset=presets[algo],
                                     flags={"algo.name": algo, "model.name": a.model, "model.path": a.model_path,
                                            "seed": a.seed}) for algo in algos}  # all checked before any work
    reps = {algo: {**plan_report(cfg, profile, a.iterations, a.budget), "preset": presets[algo]}
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
