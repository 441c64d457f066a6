"""``bench env``: what a bug report needs (as ``accelerate env``): treebench and library versions, Python,
platform, device and CUDA, and which rewards can run here (the same check as ``bench rewards check``)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Sequence

from bench.registry import REWARDS, load_object

PACKAGES = ("treebench", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "numpy",
            "optuna", "pandas", "matplotlib", "tensorboard", "wandb", "mlflow", "open-clip-torch", "hpsv2x",
            "image-reward")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "packages": {n: _version(n) for n in PACKAGES},
        "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "bf16_supported": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
    }
    check = load_object("rewards.cli:check_one")
    info["rewards"] = {n: check(n)["status"] for n in REWARDS}
    return info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench env", description="Versions, device and CUDA, loadable rewards.")
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    info = collect()
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"treebench {info['packages']['treebench'] or 'unknown (not installed)'}")
    print(f"python {info['python']} on {info['platform']}")
    print("packages:")
    for n, v in info["packages"].items():
        if n != "treebench":
            print(f"  {n:<18} {v or '-'}")
    print(f"cuda: {'available' if info['cuda_available'] else 'not available'} (torch built with CUDA "
          f"{info['torch_cuda'] or 'none'})")
    for i, d in enumerate(info["devices"]):
        print(f"  cuda:{i} {d}")
    if info["cuda_available"]:
        print(f"  bf16 supported: {info['bf16_supported']}")
    print("rewards (bench rewards check for why):")
    for n, st in info["rewards"].items():
        print(f"  {n:<22} {st}")
    return 0
