"""Equal budgets: wall-clock training seconds, scored samples, denoiser forward passes, iterations.

``Budget.parse("2h,5000samples")``: comma-separated limits, the first one reached stops the run. The
runner checks at iteration boundaries, so a run may overshoot by at most one iteration; totals in
``final.json`` are exact.

``Cadence.parse`` reads ``eval.every`` with the same units: an integer (every N iterations) or one budget
amount (``2000nfe``, ``500samples``, ``30s``): an evaluation schedule laid out on the cost axis.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from bench.errors import UsageError

FORMS = ("24h", "90m", "45s", "1.5h", "5000samples", "2e6nfe", "300it", "2h,5000samples")
_UNIT = {
    "h": ("seconds", 3600.0), "hr": ("seconds", 3600.0), "hours": ("seconds", 3600.0),
    "m": ("seconds", 60.0), "min": ("seconds", 60.0), "minutes": ("seconds", 60.0),
    "s": ("seconds", 1.0), "sec": ("seconds", 1.0), "seconds": ("seconds", 1.0),
    "samples": ("samples", 1.0), "sample": ("samples", 1.0), "img": ("samples", 1.0), "images": ("samples", 1.0),
    "nfe": ("nfe", 1.0),
    "it": ("iterations", 1.0), "iter": ("iterations", 1.0), "iters": ("iterations", 1.0),
    "iterations": ("iterations", 1.0),
}
_TERM = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*$")

STOP_REASONS = {"seconds": "budget_seconds", "samples": "budget_samples", "nfe": "budget_nfe",
                "iterations": "budget_iterations"}
#: currencies that count whole things: their limits are integers
COUNTED = ("samples", "nfe", "iterations")
#: clocks a seconds budget can count: "wall" (measured training seconds) or "modeled" (the modeled
#: seconds of the run's cost profile, ``run.clock``; docs/COST.md)
CLOCKS = ("wall", "modeled")


@dataclass(frozen=True)
class Totals:
    """Cumulative consumption: training seconds (rollout+reward+advantage+update), images scored,
    denoiser forward passes (rollout + update), completed iterations."""

    seconds: float = 0.0
    samples: int = 0
    nfe: int = 0
    iterations: int = 0
    modeled_seconds: float = 0.0   # cumulative modeled training seconds (0 without a cost profile)
    flops: float = 0.0             # cumulative counted FLOPs of the training calls (bench.engine.flops)


@dataclass(frozen=True)
class Budget:
    spec: str
    seconds: float | None = None
    samples: int | None = None
    nfe: float | None = None
    iterations: int | None = None
    clock: str = "wall"

    @classmethod
    def parse(cls, spec: str, clock: str = "wall") -> "Budget":
        if not isinstance(spec, str) or not spec.strip():
            raise UsageError(f"empty budget. Valid forms: {', '.join(FORMS)}")
        limits: dict[str, float] = {}
        for term in spec.split(","):
            m = _TERM.match(term)
            unit = m and _UNIT.get(m.group(2).lower())
            if not m or not unit:
                raise UsageError(f"bad budget term {term.strip()!r} in {spec!r}. Valid forms: {', '.join(FORMS)} "
                                 f"(units: h, m, s, samples, nfe, it; combine with commas, first reached stops)")
            key, mult = unit
            value = float(m.group(1)) * mult
            if not math.isfinite(value):  # 1e309 parses as inf: an unlimited budget is written by leaving it out
                raise UsageError(f"budget term {term.strip()!r} is too large to be a limit (give a finite number, or "
                                 f"leave the currency out for no limit). Valid forms: {', '.join(FORMS)}")
            if value <= 0:
                raise UsageError(f"budget term {term.strip()!r} must be positive. Valid forms: {', '.join(FORMS)}")
            if key in COUNTED and value != int(value):  # 0.5it would run 0 iterations
                raise UsageError(f"budget term {term.strip()!r} must be a whole number of {key} (a count), got "
                                 f"{value:g}. Valid forms: {', '.join(FORMS)}")
            if key in limits:
                raise UsageError(f"budget {spec!r} limits {key} twice; give each currency once. "
                                 f"Valid forms: {', '.join(FORMS)}")
            limits[key] = value
        if clock not in CLOCKS:
            raise UsageError(f"unknown clock {clock!r}; valid: {', '.join(CLOCKS)}")
        return cls(spec=spec.strip(), seconds=limits.get("seconds"), clock=clock,
                   samples=int(limits["samples"]) if "samples" in limits else None,
                   nfe=limits.get("nfe"),
                   iterations=int(limits["iterations"]) if "iterations" in limits else None)

    def exhausted(self, t: Totals) -> str | None:
        """The stop reason if any limit is reached, else None."""
        for key in ("iterations", "samples", "nfe", "seconds"):
            lim = getattr(self, key)
            if lim is not None and self._used(t, key) >= lim:
                return "budget_modeled_seconds" if key == "seconds" and self.clock == "modeled" else STOP_REASONS[key]
        return None

    def _used(self, t: Totals, key: str) -> float:
        return used(t, key, self.clock)

    def fraction(self, t: Totals) -> float:
        """Largest consumed fraction over the limits (progress bars, ETA)."""
        fr = [self._used(t, k) / getattr(self, k) for k in ("iterations", "samples", "nfe", "seconds")
              if getattr(self, k)]
        return min(1.0, max(fr)) if fr else 0.0

    def to_dict(self) -> dict:
        return {"spec": self.spec, "seconds": self.seconds, "samples": self.samples, "nfe": self.nfe,
                "iterations": self.iterations, "clock": self.clock}


def used(t: Totals, currency: str, clock: str = "wall") -> float:
    """How much of ``currency`` (seconds | samples | nfe | iterations) totals ``t`` have consumed; seconds
    on ``clock`` (wall: measured training seconds, modeled: the cost profile's)."""
    if currency == "seconds" and clock == "modeled":
        return t.modeled_seconds
    return getattr(t, currency)


#: eval.every forms (docs/RUNDIR.md)
CADENCE_FORMS = ("10 (iterations)", "0 (start and end only)", "2000nfe", "500samples", "30s", "2m", "25it")


@dataclass(frozen=True)
class Cadence:
    """When a run evaluates (``eval.every``): at the first iteration boundary at or past each multiple of
    ``amount`` of ``currency`` consumed (cumulative training totals, so a resumed run continues the same
    schedule). ``amount`` 0: never on a schedule (only at the start and at the end). An integer
    ``eval.every`` is ``amount`` iterations; seconds count the run's clock (``run.clock``)."""

    currency: str = "iterations"
    amount: float = 0.0
    clock: str = "wall"

    @classmethod
    def parse(cls, value: object, clock: str = "wall") -> "Cadence":
        """An integer >= 0 (iterations) or one budget term (``2000nfe``, ``500samples``, ``30s``, ``25it``)."""
        forms = ", ".join(CADENCE_FORMS)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise UsageError(f"eval.every must be >= 0, got {value!r}. Valid forms: {forms}")
            return cls("iterations", float(value), clock)
        m = _TERM.match(value) if isinstance(value, str) else None
        unit = m and _UNIT.get(m.group(2).lower())
        if not m or not unit:
            raise UsageError(f"eval.every must be an integer number of iterations or one budget amount (units h, "
                             f"m, s, samples, nfe, it), got {value!r}. Valid forms: {forms}")
        currency, mult = unit
        amount = float(m.group(1)) * mult
        if amount <= 0 or (currency == "iterations" and amount != int(amount)):
            raise UsageError(f"eval.every {value!r} must be a positive amount (whole iterations; 0 alone means "
                             f"at the start and the end only). Valid forms: {forms}")
        return cls(currency, amount, clock)

    def used(self, t: Totals) -> float:
        return used(t, self.currency, self.clock)

    def due(self, before: Totals, after: Totals) -> bool:
        """An iteration that took the totals from ``before`` to ``after`` crossed (or reached) a multiple."""
        return self.amount > 0 and self._index(after) > self._index(before)

    def point(self, t: Totals) -> float:
        """The largest multiple of ``amount`` that totals ``t`` have reached (the schedule point an
        evaluation at ``t`` stands for), in the cadence's currency."""
        return self._index(t) * self.amount if self.amount > 0 else 0.0

    def _index(self, t: Totals) -> int:
        return math.floor(self.used(t) / self.amount)

    def describe(self) -> str:
        if self.amount == 0:
            return "at the start and the end only"
        unit = {"iterations": "iterations", "samples": "samples", "nfe": "NFE",
                "seconds": "modeled seconds" if self.clock == "modeled" else "training seconds"}[self.currency]
        return f"every {self.amount:g} {unit}"
