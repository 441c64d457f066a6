"""``python -m bench.cost.perf validate-cost``: modeled vs measured seconds per iteration (a benchmark, not a test).

For each algorithm it runs a real ``bench run`` on the model (default: the shapes world with its
shipped CPU profile ``shapes-cpu``), ``--warmup`` untimed iterations then ``--iterations`` timed ones, with
the profile selected, and compares per iteration and per phase the modeled seconds (trace x profile)
with the measured training seconds (rollout + reward + advantage + update, device-synchronised).
ratio = modeled / measured; the target is 0.8 - 1.2. Writes JSON (``--out``). Measured seconds depend
on how busy the machine is: run it on an idle machine and read the load averages it records.

On a shared machine the speed of the device drifts between the profile's measurement and the run. A
*speed probe* (the profile's largest forward call, timed just before and just after each run) measures
that drift: ``speed_factor`` = probe seconds now / the profile's seconds for that call, and
``speed_corrected_ratio`` = modeled x speed_factor / measured isolates the model's own error (what it
leaves out: step math, bookkeeping, overheads) from the machine's change of speed. Both are reported;
the plain ratio is the one the target refers to.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from bench.registry import ALGORITHMS

PHASES = ("rollout", "reward", "advantage", "update")


def _probe(cfg: dict[str, Any], rows: int, repeats: int = 5) -> float:
    """Median seconds of one no-grad forward of ``rows`` rows of the configured model, now."""
    import torch

    from bench.cost.profiling import _denoiser_fns, time_call
    from bench.model.models import build_policy, resolve_device
    from bench.spec import ModelSpec

    model = ModelSpec.from_config(cfg)
    dev = resolve_device(model.device)
    torch.manual_seed(0)
    return time_call(_denoiser_fns(build_policy(model, dev), False)(rows), dev, 1, repeats)["seconds"]


def _one(algo: str, model: str, profile: str, iterations: int, warmup: int, sets: dict[str, Any],
         preset: str | None = None) -> dict[str, Any]:
    from bench import config
    from bench.cost.profiling import load_text
    from bench.engine.pricing import load_profile
    from bench.run import runner

    with tempfile.TemporaryDirectory(prefix=f"validate_cost_{algo}_") as tmp:
        cfg = config.resolve({"eval.every": 0, "eval.at_start": False, "run.checkpoint_every": 0,
                              "run.cost_profile": profile, **sets},
                             preset=preset, flags={"algo.name": algo, "model.name": model, "budget": f"{warmup + iterations}it",
                                    "out": tmp, "run.overwrite": True, "run.progress": False})
        before = load_text()
        fwd = load_profile(profile).tables["forward"]
        probe_rows = fwd.rows[-1]
        probe = [_probe(cfg, probe_rows)]
        recs = [r for r in runner.run(cfg, progress=False).records if r["iteration"] >= warmup]
        probe.append(_probe(cfg, probe_rows))
    n = len(recs)
    row: dict[str, Any] = {
        "measured_s_per_iter": sum(r["t_iteration_s"] for r in recs) / n,
        "modeled_s_per_iter": sum(r["modeled_iteration_s"] for r in recs) / n,
        "iterations_timed": n, "load_before": before,
        "phases": {p: {"measured_s": sum(r[f"t_{p}_s"] for r in recs) / n,
                       "modeled_s": sum(r[f"modeled_{p}_s"] for r in recs) / n} for p in PHASES},
        "per_iteration_ratio": [r["modeled_iteration_s"] / r["t_iteration_s"] for r in recs],
        "unpriced_calls_per_iter": recs[-1].get("modeled_unpriced_calls", 0),
    }
    row["ratio"] = row["modeled_s_per_iter"] / row["measured_s_per_iter"]
    row["speed_probe"] = {"rows": probe_rows, "profile_s": fwd.seconds[-1], "before_s": probe[0], "after_s": probe[1]}
    row["speed_factor"] = (probe[0] + probe[1]) / 2 / fwd.seconds[-1]
    row["speed_corrected_ratio"] = row["ratio"] * row["speed_factor"]
    row["load_after"] = load_text()
    return row


def validate(model: str = "shapes", profile: str = "shapes-cpu", algos: tuple[str, ...] | None = None, iterations: int = 4, warmup: int = 1,
             sets: dict[str, Any] | None = None, preset: str | None = None) -> dict[str, Any]:
    import torch

    from bench.engine.pricing import load_profile

    prof = load_profile(profile)
    out: dict[str, Any] = {"model": model, "profile": prof.describe(), "iterations": iterations, "warmup": warmup,
                           "torch_threads": torch.get_num_threads(), "overrides": sets or {}, "preset": preset,
                           "results": {}}
    for algo in (tuple(ALGORITHMS) if algos is None else algos):  # default: every registered algorithm
        out["results"][algo] = _one(algo, model, profile, iterations, warmup, dict(sets or {}), preset)
    ratios = [r["ratio"] for r in out["results"].values()]
    out["within_20_percent"] = all(0.8 <= x <= 1.2 for x in ratios)
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = [(f"modeled (profile {res['profile']['name']}) vs measured seconds per iteration, model {res['model']}, "
              f"mean of {res['iterations']} iterations after {res['warmup']} warm-up, torch threads "
              f"{res['torch_threads']}"),
             f"{'algorithm':<10} {'measured':>9} {'modeled':>9} {'ratio':>6}   " + "  ".join(
                 f"{p[:7]:>13}" for p in PHASES) + "   speed  corr.ratio   load before -> after"]
    for algo, r in res["results"].items():
        ph = "  ".join(f"{r['phases'][p]['modeled_s']:6.2f}/{r['phases'][p]['measured_s']:6.2f}" for p in PHASES)
        lines.append(f"{algo:<10} {r['measured_s_per_iter']:9.3f} {r['modeled_s_per_iter']:9.3f} {r['ratio']:6.3f}   "
                     f"{ph}   {r['speed_factor']:5.2f} {r['speed_corrected_ratio']:10.3f}   "
                     f"{r['load_before'].split(' ', 2)[-1]} -> {r['load_after'].split(' ', 2)[-1]}")
    lines.append("phases: modeled/measured seconds; speed = machine speed probe / profile (>1: slower now than "
                 "when profiled); corr.ratio = ratio x speed; target ratio 0.8 - 1.2: "
                 + ("all within" if res["within_20_percent"] else "NOT all within"))
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("validate-cost", help="modeled vs measured seconds per iteration for each algorithm")
    p.add_argument("--model", default="shapes")
    p.add_argument("--profile", default="shapes-cpu", help="cost profile (shipped name or JSON file)")
    p.add_argument("--algos", default=None, help="comma-separated algorithms (default: every registered one)")
    p.add_argument("--preset", default=None, help="algorithm preset for every algorithm (e.g. treegrpo-paper)")
    p.add_argument("--iterations", type=int, default=4, help="timed iterations per algorithm")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="validate_cost.json")


def main(a: Any) -> int:
    import torch

    from bench.config import parse_sets

    if a.threads:
        torch.set_num_threads(a.threads)
    algos = None if a.algos is None else tuple(x.strip() for x in a.algos.split(",") if x.strip())
    res = validate(a.model, a.profile, algos, a.iterations,
                   a.warmup, parse_sets(a.sets), a.preset)
    print(format_table(res))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {a.out}")
    return 0
