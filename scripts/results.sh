#!/usr/bin/env bash
# Canonical shapes-world results from one clean commit (`make results`; docs/REPORTS.md):
#   1. the four algorithms under one equal NFE budget, RESULTS_SEEDS seeds, plus the controls (an A/A arm
#      and a frozen arm of the baseline, bench compare --controls)           -> docs/results/compare_shapes.pdf
#      each algorithm first tuned with an equal budget (bench compare --tune: one Optuna study per algorithm,
#      RESULTS_TUNE), then run tuned (<algo>) and with reference defaults (<algo>-default)
#                                                                            -> docs/results/tuning/<algo>/
#   2. a TreeGRPO k x d grid, KD_SEEDS seeds per cell                         -> docs/results/treegrpo_kd_grid.pdf
# Re-running resumes: finished runs are skipped, killed ones resumed (bench compare). Every setting can be
# overridden from the environment (a smoke test uses a tiny budget and model).
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH=${BENCH:-.venv/bin/bench}
RUNS=${RESULTS_RUNS:-runs/results}
OUT=${RESULTS_OUT:-docs/results}
BUDGET=${RESULTS_BUDGET:-20000nfe}
SEEDS=${RESULTS_SEEDS:-5}
KD_SEEDS=${KD_SEEDS:-3}
KS=${KD_KS:-2 3 4}
DS=${KD_DS:-1 2 3}
ALGOS=${RESULTS_ALGOS:-ddpo,dancegrpo,mixgrpo,treegrpo}
# 4 prompts per iteration: twice the updates per NFE of the default 8 (more iterations inside a small
# budget); evaluation: 32 held-out prompts x 4 images on shared noise (eval.seed 0) on one NFE grid, every
# 2,500 NFE (above every algorithm's cost per iteration, a divisor of the budget: 25/50/75/100% are grid
# points) for every algorithm (every 10 iterations in the grid, whose cheap cells run many iterations);
# docs/REPORTS.md says why
SETTINGS=${RESULTS_SETTINGS:---set train.prompts_per_iteration=4 --set eval.every=2500nfe --set eval.num_prompts=32 --set eval.images_per_prompt=4 --set eval.seed=0}
KD_EVAL=${KD_EVAL:---set eval.every=10}
EXTRA=${RESULTS_ARGS:-}
CONTROLS=${RESULTS_CONTROLS:---controls}  # <baseline>-aa and <baseline>-frozen arms (bench compare --help)
# equal tuning budget per algorithm: 8 trials of 5,000 NFE each (a quarter of a final run; Hyperband prunes
# the poor ones), learning rate log-uniform in [1e-6, 1e-3], scored with the held-out shapes_attr on the
# validation prompts (shapes-eval prompts 33-48), trials the reward-hacking rule flags rejected
# (docs/REPORTS.md "Tuning"); RESULTS_TUNE= (empty) compares at the reference defaults only
TUNE=${RESULTS_TUNE---tune lr --tune-trials 8 --tune-budget 5000nfe}

if [ -n "$(git status --porcelain --untracked-files=no)" ] && [ "${RESULTS_ALLOW_DIRTY:-0}" != 1 ]; then
  echo "error: the working tree has uncommitted changes; canonical results come from one clean commit" >&2
  echo "       (commit first, or RESULTS_ALLOW_DIRTY=1 for a throw-away smoke run)" >&2
  exit 2
fi
commit=$(git rev-parse HEAD)
MIXED=""
if [ "${RESULTS_ALLOW_DIRTY:-0}" = 1 ]; then MIXED="--allow-mixed-code"; fi
MIXED_REPORT=""  # bench report marks mixed or dirty code on its first page; it refuses nothing
mkdir -p "$OUT" "$RUNS"
t0=$(date +%s)
# shellcheck disable=SC2086
$BENCH compare --algos "$ALGOS" --budget "$BUDGET" --seeds "$SEEDS" --out "$RUNS/compare" --x nfe \
  $CONTROLS $TUNE $MIXED $SETTINGS $EXTRA
t1=$(date +%s)
for k in $KS; do
  for d in $DS; do
    # shellcheck disable=SC2086
    $BENCH compare --algos treegrpo --budget "$BUDGET" --seeds "$KD_SEEDS" --out "$RUNS/kd/k${k}_d${d}" --no-report \
      $MIXED $SETTINGS $KD_EVAL --set algo.k="$k" --set algo.d="$d" $EXTRA
  done
done
$BENCH report "$RUNS/kd" --out "$RUNS/kd/report.pdf" --x nfe --baseline "${KD_BASELINE:-treegrpo k=3 d=3}" $MIXED_REPORT \
  --title "TreeGRPO k x d grid, budget $BUDGET"
t2=$(date +%s)
rm -rf "$OUT/compare_shapes_files" "$OUT/treegrpo_kd_grid_files"
cp "$RUNS/compare/report.pdf" "$OUT/compare_shapes.pdf"
cp -r "$RUNS/compare/report_files" "$OUT/compare_shapes_files"
cp "$RUNS/kd/report.pdf" "$OUT/treegrpo_kd_grid.pdf"
cp -r "$RUNS/kd/report_files" "$OUT/treegrpo_kd_grid_files"
rm -rf "$OUT/tuning"
tuned="{}"
if [ -d "$RUNS/compare/tuning" ]; then
  for d in "$RUNS/compare/tuning"/*/; do  # the tuned settings and the trials table of every study (small)
    a=$(basename "$d")
    mkdir -p "$OUT/tuning/$a"
    cp "$d/tuned.json" "$d/trials.csv" "$d/sweep.json" "$d/validation.jsonl" "$OUT/tuning/$a/" 2>/dev/null || true
  done
  tuned=$(python3 -c 'import json,pathlib,sys; print(json.dumps({p.parent.name: json.loads(p.read_text()).get("overrides") for p in sorted(pathlib.Path(sys.argv[1]).glob("*/tuned.json"))}))' "$OUT/tuning")
fi
cat > "$OUT/results.json" <<JSON
{"commit": "$commit", "budget": "$BUDGET", "seeds": $SEEDS, "kd_seeds": $KD_SEEDS, "settings": "$SETTINGS $EXTRA",
 "controls": "$CONTROLS", "tune": "$TUNE", "tuned": $tuned,
 "compare_wall_s": $((t1 - t0)), "kd_grid_wall_s": $((t2 - t1)), "machine": "$(nproc) CPU cores"}
JSON
echo "results: comparison $((t1 - t0)) s, k/d grid $((t2 - t1)) s (commit ${commit:0:12}) -> $OUT"
