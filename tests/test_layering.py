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
    assert not {m for m in mods if m.startswith(("bench.runner", "bench.rollout", "bench.policy"))}


@pytest.mark.parametrize("path", files("sweeps"), ids=lambda p: str(p.relative_to(ROOT)))
def test_sweeps_do_not_import_plugins(path):
    mods = imports_of(path)
    assert not {m for m in mods if top(m) in ("algorithms", "rewards", "reports")}
