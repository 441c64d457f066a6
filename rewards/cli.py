"""``bench rewards check``: which rewards can run on this machine, and why not.

    bench rewards check                      # every registered reward: packages + weight files
    bench rewards check hpsv2 image_reward   # only these; exit status 1 if one of them cannot run
    bench rewards check --load --device cuda # also build each model and score one image
    bench rewards check --json               # machine-readable

Without ``--load`` nothing big is read: packages are checked with ``importlib.util.find_spec`` and
weights by looking for their files (sizes reported; a weight file is hashed only with ``--hash``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL_HINT = ('pip install -c constraints.txt "treebench[rewards]" && '
                'pip install -c constraints.txt --no-deps hpsv2x==1.2.0 image-reward==1.5')


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def check_one(name: str, device: str = "cpu", load: bool = False, with_hash: bool = False) -> dict[str, Any]:
    from bench.registry import REWARDS, load_object

    entry: dict[str, Any] = {"reward": name, "target": REWARDS[name].target}
    missing = [m for m in REWARDS[name].requires if importlib.util.find_spec(m) is None]
    if missing:
        return {**entry, "ok": False, "status": "missing-package",
                "why": f"python modules not installed: {', '.join(missing)}; install with: {INSTALL_HINT}"}
    try:
        cls = load_object(REWARDS[name].target)
    except NotImplementedError as e:
        return {**entry, "ok": False, "status": "not-implemented", "why": str(e)}
    except ImportError as e:
        return {**entry, "ok": False, "status": "missing-package", "why": f"{e}; install with: {INSTALL_HINT}"}
    try:
        reward = cls(device=device) if load else cls(device="cpu")
    except Exception as e:  # noqa: BLE001 - report, do not crash the check
        return {**entry, "ok": False, "status": "error", "why": f"{type(e).__name__}: {e}"}
    locate = getattr(reward, "_locate", None)
    if locate is not None:  # a model-based reward: find its files without loading them
        from rewards._paths import MissingWeightsError

        try:
            files = [Path(f) for f in locate()]
        except MissingWeightsError as e:
            return {**entry, "ok": False, "status": "missing-weights", "why": str(e)}
        entry["files"] = [{"path": str(f), "bytes": _size(f)} for f in files]
        if with_hash:
            entry["version"] = reward.version
    else:
        entry["version"] = getattr(reward, "version", "?")
    if load:
        import torch

        try:
            out = reward(torch.rand(1, 3, 64, 64, device=device), ["a photo of a cat"], [{}])
            entry["version"] = reward.version
            entry["sample_score"] = float(out.scores[0])
        except Exception as e:  # noqa: BLE001
            return {**entry, "ok": False, "status": "load-failed", "why": f"{type(e).__name__}: {e}"}
    return {**entry, "ok": True, "status": "ok" if locate is not None else "built-in"}


def _print_human(results: list[dict[str, Any]]) -> None:
    for r in results:
        print(f"{r['reward']:<22} {r['status']}")
        for f in r.get("files", []):
            print(f"    {f['path']}  ({f['bytes'] / 2**20:.1f} MiB)")
        if "version" in r:
            print(f"    version {r['version']}")
        if "sample_score" in r:
            print(f"    score of a random image: {r['sample_score']:.4f}")
        if not r["ok"]:
            for line in str(r["why"]).splitlines():
                print(f"    {line}")


def main(argv: Sequence[str] | None = None) -> int:
    from bench.errors import UsageError
    from bench.registry import REWARDS, did_you_mean

    p = argparse.ArgumentParser(prog="bench rewards", description="Reward backends on this machine.")
    sub = p.add_subparsers(dest="cmd", metavar="check")
    c = sub.add_parser("check", help="report which rewards are loadable here and why not")
    c.add_argument("names", nargs="*", help="rewards to check (default: all registered)")
    c.add_argument("--load", action="store_true", help="also build each model and score one random image")
    c.add_argument("--device", default="cpu", help="device for --load (default cpu)")
    c.add_argument("--hash", action="store_true", help="hash weight files to report each reward's version")
    c.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.cmd is None:
        raise UsageError("a subcommand is required: check (bench rewards check [NAMES] [--load] "
                         "[--json]: which rewards can run here and why not)")

    names = list(args.names) or list(REWARDS)
    for n in names:
        if n not in REWARDS:
            raise UsageError(did_you_mean(n, REWARDS, "reward"))
    results = [check_one(n, device=args.device, load=args.load, with_hash=args.hash) for n in names]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_human(results)
    # explicit names: the exit status says whether all of them can run; a plain listing always succeeds
    return 0 if not args.names or all(r["ok"] for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
