"""Measuring cost profiles: ``python -m bench.perf profile --model M --device D --out F.json``.

For the configured model (same loader, options and precision as ``bench run``) it times, per call
kind, seconds per call at several row counts (mean of ``repeats`` calls after ``warmup`` calls,
device-synchronised) and, on CUDA, the peak memory of each call:

* ``forward``: the denoiser without gradients at 1..64 rows
* ``forward_backward`` / ``forward_backward_checkpointed``: forward with gradients, loss = mean square of
  the output, backward, zero_grad, with gradient checkpointing off / on, at 1..16 rows (only the
  parameters the run would train carry gradients: LoRA or full fine-tuning as configured)
* ``vae_decode`` (latent models), ``text_encode`` (prompts), ``reward:<name>`` for the training and
  held-out rewards (images), ``optimizer_step`` (AdamW over the trainable parameters)

The JSON it writes is a ``bench.cost`` profile. ``convert_measurements`` turns a bare measurement file
(``{"measurements": [{kind, rows, seconds_per_call, peak_mem_mb}]}``) into one.
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from bench.cost import FORMAT

FORWARD_ROWS = (1, 2, 4, 8, 16, 32, 64)
BACKWARD_ROWS = (1, 2, 4, 8, 16)
IMAGE_ROWS = (1, 4, 16, 64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """Mean and min seconds per call of ``fn`` and, on CUDA, the peak memory it reached (MiB)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    times.sort()
    return {"seconds": sum(times) / len(times), "min_seconds": times[0], "median_seconds": times[len(times) // 2],
            "peak_mem_mb": mem}


def _points(fn_for_rows: Callable[[int], Callable[[], Any]], rows: Sequence[int], device: torch.device,
            warmup: int, repeats: int, log: Callable[[str], None], kind: str) -> list[dict[str, Any]]:
    pts = []
    for r in rows:
        try:
            m = time_call(fn_for_rows(r), device, warmup, repeats)
        except torch.cuda.OutOfMemoryError:  # a row count that does not fit ends the table
            log(f"  {kind} rows {r}: out of memory, stopping this kind")
            torch.cuda.empty_cache()
            break
        pts.append({"rows": r, **m})
        log(f"  {kind:<30} rows {r:>3}: {m['seconds'] * 1e3:9.2f} ms/call")
    return pts


def _denoiser_fns(policy: Any, grad: bool) -> Callable[[int], Callable[[], Any]]:
    dev = policy.device
    params = policy.trainable_parameters()

    def for_rows(r: int) -> Callable[[], Any]:
        cond = policy.encode_prompts(["a large red circle on the left"] * r)
        x = torch.randn(r, *policy.latent_shape, device=dev)
        t = policy.timestep_values(torch.full((r,), 0.5, device=dev))

        def fwd() -> None:
            with torch.no_grad():
                policy.predict(x, t, cond)

        def fwd_bwd() -> None:
            out = policy.predict(x, t, cond)
            out.square().mean().backward()
            for p in params:
                p.grad = None

        return fwd_bwd if grad else fwd

    return for_rows


def measure(cfg: Mapping[str, Any], device: torch.device, warmup: int = 2, repeats: int = 10,
            log: Callable[[str], None] = print, forward_rows: Sequence[int] = FORWARD_ROWS,
            backward_rows: Sequence[int] = BACKWARD_ROWS, image_rows: Sequence[int] = IMAGE_ROWS) -> dict[str, Any]:
    """Measured points per kind for the model of ``cfg`` (a resolved config) on ``device``."""
    from bench.runner import _build_reward_checked, build_policy

    torch.manual_seed(0)
    policy = build_policy(cfg, device)
    kinds: dict[str, list[dict[str, Any]]] = {}
    kinds["forward"] = _points(_denoiser_fns(policy, False), forward_rows, device, warmup, repeats, log, "forward")
    policy.train(True)
    den = policy.denoiser
    for ckpt in (False, True):
        kind = "forward_backward_checkpointed" if ckpt else "forward_backward"
        if ckpt and not hasattr(den, "enable_gradient_checkpointing"):
            log(f"  {kind}: {type(den).__name__} has no gradient checkpointing; skipped")
            continue
        if hasattr(den, "enable_gradient_checkpointing"):
            den.enable_gradient_checkpointing() if ckpt else den.disable_gradient_checkpointing()
        kinds[kind] = _points(_denoiser_fns(policy, True), backward_rows, device, warmup, repeats, log, kind)
    if hasattr(den, "disable_gradient_checkpointing"):
        den.disable_gradient_checkpointing()
    policy.train(False)
    lat = lambda r: torch.randn(r, *policy.latent_shape, device=device)  # noqa: E731
    if policy.vae is not None:
        kinds["vae_decode"] = _points(lambda r: (lambda z=lat(r): policy.decode(z)), image_rows, device, warmup,
                                      repeats, log, "vae_decode")
    kinds["text_encode"] = _points(lambda r: (lambda: policy.encode_prompts(["a small blue square"] * r)),
                                   image_rows, device, warmup, repeats, log, "text_encode")
    images = policy.decode(lat(1))
    r = cfg["reward"]
    for name in dict.fromkeys([r["name"], *cfg["eval"]["rewards"]]):
        reward = _build_reward_checked(name, device, r["options"], r["normalize"])
        kinds[f"reward:{name}"] = _points(
            lambda n, rw=reward: (lambda im=images.repeat(n, 1, 1, 1): rw(im, ["a small blue square"] * n,
                                                                          [{}] * n)),
            image_rows, device, warmup, repeats, log, f"reward:{name}")
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-12)
    for p in policy.trainable_parameters():
        p.grad = torch.zeros_like(p)
    kinds["optimizer_step"] = _points(lambda n: opt.step, (1,), device, warmup, repeats, log, "optimizer_step")
    return kinds


def profile_json(name: str, model: str, models: Sequence[str], device: str, conditions: str, software: str,
                 trainable: str, kinds: Mapping[str, Sequence[Mapping[str, Any]]], measured: str,
                 assumptions: Mapping[str, str] | None = None, source: str = "") -> dict[str, Any]:
    """A ``bench.cost`` profile object from measured points (kept: rows, seconds, peak_mem_mb, min/median)."""
    keep = ("rows", "seconds", "peak_mem_mb", "min_seconds", "median_seconds")
    return {"format": FORMAT, "name": name, "model": model, "models": list(models), "device": device,
            "measured": measured, "conditions": conditions, "software": software, "trainable": trainable,
            "source": source,
            "kinds": {k: {"note": "measured", "points": [{f: p[f] for f in keep if f in p} for p in pts]}
                      for k, pts in kinds.items() if pts},
            "assumptions": dict(assumptions or {})}


def software() -> str:
    import diffusers
    import transformers

    return (f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}")


def convert_measurements(obj: Mapping[str, Any], name: str, model: str, models: Sequence[str], trainable: str,
                         assumptions: Mapping[str, str], source: str) -> dict[str, Any]:
    """A profile from a bare measurement file (``measurements``: kind, rows, seconds_per_call, peak_mem_mb)."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for m in obj["measurements"]:
        kinds.setdefault(m["kind"], []).append({"rows": int(m["rows"]), "seconds": float(m["seconds_per_call"]),
                                                "peak_mem_mb": m.get("peak_mem_mb")})
    cond = f"{obj.get('conditions', '')}. Rows: {obj.get('rows_are', '')}".strip()
    return profile_json(name, model, models, str(obj.get("device", "")), cond, str(obj.get("software", "")),
                        trainable, kinds, str(obj.get("measured", "")), assumptions, source)
