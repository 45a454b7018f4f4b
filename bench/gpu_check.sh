#!/usr/bin/env bash
# The GPU check (README "GPU check"), on any machine with a CUDA GPU:
#   with the project installed there (`make install`):   bash bench/gpu_check.sh   (uses .venv, or set PY)
#   without network there: `make gpu-bundle` on a machine with network writes .gpu-bundle/ (what a Python 3.12
#   environment with torch, transformers, peft and accelerate lacks); copy the repository with .gpu-bundle/
#   over and run `bash bench/gpu_check.sh`: it installs the bundle offline into /tmp/site.
# Then bench/gpu_check.py runs the preflight (CUDA, bf16, nccl), the `gpu`-marked tests, and sft -> rm -> ppo on
# SmolLM2-135M- and ~1B-shaped random Llamas (LoRA, full, ZeRO-2 on one nccl rank), and writes gpu_check.json +
# gpu_check.md into $OUT (default outputs/gpu-check-out). Exit status non-zero, naming the failing step, when
# anything fails.
# GPU_CHECK_DRY_RUN=1: the same steps on a CPU with tiny sizes and .venv (no bundle; < 3 min on 2 cores).
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
export DS_ACCELERATOR=cuda DS_BUILD_OPS=0
BUNDLE=${GPU_BUNDLE_DIR:-.gpu-bundle}
SITE=/tmp/site
if ! ls "$BUNDLE"/*.whl >/dev/null 2>&1; then
  # no bundle: the project's own environment, installed on this machine
  PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
  if ! "$PY" -c "import deepspeed, peft, pydantic, pytest" 2>/dev/null; then
    echo "FAILED step install: no wheels in $BUNDLE and $PY lacks the project's packages (run 'make install'" \
         "here, or 'make gpu-bundle' on a machine with network and copy .gpu-bundle/ here)" >&2
    exit 2
  fi
  echo "no bundle in $BUNDLE: using the packages of $PY"
  exec "$PY" bench/gpu_check.py --out "$OUT" "$@"
fi
PY=${PY:-python3}
t0=$(date +%s)
# peft: the environment's, unless older than the project needs (then the bundle's)
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
