"""The modeled counterpart of the TreeGRPO paper's time-per-iteration table: ``bench plan`` for TreeGRPO,
DanceGRPO and MixGRPO on sd3.5-medium with the shipped H200 profile (one GPU), 8 prompts per iteration,
micro-batches of 16 rows with gradient checkpointing (as ``python -m bench.perf paper-table`` runs them).

    python scripts/cost_paper_table.py [--json OUT.json]

Two settings: every algorithm at the TreeGRPO paper's sampler (``--preset treegrpo-paper``: T = 10, CFG 4.5,
Flow-GRPO SDE 0.7), and each algorithm's own paper preset (``treegrpo-paper``, ``dancegrpo-paper``: T = 16,
DanceGRPO SDE 0.3; ``mixgrpo-paper``: T = 25). Modeled seconds from measured per-call costs; see docs/COST.md.
"""

import argparse
import json

from bench import config, cost
from bench.plan import plan_report

PAPER = {"treegrpo": 72.0, "mixgrpo": 145.4, "dancegrpo": 184.0}  # s/iteration, 8 GPUs (ALGORITHMS.md 7.1)
SETS = {"train.micro_batch": 16, "model.gradient_checkpointing": True, "train.prompts_per_iteration": 8}
SETTINGS = {"TreeGRPO paper's sampler for all": {a: "treegrpo-paper" for a in PAPER},
            "each algorithm's own paper preset": {"treegrpo": "treegrpo-paper", "mixgrpo": "mixgrpo-paper",
                                                  "dancegrpo": "dancegrpo-paper"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--iterations", type=int, default=20)
    a = ap.parse_args()
    prof = cost.load_profile("sd3.5-medium-h200")
    out = {}
    for setting, presets in SETTINGS.items():
        rows = {}
        for algo, preset in presets.items():
            cfg = config.resolve(dict(SETS), preset=preset, flags={"algo.name": algo, "model.name": "sd3.5-medium"})
            rows[algo] = plan_report(cfg, prof, a.iterations) | {"preset": preset}
        out[setting] = rows
        base, rbase = rows["dancegrpo"]["modeled_seconds_per_iteration"], \
            rows["dancegrpo"]["reference_modeled_seconds_per_iteration"]
        print(f"\n{setting} (sd3.5-medium, profile {prof.name}, 8 prompts/iteration, micro-batch 16 rows, "
              f"gradient checkpointing; mean of {a.iterations} simulated iterations)")
        print("| method | preset | T | images / it | NFE / it | modeled s / it (treebench) | x DanceGRPO | "
              "paper s / it (8 GPUs) | paper x DanceGRPO | modeled s / it (reference trainers) | "
              "x DanceGRPO | engine speed-up |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for algo, r in rows.items():
            s, ref = r["modeled_seconds_per_iteration"], r["reference_modeled_seconds_per_iteration"]
            print(f"| {algo} | `{r['preset']}` | {r['settings']['sampler.steps']} | {r['images_per_iteration']:g} | "
                  f"{r['nfe_per_iteration']:g} | {s:.1f} | {s / base:.2f} | {PAPER[algo]:.1f} | "
                  f"{PAPER[algo] / PAPER['dancegrpo']:.2f} | {ref:.1f} | {ref / rbase:.2f} | "
                  f"{r['speedup_vs_reference']:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
