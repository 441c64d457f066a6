"""Make ``import torchvision`` work on a CPU-only torch build (see STACK.md).

torchvision 0.28.0 wheels carry CUDA-built ops; on the CPU torch build their load fails silently and
torchvision then registers fake kernels for ``torchvision::nms``/``qnms`` without a schema, raising
``operator torchvision::nms does not exist``. Because diffusers and transformers import torchvision
whenever it is installed, that breaks them too. ``install()`` adds an import hook that, right before
torchvision is first imported, defines the two op schemas if they are missing (a no-op where the
compiled ops load). It imports nothing heavy until torchvision itself is imported.
"""

from __future__ import annotations

import importlib.abc
import sys


def define_missing_ops() -> None:
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018  (raises when the schema is absent)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)  # the library object must stay alive for the schemas to stay defined


_KEEP: list = []


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_missing_ops()
        return None


def install() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
