"""Prompt sets: built-in names or a user's file (one prompt per line, or JSONL with metadata).

Built-in sets: ``shapes-train`` / ``shapes-eval`` (the embedded world's splits) and every entry of
``bench/data/prompts/MANIFEST.json`` (real-model prompt sets with licence, source and sha256).
A ``.jsonl`` file needs a ``"prompt"`` key per line; its other keys become per-prompt metadata that
rewards receive. Any other file is read as one prompt per line (blank lines and lines starting with
``#`` are skipped).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from bench.engine.seeding import generator
from bench.errors import UsageError
from bench.registry import suggestions
from bench.types import PromptBatch

_ROOT = Path(__file__).resolve().parents[1]
BUILTIN_FILES = {"shapes-train": _ROOT / "shapes" / "data" / "train.jsonl",
                 "shapes-eval": _ROOT / "shapes" / "data" / "eval.jsonl"}
MANIFEST = _ROOT / "data" / "prompts" / "MANIFEST.json"


def builtin_sets() -> dict[str, Path]:
    sets = dict(BUILTIN_FILES)
    if MANIFEST.is_file():
        for name, entry in json.loads(MANIFEST.read_text()).items():
            sets[name] = MANIFEST.parent / entry["file"]
    return sets


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]
    metadata: tuple[Mapping[str, Any], ...]
    sha256: str

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, indices: list[int]) -> PromptBatch:
        return PromptBatch(prompts=tuple(self.prompts[i] for i in indices),
                           metadata=tuple(self.metadata[i] for i in indices), prompt_ids=tuple(indices))

    def sample(self, n: int, seed: int, iteration: int) -> PromptBatch:
        """n distinct prompts (with replacement only when n exceeds the set), drawn from
        generator(seed, iteration, "prompts"): every algorithm with the same seed sees the same prompts."""
        g = generator(seed, iteration, "prompts")
        if n <= len(self):
            idx = torch.randperm(len(self), generator=g)[:n].tolist()
        else:
            idx = torch.randint(len(self), (n,), generator=g).tolist()
        return self.batch(idx)

    def head(self, n: int) -> PromptBatch:
        return self.batch(list(range(min(n, len(self)))))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "count": len(self)}


def load_prompt_set(spec: str) -> PromptSet:
    sets = builtin_sets()
    path = sets.get(spec)
    if path is None:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UsageError(f"prompt set {spec!r} is neither a file nor a built-in prompt set. "
                             f"{suggestions(spec, list(sets))}")
    if not path.is_file():
        raise UsageError(f"prompt set {spec!r}: {path} is not a file")
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"prompt file {path} is not UTF-8 text") from None
    prompts: list[str] = []
    meta: list[dict[str, Any]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{n}: malformed JSON ({e.msg}); each line must be an object with a "
                                 f"\"prompt\" key") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
                raise UsageError(f"{path}:{n}: each line must be a JSON object with a non-empty \"prompt\" string")
            prompts.append(obj.pop("prompt").strip())
            meta.append(obj)
    else:
        for line in text.splitlines():
            s = line.strip()
            if s and not s.startswith("#"):
                prompts.append(s)
                meta.append({})
    if not prompts:
        raise UsageError(f"prompt set {spec!r} ({path}) contains no prompts")
    return PromptSet(name=spec, prompts=tuple(prompts), metadata=tuple(meta), sha256=sha)
