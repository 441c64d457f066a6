"""Benchmarks (not tests): ``python -m bench.perf engine [--json]``.

``engine``: the rollout engine's throughput as a ratio of the raw denoiser's forward throughput on the
same model, micro-batch and number of evaluations, both measured in this run (best of ``--repeats``),
for a chain plan (G chains per prompt, all SDE) and a k=3, d=3 tree plan (TreeGRPO's paper setting).
ratio = (engine evaluations / s) / (raw evaluations / s); 1.0 means the engine adds no overhead
beyond the denoiser calls (target >= 0.95). With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, repeats: int, device: torch.device) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
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
    from bench.rollout import RolloutEngine
    from bench.runner import build_policy, resolve_device
    from bench.types import PromptBatch, RolloutPlan

    cfg = config.resolve({}, flags={"algo.name": "grpo", "model.name": model})
    dev = resolve_device(device)
    policy = build_policy(cfg, dev)
    T = int(cfg["sampler"]["steps"])
    g = float(cfg["sampler"]["guidance"] if guidance is None else guidance)
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
        engine = RolloutEngine(policy, max_micro_batch=micro_batch, seed=0, shift=float(cfg["sampler"]["shift"]))
        engine.run(plan, batch, 0)  # warm-up
        nfe = engine.nfe_rollout
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__,
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
    a = p.parse_args(argv)
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
