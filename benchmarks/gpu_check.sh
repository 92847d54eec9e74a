#!/usr/bin/env bash
# The GPU checks of issue #4 as one short script, for a machine with CUDA (a few minutes):
# the device tests, then benchmarks 1, 2 and 6 on the GPU, each printing its markdown table
# and JSON (also written under $OUT, default runs/bench/gpu).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, venv active
set -euo pipefail
OUT=${OUT:-runs/bench/gpu}
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest-gpu.txt"
python benchmarks/inner_loop.py --device cuda --sizes 1000 10000 --alternatives \
  --procs-items 0 --json "$OUT/inner_loop.json" | tee "$OUT/inner_loop.md"
python benchmarks/cold_start.py --device cuda --json "$OUT/cold_start.json" | tee "$OUT/cold_start.md"
python benchmarks/training.py --device cuda --json "$OUT/training.json" | tee "$OUT/training.md"
