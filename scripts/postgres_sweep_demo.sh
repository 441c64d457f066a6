#!/usr/bin/env bash
# Two sweep workers share one Optuna study on a real PostgreSQL server.
#
# Starts a throw-away PostgreSQL cluster on 127.0.0.1 (Debian: apt-get install postgresql), runs two
# `bench sweep` workers at the same time against it (separate --out directories, as on two machines),
# prints the study's trials and checks that both workers ran trials and no trial number repeats, then
# stops the server and removes its data directory.
#
#   scripts/postgres_sweep_demo.sh            # TRIALS=6 BUDGET=1it PORT=55432 by default
#   KEEP=1 scripts/postgres_sweep_demo.sh     # leave the output directory for inspection
#
# Also runs the opt-in test: TREEBENCH_POSTGRES_URL=... pytest -m postgres tests/test_sweeps.py
set -euo pipefail

cd "$(dirname "$0")/.."
TRIALS=${TRIALS:-6}
BUDGET=${BUDGET:-1it}
PORT=${PORT:-55432}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ]; then
  echo "PostgreSQL server binaries not found: sudo apt-get install postgresql" >&2
  exit 2
fi
"$PY" -c "import optuna, psycopg" 2>/dev/null || {
  echo "missing Python packages: pip install -c constraints.txt -e '.[sweeps]'" >&2; exit 2; }

WORK=$(mktemp -d /tmp/treebench-pg.XXXXXX)
PGDATA="$WORK/pgdata"
# initdb and the server refuse to run as root: use the postgres system user then
AS=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || { echo "running as root needs the 'postgres' user (created by the package)" >&2; exit 2; }
  AS=(runuser -u postgres --)
  chown postgres "$WORK"
fi
cleanup() {
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null 2>&1 || true
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
}
trap cleanup EXIT

echo "== starting PostgreSQL ($("$PGBIN/postgres" --version)) on 127.0.0.1:$PORT"
"${AS[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >/dev/null
"${AS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $WORK" start >/dev/null
"${AS[@]}" "$PGBIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres treebench
URL="postgresql://postgres@127.0.0.1:$PORT/treebench"

echo "== two workers: bench sweep --storage $URL --study demo --trials $TRIALS"
run_worker() {
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 "$PY" -m bench.cli sweep --algo grpo --model tiny-random --space group_size \
    --trials "$TRIALS" --budget-per-trial "$BUDGET" --pruner none --study demo --storage "$URL" --out "$WORK/$1" \
    --set sampler.steps=3 eval.every=1 eval.num_prompts=2 train.prompts_per_iteration=1 >"$WORK/$1.log" 2>&1
}
t0=$(date +%s)
run_worker worker1 & P1=$!
run_worker worker2 & P2=$!
rc=0
wait $P1 || rc=$?
wait $P2 || rc=$?
echo "   both workers finished in $(( $(date +%s) - t0 )) s (exit status $rc)"
grep -h "bench sweep: study" "$WORK"/worker*.log | sed 's/; space:.*//; s/^/   /'
[ "$rc" = 0 ] || { tail -20 "$WORK"/worker*.log; exit 1; }

echo "== the study as stored in PostgreSQL"
"$PY" - "$URL" "$TRIALS" <<'EOF'
import sys
import optuna
from optuna.trial import TrialState
from sweeps.study import make_storage

url, target = sys.argv[1], int(sys.argv[2])
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage, _ = make_storage(url, None, "demo")
study = optuna.load_study(study_name="demo", storage=storage)
print(f"   {'trial':>5} {'state':<9} {'worker':<18} {'group_size':>10} {'eval/brightness':>16}  run_dir")
for t in study.trials:
    w = t.user_attrs.get("worker", {})
    v = f"{t.value:.6f}" if t.value is not None else "-"
    print(f"   {t.number:>5} {t.state.name:<9} {w.get('host', '?') + ':' + str(w.get('pid', '?')):<18} "
          f"{t.params.get('group_size', '-'):>10} {v:>16}  {t.user_attrs.get('run_dir', '')}")
numbers = [t.number for t in study.trials]
workers = {t.user_attrs["worker"]["pid"] for t in study.trials if t.state == TrialState.COMPLETE}
complete = sum(t.state == TrialState.COMPLETE for t in study.trials)
print(f"   {len(numbers)} trials, {complete} complete, distinct trial numbers: {len(set(numbers)) == len(numbers)}, "
      f"workers that ran trials: {len(workers)}")
assert len(set(numbers)) == len(numbers), "duplicate trial numbers"
assert complete >= target, f"expected {target} complete trials"
assert len(workers) == 2, "both workers should have run trials"
print("OK: two workers shared one PostgreSQL study")
EOF
