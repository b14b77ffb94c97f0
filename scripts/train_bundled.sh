#!/usr/bin/env bash
# Train the bundled tiny FAST3DIS checkpoint on one GPU in under 9.5 minutes of wall time
# (scene rendering ~40 s + TIME_BUDGET 440 s of training loop + final validation/export).
#
#   scripts/train_bundled.sh OUT_DIR [extra fast3dis-train args...]
#   scripts/train_bundled.sh OUT_DIR --init fast3dis_ros/assets/fast3dis_tiny   # continue from run 1
#
# --init loads a checkpoint folder (also the fp16 export) into the fp32 training model (weights are cast
# to fp32; optimizer/LR schedule start fresh, model config comes from the checkpoint's config.json).
#
# Tiny DA3-style backbone + instance head, trained end to end (--full-finetune: instance set losses +
# scale-invariant depth / pose / intrinsics losses) on procedural scenes rendered on the GPU by
# fast3dis_ros.data.synthetic at 196x140 (3 cameras x 2 frames = 6 views per sample).
# The training loop stops within TIME_BUDGET seconds (default 440): the step time is measured after 10
# warm-up steps and --steps (an upper bound, 12000) is refitted at steps 30/80/200/500/1000/2000,
# refitting the LR and overlap schedules. Scene rendering comes on top (GPU renderer; set
# RENDER_DEVICE=cpu to render with GEN_WORKERS CPU processes instead).
# Env overrides: TIME_BUDGET, SCENES (512), WORKERS (DataLoader, 8), RENDER_DEVICE, GEN_WORKERS.
#
# Writes:
#   OUT_DIR/train/    fp32 checkpoint + train_state.pt (exact resume), train_log.jsonl, val_log.jsonl,
#                     loss_curve.png, train_summary.json
#   OUT_DIR/bundled/  the lean inference checkpoint to ship: config.json + model.safetensors (fp16, ~4 MB)
# and prints the final train / validation losses.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: scripts/train_bundled.sh OUT_DIR [extra fast3dis-train args]}"
shift || true
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
TIME_BUDGET="${TIME_BUDGET:-440}"
RENDER_DEVICE="${RENDER_DEVICE:-cuda}"   # cpu: render with GEN_WORKERS processes instead
GEN_WORKERS="${GEN_WORKERS:-12}"
SCENES="${SCENES:-512}"
WORKERS="${WORKERS:-8}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

"$PY" -c "import torch; assert torch.cuda.is_available(), 'needs a CUDA GPU'; print('[train_bundled]', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

"$PY" -m fast3dis_ros.train.train \
  --synthetic "$SCENES" --scene-seed 1000 --scene-frames 6 --objects 10 --render-device "$RENDER_DEVICE" --gen-workers "$GEN_WORKERS" \
  --val-seeds 900000-900015 --eval-every 2000 \
  --size tiny --full-finetune \
  --cameras 3 --frames 2 --height 140 --width 196 \
  --batch-size 16 --accum-steps 1 --lr 1e-3 --warmup-steps 150 --weight-decay 0.05 --grad-clip 1.0 \
  --steps 12000 --time-budget "$TIME_BUDGET" \
  --amp bf16 --device cuda --num-workers "$WORKERS" \
  --seed 0 --log-every 250 --save-every 2000 --no-progress \
  --out "$OUT/train" --export "$OUT/bundled" --export-dtype fp16 \
  "$@" 2>&1 | tee "$OUT/train_stdout.log"

ls -la "$OUT/bundled"
