"""Benchmarks (not tests): ``python -m bench.cost.perf engine [--json]`` and ``python -m bench.cost.perf paper-table``;
``profile`` (measure a cost profile, bench/cost/profiling.py) and ``validate-cost`` (modeled vs measured
seconds per iteration, bench/cost/validate.py): docs/COST.md.

``engine``: the rollout engine's throughput as a ratio of the raw denoiser's forward throughput on the
same model, micro-batch and number of evaluations, both measured in this run (best of ``--repeats``),
for a chain plan (G chains per prompt, all SDE) and a k=3, d=3 tree plan (TreeGRPO's paper setting).
ratio = (engine evaluations / s) / (raw evaluations / s); 1.0 means the engine adds no overhead
beyond the denoiser calls (target >= 0.95). With ``--json`` the last line is one JSON object.

``paper-table``: the TreeGRPO paper's time-per-iteration comparison (SD3.5-medium, 512 px, T = 10,
CFG 4.5, Flow-GRPO SDE noise 0.7, the model scheduler's own sigmas: shift 3 on SD3.5) for DanceGRPO (G = 12, trained fraction 0.6), MixGRPO
(G = 12, window 4) and TreeGRPO (k = 3, d = 3), each a real ``bench run`` on the same model preset,
prompts per iteration and micro-batch: seconds per iteration and per phase (mean over the timed
iterations after warm-up), peak device memory, NFE, and the ratios to DanceGRPO beside the paper's
numbers (8 GPUs: TreeGRPO 72.0, MixGRPO 145.4, DanceGRPO 184.0 s/iter). Default model
``sd3.5-medium-random`` (real architecture, random weights: timing needs no download); ``--quick
--model tiny-random`` runs the same code path on CPU in seconds. Writes JSON (``--out``). See
docs/SCALE.md for the GPU command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from bench.run.timing import sync


def _best_time(fn, repeats: int, device: torch.device) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _raw_forward(policy: Any, rows: int, calls: int):  # noqa: ANN201
    """A closure running ``calls`` denoiser forward passes of ``rows`` rows, inputs prepared in advance."""
    dev = policy.device
    cond = policy.encode_prompts(["a large red circle on the left"] * rows)
    x = torch.randn(rows, *policy.latent_shape, device=dev)
    t = policy.timestep_values(torch.full((rows,), 0.5, device=dev))

    @torch.no_grad()
    def go() -> None:
        for _ in range(calls):
            policy.predict(x, t, cond)

    return go


def _paired_best(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Best time of each function, measured interleaved (A B A B ...) so background load on a shared
    machine hits both alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], _best_time(fn, 1, device))
    return best


def engine_benchmark(model: str = "shapes", prompts: int = 16, micro_batch: int = 64, repeats: int = 3,
                     device: str = "auto", guidance: float | None = None) -> dict[str, Any]:
    from bench import config
    from bench.engine.rollout import RolloutEngine
    from bench.model.models import build_policy, resolve_device
    from bench.spec import RunSpec
    from bench.types import PromptBatch, RolloutPlan

    spec = RunSpec.from_config(config.resolve({}, flags={"algo.name": "grpo", "model.name": model}))
    dev = resolve_device(device)
    policy = build_policy(spec.model, dev)
    T = spec.sampler.steps
    g = spec.sampler.guidance if guidance is None else float(guidance)
    batch = PromptBatch(tuple(f"a small blue square on the top {i}" for i in range(prompts)))
    k, d, s0 = 3, 3, 2
    modes, branch = ["ode"] * T, [1] * T
    for i in range(s0, s0 + d):
        modes[i], branch[i] = "sde", k
    plans = {
        "chain": RolloutPlan(T, ("sde",) * T, (1,) * T, trees_per_prompt=12, guidance=g),
        "tree_k3_d3": RolloutPlan(T, tuple(modes), tuple(branch), trees_per_prompt=1, guidance=g),
    }
    out: dict[str, Any] = {"model": model, "device": str(dev), "steps": T, "guidance": g, "prompts": prompts,
                           "micro_batch_rows": micro_batch, "torch_threads": torch.get_num_threads()}
    for name, plan in plans.items():
        engine = RolloutEngine(policy, max_micro_batch=micro_batch, seed=0, shift=spec.sampler.shift)
        nfe = engine.run(plan, batch, 0).nfe  # warm-up
        calls = -(-nfe // micro_batch)
        raw = _raw_forward(policy, micro_batch, calls)
        raw()  # warm-up
        best = _paired_best({"engine": lambda: engine.run(plan, batch, 0), "raw": raw}, repeats, dev)
        t_engine = best["engine"]
        t_raw = best["raw"] * (nfe / (calls * micro_batch))  # raw ran full micro-batches only
        out[name] = {"nfe": nfe, "engine_s": t_engine, "raw_s": t_raw, "engine_nfe_per_s": nfe / t_engine,
                     "raw_nfe_per_s": nfe / t_raw}
        out[f"{name}_ratio"] = t_raw / t_engine
    return out


#: the TreeGRPO paper's time per iteration (s/iter, 8 GPUs, SD3.5-medium; TreeGRPO arXiv 2512.08153, its
#: efficiency comparison table)
PAPER_S_PER_ITER = {"dancegrpo": 184.0, "mixgrpo": 145.4, "treegrpo": 72.0}
#: the paper's comparison setting, shared by the three algorithms
#: (the shift is the model preset's: SD3.5's scheduler config has shift 3, which sampler.schedule=scheduler uses)
PAPER_SAMPLER = {"sampler.steps": 10, "sampler.guidance": 4.5, "sampler.noise_level": 0.7, "sampler.sde": "flow_grpo"}
PAPER_ALGOS: dict[str, dict[str, Any]] = {
    "dancegrpo": {"algo.group_size": 12, "algo.timestep_fraction": 0.6},
    "mixgrpo": {"algo.group_size": 12, "algo.window": 4},
    "treegrpo": {"algo.k": 3, "algo.d": 3},
}
PHASE_KEYS = ("rollout", "reward", "advantage", "update")


def _paper_row(algo: str, model: str, overrides: dict[str, Any], iterations: int, warmup: int,
               device: str) -> dict[str, Any]:
    """One algorithm: a real ``bench run`` for warmup + iterations iterations; timings of the last ones."""
    import tempfile

    from bench import config
    from bench.run import runner

    sets = {**PAPER_SAMPLER, **PAPER_ALGOS[algo], "eval.every": 0, "eval.at_start": False, "eval.num_prompts": 1,
            "run.checkpoint_every": 0, "model.device": device, **overrides}
    with tempfile.TemporaryDirectory(prefix=f"paper_table_{algo}_") as tmp:
        cfg = config.resolve(sets, flags={"algo.name": algo, "model.name": model, "budget": f"{warmup + iterations}it",
                                          "out": tmp, "run.overwrite": True, "run.progress": False})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        summary = runner.run(cfg, progress=False)
        recs = [r for r in summary.records if r["iteration"] >= warmup]
    n = max(1, len(recs))
    row: dict[str, Any] = {"s_per_iter": sum(r["t_iteration_s"] for r in recs) / n,
                           **{f"{p}_s": sum(r[f"t_{p}_s"] for r in recs) / n for p in PHASE_KEYS},
                           "peak_mem_gb": max(r["peak_mem_mb"] for r in recs) / 1024,
                           "nfe_rollout": recs[-1]["nfe_rollout"], "nfe_update": recs[-1]["nfe_update"],
                           "images": recs[-1]["samples"], "iterations_timed": len(recs),
                           "s_per_image": sum(r["t_iteration_s"] for r in recs) / max(1, sum(r["samples"] for r in recs)),
                           "settings": {k: v for k, v in sets.items() if k.startswith(("algo.", "sampler.", "train.",
                                                                                         "model."))}}
    return row


def paper_table(model: str = "sd3.5-medium-random", prompts: int = 2, iterations: int = 2, warmup: int = 1,
                device: str = "auto", algos: tuple[str, ...] = ("dancegrpo", "mixgrpo", "treegrpo"),
                overrides: dict[str, Any] | None = None,
                algo_overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Time per iteration of the paper's three algorithms under one setting (see the module docstring).
    ``overrides`` apply to every algorithm, ``algo_overrides[name]`` to one (tests shrink groups with it)."""
    from bench.model.models import resolve_device
    from bench.rundir.runlog import device_info

    dev = resolve_device(device)
    sets = {"train.prompts_per_iteration": prompts, **(overrides or {})}
    out: dict[str, Any] = {"model": model, "device": device_info(dev), "prompts_per_iteration": prompts,
                           "iterations": iterations, "warmup": warmup, "overrides": sets,
                           "paper_s_per_iter": PAPER_S_PER_ITER, "results": {}}
    for algo in algos:
        try:
            row_sets = {**sets, **(algo_overrides or {}).get(algo, {})}
            out["results"][algo] = _paper_row(algo, model, row_sets, iterations, warmup, str(dev))
        except Exception as e:  # noqa: BLE001 - one algorithm's failure (e.g. OOM) must not lose the others
            out["results"][algo] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = out["results"].get("dancegrpo", {}).get("s_per_iter")
    for algo, row in out["results"].items():
        if "s_per_iter" in row and base:
            row["ratio_to_dancegrpo"] = row["s_per_iter"] / base
        if algo in PAPER_S_PER_ITER:
            row["paper_s_per_iter"] = PAPER_S_PER_ITER[algo]
            row["paper_ratio_to_dancegrpo"] = PAPER_S_PER_ITER[algo] / PAPER_S_PER_ITER["dancegrpo"]
    return out


def format_paper_table(res: dict[str, Any]) -> str:
    head = (f"{'algorithm':<10} {'s/iter':>8} {'rollout':>8} {'reward':>7} {'adv':>6} {'update':>8} "
            f"{'peak GB':>8} {'NFE roll':>8} {'NFE upd':>8} {'images':>6} {'s/image':>8} {'x Dance':>8} {'paper':>7} "
            f"{'paper x':>8}")
    title = (f"model {res['model']} on {res['device'].get('name', res['device'])}, {res['prompts_per_iteration']} "
             f"prompts/iteration, mean of {res['iterations']} iterations after {res['warmup']} warm-up")
    lines = [title, head]
    for algo, r in res["results"].items():
        if "error" in r:
            lines.append(f"{algo:<10} error: {r['error']}")
            continue
        lines.append(f"{algo:<10} {r['s_per_iter']:8.2f} {r['rollout_s']:8.2f} {r['reward_s']:7.2f} "
                     f"{r['advantage_s']:6.2f} {r['update_s']:8.2f} {r['peak_mem_gb']:8.2f} {r['nfe_rollout']:8d} "
                     f"{r['nfe_update']:8d} {r['images']:6d} {r['s_per_image']:8.3f} {r.get('ratio_to_dancegrpo', float('nan')):8.3f} "
                     f"{r.get('paper_s_per_iter', float('nan')):7.1f} {r.get('paper_ratio_to_dancegrpo', float('nan')):8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cost.perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("engine", help="rollout engine throughput vs raw denoiser throughput")
    e.add_argument("--model", default="shapes")
    e.add_argument("--prompts", type=int, default=16)
    e.add_argument("--micro-batch", type=int, default=64)
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--device", default="auto")
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--json", action="store_true")
    t = sub.add_parser("paper-table", help="the TreeGRPO paper's time-per-iteration table (DanceGRPO, MixGRPO, "
                                           "TreeGRPO) on one model")
    t.add_argument("--model", default="sd3.5-medium-random", help="model preset (default sd3.5-medium-random)")
    t.add_argument("--model-path", default=None, help="local diffusers directory (real weights) for the preset")
    t.add_argument("--prompts", type=int, default=None, help="prompts per iteration (default 2; --quick 1)")
    t.add_argument("--iterations", type=int, default=None, help="timed iterations per algorithm (default 2; --quick 1)")
    t.add_argument("--warmup", type=int, default=1, help="untimed iterations first (compilation, allocator)")
    t.add_argument("--algos", default="dancegrpo,mixgrpo,treegrpo")
    t.add_argument("--device", default="auto")
    t.add_argument("--quick", action="store_true", help="CPU smoke: 1 prompt, 1 timed iteration, micro-batch 64, "
                                                       "no gradient checkpointing (use with --model tiny-random)")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every algorithm (e.g. model.lora_rank=0)")
    t.add_argument("--out", default="paper_table.json", help="JSON output (default paper_table.json)")
    from bench.cost import profiling
    from bench.cost import validate as validate_cost  # (cost) docs/COST.md

    profiling.add_profile_parser(sub)
    validate_cost.add_parser(sub)
    a = p.parse_args(argv)
    if a.what == "profile":
        return profiling.profile_main(a)
    if a.what == "validate-cost":
        return validate_cost.main(a)
    if a.what == "paper-table":
        from bench.config import parse_sets

        # GPU default: micro-batches of 16 rows with gradient checkpointing keep SD3.5-M's update well
        # inside 80 GB (STACK.md: 16 rows fwd+bwd take 58 GB without, 12 GB with checkpointing)
        sets = {} if a.quick else {"train.micro_batch": 16, "model.gradient_checkpointing": True}
        if a.model_path:
            sets["model.path"] = a.model_path
        sets.update(parse_sets(a.sets))
        res = paper_table(a.model, a.prompts or (1 if a.quick else 2), a.iterations or (1 if a.quick else 2),
                          a.warmup, a.device, tuple(x.strip() for x in a.algos.split(",") if x.strip()), sets)
        print(format_paper_table(res))
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {a.out}")
        return 0
    if a.what == "engine":
        res = engine_benchmark(a.model, a.prompts, a.micro_batch, a.repeats, a.device, a.guidance)
        for name in ("chain", "tree_k3_d3"):
            r = res[name]
            print(f"{name:<11} nfe {r['nfe']:>6}  engine {r['engine_nfe_per_s']:9.1f} NFE/s  raw "
                  f"{r['raw_nfe_per_s']:9.1f} NFE/s  ratio {res[name + '_ratio']:.3f}")
        if a.json:
            print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
