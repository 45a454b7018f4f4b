"""A model's shape for the memory planner, without loading weights: ``ModelDims`` (hidden size, layers, heads,
vocabulary, ...) of the run's base model or any folder / hub name (``model_dims``), and the parameters a tuning
method trains (``trainable_params``). Read from a folder's config, the local HF cache, a table of well-known
models, a GGUF header or the hub (unless offline); no torch."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from pipeline.config import RunConfig, TuningConfig, resolve_path
from pipeline.paths import output_path

# Well-known hub models, so a planner run needs neither the network nor a gated-model token.
# Values are those of each model's config.json.
_KNOWN_MODELS: list[tuple[str, dict[str, Any]]] = [
    (r"llama-?3(\.\d)?-8b", dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                 vocab_size=128256, num_attention_heads=32, num_key_value_heads=8,
                                 tie_word_embeddings=False)),
    (r"llama-?3(\.\d)?-70b", dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                  vocab_size=128256, num_attention_heads=64, num_key_value_heads=8,
                                  tie_word_embeddings=False)),
    (r"llama-?3\.2-1b", dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, vocab_size=128256,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                             tie_word_embeddings=True)),
    (r"llama-?3\.2-3b", dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, vocab_size=128256,
                             num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                             tie_word_embeddings=True)),
    (r"llama-2-7b", dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, vocab_size=32000,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)),
    (r"llama-2-13b", dict(hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, vocab_size=32000,
                          num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False)),
    (r"llama-2-70b", dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, vocab_size=32000,
                          num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)),
    (r"mistral-7b", dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=32000,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
]

# Linear projections of a Llama-style layer by their usual module names: (in_features, out_features)
# as functions of the model dims. Aliases cover Mistral/Qwen/Gemma, which use the same names.
_LINEAR_SHAPES: dict[str, Callable[["ModelDims"], tuple[int, int]]] = {
    "q_proj": lambda d: (d.hidden, d.heads * d.head_dim),
    "k_proj": lambda d: (d.hidden, d.kv_heads * d.head_dim),
    "v_proj": lambda d: (d.hidden, d.kv_heads * d.head_dim),
    "o_proj": lambda d: (d.heads * d.head_dim, d.hidden),
    "gate_proj": lambda d: (d.hidden, d.intermediate),
    "up_proj": lambda d: (d.hidden, d.intermediate),
    "down_proj": lambda d: (d.intermediate, d.hidden),
}


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The architecture numbers the planner needs (Llama-style decoder)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    experts: int = 1  # MoE: MLP copies per layer (router weights added separately)
    source: str = "config"

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], source: str) -> "ModelDims":
        """From a transformers config dict (also multimodal ones with a ``text_config``)."""
        if "text_config" in config and isinstance(config["text_config"], dict) and "hidden_size" not in config:
            config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", False)}

        def first(*names: str, default: Any = None) -> Any:
            for name in names:
                if config.get(name) is not None:
                    return config[name]
            if default is None:
                raise ValueError(f"model config ({source}) has none of {names}; pass param_count instead")
            return default

        hidden = int(first("hidden_size", "n_embd", "d_model"))
        heads = int(first("num_attention_heads", "n_head", "num_heads"))
        return cls(
            hidden=hidden,
            layers=int(first("num_hidden_layers", "n_layer", "num_layers")),
            intermediate=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
            vocab=int(first("vocab_size")),
            heads=heads,
            kv_heads=int(first("num_key_value_heads", "num_kv_heads", default=heads)),
            head_dim=int(first("head_dim", default=hidden // heads)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            experts=int(first("num_local_experts", "num_experts", "n_routed_experts", default=1)),
            source=source,
        )

    @classmethod
    def from_param_count(cls, param_count: int) -> "ModelDims":
        """Plausible Llama-like dims for a bare parameter count (used when no config is readable).

        Assumes head_dim 128, layers ~ hidden / 128, intermediate 3.5 x hidden, vocab 32000, so that
        12-ish x layers x hidden^2 + embeddings matches the count; only KV cache, activations and LoRA
        sizes depend on this guess, never the weight/gradient/optimizer bytes.
        """
        vocab = 32000
        hidden = 128
        while True:  # grow until the model built from these dims reaches the count
            layers = max(1, hidden // 128)
            dims = cls(hidden, layers, int(3.5 * hidden), vocab, hidden // 128, hidden // 128, 128,
                       source=f"guessed from param_count={param_count:,}")
            if dims.causal_lm_params() >= param_count or hidden > 65536:
                return dims
            hidden += 128

    def layer_params(self) -> int:
        """Parameters of one decoder layer (no biases: Llama/Mistral have none)."""
        attn = sum(math.prod(_LINEAR_SHAPES[n](self)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        mlp = 3 * self.hidden * self.intermediate * self.experts
        router = self.hidden * self.experts if self.experts > 1 else 0
        return attn + mlp + router + 2 * self.hidden  # two RMSNorm weights

    def causal_lm_params(self) -> int:
        """Embeddings + layers + final norm + LM head (shared with embeddings when tied)."""
        embed = self.vocab * self.hidden
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return embed + self.layers * self.layer_params() + self.hidden + head

    def seq_cls_params(self, num_labels: int = 1) -> int:
        """A reward model / critic: the LM head replaced by a ``hidden -> num_labels`` score head."""
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.causal_lm_params() - head + self.hidden * num_labels


def _config_dict_from_folder(folder: Path) -> dict[str, Any] | None:
    """A folder's config through AutoConfig (class defaults filled in), else its raw config.json."""
    if not (folder / "config.json").exists():
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder)).to_dict()
    except Exception:  # custom architectures without trust_remote_code: the raw JSON has the numbers
        return json.loads((folder / "config.json").read_text())


def _known_model(name: str) -> dict[str, Any] | None:
    lowered = name.lower()
    for pattern, dims in _KNOWN_MODELS:
        if re.search(pattern, lowered):
            return dims
    return None


def model_dims(cfg: RunConfig, param_count: int | None = None) -> ModelDims:
    """Dims of the run's base model, without downloading weights.

    tiny: ``cfg.model.tiny``; local: the folder's config; hub: the local HF cache, then a table of
    well-known models, then the hub itself (unless HF_HUB_OFFLINE); gguf: the cached converted
    folder. Where none is available, ``param_count`` gives guessed dims; without it, an error.
    """
    model = cfg.model
    if model.source == "tiny":
        t = model.tiny
        return ModelDims(t.hidden_size, t.num_layers, t.intermediate_size, t.vocab_size, t.num_heads,
                         t.num_kv_heads, t.hidden_size // t.num_heads, tie_embeddings=False, source="model.tiny")
    config: dict[str, Any] | None = None
    where = model.source
    if model.source == "local":
        config = _config_dict_from_folder(resolve_path(model.path))
        where = f"local folder {model.path}"
    elif model.source == "gguf":
        from pipeline.models import _cache_key  # the converted folder's name (models.prepare_base)

        folder = output_path(model.cache_dir) / f"gguf-{_cache_key(model)}"
        config = _config_dict_from_folder(folder) if (folder / "READY").exists() else None
        where = f"converted GGUF cache {folder}"
        if config is None:  # not converted yet: the GGUF header has the numbers
            config = _gguf_header_config(model)
            where = f"GGUF header of {model.gguf_file}"
    elif model.source == "hub":
        where = f"hub model {model.path}"
        config = _hub_config(model.path, model.revision, model.trust_remote_code)
    if config is not None:
        dims = ModelDims.from_config_dict(config, where)
        if param_count is None:
            return dims
        return dataclasses.replace(dims, source=f"{where}; param_count={param_count:,} given")
    if param_count is not None:
        return ModelDims.from_param_count(param_count)
    raise ValueError(
        f"cannot read the model config of {where} (not cached, not a well-known model, offline); "
        "pass param_count= to the planner, or point model.path at a folder with its config.json"
    )


def _gguf_header_config(model: Any) -> dict[str, Any] | None:
    """Architecture numbers from a GGUF file's metadata (reads the header, not the tensors)."""
    try:
        import gguf

        from pipeline.models import gguf_folder

        file = gguf_folder(model) / model.gguf_file
        if not file.exists():
            return None
        reader = gguf.GGUFReader(str(file))
    except Exception:  # package missing, file unreadable: the caller asks for param_count
        return None

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    if not arch or value(f"{arch}.embedding_length") is None:
        return None
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "hidden_size": value(f"{arch}.embedding_length"),
        "num_hidden_layers": value(f"{arch}.block_count"),
        "intermediate_size": value(f"{arch}.feed_forward_length"),
        "num_attention_heads": value(f"{arch}.attention.head_count"),
        "num_key_value_heads": value(f"{arch}.attention.head_count_kv"),
        "head_dim": value(f"{arch}.attention.key_length"),
        "vocab_size": value(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None),
        "num_local_experts": value(f"{arch}.expert_count"),
        # GGUF stores no separate output matrix when the LM head shares the embeddings.
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }


def _hub_config(name: str, revision: str | None, trust_remote_code: bool) -> dict[str, Any] | None:
    """Hub config: HF cache first (no network), then the built-in table, then the hub if online."""
    try:
        from transformers import AutoConfig
    except ImportError:
        AutoConfig = None  # type: ignore[assignment]
    if AutoConfig is not None:
        try:
            return AutoConfig.from_pretrained(
                name, revision=revision, local_files_only=True, trust_remote_code=trust_remote_code
            ).to_dict()
        except Exception:  # not in the local cache
            pass
    known = _known_model(name)
    if known is not None:
        return known
    if AutoConfig is not None and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "TRUE", "yes"):
        try:
            return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code).to_dict()
        except Exception:  # offline, gated, or misspelt: the caller explains
            return None
    return None


# ---------------------------------------------------------------------------------------- trainables
def _matches_targets(name: str, targets: list[str] | str) -> bool:
    if targets == "all-linear":
        return True
    if isinstance(targets, str):  # PEFT treats a string as a regex over module names
        return re.fullmatch(targets, name) is not None or re.search(targets, name) is not None
    return name in targets


def trainable_params(dims: ModelDims, tuning: TuningConfig, total: int, kind: str) -> int:
    """Trainable parameters of a model of ``total`` parameters under ``tuning``.

    LoRA family: r x (in + out) per targeted projection per layer (``all-linear``: every projection but
    the output head), plus the score head for seq_cls models (PEFT's modules_to_save). Other PEFT
    methods from their own shapes. Freeze: the top ``trainable_layers`` layers (+ head);
    gradual_unfreeze: planned at its peak (all layers), since it ends there on long runs.
    """
    head = dims.hidden if kind == "seq_cls" else 0
    m = tuning.method
    if m == "full" or m == "gradual_unfreeze":
        return total
    if m == "freeze":
        return min(total, tuning.trainable_layers * dims.layer_params() + head + dims.hidden)
    if tuning.is_lora_family:
        r = tuning.lora_r
        names = [n for n in _LINEAR_SHAPES if _matches_targets(n, tuning.target_modules)]
        if not names:  # unknown module names (non-Llama): assume every projection, the safe side
            names = list(_LINEAR_SHAPES)
        per_layer = 0
        for name in names:
            fan_in, fan_out = _LINEAR_SHAPES[name](dims)
            copies = dims.experts if name in ("gate_proj", "up_proj", "down_proj") else 1
            per_layer += r * (fan_in + fan_out) * copies
            if m == "dora":
                per_layer += fan_out * copies  # DoRA's magnitude vector
        return dims.layers * per_layer + head
    if m == "ia3":  # scaling vectors on k, v and the MLP input of down_proj
        return dims.layers * (2 * dims.kv_heads * dims.head_dim + dims.intermediate) + head
    if m == "prefix":  # past key/values per layer per virtual token
        return tuning.num_virtual_tokens * dims.layers * 2 * dims.kv_heads * dims.head_dim + head
    if m == "prompt":
        return tuning.num_virtual_tokens * dims.hidden + head
    if m == "ptuning":  # prompt embeddings + PEFT's default MLP encoder (hidden -> hidden -> hidden)
        return tuning.num_virtual_tokens * dims.hidden + 2 * dims.hidden * dims.hidden + head
    if m == "llama_adapter":
        return tuning.adapter_layers * (tuning.adapter_len * dims.hidden + 1) + head
    raise ValueError(f"memory planner: unknown tuning method {m!r}")
