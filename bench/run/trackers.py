"""Experiment trackers (``--log-with tensorboard|wandb|mlflow``, several allowed; config ``run.log_with``).

Each tracker is driven through its library's own API and writes locally by default, so a run works
offline: TensorBoard event files in ``RUN/tensorboard``, W&B in offline mode under ``RUN/wandb`` (sync
later with ``wandb sync``), MLflow in a local SQLite store ``RUN/mlflow.db`` (artifacts in
``RUN/mlartifacts``) unless ``MLFLOW_TRACKING_URI`` names another store or a server. They mirror every iteration record, every evaluation and its sample grid (captioned with the eval
prompts), and the final summary. The run directory's JSONL files stay the source of truth; a tracker
that fails mid-run is warned about once and dropped, never stops the run.

Offline means no network and nothing outside the run directory (``offline_env``), through each library's
documented switches, each only where the user has not set it: MLflow's usage telemetry (a DNS lookup of
its config server, an installation id in ``~/.config/mlflow``) is off (``MLFLOW_DISABLE_TELEMETRY``, read
when mlflow is imported); W&B in offline mode reports no errors to its server (``WANDB_ERROR_REPORTING``)
and keeps its cache, config, staging and artifact directories (``WANDB_CACHE_DIR``, ``WANDB_CONFIG_DIR``,
``WANDB_DATA_DIR``, ``WANDB_ARTIFACT_DIR``; default under ``~/.cache``, ``~/.config``, ``~/.local``) in
``RUN/wandb``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench.errors import UsageError
from bench.spec import RunOptions

TRACKERS = ("tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}

#: environment variables this process set for an offline tracker (so a later run of the same process, e.g.
#: the next sweep trial, moves them to its own directory, while a user's own setting is never touched)
_SET_HERE: dict[str, str] = {}


def offline_env(name: str, out: Path) -> dict[str, str]:
    """The environment settings that keep tracker ``name`` off the network and inside ``out`` (see the module
    docstring); applied to ``os.environ`` where the user has not set them. Returns what was applied."""
    if name == "mlflow":
        wanted = {"MLFLOW_DISABLE_TELEMETRY": "true"}
    elif name == "wandb":
        base = out / "wandb"
        wanted = {"WANDB_ERROR_REPORTING": "false", "WANDB_CACHE_DIR": str(base / "cache"),
                  "WANDB_CONFIG_DIR": str(base / "config"), "WANDB_DATA_DIR": str(base / "data"),
                  "WANDB_ARTIFACT_DIR": str(base / "artifacts")}
    else:
        return {}
    applied = {}
    for k, v in wanted.items():
        if k in os.environ and _SET_HERE.get(k) != os.environ[k]:
            continue  # the user's own choice
        os.environ[k] = _SET_HERE[k] = applied[k] = v
    return applied


def check(names: Sequence[str]) -> None:
    """Refuse unknown tracker names and trackers whose package is missing (before anything is created)."""
    import importlib.util

    from bench.registry import did_you_mean

    for n in names:
        if n not in TRACKERS:
            raise UsageError(did_you_mean(n, TRACKERS, "tracker (--log-with)"))
        if importlib.util.find_spec(PACKAGES[n]) is None:
            raise UsageError(f"--log-with {n} needs the {PACKAGES[n]} package: pip install -c constraints.txt "
                             f"'treebench[trackers]' (or pip install {PACKAGES[n]})")


def check_run(run: RunOptions) -> list[str]:
    """The trackers of a run's ``RunOptions``, checked (``run.tensorboard`` already mirrors to TensorBoard
    through the run log, so ``--log-with tensorboard`` does not open a second writer)."""
    names = [n for n in run.log_with if not (n == "tensorboard" and run.tensorboard)]
    check(names)
    return names


def scalars(rec: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of a record, nested mappings flattened with '/' (strings and lists dropped)."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(scalars(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class _TensorBoard:
    def __init__(self, out: Path, config: Mapping[str, Any], name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(out / "tensorboard"))
        self.w.add_text("config", f"```\n{config}\n```")

    def log(self, values: Mapping[str, float], step: int) -> None:
        for k, v in values.items():
            self.w.add_scalar(k, v, step)

    def image(self, key: str, png: Path, caption: str, step: int) -> None:
        import numpy as np
        from PIL import Image

        self.w.add_image(key, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")
        self.w.add_text(f"{key}/prompts", caption, step)

    def close(self, summary: Mapping[str, Any]) -> None:
        self.w.flush()
        self.w.close()


class _WandB:
    def __init__(self, out: Path, config: Mapping[str, Any], name: str):
        mode = os.environ.get("WANDB_MODE", "offline")  # offline unless the user asks for online
        if mode in ("offline", "disabled", "dryrun"):
            offline_env("wandb", out)
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "treebench"), name=name, dir=str(out),
                              config=dict(config), mode=mode, reinit="create_new")

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def image(self, key: str, png: Path, caption: str, step: int) -> None:
        self.run.log({key: self.wandb.Image(str(png), caption=caption)}, step=step)

    def close(self, summary: Mapping[str, Any]) -> None:
        for k, v in scalars(summary).items():
            self.run.summary[k] = v
        self.run.finish()


class _MLflow:
    def __init__(self, out: Path, config: Mapping[str, Any], name: str):
        offline_env("mlflow", out)  # before mlflow is imported: it starts its telemetry client at import
        from mlflow.tracking import MlflowClient

        try:  # mlflow imported earlier in this process (another run): its telemetry client is re-read
            from mlflow.telemetry import set_telemetry_client

            set_telemetry_client()
        except ImportError:  # an MLflow without telemetry
            pass

        # MLflow 3 keeps its file store in maintenance mode: the local default is a SQLite store in the run
        # directory, with artifacts (sample grids) beside it
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "treebench")
        exp = self.client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            exp_name, artifact_location=(out / "mlartifacts").resolve().as_uri())
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        for k, v in scalars(config).items():
            self.client.log_param(self.run_id, k, v)

    def log(self, values: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def image(self, key: str, png: Path, caption: str, step: int) -> None:
        self.client.log_artifact(self.run_id, str(png), artifact_path="samples")
        self.client.log_text(self.run_id, caption, f"samples/{png.stem}_prompts.txt")

    def close(self, summary: Mapping[str, Any]) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if summary.get("stop_reason") != "error" else "FAILED")


_CLASSES = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """The trackers a run logs to; every call is safe to make with none configured."""

    def __init__(self, names: Sequence[str], out: Path, config: Mapping[str, Any], name: str):
        check(names)
        self.active: dict[str, Any] = {}
        for n in dict.fromkeys(names):
            try:
                self.active[n] = _CLASSES[n](out, config, name)
            except Exception as e:  # noqa: BLE001 - the run directory is the record; go on without this mirror
                print(f"warning: tracker {n} could not start ({type(e).__name__}: {e}); the run continues "
                      f"without it", file=sys.stderr)

    def _each(self, what: str, fn: Any) -> None:
        for n, t in list(self.active.items()):
            try:
                fn(t)
            except Exception as e:  # noqa: BLE001 - the run directory is the record; a tracker is a mirror
                print(f"warning: tracker {n} failed ({what}: {type(e).__name__}: {e}); no longer logging to it",
                      file=sys.stderr)
                del self.active[n]

    def iteration(self, rec: Mapping[str, Any]) -> None:
        values = scalars({k: v for k, v in rec.items() if k != "iteration"}, "train/")
        self._each("iteration", lambda t: t.log(values, int(rec["iteration"]) + 1))

    def evaluation(self, rec: Mapping[str, Any], out: Path, prompts: Sequence[str]) -> None:
        """An evaluation after ``rec['iteration']`` iterations (the step of the iteration record that ended
        it), and its sample grid captioned with the prompts shown in it."""
        values = scalars({k: v for k, v in rec.items() if k.startswith("eval/") or k == "t_eval_s"})
        step = int(rec["iteration"])
        self._each("evaluation", lambda t: t.log(values, step))
        png = rec.get("samples_png")
        if png:
            caption = " | ".join(prompts)
            self._each("sample grid", lambda t: t.image("eval/samples", out / png, caption, step))

    def close(self, summary: Mapping[str, Any]) -> None:
        self._each("close", lambda t: t.close(summary))
        self.active = {}
