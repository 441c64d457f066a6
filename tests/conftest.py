"""Shared test set-up: offline hub, small thread count, tiny models built in-process."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bench  # noqa: E402,F401,I001  (installs the torchvision import fix before anything imports it)
import pytest  # noqa: E402
import torch  # noqa: E402

#: intra-op threads: TREEBENCH_TEST_THREADS where set (tests/perturbed_rounding.sh runs the numerics tests with 1
#: and 2 to perturb float32 reduction order), else 1 in each of pytest-xdist's worker processes (the default
#: run: two of them share the cores), else at most 2
torch.set_num_threads(int(os.environ.get("TREEBENCH_TEST_THREADS")
                          or (1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))))


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared, busy machine a second
    spinning thread makes these tests several times slower (``pytestmark = usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def weights():
    """(root, options) of tiny reward checkpoints in their packages' real formats (tests/_rewards_tiny.py)."""
    import _rewards_tiny

    return _rewards_tiny.shared_weights()


@pytest.fixture(scope="session")
def tiny_flow_dir():
    from bench.model.random_models import tiny_pipeline_dir

    return tiny_pipeline_dir("flow")


@pytest.fixture(scope="session")
def tiny_eps_dir():
    from bench.model.random_models import tiny_pipeline_dir

    return tiny_pipeline_dir("epsilon")


@pytest.fixture(scope="session")
def tiny_flow_policy(tiny_flow_dir):
    from bench.model.models import load_policy

    return load_policy(tiny_flow_dir)


@pytest.fixture(scope="session")
def tiny_eps_policy(tiny_eps_dir):
    from bench.model.models import load_policy

    return load_policy(tiny_eps_dir)


@pytest.fixture
def fake_bench_run(monkeypatch):
    """``bench compare`` launches tests/synthetic_runs.py (instant synthetic run directories with known
    values) instead of ``bench run``."""
    import sys
    from pathlib import Path

    from bench.fleet import compare

    monkeypatch.setattr(compare, "RUNNER", [sys.executable, str(Path(__file__).with_name("synthetic_runs.py"))])


# ---- an installed plug-in package ------------------------------------------------------------------
#: the example plug-in package (docs/PLUGINS.md); its pyproject.toml declares the entry points
PLUGIN_ROOT = Path(__file__).resolve().parent / "plugin_example"
PLUGIN_ALGORITHMS = ("example_bestofgroup",)
PLUGIN_REWARDS = ("example_redness",)


def write_dist_info(site: Path, pyproject: Path) -> Path:
    """Install ``pyproject``'s package the way pip would make it visible, offline: a ``.dist-info`` with
    METADATA and entry_points.txt in ``site`` (the package's sources are put on sys.path by the caller)."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = []
    for group, eps in project.get("entry-points", {}).items():
        lines += [f"[{group}]", *(f"{name} = {target}" for name, target in eps.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    return info


@pytest.fixture
def plugin_installed(tmp_path_factory):
    """The example plug-in package installed for one test: its entry points add names to the registry."""
    site = tmp_path_factory.mktemp("site")
    write_dist_info(site, PLUGIN_ROOT / "pyproject.toml")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(PLUGIN_ROOT))
        mp.syspath_prepend(str(site))
        yield site


@pytest.fixture
def failpoints():
    """``failpoints("checkpoint.rename=enospc@2")`` switches failpoints on for one test (bench.rundir.failpoints)."""
    from bench.rundir import failpoints as fp

    yield fp.set_failpoints
    fp.set_failpoints("")


@pytest.fixture(scope="module")
def flow_policy(tiny_flow_dir):
    """A fresh tiny flow policy per test module (algorithm tests train it)."""
    from bench.model.models import load_policy

    return load_policy(tiny_flow_dir)


@pytest.fixture
def fixed_noise(monkeypatch):
    """(parity tests) Replace the engine's noise draws, in order, by parity_reference.noise(0), noise(1), ..."""
    from parity_reference import noise as parity_noise

    real = torch.randn
    calls = {"k": 0}

    def fake(*size, generator=None, device=None, dtype=None, **kw):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        k = calls["k"]
        calls["k"] += 1
        z = torch.from_numpy(parity_noise(k, shape[0])).to(dtype or torch.float32)
        assert tuple(z.shape) == shape, f"draw {k}: shape {shape} vs {tuple(z.shape)}"
        return z

    monkeypatch.setattr(torch, "randn", fake)
    yield calls
    monkeypatch.setattr(torch, "randn", real)
