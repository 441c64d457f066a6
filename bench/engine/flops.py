"""FLOPs and activation memory of every call kind, counted on the meta device (no weights), and the peak
FLOP/s of known devices (MFU).

What is counted, and how:

* **FLOPs per row** of each call kind (``bench.engine.trace.KINDS``): the real modules (the run's own
  policy, or the random-weight twin of a preset for ``bench plan``) are copied to the meta device, where
  tensors have shapes but no data, and one call of one row runs under PyTorch's ``FlopCounterMode``:
  denoiser forward, forward+backward with gradient checkpointing off and on (only the parameters the run
  trains require gradients, so a LoRA backward skips the frozen weights' gradients, as it does on the
  device), VAE decode of one latent, text encoding of one prompt, and a reward model on one image (a
  reward plug-in's optional ``meta_model()``, docs/PLUGINS.md). Calls are linear in rows (every row is
  an independent sample; a test checks it), so a call of R rows costs R times the one-row count.
  ``FlopCounterMode`` counts matrix products, convolutions and attention (2 FLOPs per multiply-add);
  elementwise work (norms, activations) is not counted.
* Attention on the meta device runs as the memory-efficient SDPA kernel (``_scaled_dot_product_efficient_
  attention``), as on a GPU: its FLOPs (the backward recomputes the attention matrix: 2.5x the forward)
  and its memory (no L x L matrix is kept) are those of the GPU kernel, not of the math fallback.
* **optimizer_step**: counted by hand, not by the FLOP counter (which counts matrix products only):
  ``OPTIMIZER_FLOPS_PER_PARAMETER`` per trainable parameter.
* **Activation memory** of a call (``LiveBytes``): the bytes of every tensor the call creates, live at
  the same time, at its peak (a tensor is freed when its last reference goes; tensors saved for the
  backward are held by the graph until it is freed). It leaves out allocator rounding, workspaces and
  CUDA context. Measured at a few row counts and fitted as ``max(first, intercept + slope * rows)``.

The counts of a model configuration are cached in ``$TREEBENCH_CACHE/flops/`` (default
``~/.cache/treebench``), keyed by the components' classes and configs and the training options, since
counting a 2 B-parameter model on the meta device takes tens of seconds of CPU.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.engine.trace import Call

#: bumps when what is counted changes (invalidates the cache)
COUNT_VERSION = 1
#: torch.optim.AdamW's single-tensor step per parameter element: decoupled weight decay (1), first moment
#: lerp (3), second moment mul + addcmul (4), bias-corrected denominator sqrt/div/add (3), addcdiv (3) = 14;
#: gradient-norm clipping: square-and-sum (2) and the rescale (1) = 3
OPTIMIZER_FLOPS_PER_PARAMETER = 17
#: bytes the optimizer step reads and writes per trainable fp32 parameter (weight, grad, exp_avg,
#: exp_avg_sq read; weight, exp_avg, exp_avg_sq written): the step is bound by memory bandwidth
OPTIMIZER_BYTES_PER_PARAMETER = 28

#: Dense (no sparsity) peak FLOP/s per GPU from the vendors' data sheets: bf16/fp16 tensor cores, fp32
#: without tensor cores (PyTorch's default for float32 matmuls), and memory bandwidth (bytes/s).
#: Matched against the device name, longest key first.
DEVICE_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4e12, "fp32": 66.9e12, "bandwidth": 4.8e12},
    "H100 NVL": {"bf16": 835.5e12, "fp32": 60.0e12, "bandwidth": 3.9e12},
    "H100 PCIe": {"bf16": 756.0e12, "fp32": 51.2e12, "bandwidth": 2.0e12},
    "H100": {"bf16": 989.4e12, "fp32": 66.9e12, "bandwidth": 3.35e12},
    "A100": {"bf16": 312.0e12, "fp32": 19.5e12, "bandwidth": 2.0e12},
    "L40S": {"bf16": 362.05e12, "fp32": 91.6e12, "bandwidth": 0.864e12},
    "A10G": {"bf16": 70.0e12, "fp32": 31.2e12, "bandwidth": 0.6e12},
}


def device_peak(name: str | None, precision: str = "bf16") -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) of the device called ``name`` for ``precision`` ("bf16" for
    mixed precision, else "fp32"); (None, reason) when the device is not in ``DEVICE_PEAKS``."""
    key = "bf16" if precision in ("bf16", "fp16") else "fp32"
    if name:
        for k in sorted(DEVICE_PEAKS, key=len, reverse=True):
            if k.lower() in name.lower():
                return DEVICE_PEAKS[k][key], f"device table: {k} {key} dense peak"
    return None, (f"no peak FLOP/s known for device {name!r} (known: {', '.join(DEVICE_PEAKS)}); set "
                  f"run.peak_flops")


def device_bandwidth(name: str | None) -> float | None:
    if name:
        for k in sorted(DEVICE_PEAKS, key=len, reverse=True):
            if k.lower() in name.lower():
                return DEVICE_PEAKS[k]["bandwidth"]
    return None


# ---- attention as on the GPU -----------------------------------------------------------------------
_SDPA = torch.nn.functional.scaled_dot_product_attention


def _efficient_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                    enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` on meta tensors as the memory-efficient kernel (its FLOPs and
    memory); anything it cannot take falls back to the original."""
    if query.device.type != "meta" or enable_gqa or query.dim() != 4:
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    try:
        grad = query.requires_grad or key.requires_grad or value.requires_grad
        bias = None if attn_mask is None else (attn_mask if attn_mask.dtype != torch.bool else
                                               torch.zeros(attn_mask.shape, dtype=query.dtype, device="meta"))
        if bias is not None:
            bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, grad, dropout_p, is_causal, scale=scale)[0]
    except (RuntimeError, NotImplementedError):
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)


@contextlib.contextmanager
def gpu_attention() -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` on meta tensors is the efficient kernel."""
    F = torch.nn.functional
    F.scaled_dot_product_attention = _efficient_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


# ---- live bytes --------------------------------------------------------------------------------------
class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensors created inside the block and alive at the same time (``peak``). Views
    share their storage's bytes; a storage counts until its last tensor is garbage. With ``hold_saved``
    the tensors autograd saves for the backward are held as Python objects, so they count until the graph
    releases them."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}

    def _drop(self, key: int) -> None:
        e = self._refs.get(key)
        if e is None:
            return
        e[1] -= 1
        if e[1] == 0:
            self.live -= e[0]
            del self._refs[key]

    def _track(self, t: Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = st._cdata
        if key in self._refs:
            self._refs[key][1] += 1
        else:
            n = int(st.nbytes())
            self._refs[key] = [n, 1]
            self.live += n
            self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._drop, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._track(t)
        return out


def measure(fn: Callable[[], Any], memory: bool = True) -> tuple[float, int]:
    """(FLOPs, peak live bytes) of ``fn()`` on meta tensors (attention as the GPU's efficient kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    lb = LiveBytes() if memory else contextlib.nullcontext()
    hold = (torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if memory
            else contextlib.nullcontext())
    with gpu_attention(), FlopCounterMode(display=False) as fc, lb, hold:
        fn()
    return float(fc.get_total_flops()), (lb.peak if memory else 0)  # type: ignore[union-attr]


# ---- the policy on the meta device -----------------------------------------------------------------
def _float_dtype(t: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if (dtype is not None and t.is_floating_point()) else t.dtype


def meta_policy(policy: Any) -> Any:
    """A copy of ``policy`` whose modules live on the meta device (no memory is copied): same classes,
    configs, LoRA adapters and trainable flags. Weights are in the dtype the run computes in (the autocast
    dtype for the denoiser under mixed precision), since autocast does not run on the meta device."""
    if all(p.device.type == "meta" for p in policy.denoiser.parameters()) and policy.autocast_dtype is None:
        return policy
    compute = policy.autocast_dtype
    memo: dict[int, Any] = {}
    for m, dtype in [(policy.denoiser, compute), *[(f, None) for f in policy.frozen_modules()]]:
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) in memo:
                continue
            mt = torch.empty_like(t, device="meta", dtype=_float_dtype(t, dtype))
            memo[id(t)] = nn.Parameter(mt, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else mt
    for name in ("train_module", "_pinned", "_empty"):
        v = getattr(policy, name, None)
        if v is not None:
            memo[id(v)] = None
    out = copy.deepcopy(policy, memo)
    out.device = torch.device("meta")
    out.autocast_dtype = None
    return out


def _to_meta_compute_dtype(policy: Any, dtype: torch.dtype | None) -> None:
    """A policy built on the meta device: the denoiser's weights in the run's compute dtype."""
    if dtype is None:
        return
    for p in policy.denoiser.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = torch.empty_like(p, device="meta", dtype=dtype)
    policy.autocast_dtype = None


# ---- counts ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KindCount:
    """One call kind: FLOPs per row, and activation MiB at ``rows`` (the meta tracker's measurements)."""

    flops_per_row: float
    act_rows: tuple[int, ...] = ()
    act_mib: tuple[float, ...] = ()

    def act_at(self, rows: int) -> float | None:
        """Activation MiB of a call of ``rows`` rows: max(the first measurement, the line through the last
        two) (one measurement: proportional)."""
        if not self.act_rows:
            return None
        if len(self.act_rows) == 1:
            return self.act_mib[0] * rows / self.act_rows[0]
        (r1, m1), (r2, m2) = list(zip(self.act_rows, self.act_mib))[-2:]
        slope = (m2 - m1) / (r2 - r1)
        return max(self.act_mib[0], m1 + slope * (rows - r1))


@dataclass(frozen=True)
class ModelCounts:
    """What the meta device says about a model configuration: FLOPs per row of each call kind, activation
    memory, and the parameters each component keeps resident (count and bytes in the run's dtypes).

    kinds:      kind ("forward", "forward_backward", "forward_backward_checkpointed", "vae_decode",
                "text_encode", "reward:<name>", "optimizer_step") -> KindCount (optimizer_step: per call)
    parameters: component -> parameter count ("denoiser", "trainable", "text_encoders", "vae", "reward:<name>")
    weight_mib: component -> MiB of its weights on the device in the run's dtypes
    uncounted:  kind -> why it has no count (a reward without ``meta_model()``, say)
    act_scale:  bytes of an activation element in the run / on the meta device, per kind (rewards are
                counted in float32 and run under fp16 autocast on CUDA: 0.5)
    """

    kinds: Mapping[str, KindCount]
    parameters: Mapping[str, int]
    weight_mib: Mapping[str, float]
    latent_shape: tuple[int, ...]
    uncounted: Mapping[str, str] = field(default_factory=dict)
    act_scale: Mapping[str, float] = field(default_factory=dict)
    key: str = ""
    describes: str = ""

    def kind_of(self, call: Call) -> str:
        return f"reward:{call.component}" if call.kind == "reward" else call.kind

    def call_flops(self, call: Call) -> float | None:
        """FLOPs of one call; None when its kind has no count."""
        k = self.kinds.get(self.kind_of(call))
        if k is None:
            return None
        return k.flops_per_row * (1 if call.kind == "optimizer_step" else call.rows)

    def act_mib_at(self, kind: str, rows: int) -> float | None:
        k = self.kinds.get(kind)
        a = None if k is None else k.act_at(rows)
        return None if a is None else a * self.act_scale.get(kind.split(":")[0], 1.0)

    def to_json(self) -> dict[str, Any]:
        return {"version": COUNT_VERSION, "key": self.key, "describes": self.describes,
                "latent_shape": list(self.latent_shape),
                "kinds": {k: asdict(v) for k, v in self.kinds.items()}, "parameters": dict(self.parameters),
                "weight_mib": dict(self.weight_mib), "uncounted": dict(self.uncounted),
                "act_scale": dict(self.act_scale)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ModelCounts:
        kinds = {k: KindCount(float(v["flops_per_row"]), tuple(v.get("act_rows", ())), tuple(v.get("act_mib", ())))
                 for k, v in obj["kinds"].items()}
        return cls(kinds, dict(obj["parameters"]), dict(obj["weight_mib"]), tuple(obj["latent_shape"]),
                   dict(obj.get("uncounted", {})), dict(obj.get("act_scale", {})), str(obj.get("key", "")),
                   str(obj.get("describes", "")))


def _mib(n: float) -> float:
    return n / 2**20


def _module_mib(m: nn.Module | None) -> float:
    if m is None:
        return 0.0
    return _mib(sum(p.numel() * p.element_size() for p in m.parameters()))


def resident_parameters(policy: Any) -> tuple[dict[str, int], dict[str, float]]:
    """Parameter counts and weight MiB per component of ``policy`` in its own dtypes (call it on the real
    policy, or on a planner's meta policy built with the run's dtypes)."""
    den = policy.denoiser
    trainable = [p for p in den.parameters() if p.requires_grad]
    frozen = [p for p in den.parameters() if not p.requires_grad]
    texts = [m for m in policy.frozen_modules() if m is not policy.vae]
    params = {"denoiser": sum(p.numel() for p in den.parameters()), "trainable": sum(p.numel() for p in trainable),
              "text_encoders": sum(p.numel() for m in texts for p in m.parameters()),
              "vae": sum(p.numel() for p in policy.vae.parameters()) if policy.vae is not None else 0}
    mib = {"denoiser": _mib(sum(p.numel() * p.element_size() for p in frozen + trainable)),
           "text_encoders": sum(_module_mib(m) for m in texts), "vae": _module_mib(policy.vae)}
    return params, mib


def _one_prompt_cond(policy: Any, rows: int) -> Any:
    cond = policy.encode_prompts(["a photo"])
    return cond.take(torch.zeros(rows, dtype=torch.long))


def _denoiser_call(policy: Any, rows: int, grad: bool) -> Callable[[], None]:
    x = torch.zeros(rows, *policy.latent_shape, device="meta")
    t = policy.timestep_values(torch.full((rows,), 0.5, device="meta"))
    cond = _one_prompt_cond(policy, rows)

    def go() -> None:
        if grad:
            out = policy.predict(x, t, cond)
            out.square().mean().backward()
            for p in policy.denoiser.parameters():
                p.grad = None
        else:
            with torch.no_grad():
                policy.predict(x, t, cond)

    return go


def _set_checkpointing(den: nn.Module, on: bool) -> bool:
    if not hasattr(den, "enable_gradient_checkpointing"):
        return False
    den.enable_gradient_checkpointing() if on else den.disable_gradient_checkpointing()
    return True


def count_kind(policy: Any, kind: str, rows: Sequence[int] = (1,), memory: bool = False) -> KindCount | None:
    """Count one denoiser/VAE/text kind of a meta policy at each of ``rows`` (FLOPs per row from the first)."""
    flops: list[float] = []
    mib: list[float] = []
    den = policy.denoiser
    was = bool(getattr(den, "gradient_checkpointing", False) or getattr(den, "is_gradient_checkpointing", False))
    try:
        for r in rows:
            if kind == "forward":
                fn = _denoiser_call(policy, r, grad=False)
            elif kind in ("forward_backward", "forward_backward_checkpointed"):
                if not _set_checkpointing(den, kind.endswith("checkpointed")) and kind.endswith("checkpointed"):
                    return None
                policy.train(True)
                fn = _denoiser_call(policy, r, grad=True)
            elif kind == "vae_decode":
                if policy.vae is None:
                    return None
                lat = torch.zeros(r, *policy.latent_shape, device="meta")
                fn = lambda lat=lat: policy.decode(lat)
            elif kind == "text_encode":
                fn = lambda r=r: policy.encode_prompts(["a photo"] * r)
            else:
                raise ValueError(f"unknown kind {kind!r}")
            f, b = measure(fn, memory)
            flops.append(f / r)
            mib.append(_mib(b))
    finally:
        policy.train(False)
        _set_checkpointing(den, was)
    return KindCount(flops[0], tuple(rows) if memory else (), tuple(mib) if memory else ())


def _no_grad(fn: Callable[..., Any], *args: Any) -> Any:
    with torch.no_grad():
        return fn(*args)


def count_reward(reward: Any, resolution: int, rows: Sequence[int] = (1, 2), memory: bool = True
                 ) -> tuple[KindCount, int, float]:
    """(count per image, parameters, weight MiB) of a reward with ``meta_model()`` (docs/PLUGINS.md);
    a weighted sum counts its parts. Raises NotImplementedError when a reward has no meta model."""
    parts = getattr(reward, "parts", None)
    if parts:
        counts = [count_reward(p, resolution, rows, memory) for _, _, p in parts]
        acts = tuple(max(c.act_mib[i] for c, _, _ in counts) for i in range(len(rows))) if memory else ()
        return (KindCount(sum(c.flops_per_row for c, _, _ in counts), tuple(rows) if memory else (), acts),
                sum(n for _, n, _ in counts), sum(m for _, _, m in counts))
    make = getattr(reward, "meta_model", None)
    if make is None:
        raise NotImplementedError(f"reward {getattr(reward, 'name', reward)!r} has no meta_model() to count "
                                  f"its FLOPs on the meta device")
    module, score = make()
    n = sum(p.numel() for p in module.parameters()) if module is not None else 0
    w = _module_mib(module)
    flops, mib = [], []
    for r in rows:
        images = torch.zeros(r, 3, resolution, resolution, device="meta")
        f, b = measure(lambda images=images, r=r: _no_grad(score, images, ["a photo"] * r), memory)
        flops.append(f / r)
        mib.append(_mib(b + images.numel() * 4))  # the images the reward receives are on its device too
    return KindCount(flops[0], tuple(rows) if memory else (), tuple(mib) if memory else ()), n, w


def _cache_dir() -> Path:
    return Path(os.environ.get("TREEBENCH_CACHE", Path.home() / ".cache" / "treebench")) / "flops"


#: counts shipped with treebench for the paper presets (the same cache format; ``python -m bench.cost.perf
#: count-flops`` regenerates them, a slow test checks them against a fresh count)
SHIPPED_COUNTS = Path(__file__).resolve().parents[1] / "profiles" / "counts"


def reward_signature(rewards: Mapping[str, Any]) -> list[Any]:
    """Names and architecture versions of rewards (part of a cache key; no weight file is looked up)."""
    def one(reward: Any) -> Any:
        parts = getattr(reward, "parts", None)
        if parts:
            return [one(p) for _, _, p in parts]
        return getattr(reward, "_base_version", None) or str(getattr(type(reward), "version", ""))

    return sorted([n, one(r)] for n, r in rewards.items())


def cache_key(parts: Any) -> str:
    return hashlib.sha256(json.dumps([COUNT_VERSION, parts], sort_keys=True, default=str).encode()).hexdigest()[:24]


def module_signature(policy: Any) -> list[Any]:
    """Classes and configs of a policy's modules, and what is trainable (the cache key of its counts)."""
    sig: list[Any] = []
    for m in [policy.denoiser, *policy.frozen_modules()]:
        cfg = getattr(m, "config", None)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg) if cfg is not None else None
        sig.append([type(m).__name__, cfg, sum(p.numel() for p in m.parameters() if p.requires_grad),
                    str(next(m.parameters()).dtype)])
    sig.append([tuple(policy.latent_shape), policy.max_length, str(policy.autocast_dtype), policy.family])
    return sig


def load_cached(key: str) -> ModelCounts | None:
    for d in (_cache_dir(), SHIPPED_COUNTS):
        try:
            obj = json.loads((d / f"{key}.json").read_text())
        except (OSError, ValueError):
            continue
        if obj.get("version") == COUNT_VERSION:
            return ModelCounts.from_json(obj)
    return None


def save_cached(counts: ModelCounts, d: Path | None = None) -> None:
    d = d or _cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{counts.key}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(counts.to_json(), indent=1))
        os.replace(tmp, d / f"{counts.key}.json")
    except OSError:
        pass  # a read-only home: count again next time


#: rows at which activation memory is tracked: denoiser kinds at 1, 32 and 64 rows (a transient of a
#: row-independent size, e.g. a cast of SD3's positional-embedding table, dominates the first 16 or so
#: rows; the meta device's time does not depend on rows), the others at 1 and 2
DENOISER_ACT_ROWS = (1, 32, 64)
OTHER_ACT_ROWS = (1, 2)


def count_model(policy: Any, rewards: Mapping[str, Any], *, key: str | None = None, denoiser_memory: bool = False,
                reward_scale: float = 1.0, use_cache: bool = True) -> ModelCounts:
    """Count every call kind of ``policy`` (real or already on the meta device) and ``rewards``
    ({name: reward object}); cached under ``key`` (default: the modules' signature). The parameters and
    weight MiB come from ``policy`` as given (its dtypes). ``denoiser_memory`` also tracks the denoiser
    kinds' activations (slow on large models; a cost profile that measured peak memory replaces it)."""
    key = key or cache_key([module_signature(policy), reward_signature(rewards),
                            denoiser_memory and list(DENOISER_ACT_ROWS), reward_scale])
    if use_cache:
        hit = load_cached(key)
        if hit is not None:
            return hit
    params, mib = resident_parameters(policy)
    meta = meta_policy(policy)
    kinds: dict[str, KindCount] = {}
    uncounted: dict[str, str] = {}
    for kind in ("forward", "forward_backward", "forward_backward_checkpointed"):
        c = count_kind(meta, kind, DENOISER_ACT_ROWS if denoiser_memory else (1,), memory=denoiser_memory)
        if c is not None:
            kinds[kind] = c
    for kind in ("vae_decode", "text_encode"):
        c = count_kind(meta, kind, OTHER_ACT_ROWS, memory=True)
        if c is not None:
            kinds[kind] = c
    res = int(getattr(policy, "resolution", 0) or policy.latent_shape[-1])
    for name, reward in rewards.items():
        try:
            c, n, w = count_reward(reward, res)
        except NotImplementedError as e:
            uncounted[f"reward:{name}"] = str(e)
            continue
        kinds[f"reward:{name}"] = c
        params[f"reward:{name}"] = n
        mib[f"reward:{name}"] = w
    kinds["optimizer_step"] = KindCount(float(OPTIMIZER_FLOPS_PER_PARAMETER * params["trainable"]))
    out = ModelCounts(kinds, params, mib, tuple(policy.latent_shape), uncounted,
                      {"reward": reward_scale}, key)
    if use_cache:
        save_cached(out)
    return out


def planner_counts(cfg: Mapping[str, Any], twin: str, rewards: Mapping[str, Any], *, denoiser_memory: bool = False,
                   use_cache: bool = True, spec: Mapping[str, Any] | None = None) -> ModelCounts:
    """The counts of the model a config names, from its random-weight twin ``twin`` (or the architecture
    ``spec`` given) built directly on the meta device with the config's LoRA, resolution and precision
    options (nothing is read but the architecture spec). Cached under the spec, the options and the
    reward names."""
    import dataclasses

    from bench.model.families import REAL_PIPELINES
    from bench.model.models import PRESET_DIR, model_options, policy_from_pipeline
    from bench.model.random_models import build_random_pipeline, quiet_libraries, random_preset_spec

    m = cfg["model"]
    opts = model_options(m)
    mp = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[m.get("mixed_precision", "no")]
    spec = dict(spec) if spec is not None else random_preset_spec(twin)
    if opts.resolution is None and spec.get("resolution"):
        opts = dataclasses.replace(opts, resolution=int(spec["resolution"]))
    reward_scale = 0.5  # rewards run under fp16 autocast on CUDA (counted in float32 here)
    # checkpointing and compilation change no count (both backward kinds are counted): not in the key
    key_opts = asdict(opts) | {"frozen_dtype": str(opts.frozen_dtype), "gradient_checkpointing": None, "compile": None}
    key = cache_key(["twin", twin, spec, key_opts, str(mp), reward_signature(rewards),
                     denoiser_memory and list(DENOISER_ACT_ROWS),
                     reward_scale])
    if use_cache:
        hit = load_cached(key)
        if hit is not None:
            return hit
    quiet_libraries()
    pipe = build_random_pipeline(dict(spec), "meta")
    policy = policy_from_pipeline(pipe, REAL_PIPELINES[spec["pipeline"]], PRESET_DIR / f"{twin}.json",
                                  torch.device("meta"), mp, opts)
    params, mib = resident_parameters(policy)  # the run's dtypes: LoRA fp32, base in the frozen dtype
    _to_meta_compute_dtype(policy, mp)
    counts = count_model(policy, rewards, key=key, denoiser_memory=denoiser_memory, reward_scale=reward_scale,
                         use_cache=False)
    comps = ", ".join(f"{k} {c['class']}" for k, c in spec["components"].items() if "config" in c
                      and c["class"] != "word_tokenizer" and "Scheduler" not in c["class"])
    what = (f"{twin} architecture ({comps}); LoRA rank {opts.lora_rank} alpha {opts.lora_alpha}; "
            f"{opts.resolution} px; mixed precision {mp}; rewards {', '.join(rewards)}")
    out = ModelCounts(counts.kinds, {**counts.parameters, **{k: v for k, v in params.items()}},
                      {**counts.weight_mib, **mib}, counts.latent_shape, counts.uncounted, counts.act_scale, key, what)
    if use_cache:
        save_cached(out)
    return out


def meta_rewards(spec: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """{name: reward object} for a reward spec, constructed for the meta device without looking for weight
    files (only ``meta_model()`` is used); a weighted spec is one entry holding its parts."""
    from bench.registry import WEIGHTED_REWARD, is_spec, load_object, reward_class

    def one(name: str) -> Any:
        return reward_class(name)(device="meta", **dict(options.get(name, {})))

    if not is_spec(spec) and ("=" in spec or "," in spec):
        parts = load_object("rewards.combine:parse_reward_spec")(spec)
        return {spec: load_object(WEIGHTED_REWARD)([(n, w, one(n)) for n, w in parts])}
    return {spec: one(spec)}


def trace_flops(counts: ModelCounts, calls: Sequence[Call]) -> tuple[float, int]:
    """(FLOPs of the calls whose kind is counted, number of calls of uncounted kinds)."""
    total, uncounted = 0.0, 0
    for c in calls:
        f = counts.call_flops(c)
        if f is None:
            uncounted += 1
        else:
            total += f
    return total, uncounted


def run_peak(given: float | None, mixed_precision: str, device_name: str | None) -> tuple[float | None, str]:
    """Peak FLOP/s per device for MFU: ``given`` (``run.peak_flops``), else the device table for the run's
    precision ``mixed_precision`` (``model.mixed_precision``)."""
    if given:
        return float(given), "run.peak_flops"
    if device_name is None or device_name.lower().startswith("cpu"):
        return None, ("no default peak FLOP/s for a CPU (it depends on the cores, their vector units and the "
                      "threads); set run.peak_flops to get MFU")
    return device_peak(device_name, mixed_precision)
