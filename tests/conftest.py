"""Shared test set-up: offline hub, small thread count, tiny models built in-process."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bench  # noqa: E402,F401  (installs the torchvision import fix before anything imports it)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_flow_dir():
    from bench.policy import tiny_pipeline_dir

    return tiny_pipeline_dir("flow")


@pytest.fixture(scope="session")
def tiny_eps_dir():
    from bench.policy import tiny_pipeline_dir

    return tiny_pipeline_dir("epsilon")


@pytest.fixture(scope="session")
def tiny_flow_policy(tiny_flow_dir):
    from bench.policy import load_policy

    return load_policy(tiny_flow_dir)


@pytest.fixture(scope="session")
def tiny_eps_policy(tiny_eps_dir):
    from bench.policy import load_policy

    return load_policy(tiny_eps_dir)


@pytest.fixture
def fake_bench_run(monkeypatch):
    """``bench compare`` launches tests/synthetic_runs.py (instant synthetic run directories with known
    values) instead of ``bench run``."""
    import sys
    from pathlib import Path

    from bench import compare

    monkeypatch.setattr(compare, "RUNNER", [sys.executable, str(Path(__file__).with_name("synthetic_runs.py"))])
