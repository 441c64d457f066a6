"""The evaluation cache (``eval.cache``): the iteration-0 held-out evaluation computed once per setting.

Before any training step every run of a comparison evaluates the same initial weights on the same prompts,
noise (``eval.seed``) and deterministic sampler: the same images and scores in every arm, seed and tuning
trial. With ``eval.cache`` set to a directory (``bench compare`` sets ``DIR/.eval_cache``; a plain
``bench run`` has none, so it writes nothing outside its run directory), that evaluation looks up an entry
keyed by a hash of everything that determines it (``key_fields``): the weights it samples with (hashed in
memory: a random-architecture preset's weights depend on the run seed, a LoRA adapter's initialisation too),
the model settings, the evaluation plan and schedule, the micro-batch (chunking changes float reductions),
the eval prompts (their text and metadata), images per prompt, eval seed and grid, every eval reward's name,
version (with its weights' hash) and options, device, precision, package versions, the CPU thread count and
a hash of treebench's own source (``bench/``, ``rewards/``). Only iteration 0 is cached: later weights differ.

A hit writes what the evaluation would have written (the scores, the sample grid, the calls it made, which
go to the call trace and are priced by the run's own cost profile) and the record says ``"cached": true``;
a miss evaluates and stores the entry. Entries are JSON and a PNG, never pickles: ``<key>.json`` names the
grid ``<key>-<sha256 of the PNG>.png``; each file is written to a temporary file in the cache directory and
renamed over its name (``os.replace``), the PNG first, so concurrent runs racing for one key both end with a
complete, correct entry. An entry that cannot be read or does not match is ignored with a warning and
recomputed (and replaced). Off under FSDP (every rank takes part in the evaluation's forward passes).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.engine.trace import Call
from bench.run.parts import RunParts
from bench.rundir.layout import eval_cache_entry, eval_cache_grid
from bench.types import CURRENT, RewardOutput

#: the entry format written by this version (an entry of another format is recomputed)
FORMAT = 1
#: the source trees whose code determines an evaluation (hashed into every key)
CODE_DIRS = ("bench", "rewards")
CODE_SUFFIXES = (".py", ".json", ".jsonl")


class CachedImages:
    """Stands in for the evaluation's rollout on a hit: the prompt index of every image (the images
    themselves are not kept; their grid is)."""

    def __init__(self, leaf_prompts: list[int]):
        self._leaf = torch.tensor(leaf_prompts, dtype=torch.long)
        self.images = None

    def leaf_prompts(self) -> torch.Tensor:
        return self._leaf


# ---- the hook --------------------------------------------------------------------------------------------
def evaluate_images(r: RunParts, iteration: int, png: Path,
                    compute: Callable[[Any, int, Path], tuple[Any, dict[str, RewardOutput]]]
                    ) -> tuple[Any, dict[str, RewardOutput], bool]:
    """``compute(r, iteration, png)`` (sample the eval images, score them with every eval reward, save the
    grid to ``png``: returns the rollout and the scores by reward name), or its result from the cache.
    Returns (rollout or ``CachedImages``, scores, whether it came from the cache)."""
    cache = getattr(r.spec.eval, "cache", None)
    if cache is None or iteration != 0 or r.state.totals.iterations != 0 or r.dist.fsdp:
        roll, scored = compute(r, iteration, png)
        return roll, scored, False
    cache = Path(cache)
    fields = key_fields(r)
    key = digest(fields)
    hit = load(cache, key, fields, r, png)
    if hit is not None:
        return hit[0], hit[1], True
    n0, nfe0, t0 = len(r.engine.recorder.calls), r.engine.nfe_eval, time.perf_counter()
    roll, scored = compute(r, iteration, png)
    seconds = time.perf_counter() - t0
    store(cache, key, fields, roll.leaf_prompts().tolist(), scored, r.engine.recorder.calls[n0:],
          r.engine.nfe_eval - nfe0, png, seconds)
    return roll, scored, False


# ---- the key ---------------------------------------------------------------------------------------------
def digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(fields).encode()).hexdigest()[:32]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def key_fields(r: RunParts) -> dict[str, Any]:
    """Everything that determines the iteration-0 evaluation of run ``r`` (JSON; stored in the entry)."""
    from bench.run.evaluation import eval_plan
    from bench.rundir.runlog import device_info, package_versions

    spec, pol, e = r.spec, r.policy, r.spec.eval
    weights = getattr(r.algo, "eval_weights", CURRENT)
    plan = eval_plan(spec.sampler, e.images_per_prompt, weights)
    b = r.eval_batch
    rewards = [{"name": n, "version": str(getattr(w, "version", "unknown")),
                "class": f"{type(w).__module__}.{type(w).__qualname__}",
                "options": dict(spec.reward.options.get(n) or {}),
                "normalize": spec.reward.normalize if n == spec.reward.name else None}
               for n, w in r.eval_rewards.items()]
    return {
        "format": FORMAT,
        "weights": weights_digest(r, weights),
        "eval_weights": weights,
        "model": {"config": {k: v for k, v in spec.config["model"].items() if k != "device"},
                  "options": dataclasses.asdict(pol.options), "prediction": pol.prediction, "family": pol.family,
                  "meta": pol.meta, "autocast": str(pol.autocast_dtype), "latent_shape": list(pol.latent_shape)},
        "plan": dataclasses.asdict(plan),
        "schedule": r.schedule_record(),
        "engine": {"max_micro_batch": r.engine.max_micro_batch, "shift": r.engine.shift,
                   "schedule": r.engine.schedule_kind},
        "prompts": hashlib.sha256(_canonical({"prompts": list(b.prompts), "metadata": [dict(m) for m in b.metadata],
                                              "ids": list(b.prompt_ids)}).encode()).hexdigest(),
        "num_prompts": len(b.prompts),
        "images_per_prompt": e.images_per_prompt, "seed": e.seed, "grid": e.grid,
        "rewards": rewards,
        "device": str(r.device), "device_info": device_info(r.device), "world_size": r.dist.world_size,
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "packages": package_versions(),
        "code": code_digest(),
    }


def weights_digest(r: RunParts, weights: str) -> str:
    """sha256 of every tensor the evaluation samples with, in memory: the denoiser (holding the
    ``weights`` snapshot when the algorithm evaluates with one), text encoders and VAE."""
    pol = r.policy
    h = hashlib.sha256()
    mods = [("denoiser", pol.denoiser)] + [(f"frozen{i}", m) for i, m in enumerate(pol.frozen_modules())]
    with torch.no_grad(), r.engine.snapshots.use(weights):
        for tag, mod in mods:
            for name, t in sorted(mod.state_dict(keep_vars=False).items()):
                if not isinstance(t, torch.Tensor):
                    continue
                t = t.detach()
                h.update(f"{tag}/{name}:{t.dtype}:{tuple(t.shape)};".encode())
                h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of treebench's source (``CODE_DIRS``): a change to the code, committed or not, misses."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for f in sorted((root / d).rglob("*")):
            if f.suffix in CODE_SUFFIXES and f.is_file() and "__pycache__" not in f.parts:
                h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# ---- entries ---------------------------------------------------------------------------------------------
def _warn(msg: str) -> None:
    print(f"warning: eval cache: {msg}", file=sys.stderr, flush=True)


class _Bad(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Entry:
    """A cached evaluation: every image's prompt index, the scores by reward, the calls it made, its NFE and
    the bytes of its sample grid."""

    leaf_prompts: list[int]
    scored: dict[str, RewardOutput]
    calls: list[Call]
    nfe: int
    png: bytes


def load(cache: Path, key: str, fields: dict[str, Any], r: RunParts, png: Path
         ) -> tuple[CachedImages, dict[str, RewardOutput]] | None:
    """Entry ``key`` applied to run ``r`` (its grid copied to ``png``, its calls added to the engine's
    recorder, where the evaluation's drain finds them), or None (the caller evaluates)."""
    entry = read_entry(cache, key, fields, list(r.eval_rewards))
    if entry is None:
        return None
    png.write_bytes(entry.png)
    r.engine.recorder.calls.extend(entry.calls)
    r.engine.nfe_eval += entry.nfe
    return CachedImages(entry.leaf_prompts), entry.scored


def read_entry(cache: Path, key: str, fields: dict[str, Any], rewards: list[str]) -> Entry | None:
    """Entry ``key``, or None: absent, or unreadable or not matching ``fields`` and the eval ``rewards``
    (then with a warning)."""
    path = eval_cache_entry(cache, key)
    if not path.is_file():
        return None
    try:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise _Bad(f"not readable JSON ({e})") from None
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
            raise _Bad("not an entry of this format and key")
        if _canonical(entry.get("fields")) != _canonical(fields):
            raise _Bad("its settings differ from this evaluation's")
        leaf = entry["leaf_prompts"]
        n = int(entry["eval_images"])
        if not (isinstance(leaf, list) and len(leaf) == n and all(isinstance(j, int) for j in leaf)):
            raise _Bad("bad leaf_prompts")
        names = [name for name, _ in entry["scores"]]
        if names != list(rewards):
            raise _Bad(f"rewards {names} are not {list(rewards)}")
        scored = {name: RewardOutput(_vector(s["scores"], n), {c: _vector(v, n) for c, v in s["components"]})
                  for name, s in entry["scores"]}
        calls = [Call.from_list(c) for c in entry["calls"]]
        grid = eval_cache_grid(cache, key, str(entry["png_sha256"]))
        if entry["png"] != grid.name:
            raise _Bad("bad grid name")
        try:
            data = grid.read_bytes()
        except OSError as e:
            raise _Bad(f"grid {grid.name} unreadable ({e.strerror or e})") from None
        if hashlib.sha256(data).hexdigest() != entry["png_sha256"]:
            raise _Bad(f"grid {grid.name} does not match its hash")
        return Entry(leaf, scored, calls, int(entry["nfe"]), data)
    except (_Bad, KeyError, TypeError, ValueError) as e:
        what = str(e) if isinstance(e, _Bad) else f"malformed ({type(e).__name__}: {e})"
        _warn(f"entry {path} ignored: {what}; evaluating again")
        return None


def _vector(values: Any, n: int) -> torch.Tensor:
    if not isinstance(values, list) or len(values) != n or not all(isinstance(v, (int, float)) for v in values):
        raise _Bad("a score vector has the wrong length or type")
    return torch.tensor(values, dtype=torch.float32)


def store(cache: Path, key: str, fields: dict[str, Any], leaf: list[int], scored: dict[str, RewardOutput],
          calls: list[Call], nfe: int, png: Path, seconds: float) -> None:
    """Write entry ``key`` (the PNG, then the JSON naming it; each atomically). A failure to write is a
    warning: the run goes on without the entry."""
    try:
        data = png.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        entry = {"format": FORMAT, "key": key, "eval_images": len(leaf), "leaf_prompts": leaf,
                 "scores": [[name, {"scores": out.scores.tolist(),
                                    "components": [[c, v.tolist()] for c, v in out.components.items()]}]
                            for name, out in scored.items()],
                 "calls": [c.as_list() for c in calls], "nfe": int(nfe),
                 "png": eval_cache_grid(cache, key, sha).name, "png_sha256": sha,
                 "t_eval_s": seconds, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "fields": fields}
        cache.mkdir(parents=True, exist_ok=True)
        _replace(eval_cache_grid(cache, key, sha), data)
        _replace(eval_cache_entry(cache, key), (json.dumps(entry, default=str) + "\n").encode())
    except OSError as e:
        _warn(f"could not store the iteration-0 evaluation in {cache} ({e.strerror or e}); the run goes on "
              f"without it")


def _replace(path: Path, data: bytes) -> None:
    """``path`` whole or not at all: a uniquely named temporary file in its directory, renamed over it (so
    concurrent writers never see each other's partial files)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the cache from the other users of a shared directory
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
