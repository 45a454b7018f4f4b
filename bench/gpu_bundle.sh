#!/usr/bin/env bash
# make gpu-bundle: for a GPU machine without network, the packages bench/gpu_check.sh needs beyond a Python 3.12
# environment with torch, transformers, peft and accelerate, as files pip can install offline there (x86-64
# manylinux; README "GPU check"). Written into .gpu-bundle/ (git-ignored); copy it to the GPU machine with the
# repository. Versions are this project's .venv's, so the GPU runs the code as tested here.
#
# Needed there (assumed present: torch, transformers, peft, accelerate, tokenizers, safetensors, pyyaml, pandas):
#   pydantic + pydantic-core + annotated-types + typing-inspection + typing-extensions   (pipeline/config.py)
#   deepspeed (an sdist: installs with DS_BUILD_OPS=0 and --no-build-isolation without compiling; no JIT op is
#     built by the ZeRO-2 runs: their optimizer is torch's AdamW, their collectives torch.distributed's, and
#     the check fails if anything lands in its TORCH_EXTENSIONS_DIR) + hjson (its one dependency the image lacks)
#   bitsandbytes (QLoRA test; manylinux wheel with its CUDA 13.0 library, ~43 MB: the largest file)
#   trl + datasets + dill + multiprocess (project dependencies; nothing in the check imports them)
#   peft (gpu_check.sh installs this one only if the GPU environment's is older than the project needs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${GPU_BUNDLE_DIR:-.gpu-bundle}
PYVER=${GPU_PYTHON_VERSION:-3.12}
ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
WHEELS=()
for pkg in pydantic pydantic_core annotated-types typing-inspection typing_extensions hjson bitsandbytes trl datasets \
           dill multiprocess peft; do
  WHEELS+=("$pkg==$(ver "$pkg")")
done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST.tmp" "${WHEELS[@]}"
# deepspeed publishes no wheel: its sdist, installed there with DS_BUILD_OPS=0 (no compiler run; checked here)
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: --no-build-isolation \
  -d "$DEST.tmp" "deepspeed==$(ver deepspeed)"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
ls -l "$DEST" | awk 'NR>1 {printf "  %10d  %s\n", $5, $9}'
echo "gpu bundle: $(ls "$DEST" | wc -l) files, $(du -sh "$DEST" | cut -f1) in $DEST (copy it to the GPU machine with the repository)"
