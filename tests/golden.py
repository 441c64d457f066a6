"""Golden trajectories: every algorithm, 2 iterations on the tiny in-process models (fixed weights, seed 0).

``tests/test_golden.py`` re-runs each case through the real runner and compares the numbers it logs
(rewards, losses, first importance ratio, gradient norm, NFE) with ``tests/golden.json``, so a silent
change of the numerics fails. Likelihood-free algorithms log no importance ratio (null in the records):
null must stay null. When a change of the numbers is intended, regenerate the file on
purpose and commit it with the change that explains it:

    .venv/bin/python tests/golden.py --regenerate

(``--check`` prints the differences without writing.) The runs use one intra-op thread, so the
numbers do not depend on the machine's core count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).resolve().parent / "golden.json"

#: per case: algorithm, model and settings (small: a few seconds each on one CPU thread)
CASES: dict[str, dict[str, Any]] = {
    "grpo": {"algo": "grpo", "sets": {"algo.group_size": 2}},
    "ddpo": {"algo": "ddpo", "sets": {"algo.group_size": 2, "algo.min_count": 2, "algo.buffer_size": 4}},
    "ddpo-ddim": {"algo": "ddpo", "model": "tiny-random-ddim", "sets": {"algo.group_size": 2}},
    "dancegrpo": {"algo": "dancegrpo", "sets": {"algo.group_size": 3}},
    "dancegrpo-dance-sde": {"algo": "dancegrpo", "sets": {"algo.group_size": 3, "sampler.sde": "dance",
                                                          "sampler.noise_level": 0.3,
                                                          "sampler.schedule": "linspace", "sampler.shift": 3.0}},
    "mixgrpo": {"algo": "mixgrpo", "sets": {"algo.group_size": 3, "algo.window": 2, "algo.shift_interval": 1}},
    "mixgrpo-flash": {"algo": "mixgrpo", "sets": {"algo.group_size": 3, "algo.window": 2, "algo.flash": True,
                                                  "algo.compress_ratio": 0.5, "sampler.steps": 6}},
    "treegrpo": {"algo": "treegrpo", "sets": {"algo.k": 2, "algo.d": 2}},
    "treegrpo-softmax": {"algo": "treegrpo", "sets": {"algo.k": 3, "algo.d": 2,
                                                      "algo.weighting": "softmax_logprob"}},
    "flowgrpo": {"algo": "flowgrpo", "sets": {"algo.group_size": 3, "algo.global_std": False}},
    "flowgrpo-fast": {"algo": "flowgrpo", "sets": {"algo.group_size": 3, "algo.sde_window_size": 1,
                                                   "sampler.steps": 6}},
    "branchgrpo": {"algo": "branchgrpo", "sets": {"algo.split_rounds": 2}},
    "branchgrpo-pruned": {"algo": "branchgrpo", "sets": {"algo.split_points": [0, 1], "algo.split_noise_scale": 4.0,
                                                         "algo.prob_weighted": True, "algo.depth_pruning": [4],
                                                         "algo.width_pruning": "global"}},
    "awm": {"algo": "awm", "sets": {"algo.group_size": 3, "algo.train_timesteps": 3, "algo.beta": 1e-3}},
    "refl": {"algo": "refl", "sets": {"algo.group_size": 2, "algo.loss_scale": 1.0}},
    "refl-draft2-ddim": {"algo": "refl", "model": "tiny-random-ddim",
                         "sets": {"algo.group_size": 2, "algo.grad_steps": 2, "algo.stop_steps": [-2, -2],
                                  "algo.solver": "ode", "algo.loss": "negative", "algo.loss_scale": 1.0}},
    "flowdppo": {"algo": "flowdppo", "sets": {"algo.group_size": 3, "algo.num_sde_steps": 2, "sampler.steps": 6}},
    "flowgrpo-cps": {"algo": "flowgrpo", "sets": {"algo.group_size": 3, "sampler.sde": "cps",
                                                  "sampler.noise_level": 0.8}},
    "treegrpo-guard": {"algo": "treegrpo", "sets": {"algo.k": 2, "algo.d": 2, "algo.guard": True}},
}

#: logged per iteration and compared: integers exactly, floats within atol + rtol |golden|. The
#: tolerances leave room for float32 reduction-order differences between CPUs, not for changed math:
#: the loss (~1e-5) and approx_kl (~1e-9, squared log-ratios after the first optimizer step) get
#: looser relative but tight absolute tolerances.
TOLERANCE: dict[str, tuple[float, float]] = {  # key: (rtol, atol)
    "reward_mean": (1e-3, 1e-6), "reward_std": (1e-3, 1e-6), "grad_norm": (1e-3, 1e-6),
    "loss": (1e-2, 1e-7), "approx_kl": (5e-2, 1e-12), "first_ratio": (0.0, 1e-5)}
KEYS = ("reward_mean", "reward_std", "loss", "approx_kl", "grad_norm", "first_ratio", "nfe_rollout",
        "nfe_update", "edges", "optimizer_steps")


def run_case(name: str, out_root: Path) -> list[dict[str, Any]]:
    """Run one case for 2 iterations; returns the compared keys of each iteration record."""
    import torch

    from bench import config
    from bench.run import runner

    case = CASES[name]
    base = {"sampler.steps": 4, "run.progress": False, "eval.every": 0, "eval.at_start": False,
            "train.prompts_per_iteration": 2, "train.lr": 1e-4, "train.optimizer_steps": 2,
            "run.checkpoint_every": 0, **case["sets"]}
    cfg = config.resolve(base, flags={"algo.name": case["algo"], "model.name": case.get("model", "tiny-random"),
                                      "budget": "2it", "seed": 0, "out": str(out_root / name)})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = runner.run(cfg)
    finally:
        torch.set_num_threads(n)
    recs = [json.loads(line) for line in (summary.out_dir / "iterations.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in KEYS} for r in recs]


def compute_all() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: run_case(name, Path(tmp)) for name in CASES}


def differences(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> list[str]:
    """Human-readable mismatches between two lists of iteration records ([] when they agree)."""
    if len(expected) != len(got):
        return [f"{len(got)} iterations, expected {len(expected)}"]
    out = []
    for i, (e, g) in enumerate(zip(expected, got)):
        for k in KEYS:
            a, b = e[k], g[k]
            if a is None or b is None:  # no importance ratio (likelihood-free): null stays null
                ok = a is None and b is None
            elif isinstance(a, int) and isinstance(b, int):
                ok = a == b
            else:
                rtol, atol = TOLERANCE[k]
                ok = abs(float(a) - float(b)) <= atol + rtol * abs(float(a))
            if not ok:
                out.append(f"iteration {i} {k}: got {b!r}, golden {a!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--regenerate", action="store_true", help=f"recompute every case and write {GOLDEN.name}")
    g.add_argument("--check", action="store_true", help="recompute and print the differences")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    got = compute_all()
    if a.regenerate:
        GOLDEN.write_text(json.dumps({"cases": got}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN} ({len(got)} cases)")
        return 0
    golden = json.loads(GOLDEN.read_text())["cases"]
    bad = {n: differences(golden[n], got[n]) for n in CASES if n in golden}
    for n, d in bad.items():
        print(f"{n}: {'ok' if not d else '; '.join(d)}")
    return 1 if any(bad.values()) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
