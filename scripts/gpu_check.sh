#!/usr/bin/env bash
# GPU check: the CUDA tests and the training smoke run, in one go, logs kept.
#
#   bash scripts/gpu_check.sh            # from a clone of this repository, on a CUDA machine
#
# Needs python3 with torch, torchvision, numpy and pytest (tqdm and matplotlib if present;
# no tritonclient, OpenVINO, TensorRT or pycocoevalcap needed, no network). Steps:
#   1. machine.log: nvidia-smi, Python/torch/CUDA/cuDNN/NCCL versions, which optional
#      packages are importable;
#   2. pytest.log, pytest.xml: tests/unit/test_cuda.py (the CUDA paths, skipped without a
#      GPU), test_train_devices.py and test_train.py (CPU training figures, also on a GPU
#      machine); figures.log: the figures those tests record (loss differences CPU vs
#      CUDA, shares correct, feature agreement, NCCL version);
#   3. smoke.log (+ smoke_small_cnn.log, smoke_inception_v3.log): scripts/gpu_smoke.sh;
#   4. summary.log: both exit codes and times.
# It goes on to the smoke run when pytest fails, and exits non-zero if either failed.
# Seen on one H200 (2026-11-27, README "Seen on a GPU"): 174 s of tests, 263 s in all. Each step has a time limit
# (PYTEST_TIMEOUT, SMOKE_TIMEOUT seconds) so the whole stays under ~9 min.
#
# Knobs (environment): OUT (/tmp/gpu-check), PYTHON (python3), PYTEST_TIMEOUT (270),
# SMOKE_TIMEOUT (210), PYTEST_ARGS (extra pytest arguments), and gpu_smoke.sh's SCENES
# (2000), STEPS (50), BATCH (256), WORKERS (8), AMP (bf16).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-check}
PYTHON=${PYTHON:-python3}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-270}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-210}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Settings a user may have exported would change what the tests and the smoke run do.
unset CAPTIONER_DEVICE CAPTIONER_AMP CAPTIONER_WORKERS CAPTIONER_THREADS CAPTIONER_MODEL CAPTIONER_DATA
t0=$(date +%s)

echo "== machine ($(date -u +%FT%TZ))" | tee "$OUT/machine.log"
{
  nvidia-smi || echo "nvidia-smi failed (exit $?)"
  echo "nproc: $(nproc), memory: $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
  $PYTHON - <<'EOF'
import importlib.util, platform, sys
import numpy, torch, torchvision
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
if torch.cuda.is_available():
    print(f"NCCL {torch.cuda.nccl.version()}, nccl backend available: {torch.distributed.is_nccl_available()}")
for name in ("pytest", "tqdm", "matplotlib", "PIL", "onnx", "onnxruntime", "pycocoevalcap", "tritonclient", "openvino", "tensorrt"):
    print(f"  {name}: {'present' if importlib.util.find_spec(name) else 'absent'}")
EOF
} 2>&1 | tee -a "$OUT/machine.log"

echo "== pytest (limit ${PYTEST_TIMEOUT} s)" | tee "$OUT/pytest.log"
t1=$(date +%s)
# -v names each test before it runs (a hang shows where); faulthandler dumps every
# thread's stack when one test runs past 120 s; xunit1 is the junit family that keeps
# the record_property figures.
timeout -k 15 "$PYTEST_TIMEOUT" $PYTHON -m pytest -v -p no:cacheprovider -rsxf --durations=25 \
  -o faulthandler_timeout=120 -o junit_family=xunit1 --junitxml="$OUT/pytest.xml" ${PYTEST_ARGS:-} \
  tests/unit/test_cuda.py tests/unit/test_train_devices.py tests/unit/test_train.py 2>&1 | tee -a "$OUT/pytest.log"
pytest_rc=${PIPESTATUS[0]}
pytest_s=$(( $(date +%s) - t1 ))
[ "$pytest_rc" = 124 ] && echo "pytest stopped after ${PYTEST_TIMEOUT} s" | tee -a "$OUT/pytest.log"

$PYTHON - "$OUT/pytest.xml" <<'EOF' 2>&1 | tee "$OUT/figures.log"
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    sys.exit(f"no figures: {sys.argv[1]}: {e}")
for tc in root.iter("testcase"):
    outcome = next((c.tag for c in tc if c.tag in ("failure", "error", "skipped")), "passed")
    props = [(p.get("name"), p.get("value")) for p in tc.iter("property")]
    if props or outcome != "passed":
        print(f"{tc.get('name')} [{outcome}, {float(tc.get('time', 0)):.1f} s]")
        for name, value in props:
            print(f"    {name} = {value}")
EOF

echo "== scripts/gpu_smoke.sh (limit ${SMOKE_TIMEOUT} s)" | tee "$OUT/smoke.log"
t2=$(date +%s)
work=$(mktemp -d -t captioner-gpu-check.XXXXXX)
WORK="$work" timeout -k 15 "$SMOKE_TIMEOUT" bash scripts/gpu_smoke.sh 2>&1 | tee -a "$OUT/smoke.log"
smoke_rc=${PIPESTATUS[0]}
smoke_s=$(( $(date +%s) - t2 ))
[ "$smoke_rc" = 124 ] && echo "gpu_smoke.sh stopped after ${SMOKE_TIMEOUT} s" | tee -a "$OUT/smoke.log"
for run in small_cnn inception_v3; do
  # tqdm redraws its bars with carriage returns: keep one line per redraw, readable.
  [ -f "$work/$run.log" ] && tr '\r' '\n' < "$work/$run.log" | grep -v '^\s*$' > "$OUT/smoke_$run.log"
done
rm -rf "$work"  # checkpoints: ~0.4 GB per InceptionV3 epoch
echo "(removed $work)" | tee -a "$OUT/smoke.log"

{
  echo "== summary"
  echo "pytest: exit $pytest_rc in ${pytest_s} s ($(tail -n 3 "$OUT/pytest.log" | grep -Eo '[0-9]+ (passed|failed|skipped|deselected|errors?)' | paste -sd ' '))"
  echo "gpu_smoke.sh: exit $smoke_rc in ${smoke_s} s"
  echo "total: $(( $(date +%s) - t0 )) s; logs in $OUT"
} | tee "$OUT/summary.log"
[ "$pytest_rc" = 0 ] && [ "$smoke_rc" = 0 ]
