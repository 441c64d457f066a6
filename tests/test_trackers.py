"""Experiment trackers: a run with --log-with writes each tracker's own files, and reading them back gives
the numbers of the run directory (which stays the source of truth)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run.trackers import scalars

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--algo", "grpo", "--model", "tiny-random", "--set", "sampler.steps=3", "--set", "eval.every=1",
        "--set", "eval.num_prompts=2", "--set", "train.prompts_per_iteration=1", "--no-progress"]


def test_scalars_flattens_numbers_only():
    rec = {"a": 1, "b": True, "c": "x", "d": {"e": 2.5, "f": [1]}, "g": None}
    assert scalars(rec, "p/") == {"p/a": 1.0, "p/d/e": 2.5}


def _run(tmp_path, *trackers):
    out = tmp_path / "run"
    args = [a for t in trackers for a in ("--log-with", t)]
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "MLFLOW_TRACKING_URI": ""}
    env.pop("WANDB_MODE", None)
    res = subprocess.run([sys.executable, "-m", "bench.cli", "run", *TINY, "--budget", "2it", "--out", str(out),
                          *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    assert "tracker" not in res.stderr  # no tracker was dropped
    its = [json.loads(ln) for ln in (out / "iterations.jsonl").read_text().splitlines()]
    evs = [json.loads(ln) for ln in (out / "evals.jsonl").read_text().splitlines()]
    return out, its, evs


def _tensorboard(out, its, evs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    got = [(e.step, e.value) for e in ea.Scalars("train/reward_mean")]
    assert got == [(r["iteration"] + 1, pytest.approx(r["reward_mean"])) for r in its]
    got = [(e.step, e.value) for e in ea.Scalars("eval/brightness")]
    assert got == [(e["iteration"], pytest.approx(e["eval/brightness"])) for e in evs]
    assert [im.step for im in ea.Images("eval/samples")] == [e["iteration"] for e in evs]


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B offline ``.wandb`` file: W&B's LevelDB-style log (a 7-byte file header, 32 KiB
    blocks, each record chunk with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST). Read here
    because wandb no longer ships a Python reader for it."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            out.append(parts)
    return out


def _wandb(out, its, evs):
    from wandb.proto import wandb_internal_pb2 as pb

    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = []
    for data in wandb_records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    train = [(h["_step"], h["train/reward_mean"]) for h in history if "train/reward_mean" in h]
    assert train == [(r["iteration"] + 1, pytest.approx(r["reward_mean"])) for r in its]
    ev = [(h["_step"], h["eval/brightness"]) for h in history if "eval/brightness" in h]
    assert ev == [(e["iteration"], pytest.approx(e["eval/brightness"])) for e in evs]
    grids = [h for h in history if h.get("eval/samples/_type") == "image-file"]  # an image is a nested value
    assert [h["_step"] for h in grids] == [e["iteration"] for e in evs]
    assert all(h["eval/samples/caption"] for h in grids)  # the prompts shown in the grid


def _mlflow(out, its, evs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("treebench")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/reward_mean"))
    assert hist == [(r["iteration"] + 1, pytest.approx(r["reward_mean"])) for r in its]
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/brightness"))
    assert hist == [(e["iteration"], pytest.approx(e["eval/brightness"])) for e in evs]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {f"samples/{Path(e['samples_png']).name}" for e in evs} <= arts


CHECKS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}


def test_tensorboard(tmp_path):
    """The fast representative of the tracker runs: one tracker mirrors every record and evaluation."""
    pytest.importorskip("tensorboard")
    out, its, evs = _run(tmp_path, "tensorboard")
    _tensorboard(out, its, evs)


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_tensorboard_and_wandb_together(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    out, its, evs = _run(tmp_path, "tensorboard", "wandb")
    _tensorboard(out, its, evs)
    _wandb(out, its, evs)


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_mlflow(tmp_path):
    pytest.importorskip("mlflow")
    out, its, evs = _run(tmp_path, "mlflow")
    _mlflow(out, its, evs)


def test_missing_tracker_package_refused_before_anything_exists(tmp_path, monkeypatch, capsys):
    import importlib.util

    from bench.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    out = tmp_path / "run"
    assert main(["run", *TINY, "--budget", "1it", "--out", str(out), "--log-with", "wandb"]) == 2
    assert "--log-with wandb needs the wandb package" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_resume_may_add_a_tracker(tmp_path):
    """--log-with may change on --resume (it changes no record): the resumed iterations reach the tracker."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    first = subprocess.run([sys.executable, "-m", "bench.cli", "run", *TINY, "--budget", "1it", "--out", str(out)],
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--resume", str(out), "--budget", "2it",
                            "--log-with", "tensorboard", "--no-progress"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert again.returncode == 0, again.stderr
    its = [json.loads(ln) for ln in (out / "iterations.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in its] == [0, 1]
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/reward_mean")] == [(2, pytest.approx(its[1]["reward_mean"]))]
