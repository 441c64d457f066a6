"""Synthetic run directories with known values (docs/RUNDIR.md, schema_version 1).

Used by the report tests and by ``bench compare``'s tests as a stand-in runner
(``python tests/synthetic_runs.py run ...``): every number written
is a closed-form function of the arguments, so statistics over these runs can be checked by hand.

Defaults, per iteration ``i`` (0-based) of ``iterations``:
  samples_total = (i + 1) * samples_per_iter, nfe_total = (i + 1) * nfe_per_iter,
  seconds_total = (i + 1) * sum(phase_seconds), reward_mean = train_curve(i + 1),
and per evaluation after ``j`` completed iterations (j = 0, eval_every, 2 * eval_every, ..., iterations):
  eval/<training reward> = train_curve(j), eval/<held-out reward> = heldout_curve(j).

Per-image scores (``eval_scores.jsonl``, one line per image: 16 prompts x 2 images): image k = 2 p + i
scores curve(j) + 0.05 z_k, where z is a fixed zero-mean, unit-variance pattern shared by every run (the
shared prompts x noise), plus, after iteration 0, ``interaction * (j / iterations) * w_p`` (a method x
prompt effect, w zero-mean over prompts) and ``image_noise`` x a draw from (algo, seed, j) (run-specific
noise). With both 0 (the default) every image mean equals the eval record exactly.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: The commit every synthetic run records unless told otherwise (tests of `bench compare` set it to this
#: checkout's commit so that extending a comparison passes the one-commit check).
GIT_COMMIT = "0123456789abcdef0123456789abcdef01234567"

PHASES = ("t_rollout_s", "t_reward_s", "t_advantage_s", "t_update_s")
EVAL_PROMPTS, EVAL_IMAGES = 16, 2
_K = EVAL_PROMPTS * EVAL_IMAGES
#: The shared per-image pattern: zero mean, unit variance (population), the same in every run.
PATTERN = [((k * 7) % _K - (_K - 1) / 2) / math.sqrt((_K * _K - 1) / 12) for k in range(_K)]
#: Method x prompt weights: zero mean over the prompts.
PROMPT_WEIGHTS = [(p - (EVAL_PROMPTS - 1) / 2) / EVAL_PROMPTS for p in range(EVAL_PROMPTS)]


def linear_curve(start: float, slope: float) -> Callable[[int], float]:
    """reward(j) = start + slope * j (j = completed iterations)."""
    return lambda j: start + slope * j


def _write_png(path: Path, iteration: int, algo: str, size: int = 48) -> None:
    from PIL import Image, ImageDraw

    hue = zlib.crc32(algo.encode()) % 200
    img = Image.new("RGB", (size * 2, size), (20 + hue // 2, 20, 60))
    draw = ImageDraw.Draw(img)
    r = 4 + (iteration * 3) % (size // 2 - 4)
    for k, cx in enumerate((size // 2, size + size // 2)):
        draw.ellipse([cx - r, size // 2 - r, cx + r, size // 2 + r], fill=(255, 80 + 60 * k, hue))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def write_run(
    path: str | Path,
    *,
    algo: str = "grpo",
    seed: int = 0,
    iterations: int = 10,
    samples_per_iter: int = 16,
    nfe_per_iter: float = 320.0,
    phase_seconds: Sequence[float] = (1.0, 0.2, 0.05, 0.75),
    train_curve: Callable[[int], float] | None = None,
    heldout_curve: Callable[[int], float] | None = None,
    eval_every: int = 2,
    reward: str = "shapes_pref",
    reward_version: str = "1",
    heldout: str = "shapes_attr",
    heldout_version: str = "1",
    schema_version: int = 1,
    device_name: str = "cpu",
    device_type: str = "cpu",
    peak_mem_mb: float = 100.0,
    algo_config: dict[str, Any] | None = None,
    budget_spec: str = "10it",
    git_commit: str | None = None,
    images: bool = True,
    final: bool = True,
    label: str | None = None,
    frozen: bool = False,
    scores: bool = True,
    image_noise: float = 0.0,
    interaction: float = 0.0,
) -> Path:
    """Write one synthetic run directory and return its path (``label``: the arm label its manifest
    declares, as ``bench compare --controls`` arms do)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    git_commit = git_commit or GIT_COMMIT
    train_curve = train_curve or linear_curve(0.1, 0.01)
    heldout_curve = heldout_curve or linear_curve(0.2, 0.005)
    algo_config = dict(algo_config or {})
    step_seconds = float(sum(phase_seconds))
    manifest = {
        "schema_version": schema_version,
        "created": "2026-11-26T00:00:00Z",
        "run_name": path.name,
        "config": {"algo": {"name": algo, **algo_config}, "model": {"name": "tiny-random"},
                   "sampler": {"steps": 10}, "train": {"lr": 1e-4, "frozen": frozen}, "run": {"label": label},
                   "reward": {"spec": reward},
                   "eval": {"every": eval_every, "num_prompts": 16, "images_per_prompt": 2, "seed": 0},
                   "budget": budget_spec, "seed": seed},
        "algorithm": {"name": algo, "config": algo_config},
        "model": {"name": "tiny-random", "path": "", "weights_sha256": "0" * 64, "prediction": "flow"},
        "reward": {"spec": reward, "name": reward, "version": reward_version},
        "eval_rewards": [{"name": reward, "version": reward_version},
                         {"name": heldout, "version": heldout_version}],
        "budget": {"spec": budget_spec, "seconds": None, "samples": None, "nfe": None,
                   "iterations": iterations},
        "seed": seed, "weights_frozen": frozen,
        "git": {"commit": git_commit, "dirty": False},
        "packages": {"torch": "2.13.0", "treebench": "0.1.0"},
        "device": {"type": device_type, "name": device_name, "count": 1},
        "prompts": {"train": {"name": "shapes", "sha256": "a" * 64, "count": 64},
                    "eval": {"name": "shapes-eval", "sha256": "b" * 64, "count": 8}},
    }
    if label is not None:
        manifest["label"] = label
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))

    with open(path / "iterations.jsonl", "w") as f:
        for i in range(iterations):
            r = float(train_curve(i + 1))
            rec = {
                "iteration": i, "samples": samples_per_iter,
                "samples_total": (i + 1) * samples_per_iter,
                "nfe_rollout": nfe_per_iter * 0.75, "nfe_update": nfe_per_iter * 0.25,
                "nfe_total": (i + 1) * nfe_per_iter,
                "seconds_total": (i + 1) * step_seconds,
                **dict(zip(PHASES, (float(s) for s in phase_seconds))),
                "t_iteration_s": step_seconds,
                "reward_mean": r, "reward_std": 0.1, "reward_min": r - 0.2, "reward_max": r + 0.2,
                f"reward/{reward}": r,
                "loss": -0.01, "approx_kl": 1e-4, "clip_frac": 0.0, "grad_norm": 1.0,
                "first_ratio": 1.0, "kl": 0.0, "lr": 1e-4, "peak_mem_mb": float(peak_mem_mb),
                "edges": samples_per_iter * 4, "optimizer_steps": 1, "micro_batches": 1,
                "zero_spread_frac": 0.0,
            }
            f.write(json.dumps(rec) + "\n")

    evals = []
    for j in sorted(set(list(range(0, iterations + 1, max(1, eval_every))) + [iterations])):
        png = f"samples/eval_{j:06d}.png"
        if images:
            _write_png(path / png, j, algo)
        tr, ho = float(train_curve(j)), float(heldout_curve(j))
        evals.append({
            "iteration": j, "samples_total": j * samples_per_iter, "nfe_total": j * nfe_per_iter,
            "seconds_total": j * step_seconds, "t_eval_s": 0.5,
            f"eval/{reward}": tr, f"eval/{reward}/std": 0.05,
            f"eval/{heldout}": ho, f"eval/{heldout}/std": 0.05,
            "samples_png": png, "reward_hacking": False, "eval_images": 32,
            "samples_prompts": [f"a small red circle number {k}" for k in range(2)],
        })
    with open(path / "evals.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in evals)
    if scores:
        write_scores(path, evals, {reward: train_curve, heldout: heldout_curve}, iterations, algo, seed,
                     image_noise, interaction)

    if final:
        best = max(evals, key=lambda e: e[f"eval/{reward}"])
        (path / "final.json").write_text(json.dumps({
            "stop_reason": "budget_iterations", "iterations": iterations,
            "samples_total": iterations * samples_per_iter, "nfe_total": iterations * nfe_per_iter,
            "seconds_total": iterations * step_seconds,
            "wall_seconds": iterations * step_seconds + 0.5 * len(evals),
            "final_eval": evals[-1],
            "best_eval": {"key": f"eval/{reward}", "value": best[f"eval/{reward}"],
                          "iteration": best["iteration"]},
        }, indent=2))
    return path


def write_scores(path: Path, evals: Sequence[dict], curves: dict[str, Callable[[int], float]], iterations: int,
                 algo: str, seed: int, image_noise: float = 0.0, interaction: float = 0.0) -> None:
    """eval_scores.jsonl for the given eval records (module docstring)."""
    import random

    with open(path / "eval_scores.jsonl", "w") as f:
        for e in evals:
            j = e["iteration"]
            rng = random.Random(f"{algo}/{seed}/{j}")
            for p in range(EVAL_PROMPTS):
                for i in range(EVAL_IMAGES):
                    k = p * EVAL_IMAGES + i
                    sc = {}
                    for name, curve in curves.items():
                        v = float(curve(j)) + 0.05 * PATTERN[k]
                        if j > 0:
                            v += interaction * (j / max(iterations, 1)) * PROMPT_WEIGHTS[p]
                            v += image_noise * rng.gauss(0.0, 1.0)
                        sc[name] = v
                    f.write(json.dumps({"iteration": j, "nfe": e["nfe_total"], "samples": e["samples_total"],
                                        "seconds": e["seconds_total"], "prompt_index": p, "image_index": i,
                                        "prompt": f"eval prompt {p}", "scores": sc}) + "\n")


def write_comparison(
    root: str | Path,
    algos: Sequence[str] = ("ddpo", "dancegrpo", "mixgrpo", "treegrpo"),
    seeds: Sequence[int] = (0, 1, 2),
    controls: str | None = None,
    **kwargs: Any,
) -> list[Path]:
    """A ``bench compare``-shaped tree ROOT/<algo>/seed<s>/ with distinct, known curves per algorithm:
    algorithm number a (in the given order) learns at slope 0.01 * (a + 1) per iteration plus
    0.001 * seed, spends (1 + a) / 2 s rollout per iteration (so later ones are slower) and
    320 - 40 * a NFE per iteration. ``controls=<baseline>`` adds ROOT/<baseline>-aa/seed<s> (the
    baseline's curves under seeds 100 + s: slope + 0.001 * ((s + 1) % 3)) and ROOT/<baseline>-frozen/seed<s>
    (the baseline's costs, a flat curve), labelled in their manifests."""
    out = []
    fixed_phases = kwargs.pop("phase_seconds", None)
    for a, algo in enumerate(algos):
        for s in seeds:
            slope = 0.01 * (a + 1) + 0.001 * s
            out.append(write_run(
                Path(root) / algo / f"seed{s}", algo=algo, seed=s,
                train_curve=linear_curve(0.1, slope),
                heldout_curve=linear_curve(0.2, slope / 2 if algo != "ddpo" else -0.002),
                phase_seconds=fixed_phases or ((1 + a) / 2, 0.2, 0.05, 0.75),
                nfe_per_iter=320.0 - 40.0 * a, peak_mem_mb=100.0 + 50 * a, **kwargs))
    if controls is not None:
        a = list(algos).index(controls)
        for s in seeds:
            common = dict(algo=controls, phase_seconds=fixed_phases or ((1 + a) / 2, 0.2, 0.05, 0.75),
                          nfe_per_iter=320.0 - 40.0 * a, peak_mem_mb=100.0 + 50 * a, **kwargs)
            slope = 0.01 * (a + 1) + 0.001 * ((s + 1) % len(seeds))  # the baseline's slopes, other seeds
            out.append(write_run(Path(root) / f"{controls}-aa" / f"seed{100 + s}", seed=100 + s,
                                 train_curve=linear_curve(0.1, slope), heldout_curve=linear_curve(0.2, slope / 2),
                                 label=f"{controls}-aa", **common))
            out.append(write_run(Path(root) / f"{controls}-frozen" / f"seed{s}", seed=s,
                                 train_curve=linear_curve(0.1, 0.0), heldout_curve=linear_curve(0.2, 0.0),
                                 label=f"{controls}-frozen", **common))
    return out


def write_sweep(
    root: str | Path,
    algo: str = "treegrpo",
    ks: Sequence[int] = (2, 3, 4),
    ds: Sequence[int] = (1, 2, 3),
    seeds: Sequence[int] = (0, 1),
    **kwargs: Any,
) -> list[Path]:
    """A sweep-shaped tree ROOT/trials/<n>/ over algo.k x algo.d (+ ROOT/trials.csv). Run (k, d) learns
    at slope 0.005 * k * d / (1 + 0.1 * (k * d - 6) ** 2) (best near k * d = 6), takes k ** d / 4 s
    rollout per iteration and uses 50 * k ** d MB peak memory."""
    out, rows = [], []
    n = 0
    for k in ks:
        for d in ds:
            for s in seeds:
                slope = 0.005 * k * d / (1 + 0.1 * (k * d - 6) ** 2) + 0.0005 * s
                out.append(write_run(
                    Path(root) / "trials" / str(n), algo=algo, seed=s, algo_config={"k": k, "d": d},
                    train_curve=linear_curve(0.1, slope), heldout_curve=linear_curve(0.2, slope / 2),
                    phase_seconds=(k ** d / 4, 0.2, 0.05, 0.5), peak_mem_mb=50.0 * k ** d, **kwargs))
                rows.append(f"{n},{k},{d},{s},COMPLETE")
                n += 1
    (Path(root) / "trials.csv").write_text("number,params_k,params_d,seed,state\n" + "\n".join(rows) + "\n")
    return out


def _head_commit() -> str:
    from bench.rundir.runlog import git_state

    return git_state().get("commit") or GIT_COMMIT


def main(argv: Sequence[str] | None = None) -> int:
    """A stand-in for ``bench run`` (same flags) that writes a synthetic run directory instantly:
    ``python tests/synthetic_runs.py run --algo A --budget B --seed S --out DIR [--set fail=1] ...``.
    Used to test ``bench compare`` without training; ``--set fail=1`` exits with status 3; ``--set
    kill=1`` leaves a killed run (manifest and a checkpoint, no final.json; exit 137); ``--resume DIR``
    completes a run from its manifest. ``--set run.label=L`` is recorded; ``--set train.frozen=true``
    records a frozen run, whose rewards stay at their start (slope 0)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="synthetic-bench")
    p.add_argument("command", choices=["run"])
    p.add_argument("--algo")
    p.add_argument("--budget", required=True)
    p.add_argument("--seed", type=int)
    p.add_argument("--out")
    p.add_argument("--resume", default=None)
    p.add_argument("--reward", default="shapes_pref")
    p.add_argument("--model", default=None)
    p.add_argument("--model-path", default=None)
    p.add_argument("--eval-rewards", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    sets = dict(kv.split("=", 1) for kv in a.set)
    if a.resume:
        man = json.loads((Path(a.resume) / "manifest.json").read_text())
        a.algo, a.seed, a.out = man["algorithm"]["name"], man["seed"], a.resume
        sets.setdefault("run.label", man["config"].get("run", {}).get("label"))
        sets.setdefault("train.frozen", str(man.get("weights_frozen", False)).lower())
        print(f"synthetic resume {a.algo} seed {a.seed}", flush=True)
    frozen = sets.get("train.frozen") == "true"
    print(f"synthetic run {a.algo} seed {a.seed} budget {a.budget} -> {a.out}", flush=True)
    if sets.get("fail") == "1":
        print("synthetic failure requested", file=sys.stderr, flush=True)
        return 3
    order = ("ddpo", "dancegrpo", "mixgrpo", "treegrpo", "grpo")
    rank = order.index(a.algo) if a.algo in order else len(order)
    # a bounded seed effect (0.001 per seed, repeating every 7 seeds): the A/A arm's seeds (1000 + s) learn
    # within the spread of seeds 0..6 instead of far faster
    slope = 0.0 if frozen else 0.01 * (rank + 1) + 0.001 * (a.seed % 7)
    write_run(a.out, algo=a.algo, seed=a.seed, reward=a.reward, budget_spec=a.budget,
              label=sets.get("run.label"), frozen=frozen,
              train_curve=linear_curve(0.1, slope), heldout_curve=linear_curve(0.2, slope / 2),
              phase_seconds=((1 + rank) / 2, 0.2, 0.05, 0.75), nfe_per_iter=320.0 - 40.0 * rank,
              peak_mem_mb=100.0 + 50 * rank, images=True, final=sets.get("kill") != "1",
              git_commit=sets.get("commit") or _head_commit())
    if sets.get("kill") == "1":
        (Path(a.out) / "checkpoints" / "step_000001").mkdir(parents=True, exist_ok=True)
        print("killed", flush=True)
        return 137
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
