#!/usr/bin/env bash
# GPU smoke run: does training work on this CUDA machine, and how fast?
#
#   bash scripts/gpu_smoke.sh            # from a clone of this repository, on a CUDA machine
#
# Needs only python3 with torch, torchvision and numpy (Pillow comes with torchvision):
# no venv, no network, no serving packages. It writes 2,000 shapes-v1 scenes, trains
# small_cnn for 1 epoch with --device cuda --amp bf16, then runs 50 end-to-end
# InceptionV3 steps (random weights: speed only), and prints img/s and peak GPU memory
# per epoch. Everything goes to $WORK (default: a new temporary folder).
#
# Knobs (environment): PYTHON (python3), DEVICE (cuda), AMP (bf16), SCENES (2000),
# STEPS (50), BATCH (256), WORKERS (8), WORK. DEVICE=cpu AMP=off SCENES=64 STEPS=2
# BATCH=8 runs the same path on a CPU in a minute or two.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-bf16}
SCENES=${SCENES:-2000}
STEPS=${STEPS:-50}
BATCH=${BATCH:-256}
WORKERS=${WORKERS:-8}
WORK=${WORK:-$(mktemp -d -t captioner-gpu-smoke.XXXXXX)}
export PYTHONUNBUFFERED=1

echo "== machine"
$PYTHON - <<'EOF'
import numpy, torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
EOF

echo "== data: $SCENES training scenes, 200 validation -> $WORK/data"
$PYTHON -m captioner data --out "$WORK/data" --train "$SCENES" --val 200 --test 0 >/dev/null

common=(--data "$WORK/data" --device "$DEVICE" --amp "$AMP" --batch-size "$BATCH" --workers "$WORKERS")

echo "== small_cnn, 64 px, 1 epoch"
$PYTHON -m captioner train "${common[@]}" --out "$WORK/small_cnn" --epochs 1 --val-decode 200 \
  2>&1 | tee "$WORK/small_cnn.log" | grep -E '^(world size|step 1|epoch [0-9]+:|\{)'

echo "== inception_v3, 299 px, end to end, $STEPS steps"
per_epoch=$(( (SCENES + BATCH - 1) / BATCH ))
epochs=$(( (STEPS + per_epoch - 1) / per_epoch ))
$PYTHON -m captioner train "${common[@]}" --out "$WORK/inception_v3" --backbone inception_v3 \
  --epochs "$epochs" --max-steps "$STEPS" --val-decode 0 \
  2>&1 | tee "$WORK/inception_v3.log" | grep -E '^(world size|step 1|epoch [0-9]+:|\{)'

echo "== summary (the first epoch includes cuDNN autotuning)"
$PYTHON - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
for run in ("small_cnn", "inception_v3"):
    for h in json.loads((Path(sys.argv[1]) / run / "history.json").read_text()):
        mem = f", peak {h['peak_mem_gib']} GiB" if "peak_mem_gib" in h else ""
        print(f"{run:13s} epoch {h['epoch']}: {h['steps']} steps, {h['train_img_per_s']:.0f} img/s{mem}, "
              f"train loss {h['train_loss']:.3f}, val loss {h['val_loss']:.3f}")
EOF
echo "logs and checkpoints: $WORK"
