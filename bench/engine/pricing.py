"""Cost profiles and the modeled clock: a call trace (``bench.engine.trace``) priced in measured seconds.

A cost profile (JSON, format ``treebench-cost-profile/1``; shipped ones in ``bench/profiles/``) holds,
for one model on one device, a table per call kind of rows -> seconds per call (and peak device memory)
measured by ``python -m bench.cost.perf profile``, with the measurement conditions and, for every kind it
lacks, what the model assumes. Modeled seconds of a call (:func:`interpolate`):

* between measured row counts: piecewise-linear in rows;
* beyond the last measured point: the last segment's per-row slope (one point: proportional to rows);
* below the first measured point: the first point's seconds. A smaller call is not assumed cheaper
  than the smallest one measured: at small row counts a device is latency-bound (on the H200,
  SD3.5-medium's 1-row forward costs more than its 2-row one), and extending the first segment
  downwards could give zero or negative seconds.

A kind the profile has no table for is *unpriced*: it costs 0 modeled seconds and every summary lists
it (``unpriced``) so the omission is never silent. :func:`reference_calls` re-expresses a trace the
way the released trainers run it (one image per call, CFG as 2 rows, one trained step per call).
Everything here is pure arithmetic on the trace: same config + seed gives the same modeled seconds on
any machine. docs/COST.md explains the model, its assumptions and its measured error.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from bench.engine.trace import KINDS, TRAIN_PHASES, Call
from bench.errors import UsageError
from bench.registry import did_you_mean

FORMAT = "treebench-cost-profile/1"
PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles"
#: phases priced per iteration ("advantage" has no expensive calls: modeled as 0)
PHASES = ("rollout", "reward", "advantage", "update")


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) through the points (xs ascending, distinct); beyond the last point the last
    segment's slope, below the first point the first y (see the module docstring for why)."""
    if not xs or len(xs) != len(ys):
        raise ValueError("interpolate needs one y per x and at least one point")
    if x <= xs[0]:
        return float(ys[0])
    if len(xs) == 1:
        return float(ys[0]) * x / xs[0]
    if x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + (x - xs[-1]) * slope)
    j = bisect_right(xs, x)
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class CostTable:
    """Measured seconds per call (and peak memory, MiB, None where not measured) at ascending rows."""

    kind: str
    rows: tuple[int, ...]
    seconds: tuple[float, ...]
    peak_mem_mb: tuple[float | None, ...]
    note: str = ""

    def seconds_at(self, rows: int) -> float:
        return max(0.0, interpolate(self.rows, self.seconds, rows))

    def peak_mem_at(self, rows: int) -> float | None:
        if any(m is None for m in self.peak_mem_mb):
            return None
        return interpolate(self.rows, [float(m) for m in self.peak_mem_mb], rows)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CostProfile:
    name: str
    model: str
    device: str
    conditions: str
    tables: Mapping[str, CostTable]
    models: tuple[str, ...] = ()
    measured: str = ""
    software: str = ""
    trainable: str = ""
    assumptions: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    path: str = ""

    def table_for(self, call: Call) -> CostTable | None:
        if call.kind in ("reward", "reward_backward"):
            return self.tables.get(f"{call.kind}:{call.component}") or self.tables.get(call.kind)
        return self.tables.get(call.kind)

    def call_seconds(self, call: Call) -> float | None:
        """Modeled seconds of one call; None when the profile has no table for its kind."""
        t = self.table_for(call)
        return None if t is None else t.seconds_at(call.rows)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "device": self.device, "measured": self.measured,
                "path": self.path, "trainable": self.trainable, "kinds": sorted(self.tables)}

    def to_json(self) -> dict[str, Any]:
        kinds = {k: {"note": t.note, "points": [{"rows": r, "seconds": s, "peak_mem_mb": m}
                                                for r, s, m in zip(t.rows, t.seconds, t.peak_mem_mb)]}
                 for k, t in self.tables.items()}
        return {"format": FORMAT, "name": self.name, "model": self.model, "models": list(self.models),
                "device": self.device, "measured": self.measured, "conditions": self.conditions,
                "software": self.software, "trainable": self.trainable, "source": self.source, "kinds": kinds,
                "assumptions": dict(self.assumptions)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], path: str = "") -> "CostProfile":
        where = path or "cost profile"
        if obj.get("format") != FORMAT:
            raise UsageError(f"{where}: not a treebench cost profile (format {obj.get('format')!r}, expected "
                             f"{FORMAT!r}); measure one with python -m bench.cost.perf profile")
        tables = {}
        for kind, spec in (obj.get("kinds") or {}).items():
            base = kind.split(":", 1)[0]
            if base not in KINDS:
                raise UsageError(did_you_mean(kind, list(KINDS), f"call kind in {where}:"))
            pts = sorted(spec.get("points") or [], key=lambda p: p["rows"])
            rows = [int(p["rows"]) for p in pts]
            secs = [float(p["seconds"]) for p in pts]
            if not pts or len(set(rows)) != len(rows) or min(rows) < 1 or min(secs) < 0:
                raise UsageError(f"{where}: kind {kind!r} needs points with distinct rows >= 1 and seconds >= 0")
            tables[kind] = CostTable(kind, tuple(rows), tuple(secs), tuple(p.get("peak_mem_mb") for p in pts),
                                     str(spec.get("note", "")))
        return cls(name=str(obj.get("name") or Path(path).stem), model=str(obj.get("model", "")),
                   device=str(obj.get("device", "")), conditions=str(obj.get("conditions", "")), tables=tables,
                   models=tuple(obj.get("models") or ()), measured=str(obj.get("measured", "")),
                   software=str(obj.get("software", "")), trainable=str(obj.get("trainable", "")),
                   assumptions=dict(obj.get("assumptions") or {}), source=str(obj.get("source", "")), path=path)


def shipped_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.json"))}


def load_profile(spec: str | Path) -> CostProfile:
    """A shipped profile by name (``bench/profiles/<name>.json``) or a profile JSON file."""
    shipped = shipped_profiles()
    p = shipped.get(str(spec)) or Path(spec).expanduser()
    if not p.is_file():
        raise UsageError(did_you_mean(str(spec), list(shipped), "cost profile (a shipped name or a JSON file)"))
    try:
        obj = json.loads(p.read_text())
    except ValueError as e:
        raise UsageError(f"cost profile {p} is not valid JSON: {e}") from None
    return CostProfile.from_json(obj, str(p) if p not in shipped.values() else f"shipped:{p.stem}")


# ---- pricing -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Priced:
    """Modeled seconds of a list of calls: per phase, total, the calls no table priced, peak memory."""

    phases: Mapping[str, float]
    total: float
    unpriced: Mapping[str, int]
    peak_mem_mb: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"phases": dict(self.phases), "total": self.total, "unpriced": dict(self.unpriced),
                "peak_mem_mb": self.peak_mem_mb}


def price(profile: CostProfile, calls: Iterable[Call]) -> Priced:
    phases: dict[str, float] = {p: 0.0 for p in (*PHASES, "eval")}
    unpriced: Counter = Counter()
    peak: float | None = None
    for c in calls:
        t = profile.table_for(c)
        if t is None:
            unpriced[f"{c.kind}:{c.component}" if c.kind in ("reward", "reward_backward") else c.kind] += 1
            continue
        phases[c.phase] = phases.get(c.phase, 0.0) + t.seconds_at(c.rows)
        m = t.peak_mem_at(c.rows)
        if m is not None:
            peak = m if peak is None else max(peak, m)
    total = sum(phases[p] for p in PHASES)
    return Priced(phases, total, dict(sorted(unpriced.items())), peak)


def reference_calls(calls: Iterable[Call]) -> list[Call]:
    """The same work as the released trainers call it: every call split into one call per evaluated
    item (one image / latent per denoiser call, CFG's cond + uncond as its 2 rows; one image per VAE
    decode and reward call; one prompt per text-encoder call; the update one trained step per call)."""
    out: list[Call] = []
    for c in calls:
        if c.kind == "optimizer_step":
            out.append(c)
            continue
        per = max(1, c.per_eval)
        n, rest = divmod(c.rows, per)
        if rest:
            raise ValueError(f"call of {c.rows} rows is not a whole number of {per}-row evaluations")
        out.extend([Call(c.kind, per, c.phase, c.component, c.grad, c.checkpointing, per, c.role)] * n)
    return out


def iteration_record(profile: CostProfile, calls: Sequence[Call], total_before: float) -> dict[str, Any]:
    """The modeled keys of one iteration's record (docs/COST.md, ``COST_KEYS``)."""
    ours = price(profile, [c for c in calls if c.phase in TRAIN_PHASES])
    ref = price(profile, reference_calls([c for c in calls if c.phase in TRAIN_PHASES]))
    rec: dict[str, Any] = {f"modeled_{p}_s": ours.phases[p] for p in PHASES}
    rec["modeled_iteration_s"] = ours.total
    rec["modeled_seconds_total"] = total_before + ours.total
    rec["modeled_reference_iteration_s"] = ref.total
    rec["modeled_speedup_vs_reference"] = ref.total / ours.total if ours.total > 0 else math.nan
    if ours.peak_mem_mb is not None:
        rec["modeled_peak_mem_mb"] = ours.peak_mem_mb
    if ours.unpriced:
        rec["modeled_unpriced_calls"] = int(sum(ours.unpriced.values()))
    return rec


#: Keys the call trace and the modeled clock add to iterations.jsonl / evals.jsonl (docs/COST.md).
COST_KEYS: dict[str, str] = {
    "trace/<kind>/calls": "calls of one expensive kind this iteration (forward, forward_backward[_checkpointed], "
                          "vae_decode, text_encode, reward, optimizer_step; reference_forward = the KL pass)",
    "trace/<kind>/rows": "input rows of those calls (a CFG-guided denoiser evaluation is 2 rows)",
    "modeled_rollout_s": "modeled seconds of the rollout's calls under the run's cost profile (not wall-clock)",
    "modeled_reward_s": "modeled seconds of the reward calls",
    "modeled_advantage_s": "modeled seconds of the advantage phase (no expensive calls: 0)",
    "modeled_update_s": "modeled seconds of the update's calls (forward+backward, KL reference, optimizer steps)",
    "modeled_iteration_s": "modeled seconds of this iteration (sum of the modeled phases)",
    "modeled_seconds_total": "cumulative modeled training seconds (the budget's clock with run.clock=PROFILE)",
    "modeled_reference_iteration_s": "modeled seconds of the same calls made the released trainers' way "
                                     "(one image per call, CFG as 2 rows, one trained step per call)",
    "modeled_speedup_vs_reference": "modeled_reference_iteration_s / modeled_iteration_s",
    "modeled_peak_mem_mb": "largest modeled peak device memory of a call (profiles that measured memory)",
    "modeled_unpriced_calls": "calls of kinds the profile has no table for (priced at 0 s; see docs/COST.md)",
    "modeled_eval_s": "modeled seconds of this evaluation's calls (outside the training budget)",
}


# ---- configuration: run.cost_profile and run.clock -------------------------------------------------
def profile_spec(cfg: Mapping[str, Any]) -> str | None:
    """The profile a run prices its calls with: ``run.cost_profile``, or the profile named by
    ``run.clock`` (a clock other than "wall" counts a seconds budget in that profile's modeled seconds)."""
    r = cfg.get("run", {})
    prof, clock = r.get("cost_profile"), r.get("clock", "wall")
    if clock in (None, "", "wall"):
        return prof
    if prof and str(prof) != str(clock):
        raise UsageError(f"run.clock={clock!r} and run.cost_profile={prof!r} name different profiles; the "
                         f"modeled clock prices with run.clock's profile (set one of them)")
    return str(clock)


def budget_clock(cfg: Mapping[str, Any]) -> str:
    """"wall" or "modeled": which seconds a seconds budget counts."""
    return "wall" if cfg.get("run", {}).get("clock", "wall") in (None, "", "wall") else "modeled"


def run_profile(cfg: Mapping[str, Any]) -> CostProfile | None:
    """The run's cost profile (None when none is set); a profile for another model is allowed (it
    prices this run's calls as if that model made them) but said so on stderr."""
    spec = profile_spec(cfg)
    if not spec:
        return None
    prof = load_profile(spec)
    name = cfg.get("model", {}).get("name")
    if prof.models and name not in prof.models:
        import sys

        print(f"note: cost profile {prof.name!r} was measured for {', '.join(prof.models)}, not {name!r}: "
              f"modeled seconds price this run's calls as if that model made them", file=sys.stderr)
    return prof
