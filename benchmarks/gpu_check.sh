#!/bin/bash
# The checks that need a GPU, in one run of a few minutes on a machine with CUDA, PyTorch and
# vaediag's dependencies installed (vaediag itself is taken from this checkout):
#   1. the CUDA tests (device synchronisations per step: one with the blocking read, none with
#      read_before_step=False; the same with float16's GradScaler; Lightning's "16-mixed");
#   2. benchmarks/overhead.py on the GPU at 32 and 64 px: step ratios, the Monitor's own CPU
#      time per step and per probe, warm calls, synchronisations per step;
#   3. the same at 32 px with read_before_step=False (what `vaediag train` does with
#      train.on_nonfinite = "continue").
# Each part's output goes to OUTDIR (default gpu-check/) as it runs; a part that fails is
# reported and the next one still runs; the exit status is that of the first failure (1 at
# once when PyTorch sees no CUDA device).
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        (PYTHON=python3 by default)
set -u
out=${1:-gpu-check}
python=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

part() {  # name command...: run one part, its output to $out/name.txt and to the terminal
  local name=$1
  shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

part environment "$python" -c "import sys, torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'); \
sys.exit(0 if torch.cuda.is_available() else 1)"
[ "$status" -eq 0 ] || exit "$status"  # nothing below means anything without a GPU
part cuda-tests "$python" -m pytest -q -rs -p no:cacheprovider tests/test_monitor.py \
  -k device_synchronisations
part mixed-precision "$python" -m pytest -q -rs -p no:cacheprovider tests/test_mixed_precision.py \
  tests/test_lightning.py -k "synchronisation or gpu"
part overhead "$python" benchmarks/overhead.py --device cuda --resolutions 32 64 --steps 1200 \
  --evals 1
part overhead-read-after-step "$python" benchmarks/overhead.py --device cuda --resolutions 32 \
  --steps 1200 --evals 1 --read-after-step
exit $status
