#!/usr/bin/env bash
# Creates .venv and installs treebench with every extra. torch is installed FIRST and pinned, and
# constraints.txt is passed to every later pip call, so no other torch build is ever pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q torch==2.13.0
"${PIP[@]}" install -q -c constraints.txt -e ".[rewards,sweeps,reports,trackers,cluster,dev]"
# Reward packages whose metadata pins stale versions: installed without their dependencies (STACK.md).
"${PIP[@]}" install -q -c constraints.txt --no-deps hpsv2x==1.2.0 image-reward==1.5
# Every process of this venv (the accelerate CLI too) gets the torchvision-on-CPU-torch import fix.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo 'import bench._torchvision_fix as _tvfix; _tvfix.install()' > "$site/treebench_torchvision_fix.pth"
.venv/bin/python -c 'import bench, torch; print("treebench", bench.__version__, "torch", torch.__version__)'
