#!/usr/bin/env bash
# The GPU device check (one H100/H200, no downloads, under 8 minutes): jaxflow vs transformers torch on a
# LLaVA-1.5-7B-shaped random model in bf16. Figures go to $OUT/gpu.json when $OUT is set (the device
# tool's folder), else benchmarks/results/gpu.json; extra arguments go to bench_gpu.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out="${OUT:-benchmarks/results}/gpu.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
timeout 460 python3 benchmarks/gpu/bench_gpu.py --out "$out" "$@"
rc=$?
[ -f "$out" ] && echo "figures: $out"
exit $rc
