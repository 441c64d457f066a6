#!/usr/bin/env bash
# Canonical shapes-world results from one clean commit (docs/REPORTS.md "Canonical results"):
#
#   bash scripts/results.sh main     (`make results`)
#     the four seed algorithms (RESULTS_ALGOS), each first tuned with an equal budget (bench compare --tune:
#     one Optuna study per algorithm, RESULTS_TUNE) then run tuned (<algo>) and at the reference defaults
#     (<algo>-default), RESULTS_SEEDS seeds each, plus the controls (<baseline>-aa: the baseline on other
#     seeds; <baseline>-frozen: its weights frozen)            -> docs/results/compare_shapes.pdf (+ _files/)
#   bash scripts/results.sh rivals   (`make results-rivals`)
#     the rivals (RIVALS_ALGOS, baseline RIVALS_BASELINE) under the same protocol, tuned arms only
#     (RIVALS_ARGS=--no-default-arms: the reference-defaults arms would add half the runs)
#                                                              -> docs/results/compare_rivals.pdf
#   bash scripts/results.sh kd       (`make results-kd`)
#     a TreeGRPO k x d grid, KD_SEEDS seeds per cell, at the tuned TreeGRPO learning rate of `main`
#                                                              -> docs/results/treegrpo_kd_grid.pdf
#
# Each part also ships the per-run data every number is recomputed from (docs/results/runs/<part>/: manifest,
# final.json, evaluations, iteration records, per-image scores gzipped, the sample grids the report shows;
# `bench report docs/results/runs/compare_shapes --tuning docs/results/tuning` redraws the report), the tuning
# studies' results (docs/results/tuning/<algo>/) and its settings, commit and
# wall time in docs/results/results.json. Re-running resumes: finished runs are skipped, killed ones resumed.
# Every setting can be overridden from the environment (a smoke test uses a tiny budget and model).
set -euo pipefail
cd "$(dirname "$0")/.."

PART=${1:-main}
case "$PART" in main|rivals|kd) ;; *) echo "usage: $0 [main|rivals|kd]" >&2; exit 2 ;; esac

BENCH=${BENCH:-.venv/bin/bench}
PY=${PYTHON:-.venv/bin/python}
RUNS=${RESULTS_RUNS:-runs/results}
OUT=${RESULTS_OUT:-docs/results}
# The protocol (docs/REPORTS.md says how each value was chosen from pilot measurements):
BUDGET=${RESULTS_BUDGET:-20000nfe}
SEEDS=${RESULTS_SEEDS:-5}
ALGOS=${RESULTS_ALGOS:-ddpo,dancegrpo,mixgrpo,treegrpo}
BASELINE=${RESULTS_BASELINE:-dancegrpo}
RIVALS=${RIVALS_ALGOS:-flowgrpo,branchgrpo,diffusionnft,awm,refl,flowdppo}
RIVALS_BASELINE=${RIVALS_BASELINE:-flowgrpo}
RIVALS_EXTRA=${RIVALS_ARGS---no-default-arms}
KD_SEEDS=${KD_SEEDS:-3}
KS=${KD_KS:-2 3 4}
DS=${KD_DS:-1 2 3}
KD_PARALLEL=${KD_PARALLEL:-2}                           # k x d cells at once after the first
KD_JOBS=${KD_JOBS:---jobs 1 --threads-per-run 1}          # each such cell: its seeds one after the other
# 4 prompts per iteration (twice the updates per NFE of the default 8; the group size is unchanged);
# evaluation: 32 held-out prompts x 4 images on shared noise (eval.seed 0), on one NFE grid every 2,500 NFE
# (above every algorithm's cost per iteration; 25/50/75/100% of the budget are grid points)
SETTINGS=${RESULTS_SETTINGS:---set train.prompts_per_iteration=4 --set eval.every=2500nfe --set eval.num_prompts=32 --set eval.images_per_prompt=4 --set eval.seed=0}
EXTRA=${RESULTS_ARGS:-}
CONTROLS=${RESULTS_CONTROLS:---controls}
# equal tuning budget per algorithm: the same three learning rates for every algorithm (a grid: the same values
# for all, 2x apart, bracketing the pilot's 5e-5 at which TreeGRPO hacks within the budget), each trial at the
# full budget (hacking shows only after ~15k NFE), Hyperband-pruned; RESULTS_TUNE= (empty) compares at the
# reference defaults only
TUNE=${RESULTS_TUNE---tune lr --tune-grid lr=1.5e-5,3e-5,6e-5 --tune-budget $BUDGET}
# two runs at once, one CPU thread each (records do not depend on it: the thread count is pinned)
JOBS=${RESULTS_JOBS:---jobs 2 --threads-per-run 1}

if [ -n "$(git status --porcelain)" ] && [ "${RESULTS_ALLOW_DIRTY:-0}" != 1 ]; then
  echo "error: the working tree has uncommitted changes or untracked files; canonical results come from one" >&2
  echo "       clean commit (commit or remove them first, or RESULTS_ALLOW_DIRTY=1 for a throw-away smoke run)" >&2
  git status --short >&2
  exit 2
fi
commit=$(git rev-parse HEAD)
MIXED=""
if [ "${RESULTS_ALLOW_DIRTY:-0}" = 1 ]; then MIXED="--allow-mixed-code"; fi
mkdir -p "$OUT" "$RUNS"

# compare NAME ALGOS BASELINE [OPTIONS]: one tuned comparison with controls -> $OUT/NAME.pdf, _files/, runs/NAME/,
# tuning/
compare() {
  local name=$1 algos=$2 baseline=$3 more=${4:-}
  # shellcheck disable=SC2086
  $BENCH compare --algos "$algos" --baseline "$baseline" --budget "$BUDGET" --seeds "$SEEDS" --out "$RUNS/$name" \
    --x nfe $CONTROLS $TUNE $JOBS $MIXED $SETTINGS $EXTRA $more
  rm -rf "${OUT:?}/$name.pdf" "${OUT:?}/${name}_files"
  cp "$RUNS/$name/report.pdf" "$OUT/$name.pdf"
  cp -r "$RUNS/$name/report_files" "$OUT/${name}_files"
  $PY scripts/export_runs.py "$RUNS/$name" "$OUT/runs/$name" --skip tuning --sample-grids
  if [ -d "$RUNS/$name/tuning" ]; then
    for d in "$RUNS/$name/tuning"/*/; do  # the tuned settings and the trials table of every study (small)
      a=$(basename "$d")
      rm -rf "${OUT:?}/tuning/$a"
      mkdir -p "$OUT/tuning/$a"
      cp "$d/tuned.json" "$d/trials.csv" "$d/sweep.json" "$d/validation.jsonl" "$OUT/tuning/$a/" 2>/dev/null || true
    done
  fi
}

t0=$(date +%s)
if [ "$PART" = main ]; then
  compare compare_shapes "$ALGOS" "$BASELINE"
elif [ "$PART" = rivals ]; then
  compare compare_rivals "$RIVALS" "$RIVALS_BASELINE" "$RIVALS_EXTRA"
else
  # the grid at TreeGRPO's tuned learning rate (from `main`'s study when it exists), evaluated on the protocol's NFE
  # grid (SETTINGS), the iteration-0 evaluation computed once for all cells (one eval cache)
  lr_set=$($PY -c 'import json,sys
try: o = json.load(open(sys.argv[1]))["overrides"] or {}
except (OSError, ValueError, KeyError): o = {}
print(" ".join(f"--set {k}={v}" for k, v in o.items()))' "$OUT/tuning/treegrpo/tuned.json")
  # cells: the first alone with $JOBS (it computes the shared iteration-0 evaluation), then KD_PARALLEL cells at
  # once, each running its seeds one after the other on one core, so that no core idles while a cell's odd seed
  # runs alone (3 seeds two at a time leave one core idle for a third of each cell); each cell's output goes to
  # $RUNS/kd/<cell>.log
  kd_cell() {  # kd_cell K D JOBS...
    local k=$1 d=$2
    shift 2
    # shellcheck disable=SC2086
    $BENCH compare --algos treegrpo --budget "$BUDGET" --seeds "$KD_SEEDS" --out "$RUNS/kd/k${k}_d${d}" --no-report \
      "$@" $MIXED $SETTINGS $lr_set --set eval.cache="$RUNS/kd/.eval_cache" --set algo.k="$k" --set algo.d="$d" \
      $EXTRA
  }
  cells=()
  for k in $KS; do for d in $DS; do cells+=("$k $d"); done; done
  mkdir -p "$RUNS/kd"
  first=${cells[0]}
  # shellcheck disable=SC2086
  kd_cell ${first% *} ${first#* } $JOBS
  failed=0
  for cell in "${cells[@]:1}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$KD_PARALLEL" ]; do wait -n || failed=$((failed + 1)); done
    echo "== kd cell k=${cell% *} d=${cell#* } -> $RUNS/kd/k${cell% *}_d${cell#* }.log"
    # shellcheck disable=SC2086
    kd_cell ${cell% *} ${cell#* } $KD_JOBS > "$RUNS/kd/k${cell% *}_d${cell#* }.log" 2>&1 &
  done
  while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=$((failed + 1)); done
  if [ "$failed" -gt 0 ]; then
    echo "error: $failed k x d cell(s) failed (their logs: $RUNS/kd/k*_d*.log); run the same command again to resume" >&2
    exit 1
  fi
  $BENCH report "$RUNS/kd" --out "$RUNS/kd/report.pdf" --x nfe --baseline "${KD_BASELINE:-treegrpo k=3 d=3}" \
    --title "TreeGRPO k x d grid, budget $BUDGET"
  rm -rf "$OUT/treegrpo_kd_grid.pdf" "$OUT/treegrpo_kd_grid_files"
  cp "$RUNS/kd/report.pdf" "$OUT/treegrpo_kd_grid.pdf"
  cp -r "$RUNS/kd/report_files" "$OUT/treegrpo_kd_grid_files"
  $PY scripts/export_runs.py "$RUNS/kd" "$OUT/runs/kd" --sample-grids
fi
t1=$(date +%s)

# results.json: one entry per part (the other part's entry is kept), with every setting and the wall time
$PY - "$OUT/results.json" "$PART" <<PYEOF
import json, os, sys
from pathlib import Path
path, part = Path(sys.argv[1]), sys.argv[2]
try:
    doc = json.loads(path.read_text())
    if not isinstance(doc.get("parts"), dict):
        doc = {"parts": {}}
except (OSError, ValueError):
    doc = {"parts": {}}
tuned = {}
mine = {"main": "$ALGOS", "rivals": "$RIVALS"}.get(part, "").split(",")  # this part's studies only
for p in sorted(Path("$OUT", "tuning").glob("*/tuned.json")):
    if p.parent.name not in mine:
        continue
    t = json.loads(p.read_text())
    tuned[p.parent.name] = {"overrides": t.get("overrides"), "best_value": t.get("best_value"),
                            "states": t.get("states"), "note": t.get("note")}
entry = {"commit": "$commit", "budget": "$BUDGET", "seeds": $SEEDS, "settings": "$SETTINGS $EXTRA".strip(),
         "controls": "$CONTROLS", "tune": "$TUNE", "jobs": "$JOBS", "tuned": tuned,
         "wall_s": $((t1 - t0)), "machine": f"{os.cpu_count()} CPU cores"}
if part == "main":
    entry.update(algos="$ALGOS", baseline="$BASELINE", report="compare_shapes.pdf", runs="runs/compare_shapes")
elif part == "rivals":
    entry.update(algos="$RIVALS", baseline="$RIVALS_BASELINE", report="compare_rivals.pdf",
                 runs="runs/compare_rivals", options="$RIVALS_EXTRA")
else:
    for k in ("controls", "tune", "tuned"):
        entry.pop(k)
    entry.update(algos="treegrpo", report="treegrpo_kd_grid.pdf", runs="runs/kd", kd_ks="$KS", kd_ds="$DS",
                 kd_eval="the settings' grid, one iteration-0 evaluation for all cells", seeds=$KD_SEEDS,
                 lr_from="tuning/treegrpo/tuned.json (make results)",
                 kd_schedule="the first cell alone ($JOBS), then $KD_PARALLEL cells at once ($KD_JOBS each)")
doc["parts"][part] = entry
path.write_text(json.dumps(doc, indent=1) + "\n")
PYEOF
echo "results ($PART): $((t1 - t0)) s (commit ${commit:0:12}) -> $OUT"
