"""Measuring cost profiles: ``python -m bench.cost.perf profile --model M --device D --out F.json``.

For the configured model (same loader, options and precision as ``bench run``) it times, per call
kind, seconds per call at several row counts (median of ``repeats`` calls after ``warmup`` calls,
device-synchronised) and, on CUDA, the peak memory of each call:

* ``forward``: the denoiser without gradients at 1..64 rows
* ``forward_backward`` / ``forward_backward_checkpointed``: forward with gradients, loss = mean square of
  the output, backward, zero_grad, with gradient checkpointing off / on, at 1..16 rows (only the
  parameters the run would train carry gradients: LoRA or full fine-tuning as configured);
  ``--backward-rows 1,2,4,8,16,32,64`` extends the table where memory allows (the CPU profile does, as
  the shapes runs train 64-row micro-batches)
* ``vae_decode`` (latent models), ``text_encode`` (prompts), ``reward:<name>`` for the training and
  held-out rewards (images), ``optimizer_step`` (AdamW over the trainable parameters)
* ``vae_decode_backward`` (latent models) and ``reward_backward:<name>`` (rewards with a gradient path):
  forward with gradients to the input, loss = sum of the output, backward (what a direct-gradient update,
  ReFL / DRaFT-K, spends per image besides its denoiser passes)

The JSON it writes is a ``bench.engine.pricing`` profile. ``convert_measurements`` turns a bare measurement file
(``{"measurements": [{kind, rows, seconds_per_call, peak_mem_mb}]}``) into one.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from bench.engine.pricing import FORMAT

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
    # the median is the profile's value: one call slowed by another process must not move it
    return {"seconds": times[len(times) // 2], "mean_seconds": sum(times) / len(times), "min_seconds": times[0],
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


def _fixed(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """A call of ``fn`` with inputs prepared in advance (so only the call is timed)."""
    return lambda: fn(*args)


def _backward_of(fn: Callable[..., Any], x: torch.Tensor, kwargs: Mapping[str, Any]) -> None:
    """Forward ``fn(x, **kwargs)`` with gradients to ``x`` (a fresh leaf), then backward of its sum."""
    leaf = x.detach().requires_grad_(True)
    fn(leaf, **kwargs).float().sum().backward()


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
            backward_rows: Sequence[int] = BACKWARD_ROWS, image_rows: Sequence[int] = IMAGE_ROWS,
            resident: dict[str, float] | None = None) -> dict[str, Any]:
    """Measured points per kind for the model of ``cfg`` (a resolved config) on ``device``. On CUDA,
    ``resident`` (a dict) receives per denoiser kind the MiB allocated before its calls (everything built
    so far), plus the trainable gradients for the checkpointed backward, whose peak is reached while they
    are written: what the memory model subtracts from the peaks (docs/COST.md section 8)."""
    from bench.engine.prompts import load_prompt_set
    from bench.model.models import build_policy
    from bench.run.scoring import build_reward_checked
    from bench.spec import RunSpec

    spec = RunSpec.from_config(cfg, cost_profile=False)
    torch.manual_seed(0)
    policy = build_policy(spec.model, device)
    kinds: dict[str, list[dict[str, Any]]] = {}
    grads_mib = sum(p.numel() * p.element_size() for p in policy.trainable_parameters()) / 2**20

    def baseline(kind: str) -> None:
        if resident is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
            resident[kind] = torch.cuda.memory_allocated(device) / 2**20 + (
                grads_mib if kind == "forward_backward_checkpointed" else 0.0)

    baseline("forward")
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
        baseline(kind)
        kinds[kind] = _points(_denoiser_fns(policy, True), backward_rows, device, warmup, repeats, log, kind)
    if hasattr(den, "disable_gradient_checkpointing"):
        den.disable_gradient_checkpointing()
    policy.train(False)
    def lat(r: int) -> torch.Tensor:
        return torch.randn(r, *policy.latent_shape, device=device)

    if policy.vae is not None:
        kinds["vae_decode"] = _points(lambda r: _fixed(policy.decode, lat(r)), image_rows, device, warmup,
                                      repeats, log, "vae_decode")
    one = load_prompt_set(spec.train_prompts).head(1)  # a prompt every reward of the world can read
    prompt, meta = one.prompts[0], dict(one.metadata[0])
    kinds["text_encode"] = _points(lambda r: (lambda: policy.encode_prompts([prompt] * r)),
                                   image_rows, device, warmup, repeats, log, "text_encode")
    if policy.vae is not None:
        kinds["vae_decode_backward"] = _points(lambda r: _fixed(_backward_of, policy.decode, lat(r), {"grad": True}),
                                               image_rows, device, warmup, repeats, log, "vae_decode_backward")
    images = policy.decode(lat(1))
    r = spec.reward
    for name in dict.fromkeys([r.name, *spec.eval.rewards]):
        reward = build_reward_checked(name, device, r.options, r.normalize)
        kinds[f"reward:{name}"] = _points(
            lambda n, rw=reward: _fixed(rw, images.repeat(n, 1, 1, 1), [prompt] * n, [meta] * n),
            image_rows, device, warmup, repeats, log, f"reward:{name}")
        if getattr(reward, "differentiable", False):
            kinds[f"reward_backward:{name}"] = _points(
                lambda n, rw=reward: _fixed(_backward_of, lambda x: rw.score_grad(x, [prompt] * n, [meta] * n),
                                            images.repeat(n, 1, 1, 1), {}),
                image_rows, device, warmup, repeats, log, f"reward_backward:{name}")
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-12)
    for p in policy.trainable_parameters():
        p.grad = torch.zeros_like(p)
    kinds["optimizer_step"] = _points(lambda n: opt.step, (1,), device, warmup, repeats, log, "optimizer_step")
    return kinds


def profile_json(name: str, model: str, models: Sequence[str], device: str, conditions: str, software: str,
                 trainable: str, kinds: Mapping[str, Sequence[Mapping[str, Any]]], measured: str,
                 assumptions: Mapping[str, str] | None = None, source: str = "") -> dict[str, Any]:
    """A ``bench.engine.pricing`` profile object from measured points (kept: rows, seconds, peak_mem_mb, min/median)."""
    keep = ("rows", "seconds", "peak_mem_mb", "min_seconds", "mean_seconds")
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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_text() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unavailable"


def profile_main(a: Any) -> int:
    """``python -m bench.cost.perf profile``: measure the configured model and write the profile JSON."""
    import json

    from bench import config
    from bench.model.models import resolve_device
    from bench.rundir.runlog import device_info, now_iso

    if a.threads:
        torch.set_num_threads(a.threads)
    sets = config.parse_sets(a.sets)
    if a.model_path:
        sets["model.path"] = a.model_path
    cfg = config.resolve(sets, flags={"algo.name": "grpo", "model.name": a.model, "model.device": a.device})
    dev = resolve_device(a.device)
    before = load_text()
    back = tuple(int(x) for x in a.backward_rows.split(",")) if a.backward_rows else BACKWARD_ROWS
    resident: dict[str, float] = {}
    kinds = measure(cfg, dev, a.warmup, a.repeats, backward_rows=back, resident=resident)
    m = cfg["model"]
    rank = int(m["lora_rank"] or 0)
    info = device_info(dev)
    dev_name = info.get("name") or str(dev)
    if dev.type == "cpu":
        dev_name = f"{cpu_name()} ({os.cpu_count()} logical CPUs)"
    conditions = (f"{a.model} on {dev_name}, torch threads {torch.get_num_threads()}, mixed precision "
                  f"{m['mixed_precision']}, resolution {m['resolution'] or 'preset default'}, "
                  f"{'LoRA rank ' + str(rank) if rank else 'full fine-tuning'}; seconds = median of {a.repeats} calls "
                  f"after {a.warmup} warm-up calls (mean and min kept), device-synchronised; machine {before} at "
                  f"the start, {load_text()} at the end. {a.note}".strip())
    name = a.name or f"{a.model}-{dev.type}"
    prof = profile_json(name, a.model, [a.model], dev_name, conditions, software(),
                        f"LoRA rank {rank}" if rank else "full fine-tuning", kinds, now_iso()[:10],
                        {"unlisted kinds": "a kind missing from 'kinds' is unpriced (0 s) and counted as such"},
                        "python -m bench.cost.perf profile")
    if resident:
        prof["memory"] = {"resident_mb": resident, "note": "torch.cuda.memory_allocated before each denoiser kind's "
                          "calls (every component built by then), plus the trainable gradients for the "
                          "checkpointed backward (its peak is reached while they are written)"}
    with open(a.out, "w") as f:
        json.dump(prof, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out}")
    return 0


def add_profile_parser(sub: Any) -> None:
    p = sub.add_parser("profile", help="measure a cost profile (seconds per call vs rows, per call kind)")
    p.add_argument("--model", default="shapes", help="model preset (default shapes)")
    p.add_argument("--model-path", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--name", default=None, help="profile name (default MODEL-DEVICE)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--backward-rows", default=None, help="rows of the forward+backward tables (default 1,2,4,8,16)")
    p.add_argument("--note", default="", help="free text appended to the conditions (e.g. how busy the machine was)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.lora_rank=32 model.mixed_precision=bf16")
