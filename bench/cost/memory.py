"""The memory model of ``bench plan``: peak device memory per phase of a configuration, per GPU.

peak(phase) = resident + rollout latents + the largest activation of a call of that phase

* **resident** (held for the whole run; ``resident_mib``): the weights of every component in the run's
  dtypes (denoiser: frozen base in the mixed-precision dtype plus LoRA in float32, or float32 under full
  fine-tuning; text encoders and VAE in the mixed-precision dtype; the training reward in its own), counted
  from the module definitions on the meta device (``bench.engine.flops``); the trainable parameters'
  gradients and AdamW moments (float32: 12 bytes each), kept from the first backward of an iteration to its
  last step, so counted throughout; under full fine-tuning with mixed precision autocast's cached
  low-precision copy of the weights (2 bytes each); with several GPUs DDP's gradient buckets (4 bytes each).
* **rollout latents**: every node of the iteration's trees stays on the device until the update (float32
  latents, ``latent_shape``), counted at the iteration's node count.
* **activations of a call** (``ActivationFit``): for the denoiser kinds the profile measured
  (``peak_mem_mb``), a line fitted to peak - resident at the measured rows, where resident is what the
  profile says was on the device during the measurement (its ``memory.resident_mb``): least squares,
  then the intercept raised until no measured point lies above the line (an upper envelope). For kinds
  the profile did not measure (VAE decode, text encoders, rewards; and the forward and forward+backward of
  a profile without memory), the meta device's live-tensor tracker (``bench.engine.flops.LiveBytes``) at a
  few row counts. The tracker does not reproduce gradient checkpointing's saving, so a checkpointed
  backward is modeled only from measured peaks (without them the fit does not consider checkpointing).

What it leaves out: the CUDA context and allocator fragmentation (``bench plan --headroom`` keeps 1 GiB
free for them by default), evaluation rewards (loaded at the first evaluation), host memory. docs/COST.md
shows the fit against the measured rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.engine import pricing as cost_mod
from bench.engine.trace import DENOISER_KINDS, Call

#: bytes per trainable parameter beyond its weight: float32 gradient (4) + AdamW exp_avg, exp_avg_sq (8)
GRAD_AND_ADAM_BYTES = 12
#: autocast's cached low-precision copy of float32 weights during a forward with gradients (full fine-tuning)
AUTOCAST_CACHE_BYTES = 2
#: DDP's gradient buckets (gradient_as_bucket_view off): one more float32 copy of the gradients
DDP_BUCKET_BYTES = 4
#: temporaries of a foreach AdamW step per trainable parameter (two float32 copies)
OPTIMIZER_TEMP_BYTES = 8
MIB = 2**20


@dataclass(frozen=True)
class ActivationFit:
    """Activation MiB of one call kind at ``rows``: ``max(0, intercept + slope * rows)``.

    source: "measured" (fitted to a profile's peak memory) or "estimated" (meta-device tracker);
    points: (rows, measured activation MiB, model MiB) of a measured fit, for its residuals."""

    kind: str
    slope: float
    intercept: float
    source: str
    points: tuple[tuple[int, float, float], ...] = ()

    def at(self, rows: int) -> float:
        return max(0.0, self.intercept + self.slope * rows)


def fit_measured(profile: cost_mod.CostProfile, kind: str) -> ActivationFit | None:
    """The upper-envelope line through a profile's measured peaks of ``kind`` minus what was resident (the
    profile's ``memory.resident_mb``); None when the profile lacks either."""
    t = profile.tables.get(kind)
    resident = (profile.memory.get("resident_mb") or {}).get(kind)
    if t is None or resident is None or any(m is None for m in t.peak_mem_mb):
        return None
    xs = [float(r) for r in t.rows]
    ys = [float(m) - float(resident) for m in t.peak_mem_mb]  # type: ignore[arg-type]
    if len(xs) == 1:
        slope, b = ys[0] / xs[0], 0.0
    else:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        b = my - slope * mx
    b = max(y - slope * x for x, y in zip(xs, ys))  # raise the line until it bounds every measured point
    return ActivationFit(kind, slope, b, "measured",
                         tuple((int(x), y, b + slope * x) for x, y in zip(xs, ys)))


def fit_tracked(counts: Any, kind: str) -> ActivationFit | None:
    """The meta tracker's activation MiB of ``kind`` as a line (``KindCount.act_at``, scaled to the run's
    activation dtype); None when it was not tracked."""
    k = counts.kinds.get(kind)
    if k is None or not k.act_rows:
        return None
    r1, r2 = k.act_rows[-2:] if len(k.act_rows) > 1 else (k.act_rows[0], 2 * k.act_rows[0])
    m1, m2 = counts.act_mib_at(kind, r1), counts.act_mib_at(kind, r2)
    slope = (m2 - m1) / (r2 - r1)
    return ActivationFit(kind, slope, m1 - slope * r1, "estimated")


@dataclass
class MemoryModel:
    """Resident MiB per component and an activation fit per call kind, for one configuration on one GPU."""

    resident: dict[str, float]
    fits: dict[str, ActivationFit]
    latent_mib: float                      # one rollout node's latent (float32)
    reward_batch: Mapping[str, int] = field(default_factory=dict)  # reward kind -> images per internal batch
    missing: dict[str, str] = field(default_factory=dict)          # kind -> why its memory is not modeled

    def call_rows(self, call: Call) -> int:
        """Rows one pass of the call holds at once (a reward scores its images in internal batches)."""
        if call.kind == "reward":
            return min(call.rows, self.reward_batch.get(cost_mod.kind_label(call), call.rows))
        return call.rows

    def call_mib(self, call: Call) -> float | None:
        f = self.fits.get(cost_mod.kind_label(call))
        return None if f is None else f.at(self.call_rows(call))

    def phase_peaks(self, traces: Sequence[Sequence[Call]], nodes: int) -> dict[str, dict[str, Any]]:
        """{phase: {"peak_mib", "activation_mib", "call": "kind x rows", "unmodeled": [kinds]}} for the
        training phases, over all ``traces`` (one list of calls per simulated iteration; ``nodes``: the
        largest number of rollout nodes of an iteration)."""
        base = sum(self.resident.values()) + nodes * self.latent_mib
        out: dict[str, dict[str, Any]] = {}
        for phase in ("rollout", "reward", "update"):
            best, label, unmodeled = 0.0, "-", set()
            for calls in traces:
                for c in calls:
                    if c.phase != phase:
                        continue
                    m = self.call_mib(c)
                    if m is None:
                        unmodeled.add(cost_mod.kind_label(c))
                    elif m > best:
                        r = self.call_rows(c)
                        best, label = m, f"{cost_mod.kind_label(c)} x{r}" + (f" of {c.rows}" if r != c.rows else "")
            out[phase] = {"peak_mib": base + best, "activation_mib": best, "call": label,
                          "unmodeled": sorted(unmodeled)}
        return out


def resident_mib(counts: Any, lora: bool, mixed_precision: bool, gpus: int) -> dict[str, float]:
    """MiB held for the whole run, per component (see the module docstring)."""
    trainable = counts.parameters.get("trainable", 0)
    out = {"denoiser weights": counts.weight_mib.get("denoiser", 0.0),
           "gradients + AdamW state": trainable * GRAD_AND_ADAM_BYTES / MIB}
    if not lora and mixed_precision:
        out["autocast weight copies"] = trainable * AUTOCAST_CACHE_BYTES / MIB
    if gpus > 1:
        out["DDP gradient buckets"] = trainable * DDP_BUCKET_BYTES / MIB
    out["text encoders"] = counts.weight_mib.get("text_encoders", 0.0)
    if counts.weight_mib.get("vae"):
        out["VAE"] = counts.weight_mib["vae"]
    for k, v in counts.weight_mib.items():
        if k.startswith("reward:"):
            out[k] = v
    return out


def memory_model(profile: cost_mod.CostProfile, counts: Any, cfg: Mapping[str, Any], gpus: int = 1,
                 reward_batch: Mapping[str, int] | None = None) -> MemoryModel:
    """The memory model of configuration ``cfg`` with ``counts`` (``bench.engine.flops.ModelCounts``) and the
    profile's measured peaks."""
    m = cfg["model"]
    fits: dict[str, ActivationFit] = {}
    missing: dict[str, str] = {}
    kinds = [*DENOISER_KINDS, *(k for k in counts.kinds if k not in DENOISER_KINDS and k != "optimizer_step")]
    for kind in kinds:
        f = fit_measured(profile, kind) if kind in DENOISER_KINDS else None
        if f is None and kind == "forward_backward_checkpointed":
            # the meta tracker does not reproduce checkpointing's saving (docs/COST.md section 8): only a
            # measured profile models it
            missing[kind] = "the profile has no peak memory for it (the meta tracker cannot model checkpointing)"
            continue
        f = f or fit_tracked(counts, kind)
        if f is not None:
            fits[kind] = f
        elif kind in counts.kinds:
            missing[kind] = "the profile has no peak memory for it and the meta tracker did not measure it"
    # AdamW's foreach step allocates temporaries of the parameters' size (about two float32 copies)
    fits["optimizer_step"] = ActivationFit("optimizer_step", 0.0,
                                           OPTIMIZER_TEMP_BYTES * counts.parameters.get("trainable", 0) / MIB,
                                           "estimated")
    for kind, why in counts.uncounted.items():
        missing[kind] = why
    latent = 4.0
    for d in counts.latent_shape:
        latent *= d
    return MemoryModel(resident_mib(counts, int(m.get("lora_rank") or 0) > 0, m.get("mixed_precision") == "bf16",
                                    gpus),
                       fits, latent / MIB, dict(reward_batch or {}), missing)


def needs_tracked_denoiser(profile: cost_mod.CostProfile) -> bool:
    """True when the profile lacks measured memory for a denoiser kind (the meta tracker must measure it)."""
    return any(fit_measured(profile, k) is None for k in DENOISER_KINDS if k in profile.tables) or \
        any(k not in profile.tables for k in DENOISER_KINDS)
