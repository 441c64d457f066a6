"""`make results` (scripts/results.sh) end to end at a toy scale: the tiny model, 2 iterations, one seed,
a 2 x 1 k/d grid. Checks that it writes the three PDFs, their page files and results.json with its timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # ~5 min: the three parts of make results end to end at toy scale (tuning, controls, grid); compare,
# report and tune each have fast tests of their own in the default run
def test_results_script_writes_both_parts_their_runs_and_record(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RESULTS_ALLOW_DIRTY": "1",
           "BENCH": f"{sys.executable} -m bench.cli", "PYTHON": sys.executable, "RESULTS_RUNS": str(tmp_path / "runs"),
           "RESULTS_OUT": str(tmp_path / "out"), "RESULTS_BUDGET": "2it", "RESULTS_SEEDS": "1", "KD_SEEDS": "1",
           "KD_KS": "2 3", "KD_DS": "1", "KD_BASELINE": "treegrpo k=3", "RESULTS_ALGOS": "grpo,treegrpo",
           "RESULTS_BASELINE": "grpo", "RIVALS_ALGOS": "dancegrpo", "RIVALS_BASELINE": "dancegrpo",
           "RESULTS_SETTINGS": "--set train.prompts_per_iteration=2 --set eval.every=0 --set eval.num_prompts=2 "
                               "--set sampler.steps=3",
           "RESULTS_ARGS": "--model tiny-random --reps 200", "RESULTS_JOBS": "--jobs 2 --threads-per-run 1",
           "RESULTS_TUNE": "--tune lr --tune-range lr=1e-5:2e-4 --tune-trials 1 --tune-budget 1it"}
    out = tmp_path / "out"
    for part in ("main", "rivals", "kd"):
        p = subprocess.run(["bash", str(ROOT / "scripts" / "results.sh"), part], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        assert f"results ({part})" in p.stdout
    for name in ("compare_shapes", "compare_rivals", "treegrpo_kd_grid"):
        assert (out / f"{name}.pdf").stat().st_size > 10_000
        assert any((out / f"{name}_files").glob("*.png")) and (out / f"{name}_files" / "final.csv").is_file()
    assert (out / "compare_shapes_files" / "verdict.json").is_file()
    rec = json.loads((out / "results.json").read_text())["parts"]
    assert set(rec) == {"main", "rivals", "kd"}
    assert rec["main"]["budget"] == "2it" and rec["main"]["seeds"] == 1 and rec["main"]["wall_s"] >= 0
    assert len(rec["main"]["commit"]) == 40 and rec["kd"]["kd_ks"] == "2 3"
    # each comparison was tuned first (one study per algorithm) and ships the tuned settings
    assert rec["main"]["tune"].startswith("--tune lr") and set(rec["main"]["tuned"]) == {"grpo", "treegrpo"}
    assert set(rec["rivals"]["tuned"]) == {"dancegrpo"}  # each part lists its own studies
    # the grid's cells share one iteration-0 evaluation: computed by the first run, a hit in the others
    cached = [json.loads((p.parent / "evals.jsonl").read_text().splitlines()[0]).get("cached", False)
              for p in sorted((tmp_path / "runs" / "kd").glob("k*_d*/treegrpo/seed0/final.json"))]
    assert len(cached) == 2 and cached.count(True) == 1
    for a in ("grpo", "treegrpo", "dancegrpo"):
        t = json.loads((out / "tuning" / a / "tuned.json").read_text())
        assert t["trials"] == 1 and t["ranges"] == {"lr": [1e-5, 2e-4]}
    # the comparison has its controls: the baseline on other seeds, and frozen
    cmp = tmp_path / "runs" / "compare_shapes"
    assert (cmp / "grpo-aa" / "seed1000" / "final.json").is_file()
    assert json.loads((cmp / "grpo-frozen" / "seed0" / "manifest.json").read_text())["weights_frozen"] is True
    # the rivals ran their tuned arms and controls only (--no-default-arms)
    riv = tmp_path / "runs" / "compare_rivals"
    assert sorted(p.parent.parent.name for p in riv.glob("*/seed*/final.json")) == [
        "dancegrpo", "dancegrpo-aa", "dancegrpo-frozen"]
    # the shipped per-run data: every final run (no tuning trial), readable, and a report redrawn from it
    shipped = out / "runs" / "compare_shapes"
    assert sorted(p.parent.relative_to(shipped).as_posix() for p in shipped.rglob("manifest.json")) == [
        "grpo-aa/seed1000", "grpo-default/seed0", "grpo-frozen/seed0", "grpo/seed0", "treegrpo-default/seed0",
        "treegrpo/seed0"]
    assert not list(shipped.rglob("checkpoints")) and list(shipped.rglob("eval_scores.jsonl.gz"))
    r = subprocess.run([sys.executable, "-m", "bench.cli", "report", str(shipped), "--out", str(tmp_path / "re.pdf"),
                        "--reps", "200", "--baseline", "grpo", "--x", "nfe"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "verdict.json").read_text()) == json.loads(
        (out / "compare_shapes_files" / "verdict.json").read_text())
