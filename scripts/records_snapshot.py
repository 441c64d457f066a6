"""Record or compare the training records of every registered algorithm on the tiny models.

A behaviour-preserving refactor must leave ``iterations.jsonl`` and ``evals.jsonl`` identical apart from
timing fields. Record before the change, compare after it:

    python scripts/records_snapshot.py record SNAPSHOT_DIR
    python scripts/records_snapshot.py compare SNAPSHOT_DIR     # exit 1 and a list of differences if any
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from bench import config
from bench.registry import ALGORITHMS  # noqa: E402
from bench.run import runner  # noqa: E402
from bench.run.records import TIMING_KEYS  # noqa: E402

SMALL = {"grpo": {"algo.group_size": 2}, "ddpo": {"algo.group_size": 2}, "dancegrpo": {"algo.group_size": 2},
         "mixgrpo": {"algo.group_size": 2, "algo.window": 2, "algo.shift_interval": 1},
         "treegrpo": {"algo.k": 2, "algo.d": 2}, "flowdppo": {"algo.num_sde_steps": 2}}
IGNORED = set(TIMING_KEYS) | {"t_eval_s"}


def cases() -> dict[str, tuple[str, str, dict]]:
    out = {a: (a, "tiny-random", SMALL.get(a, {})) for a in sorted(ALGORITHMS)}
    out["ddpo_ddim"] = ("ddpo", "tiny-random-ddim", SMALL["ddpo"])
    out["mixgrpo_flash"] = ("mixgrpo", "tiny-random", {**SMALL["mixgrpo"], "algo.flash": True, "sampler.steps": 6})
    return out


def produce(root: Path) -> None:
    torch.set_num_threads(1)
    for name, (algo, model, sets) in cases().items():
        base = {"sampler.steps": 4, "run.progress": False, "eval.every": 2, "eval.at_start": True,
                "train.prompts_per_iteration": 2, "train.lr": 1e-4, **sets}
        cfg = config.resolve(base, flags={"algo.name": algo, "model.name": model, "budget": "3it",
                                          "out": str(root / name), "seed": 3})
        runner.run(cfg, progress=False)


def _strip(path: Path) -> list[dict]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in IGNORED} for r in recs]


def compare(snapshot: Path, fresh: Path) -> list[str]:
    problems = []
    for name in cases():
        for f in ("iterations.jsonl", "evals.jsonl"):
            old, new = _strip(snapshot / name / f), _strip(fresh / name / f)
            if len(old) != len(new):
                problems.append(f"{name}/{f}: {len(old)} records before, {len(new)} after")
            for i, (a, b) in enumerate(zip(old, new)):
                keys = sorted(set(a) | set(b))
                diff = [k for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>")]
                if diff:
                    problems.append(f"{name}/{f}[{i}]: " + ", ".join(
                        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in diff))
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("record", "compare"):
        print(__doc__, file=sys.stderr)
        return 2
    target = Path(argv[1])
    if argv[0] == "record":
        produce(target)
        print(f"recorded {len(cases())} runs in {target}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        produce(Path(tmp))
        problems = compare(target, Path(tmp))
    for p in problems:
        print(p)
    print(f"{len(cases())} runs compared: {'identical apart from timing' if not problems else 'DIFFERENT'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
