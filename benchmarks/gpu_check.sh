#!/usr/bin/env bash
# One-GPU check (issue 9): tokenize throughput vs the ffmpeg decode limit, pre-training clips/s,
# MFU, fused attention, torch.compile, loader feeding and peak GPU memory. < 8 minutes on one GPU.
#   benchmarks/gpu_check.sh [--dry-run] [--out DIR]     (--dry-run: tiny sizes on the CPU)
# Prints one summary table and writes DIR/gpu.json (default ./bench-out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m benchmarks.gpu "$@"
