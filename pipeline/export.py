"""``python -m pipeline export RUN STAGE --gguf [--quant q8_0|f16|f32]``: a stage's model as one GGUF file.

The file is what llama.cpp-based tools (llama.cpp, Ollama, LM Studio) load, and what transformers reads
back with ``from_pretrained(folder, gguf_file=...)`` (the path the demo uses for SmolLM2's GGUF). It is
written with llama.cpp's own Python package, ``gguf`` (``GGUFWriter`` for the file format,
``TensorNameMap`` for the tensor names, ``SpecialVocab`` for merges / special ids / chat template,
``gguf.quants`` for Q8_0); what this module adds is the Llama-architecture glue of llama.cpp's
``convert_hf_to_gguf.py``: which hyper-parameters go under which key, the rotary permutation of the
query/key rows llama.cpp expects, and the token list with its token types.

Scope: Llama-architecture causal LMs (``LlamaForCausalLM``: Llama 2/3 without rope scaling, SmolLM,
the tiny test model) with a byte-level BPE tokenizer. Anything else is refused with the reason. The
input is the stage's merged ``model/`` (LoRA stages save one, DESIGN §1); the output defaults to
``<stage>/export/<run>-<stage>.<quant>.gguf``.

Quantisation: ``f32`` (exact), ``f16`` (2-D weights in half precision), ``q8_0`` (2-D weights whose rows
divide into blocks of 32 in llama.cpp's 8-bit blocks, others f16; norms always f32).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError
from .hub import stage_folder
from .manifest import read_manifest

QUANTS = ("q8_0", "f16", "f32")
# a tokenizer.json pre-tokenizer -> llama.cpp's name for it (tokenizer.ggml.pre)
_PRE_TOKENIZERS = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}


def _pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = tuple(p.get("type") for p in parts or [])
    if kinds not in _PRE_TOKENIZERS or (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise ConfigError(f"GGUF export: tokenizer {(tokenizer_json.get('model') or {}).get('type')} with "
                          f"pre-tokenizer {kinds} is not supported (byte-level BPE only)")
    return _PRE_TOKENIZERS[kinds]


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The Llama hyper-parameters of an HF config.json, or a ConfigError saying why it cannot export."""
    if config.get("model_type") != "llama" or config.get("architectures") not in (None, ["LlamaForCausalLM"]):
        raise ConfigError(f"GGUF export supports Llama-architecture causal LMs; this model is "
                          f"{config.get('model_type')} {config.get('architectures')}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export: rope type {rope.get('rope_type')!r} is not supported (default only)")
    heads = config["num_attention_heads"]
    return {
        "vocab": config["vocab_size"], "context": config.get("max_position_embeddings", 2048),
        "hidden": config["hidden_size"], "layers": config["num_hidden_layers"], "ffn": config["intermediate_size"],
        "heads": heads, "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "rope_theta": float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        "eps": float(config.get("rms_norm_eps", 1e-6)), "tied": bool(config.get("tie_word_embeddings", False)),
    }


def _rope_permute(weight: Any, heads: int) -> Any:
    """llama.cpp's layout of the q/k projection rows (its converter's ``permute``): per head, the two
    rotary halves interleaved. transformers' GGUF loader undoes exactly this."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _tokens(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int]]:
    """The token strings by id and their llama.cpp token types (ids past the tokenizer: unused pads)."""
    import gguf

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    if max(by_id) >= n_vocab:
        raise ConfigError(f"GGUF export: the tokenizer has ids up to {max(by_id)}, the model {n_vocab} embeddings")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def write_gguf(model_dir: Path, path: Path, quant: str = "q8_0", name: str = "model") -> Path:
    """Write the HF Llama model in ``model_dir`` as one GGUF file at ``path`` (see the module doc)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant!r}: one of {', '.join(QUANTS)}")
    config = json.loads((model_dir / "config.json").read_text())
    hp = _hparams(config)
    pre = _pre_tokenizer_name(json.loads((model_dir / "tokenizer.json").read_text()))
    tokens, types = _tokens(model_dir, hp["vocab"])
    weight_files = sorted(model_dir.glob("*.safetensors"))
    if not weight_files:
        raise ConfigError(f"GGUF export: no safetensors weights in {model_dir}")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_vocab_size(hp["vocab"])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=hp["vocab"]).add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["layers"])
    for file in weight_files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                if key.endswith("rotary_emb.inv_freq") or (hp["tied"] and key == "lm_head.weight"):
                    continue
                data = weights.get_tensor(key).float().numpy()
                if key.endswith("q_proj.weight"):
                    data = _rope_permute(data, hp["heads"])
                elif key.endswith("k_proj.weight"):
                    data = _rope_permute(data, hp["kv_heads"])
                new_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new_name is None:
                    raise ConfigError(f"GGUF export: no GGUF name for tensor {key!r} of a Llama model")
                if data.ndim == 1 or quant == "f32":
                    writer.add_tensor(new_name, data.astype(np.float32))
                elif quant == "q8_0" and data.shape[-1] % 32 == 0:
                    qtype = gguf.GGMLQuantizationType.Q8_0
                    writer.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
                else:
                    writer.add_tensor(new_name, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
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
