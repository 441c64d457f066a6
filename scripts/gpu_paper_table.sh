#!/usr/bin/env bash
# The TreeGRPO paper's time-per-iteration table on one GPU (docs/SCALE.md). Run from the repository root
# on the GPU machine; results go to $OUT (default ./gpu_out): gpu.txt, versions.txt, smoke.log,
# paper_table.log, paper_table.json, profile.json/.log (a measured cost profile) and validate_cost.json/.log
# (modeled vs measured seconds per iteration with it; docs/COST.md).
#
#   OUT=$OUT PROMPTS=2 ITERS=2 bash scripts/gpu_paper_table.sh
#
# Pure-Python packages the GPU image may lack (diffusers, peft, importlib_metadata) are installed from a
# carried ./wheels directory when present (prepare it here with:
#   pip download --no-deps -d wheels diffusers==0.42.1 peft==0.21.2 importlib_metadata
# and pass carry=["wheels"]).
set -euo pipefail
OUT=${OUT:-./gpu_out}
PY=${PYTHON:-python3}
PROMPTS=${PROMPTS:-2}
ITERS=${ITERS:-2}
MODEL=${MODEL:-sd3.5-medium-random}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d wheels ]; then
  "$PY" -m pip install -q --no-deps --no-index --find-links wheels --target .gpu_site wheels/*.whl
  export PYTHONPATH="$PWD/.gpu_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" - <<'EOF' | tee "$OUT/versions.txt"
import importlib
for m in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "yaml", "PIL", "tqdm"):
    mod = importlib.import_module(m)
    print(m, getattr(mod, "__version__", "?"))
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
# 1. smoke: the same code path (SD3 pipeline classes, LoRA, bf16, checkpointing) at tiny sizes (seconds);
#    stops here if the environment is broken
"$PY" -m bench.cost.perf paper-table --model sd3.5-medium-random-reduced --prompts 1 --iterations 1 --warmup 0 \
  --set sampler.steps=4 --device cuda --out "$OUT/smoke.json" > "$OUT/smoke.log" 2>&1 \
  || { tail -40 "$OUT/smoke.log"; exit 1; }
tail -5 "$OUT/smoke.log"
# 2. the table: SD3.5-medium architecture (random weights), 512 px, T=10, CFG 4.5, noise 0.7, shift 3,
#    LoRA r32 bf16, micro-batch 16 rows with gradient checkpointing; DanceGRPO G=12 f=0.6, MixGRPO G=12 w=4,
#    TreeGRPO k=3 d=3; 1 warm-up + ITERS timed iterations each
"$PY" -m bench.cost.perf paper-table --model "$MODEL" --prompts "$PROMPTS" --iterations "$ITERS" --warmup 1 \
  --device cuda --out "$OUT/paper_table.json" 2>&1 | tee "$OUT/paper_table.log" | grep -v "^  \|^treebench"
# 3. the cost model (docs/COST.md): measure a profile of the same model as the table runs it (LoRA r32, bf16,
#    forward 1..64 rows, forward+backward with/without checkpointing 1..16, VAE, text encoders, reward,
#    optimizer), then modeled vs measured seconds per iteration at the table's setting with that profile
"$PY" -m bench.cost.perf profile --model "$MODEL" --device cuda --name "$MODEL-$(nvidia-smi --query-gpu=name \
  --format=csv,noheader | head -1 | tr ' ' '-')" --repeats 5 --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1 \
  || { tail -20 "$OUT/profile.log"; exit 1; }
"$PY" -m bench.cost.perf validate-cost --model "$MODEL" --profile "$OUT/profile.json" --preset treegrpo-paper \
  --algos dancegrpo,mixgrpo,treegrpo --iterations "$ITERS" --set train.prompts_per_iteration="$PROMPTS" \
  --set train.micro_batch=16 --set model.gradient_checkpointing=true --out "$OUT/validate_cost.json" 2>&1 \
  | tee "$OUT/validate_cost.log" | grep -v "^  \|^treebench"
