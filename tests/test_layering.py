"""Dependencies point inward (DESIGN.md §2), checked by scanning imports with ast."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "algorithms", "rewards", "sweeps", "reports")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def files(pkg: str):
    return sorted((ROOT / pkg).rglob("*.py"))


def top(mod: str) -> str:
    return mod.split(".")[0]


@pytest.mark.parametrize("path", files("bench"), ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_imports_no_plugin_package(path):
    bad = {m for m in imports_of(path) if top(m) in ("algorithms", "rewards", "sweeps", "reports")}
    assert not bad, f"{path} imports {bad}; name plug-ins as registry strings instead"


@pytest.mark.parametrize("path", files("algorithms"), ids=lambda p: str(p.relative_to(ROOT)))
def test_algorithms_import_only_bench_and_common(path):
    mods = imports_of(path)
    assert not {m for m in mods if top(m) in ("rewards", "sweeps", "reports")}
    others = {m for m in mods if top(m) == "algorithms" and m != "algorithms.common"}
    assert not others, f"{path} imports another algorithm: {others}"


@pytest.mark.parametrize("path", files("rewards"), ids=lambda p: str(p.relative_to(ROOT)))
def test_rewards_import_only_bench_types_errors_and_shapes_vocabulary(path):
    mods = imports_of(path)
    assert not {m for m in mods if top(m) in ("algorithms", "sweeps", "reports")}
    allowed = ("bench.types", "bench.errors", "bench.shapes", "bench._torchvision_fix")
    if path.name == "cli.py":  # `bench rewards check` is a command: it lists the registry's rewards
        allowed += ("bench.registry",)
    bad = {m for m in mods if top(m) == "bench" and m != "bench" and not m.startswith(allowed)}
    assert not bad, f"{path} imports {bad} from bench"


@pytest.mark.parametrize("path", files("reports"), ids=lambda p: str(p.relative_to(ROOT)))
def test_reports_read_run_dirs_only(path):
    mods = imports_of(path)
    assert not {m for m in mods if top(m) in ("algorithms", "rewards", "sweeps")}
    assert not {m for m in mods if m.startswith(("bench.run.runner", "bench.engine.rollout", "bench.model.policy"))}


@pytest.mark.parametrize("path", files("sweeps"), ids=lambda p: str(p.relative_to(ROOT)))
def test_sweeps_do_not_import_plugins(path):
    mods = imports_of(path)
    assert not {m for m in mods if top(m) in ("algorithms", "rewards", "reports")}


# ---- wings inside bench/ (README "Architecture"): each module imports only its own wing and lower ones ----
#: lowest first; a module's rank is that of its longest matching prefix. Imports inside functions count.
WING_RANKS: tuple[tuple[str, ...], ...] = (
    ("bench.errors", "bench._torchvision_fix"),
    ("bench.types", "bench.budget", "bench.registry"),
    ("bench.config",),
    ("bench.model",),
    ("bench.rundir",),
    ("bench.engine",),
    ("bench.spec", "bench.protocols", "bench.shapes"),
    ("bench.run",),
    ("bench.cost",),
    ("bench.fleet",),
    ("bench.cli", "bench.show", "bench.lora", "bench.envinfo"),
)


def wing_rank(mod: str) -> int:
    best, rank = -1, None
    for r, prefixes in enumerate(WING_RANKS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), r
    if rank is None:
        raise AssertionError(f"{mod} belongs to no wing: add it to WING_RANKS in tests/test_layering.py")
    return rank


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def bench_imports(path: Path) -> set[str]:
    """bench modules imported by ``path`` (``from bench import x`` counts as ``bench.x``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if top(a.name) == "bench")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and top(node.module) == "bench":
            if node.module == "bench":
                out.update(f"bench.{a.name}" for a in node.names)
            else:
                out.add(node.module)
    return {m for m in out if m != "bench"}


@pytest.mark.parametrize("path", [p for p in files("bench") if module_name(p) != "bench"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_wings_import_downward(path):
    mine = wing_rank(module_name(path))
    up = {m for m in bench_imports(path) if wing_rank(m) > mine}
    assert not up, f"{path.relative_to(ROOT)} (wing rank {mine}) imports higher wings: {sorted(up)}"


def test_no_bench_folder_holds_more_than_twenty_modules():
    for d in [ROOT / "bench", *[p for p in (ROOT / "bench").rglob("*") if p.is_dir()]]:
        n = len([p for p in d.glob("*.py") if p.name != "__init__.py"])
        assert n <= 20, f"{d.relative_to(ROOT)} holds {n} modules"


# ---- the run travels typed (README "Architecture"): no parameter carrying it is typed Any ----------------
#: parameter names that carry a run (or a part of it) by convention in bench/
RUN_PARAMETERS = ("r", "run")


def untyped_run_parameters(path: Path) -> list[str]:
    """``function(param)`` for every parameter named like a run that has no annotation or is annotated ``Any``
    (``Any``, ``typing.Any``, or the string ``"Any"``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = node.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
            if arg.arg not in RUN_PARAMETERS:
                continue
            ann = arg.annotation
            text = None if ann is None else (ann.value if isinstance(ann, ast.Constant) else ast.unparse(ann))
            if text is None or str(text).strip() in ("Any", "typing.Any"):
                bad.append(f"{node.name}({arg.arg}: {text})")
    return bad


@pytest.mark.parametrize("path", files("bench"), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_run_parameter_is_typed_any(path):
    bad = untyped_run_parameters(path)
    assert not bad, (f"{path.relative_to(ROOT)}: {bad} carry a run untyped; type them (bench.run.parts.RunParts, "
                     f"bench.rundir.state.RunState / CheckpointParts, or the part they need)")


def test_the_untyped_run_check_can_fail(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import Any\nimport typing\n"
                   "def a(r: Any): ...\ndef b(run): ...\ndef c(x, *, r: 'Any'): ...\ndef d(r: typing.Any): ...\n"
                   "def ok(r: int, run: 'RunParts', other: Any): ...\n")
    assert untyped_run_parameters(src) == ["a(r: Any)", "b(run: None)", "c(r: Any)", "d(r: typing.Any)"]


# ---- one owner of the run directory (bench/rundir/layout.py) ------------------------------------------
RUN_DIR_NAMES = {"manifest.json", "iterations.jsonl", "evals.jsonl", "eval_scores.jsonl", "final.json",
                 "trace.jsonl", ".lock"}


@pytest.mark.parametrize("path", [p for pkg in PACKAGES for p in files(pkg)], ids=lambda p: str(p.relative_to(ROOT)))
def test_run_directory_file_names_are_named_only_by_the_layout(path):
    if path.relative_to(ROOT).as_posix() == "bench/rundir/layout.py":
        return
    tree = ast.parse(path.read_text(), filename=str(path))
    found = sorted({n.value for n in ast.walk(tree)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in RUN_DIR_NAMES})
    assert not found, f"{path.relative_to(ROOT)} names run-directory files {found}: use bench.rundir.layout"
