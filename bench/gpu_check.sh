#!/usr/bin/env bash
# GPU readiness check of the clara project (attention kernel, training step, decode) on one H100/H200.
#
# Run from the project checkout root (the folder with kernels/, model.py, bench/):
#     bash bench/gpu_check.sh                  # everything: under 8 min wall clock (440 s budget + 25 s hard stop)
#     OUT=/some/dir bash bench/gpu_check.sh    # results folder (default ./gpu_check_out)
#     bash bench/gpu_check.sh --parts env p a b    # a subset of: env cold p a b c d e
#     bash bench/gpu_check.sh --dry-run        # CPU only: tiny shapes, TRITON_INTERPRET=1 (tests/test_gpu_check.py)
#     BUDGET=300 bash bench/gpu_check.sh       # seconds for all parts (default 440)
# Exit status 0: every part ran (or spent its time budget) without an error and the correctness checks passed.
#
# Writes $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/gpu_check.log. Needs torch (CUDA build), triton,
# numpy, safetensors, tokenizers, pytest: the ones the GPU machine has; nothing is installed here.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-gpu_check_out}"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"   # absolute: it is written from the checkout root below
cd "$HERE/.."                                  # the checkout root (this script lives in its bench/)
BUDGET="${BUDGET:-440}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ ! -f kernels/flash.py ]; then
  echo "gpu_check.sh: expected the project checkout one level above $HERE (no kernels/flash.py in $(pwd))" >&2
  exit 2
fi
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# A private Triton cache, so that first-call times include compilation (and nothing stale is reused).
# (outside $OUT: it holds hundreds of MB of IR that nobody needs back)
if [ -z "${TRITON_CACHE_DIR:-}" ]; then
  export TRITON_CACHE_DIR="$(mktemp -d -t clara-gpu-check-triton.XXXXXX)"; OWN_CACHE=1
else
  OWN_CACHE=0
fi
"$PY" - <<'EOF' 2>&1 | tee "$OUT/gpu_check.log"
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF
# hard stop a little after the internal budget (each part also has its own alarm)
timeout -k 15 "$(( ${BUDGET%.*} + 25 ))" "$PY" "$HERE/gpu_check.py" --root . --out "$OUT" --budget "$BUDGET" "$@" \
  2>&1 | tee -a "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
[ "$OWN_CACHE" = 1 ] && rm -rf "$TRITON_CACHE_DIR"
echo "gpu_check.sh: exit $rc; results in $OUT/gpu_check.json and $OUT/gpu_check.md"
exit "$rc"
