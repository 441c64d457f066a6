"""Search spaces: which settings a sweep varies and over which ranges.

A space is an ordered list of ``Param`` (one Optuna parameter each, mapped to one config key). Each
algorithm declares its own built-in space on its class (``search_space``, in the YAML format below, and
``search_default``); ``builtin_space(algo, names)`` reads it through the registry and adds ``lr`` and
``noise_level``; ``builtin_space(...)(trial)`` returns the overrides. ``load_space_file`` reads YAML:

    params:
      k: {type: int, low: 2, high: 4}
      d: [1, 2, 3]                                   # a list = categorical choices
      window: {type: int, low: d, high: sampler.steps}  # bounds may name earlier params / config keys
      lr: {type: float, low: 1.0e-6, high: 1.0e-3, log: true}   # lr / noise_level are built-in aliases
      train.optimizer_steps: {type: int, low: 1, high: 2}      # a dotted name is the config key itself
    constraints: ["d <= window"]                     # violated -> the trial is pruned with the reason
    fixed: {sampler.steps: 10}                       # extra overrides for every trial

A bound or constraint side is a number, a NAME, or a sum/difference of them (``sampler.steps - 2``,
``window - d``) where NAME is a parameter sampled earlier in the list or a resolved config key. Invalid
combinations raise ``InvalidCombination``; the objective prunes such trials with the message as reason.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import algorithm_fields, parse_value
from bench.config import parse_ranges as parse_range_items
from bench.errors import UsageError
from bench.registry import algorithm_class, did_you_mean

KINDS = ("int", "float", "categorical")


class InvalidCombination(Exception):
    """The sampled values cannot be run together (e.g. d > window); the trial is pruned with this reason."""


@dataclass(frozen=True)
class Param:
    """One searched setting.

    name:    Optuna parameter name (``params_<name>`` in trials.csv)
    key:     the dotted config key it sets (``algo.k``, ``train.lr``)
    kind:    "int", "float" or "categorical"
    low/high: bounds (int/float): a number or an expression such as "d" or "sampler.steps - 2"
    log:     sample on a log scale (int/float)
    step:    grid step (int/float), None = continuous / 1 for ints
    choices: the values (categorical)
    """

    name: str
    key: str
    kind: str
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()
    help: str = ""

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} ({self.key}) in {list(self.choices)}"
        scale = ", log" if self.log else ""
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.name} ({self.key}) {self.kind} in [{self.low}, {self.high}{step}{scale}]"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key, "type": self.kind}
        if self.kind == "categorical":
            d["choices"] = list(self.choices)
        else:
            d.update(low=self.low, high=self.high, log=self.log, step=self.step)
        return d


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    constraints: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def to_dict(self) -> dict[str, Any]:
        return {"params": {p.name: p.to_dict() for p in self.params}, "constraints": list(self.constraints),
                "fixed": dict(self.fixed)}

    def __call__(self, trial: Any, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return sample(trial, self, base)


# ---- built-in spaces: each algorithm declares its own (``search_space`` / ``search_default`` on its class) --
COMMON: tuple[Param, ...] = (
    Param("lr", "train.lr", "float", 1e-6, 1e-3, log=True, help="AdamW learning rate"),
    Param("noise_level", "sampler.noise_level", "float", 0.3, 1.2, help="SDE noise level (a / eta)"),
)


def _own_params(algo: str) -> tuple[Param, ...]:
    """The algorithm's declared space, read through the registry (built-in, entry point or module:Class)."""
    cls = algorithm_class(algo)
    declared = getattr(cls, "search_space", {}) or {}
    return tuple(param_from_spec(name, {"key": f"algo.{name}", **(spec if isinstance(spec, Mapping) else
                                                                  {"choices": list(spec)})},
                                 algo, where=f"{getattr(cls, '__name__', algo)}.search_space")
                 for name, spec in declared.items())


def default_names(algo: str) -> tuple[str, ...]:
    """What ``--space`` defaults to: the algorithm's ``search_default``."""
    return tuple(getattr(algorithm_class(algo), "search_default", ()) or ())


def available(algo: str) -> dict[str, Param]:
    """Every built-in parameter for ``algo`` (its own, then lr and noise_level), by name."""
    return {p.name: p for p in (*_own_params(algo), *COMMON)}


def builtin_space(algo: str, names: Iterable[str] | None = None) -> Space:
    """The built-in space of ``algo`` restricted to ``names`` (default ``search_default``; "all" = every one).
    ``builtin_space(algo, names)(trial, base)`` samples it: ``{"algo.k": 3, ...}``."""
    table = available(algo)
    names = list(default_names(algo) if names is None else names)
    if names == ["all"]:
        names = list(table)
    if not names:
        raise UsageError(f"empty search space for {algo}: pass --space with some of {', '.join(table)}")
    for n in names:
        if n not in table:
            raise UsageError(did_you_mean(n, list(table), f"search-space parameter for {algo}:") +
                             " (or give a --space-file, or vary any config key with --grid KEY=V1,V2)")
    if len(set(names)) != len(names):
        raise UsageError(f"--space names a parameter twice: {','.join(names)}")
    # keep the table's order so that bounds may refer to parameters listed before them
    return Space(tuple(p for p in table.values() if p.name in names))


# ---- expressions: sums and differences of numbers, parameter names and config keys -------------------------
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)|([A-Za-z_][\w.]*)|([+-]))")
_CMP = re.compile(r"^(.+?)(<=|>=|==|!=|<|>)(.+)$")
_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt,
        ">": operator.gt}


def _lookup(name: str, values: Mapping[str, Any], base: Mapping[str, Any] | None) -> Any:
    if name in values:
        return values[name]
    node: Any = base or {}
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise UsageError(f"search space refers to {name!r}, which is neither a parameter listed before it "
                             f"nor a config key (e.g. sampler.steps)")
        node = node[part]
    return node


def evaluate(expr: Any, values: Mapping[str, Any], base: Mapping[str, Any] | None) -> Any:
    """A number, or terms joined by + and - (``d``, ``sampler.steps - 2``, ``window - d``); names are
    looked up among the values sampled so far, then in the resolved config."""
    if isinstance(expr, bool) or expr is None or isinstance(expr, (int, float)):
        return expr
    text = str(expr).strip()
    num = parse_value(text)
    if isinstance(num, (int, float)) and not isinstance(num, bool):
        return num
    total: Any = 0
    sign, pos, expect_term = 1, 0, True
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            break
        number, name, op = m.groups()
        if expect_term and (number or name):
            v = parse_value(number) if number else _lookup(name, values, base)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                if len(text.split()) == 1:  # a lone non-numeric name (e.g. a categorical value)
                    return v
                raise UsageError(f"{name!r} in {expr!r} is not a number ({v!r})")
            total, expect_term = total + sign * v, False
        elif not expect_term and op:
            sign, expect_term = (1 if op == "+" else -1), True
        else:
            break
        pos = m.end()
    if expect_term or text[pos:].strip():
        raise UsageError(f"cannot read {expr!r} in the search space: use a number, a parameter or config key, "
                         f"or a sum/difference of them (e.g. 'sampler.steps - 2', 'window - d')")
    return total


def check_constraint(text: str, values: Mapping[str, Any], base: Mapping[str, Any] | None) -> bool:
    m = _CMP.match(text)
    if not m:
        raise UsageError(f"constraint {text!r} must compare two terms, e.g. 'd <= window' or 'window - d <= 2'")
    return bool(_OPS[m.group(2)](evaluate(m.group(1), values, base), evaluate(m.group(3), values, base)))


# ---- sampling ---------------------------------------------------------------------------------------------
def sample(trial: Any, space: Space, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Ask ``trial`` for every parameter in order; return ``{config key: value}`` (plus ``space.fixed``)."""
    values: dict[str, Any] = {}
    overrides: dict[str, Any] = dict(space.fixed)
    known = dict(space.fixed)  # names in bounds: sampled parameters, then fixed keys, then the base config
    for p in space.params:
        if p.kind == "categorical":
            v = trial.suggest_categorical(p.name, list(p.choices))
        else:
            lo, hi = evaluate(p.low, known, base), evaluate(p.high, known, base)
            if lo > hi:
                raise InvalidCombination(f"{p.name} has an empty range [{p.low}={lo}, {p.high}={hi}] with "
                                         f"{_fmt(values)}")
            if p.kind == "int":
                v = trial.suggest_int(p.name, int(lo), int(hi), step=int(p.step or 1), log=p.log)
            else:
                v = trial.suggest_float(p.name, float(lo), float(hi), step=p.step, log=p.log)
        values[p.name] = v
        known[p.name] = v
        overrides[p.key] = v
    for c in space.constraints:
        if not check_constraint(c, known, base):
            raise InvalidCombination(f"constraint {c!r} violated by {_fmt(values)}")
    return overrides


def _fmt(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "no earlier parameters"


# ---- YAML space files -------------------------------------------------------------------------------------
def resolve_key(name: str, algo: str) -> str:
    """The config key for a parameter name: dotted names as given, built-in names (k -> algo.k,
    lr -> train.lr), else a field of the algorithm's Config (algo.<name>)."""
    if "." in name:
        return name
    table = available(algo)
    if name in table:
        return table[name].key
    fields = algorithm_fields(algo)
    if name in fields:
        return f"algo.{name}"
    raise UsageError(did_you_mean(name, sorted(set(table) | set(fields)), f"parameter for {algo}:") +
                     " A dotted config key (train.lr, sampler.steps) is also accepted.")


def _number(v: Any, where: str) -> Any:
    # YAML 1.1 reads 1e-6 (no dot) as a string: accept it as a number, keep NAME expressions as text
    if isinstance(v, str):
        parsed = parse_value(v)
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            return parsed
        return v
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UsageError(f"{where} must be a number or an expression like 'd' or 'sampler.steps - 2', got {v!r}")
    return v


def param_from_spec(name: str, spec: Any, algo: str, where: str = "space") -> Param:
    if isinstance(spec, (list, tuple)):
        spec = {"type": "categorical", "choices": list(spec)}
    if not isinstance(spec, Mapping):
        raise UsageError(f"{where}: parameter {name!r} must be a list of choices or a mapping like "
                         f"{{type: int, low: 2, high: 4}}, got {spec!r}")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "key", "help"}
    if unknown:
        raise UsageError(f"{where}: parameter {name!r} has unknown field(s) {sorted(unknown)}; valid: type, low, "
                         f"high, log, step, choices, key")
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in KINDS:
        raise UsageError(f"{where}: parameter {name!r} needs type: int, float or categorical (got {kind!r})")
    key = str(spec.get("key") or resolve_key(name, algo))
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise UsageError(f"{where}: categorical parameter {name!r} needs a non-empty list of choices")
        return Param(name, key, kind, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise UsageError(f"{where}: {kind} parameter {name!r} needs low and high")
    low, high = _number(spec["low"], f"{where}: {name}.low"), _number(spec["high"], f"{where}: {name}.high")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{where}: {name}.step")
    log = bool(spec.get("log", False))
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        if low > high:
            raise UsageError(f"{where}: parameter {name!r} has low {low} > high {high}")
        if log and low <= 0:
            raise UsageError(f"{where}: log-scale parameter {name!r} needs low > 0, got {low}")
    return Param(name, key, kind, low, high, log=log, step=step, help=str(spec.get("help", "")))


def space_from_dict(data: Any, algo: str, where: str = "space file") -> Space:
    if not isinstance(data, Mapping) or "params" not in data:
        raise UsageError(f"{where} must be a mapping with a 'params' section, e.g.\n"
                         f"params:\n  k: {{type: int, low: 2, high: 4}}\n  weighting: [uniform, softmax_logprob]")
    unknown = set(data) - {"params", "constraints", "fixed", "algo"}
    if unknown:
        raise UsageError(f"{where} has unknown section(s) {sorted(unknown)}; valid: params, constraints, fixed, algo")
    if data.get("algo") not in (None, algo):
        raise UsageError(f"{where} is a space for algorithm {data['algo']!r} but the sweep runs --algo {algo}")
    params = data["params"]
    if not isinstance(params, Mapping) or not params:
        raise UsageError(f"{where}: 'params' must map parameter names to their ranges")
    built = tuple(param_from_spec(str(n), s, algo, where) for n, s in params.items())
    constraints = data.get("constraints") or []
    if isinstance(constraints, str):
        constraints = [constraints]
    for c in constraints:
        if not isinstance(c, str) or not _CMP.match(c):
            raise UsageError(f"{where}: constraint {c!r} must compare two terms, e.g. 'd <= window'")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, Mapping):
        raise UsageError(f"{where}: 'fixed' must map config keys to values")
    return Space(built, tuple(constraints), dict(fixed))


def load_space_file(path: str | Path, algo: str) -> Space:
    from bench.config import read_yaml_file

    data = read_yaml_file(path, "space file")
    return space_from_dict(data, algo, where=f"space file {Path(path)}")


def parse_ranges(items: Iterable[str]) -> dict[str, tuple[float, float]]:
    """``["lr=1e-5:2e-4"]`` -> {"lr": (1e-5, 2e-4)} (``--range``), checked: numbers, LOW < HIGH, each once
    (the one parser of ``bench compare --tune-range`` too)."""
    return parse_range_items(items, "--range")


def with_ranges(space: Space, ranges: Mapping[str, tuple[float, float]]) -> Space:
    """The space with the named numeric parameters' bounds replaced (their kind, scale and step kept)."""
    if not ranges:
        return space
    params = {p.name: p for p in space.params}
    for name, (low, high) in ranges.items():
        p = params.get(name)
        if p is None:
            raise UsageError(did_you_mean(name, list(params), "--range parameter (not in the searched space):"))
        if p.kind not in ("int", "float"):
            raise UsageError(f"--range {name}: {name!r} is {p.kind}, not a numeric parameter")
        if p.log and low <= 0:
            raise UsageError(f"--range {name}: {name!r} is searched on a log scale and needs LOW > 0, got {low:g}")
        if p.kind == "int" and (low != int(low) or high != int(high)):
            raise UsageError(f"--range {name}: {name!r} is an integer parameter: give integer bounds")
        cast = int if p.kind == "int" else float
        params[name] = dataclasses.replace(p, low=cast(low), high=cast(high))
    return Space(tuple(params[p.name] for p in space.params), space.constraints, space.fixed)


def select(space: Space, names: Sequence[str] | None) -> Space:
    """Keep only ``names`` of a space (``--space`` together with ``--space-file``)."""
    if not names:
        return space
    for n in names:
        if n not in space.names:
            raise UsageError(did_you_mean(n, space.names, "parameter of the space file:"))
    return Space(tuple(p for p in space.params if p.name in names), space.constraints, space.fixed)


# ---- grids: --grid k=2,3,4 d=1,2,3 ------------------------------------------------------------------------
def parse_grid(items: Sequence[str], algo: str) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """``["k=2,3,4", "d=1,2"]`` -> ({"k": [2, 3, 4], "d": [1, 2]}, {"k": "algo.k", "d": "algo.d"})."""
    grid: dict[str, list[Any]] = {}
    keys: dict[str, str] = {}
    for item in items:
        name, eq, values = item.partition("=")
        name = name.strip()
        if not eq or not name or not values.strip():
            raise UsageError(f"--grid expects NAME=V1,V2,... (e.g. --grid k=2,3,4 d=1,2,3), got {item!r}")
        if name in grid:
            raise UsageError(f"--grid names {name!r} twice")
        vals = [parse_value(v) for v in values.split(",") if v.strip()]
        if not vals or len(vals) != len(values.split(",")):
            raise UsageError(f"--grid {item!r} has an empty value; write NAME=V1,V2 without trailing commas")
        for v in vals:
            if not (v is None or isinstance(v, (str, int, float, bool))) or (isinstance(v, float) and math.isnan(v)):
                raise UsageError(f"--grid {name}: values must be numbers, strings or booleans, got {v!r}")
        if len(set(map(repr, vals))) != len(vals):
            raise UsageError(f"--grid {name} lists a value twice: {values}")
        grid[name] = vals
        keys[name] = resolve_key(name, algo)
    if not grid:
        raise UsageError("--grid needs at least one NAME=V1,V2,... term")
    return grid, keys


def grid_space(grid: Mapping[str, list[Any]], keys: Mapping[str, str]) -> Space:
    return Space(tuple(Param(n, keys[n], "categorical", choices=tuple(v)) for n, v in grid.items()))


def grid_size(grid: Mapping[str, list[Any]]) -> int:
    return math.prod(len(v) for v in grid.values())
