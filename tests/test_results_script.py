"""`make results` (scripts/results.sh) end to end at a toy scale: the tiny model, 2 iterations, one seed,
a 2 x 1 k/d grid. Checks that it writes both PDFs, their page files and results.json with its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # ~3 min: make results end to end at toy scale (tuning, controls, grid); compare, report
# and tune each have fast tests of their own in the default run
def test_results_script_writes_both_reports_and_its_record(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RESULTS_ALLOW_DIRTY": "1",
           "BENCH": f"{sys.executable} -m bench.cli", "RESULTS_RUNS": str(tmp_path / "runs"),
           "RESULTS_OUT": str(tmp_path / "out"), "RESULTS_BUDGET": "2it", "RESULTS_SEEDS": "1", "KD_SEEDS": "1",
           "KD_KS": "2 3", "KD_DS": "1", "KD_BASELINE": "treegrpo k=3", "RESULTS_ALGOS": "grpo,treegrpo",
           "RESULTS_SETTINGS": "--set train.prompts_per_iteration=2 --set eval.every=0 --set eval.num_prompts=2 "
                               "--set sampler.steps=3",
           "KD_EVAL": "--set eval.every=0", "RESULTS_ARGS": "--model tiny-random --reps 200",
           "RESULTS_TUNE": "--tune lr --tune-trials 1 --tune-budget 1it"}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "results.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = tmp_path / "out"
    for name in ("compare_shapes", "treegrpo_kd_grid"):
        assert (out / f"{name}.pdf").stat().st_size > 10_000
        assert any((out / f"{name}_files").glob("*.png")) and (out / f"{name}_files" / "final.csv").is_file()
    rec = json.loads((out / "results.json").read_text())
    assert rec["budget"] == "2it" and rec["seeds"] == 1 and rec["compare_wall_s"] >= 0 and len(rec["commit"]) == 40
    assert "results: comparison" in p.stdout
    # the comparison was tuned first (one study per algorithm) and ships the tuned settings
    assert rec["tune"].startswith("--tune lr") and set(rec["tuned"]) == {"grpo", "treegrpo"}
    for a in ("grpo", "treegrpo"):
        assert json.loads((out / "tuning" / a / "tuned.json").read_text())["trials"] == 1
    # the comparison has its controls: the baseline (grpo: no dancegrpo here) on other seeds, and frozen
    cmp = tmp_path / "runs" / "compare"
    assert (cmp / "grpo-aa" / "seed1000" / "final.json").is_file()
    assert json.loads((cmp / "grpo-frozen" / "seed0" / "manifest.json").read_text())["weights_frozen"] is True
