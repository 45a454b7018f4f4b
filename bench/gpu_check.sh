#!/usr/bin/env bash
# The GPU check in one device call (README "GPU check"):
#   make gpu-bundle     # here, once: .gpu-bundle/ with what the device image lacks
#   device run: carry [".gpu-bundle"], command `bash bench/gpu_check.sh`, timeout_s 480
# On the device: installs the bundle offline into /tmp/site, then bench/gpu_check.py runs the preflight (CUDA, bf16,
# nccl), the `gpu`-marked tests, and sft -> rm -> ppo on SmolLM2-135M- and ~1B-shaped random Llamas (LoRA, full,
# ZeRO-2 on one nccl rank), and writes gpu_check.json + gpu_check.md into $OUT. Exit status non-zero, naming the
# failing step, when anything fails.
# GPU_CHECK_DRY_RUN=1: the same steps on this machine's CPU with tiny sizes and .venv (no bundle; < 3 min).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu-check-out}
mkdir -p "$OUT"
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
  PY=${PY:-.venv/bin/python}
  export DS_ACCELERATOR=cpu
  exec "$PY" bench/gpu_check.py --dry-run --out "$OUT" "$@"
fi
PY=${PY:-python3}
export DS_ACCELERATOR=cuda DS_BUILD_OPS=0
BUNDLE=${GPU_BUNDLE_DIR:-.gpu-bundle}
SITE=/tmp/site
if ! ls "$BUNDLE"/*.whl >/dev/null 2>&1; then
  echo "FAILED step install: no wheels in $BUNDLE (run 'make gpu-bundle' here and carry [\".gpu-bundle\"])" >&2
  exit 2
fi
t0=$(date +%s)
# peft: the image's, unless older than the project needs (then the bundle's)
WHEELS=$(ls "$BUNDLE"/*.whl | grep -v '/peft-')
if ! "$PY" -c "import peft, sys; from packaging.version import Version as V; sys.exit(V(peft.__version__) < V('0.21'))"; then
  WHEELS="$WHEELS $(ls "$BUNDLE"/peft-*.whl)"
fi
# shellcheck disable=SC2086
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" $WHEELS || { echo "FAILED step install: wheels from $BUNDLE" >&2; exit 2; }
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
  --no-build-isolation --target "$SITE" "$BUNDLE"/deepspeed-*.tar.gz \
  || { echo "FAILED step install: deepspeed sdist (DS_BUILD_OPS=0)" >&2; exit 2; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
echo "bundle installed in $(( $(date +%s) - t0 )) s"
exec "$PY" bench/gpu_check.py --out "$OUT" "$@"
