"""Tuning methods, chosen by ``<stage>.tuning.method`` (see ``pipeline.config.TuningConfig``).

- ``full``: every parameter trains.
- ``freeze``: only the top ``trainable_layers`` decoder layers (+ final norm and head) and any module whose
  name contains one of ``trainable_modules`` train.
- ``gradual_unfreeze``: starts like ``freeze`` and unfreezes one more layer (top-down) every
  ``unfreeze_every_steps`` optimizer steps (ULMFiT-style), driven by ``GradualUnfreezer.step``.
- PEFT family through ``peft``: lora, dora, rslora, qlora (4-bit nf4 base via bitsandbytes), adalora, ia3,
  prefix, prompt, ptuning, llama_adapter.

Saving: the LoRA family (and IA3) is merged into a 16-bit model under ``model/`` and the adapter kept
under ``adapter/``; methods that cannot be merged (prefix/prompt/P-tuning/LLaMA-Adapter) save only the
adapter, and ``load_trained_causal_lm`` rebuilds base + adapter from the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ModelConfig, TuningConfig

MERGEABLE = ("lora", "dora", "rslora", "qlora", "adalora", "ia3")


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The transformer blocks of a decoder-only model, bottom to top."""
    base = model
    for attr in ("base_model", "model"):
        # peft -> LoraModel -> PreTrainedModel -> LlamaModel: walk down until we find .layers
        while hasattr(base, attr) and not hasattr(base, "layers"):
            base = getattr(base, attr)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers on {type(model).__name__}; use method 'full' or a PEFT method")
    return list(layers)


def _set_trainable_top(model: Any, n_layers: int, extra_modules: list[str]) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    for layer in layers[len(layers) - n_layers:] if n_layers else []:
        for p in layer.parameters():
            p.requires_grad_(True)
    # the head and the final norm belong with the top of the network
    always = ["lm_head", "score", "norm.weight", "classifier"] + list(extra_modules)
    for name, p in model.named_parameters():
        if any(key in name for key in always) and ".layers." not in name:
            p.requires_grad_(True)
        elif any(key in name for key in extra_modules):
            p.requires_grad_(True)


class GradualUnfreezer:
    """Unfreeze one more decoder layer (top-down) every ``every`` optimizer steps."""

    def __init__(self, model: Any, start_layers: int, every: int, extra_modules: list[str]):
        self.model, self.every, self.extra = model, every, extra_modules
        self.total = len(decoder_layers(model))
        self.current = min(start_layers, self.total)
        _set_trainable_top(model, self.current, extra_modules)

    def step(self, global_step: int) -> int:
        wanted = min(self.total, self.current + global_step // self.every)
        target = min(self.total, max(self.current, wanted))
        if target != self.current:
            self.current = target
            _set_trainable_top(self.model, self.current, self.extra)
        return self.current

    def state_dict(self) -> dict[str, int]:
        return {"current": self.current}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.current = state["current"]
        _set_trainable_top(self.model, self.current, self.extra)


def quantization_kwargs(tuning: TuningConfig) -> dict[str, Any]:
    """Extra ``from_pretrained`` kwargs: a 4-bit nf4 base for QLoRA."""
    if tuning.method != "qlora":
        return {}
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ImportError("tuning.method='qlora' needs bitsandbytes: pip install bitsandbytes") from exc
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=True,
        )
    }


def peft_config(tuning: TuningConfig, task: str, total_steps: int) -> Any:
    """A peft config for ``tuning.method``; task is 'causal_lm' or 'seq_cls'."""
    import peft

    task_type = {"causal_lm": peft.TaskType.CAUSAL_LM, "seq_cls": peft.TaskType.SEQ_CLS,
                 "token_cls": peft.TaskType.TOKEN_CLS}[task]
    method = tuning.method
    targets = tuning.target_modules
    if method in ("lora", "dora", "rslora", "qlora"):
        return peft.LoraConfig(
            task_type=task_type, r=tuning.lora_r, lora_alpha=tuning.lora_alpha, lora_dropout=tuning.lora_dropout,
            target_modules=targets, use_dora=method == "dora", use_rslora=method == "rslora",
        )
    if method == "adalora":
        return peft.AdaLoraConfig(
            task_type=task_type, init_r=tuning.lora_r, target_r=tuning.adalora_target_r,
            lora_alpha=tuning.lora_alpha, target_modules=targets, total_step=max(total_steps, 1),
            tinit=0, tfinal=0,
        )
    if method == "ia3":
        return peft.IA3Config(task_type=task_type, target_modules=["k_proj", "v_proj", "down_proj"],
                              feedforward_modules=["down_proj"])
    if task != "causal_lm":
        raise ValueError(f"tuning.method={method!r} applies to causal LMs only; use lora/ia3/full for a {task} model")
    if method == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=tuning.num_virtual_tokens)
    if method == "prompt":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=tuning.num_virtual_tokens)
    if method == "ptuning":
        return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=tuning.num_virtual_tokens,
                                        encoder_hidden_size=64)
    if method == "llama_adapter":
        return peft.AdaptionPromptConfig(task_type=task_type, adapter_len=tuning.adapter_len,
                                         adapter_layers=tuning.adapter_layers)
    raise ValueError(f"unknown PEFT method {method!r}")


def apply_tuning(model: Any, tuning: TuningConfig, task: str, total_steps: int) -> tuple[Any, GradualUnfreezer | None]:
    """Make the right parameters trainable (or wrap in peft). Returns (model, unfreezer or None)."""
    if tuning.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None
    if tuning.method == "freeze":
        _set_trainable_top(model, tuning.trainable_layers, tuning.trainable_modules)
        return model, None
    if tuning.method == "gradual_unfreeze":
        return model, GradualUnfreezer(model, tuning.trainable_layers, tuning.unfreeze_every_steps,
                                       tuning.trainable_modules)
    import peft

    if tuning.method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft_config(tuning, task, total_steps), adapter_name=tuning.adapter_name)
    if task == "seq_cls":
        # the random score head must train, or the reward model cannot learn (see shared notes)
        for name, p in model.named_parameters():
            if "score" in name:
                p.requires_grad_(True)
    return model, None


def trainable_summary(model: Any) -> dict[str, int | float]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable,
            "trainable_fraction": round(trainable / max(total, 1), 6)}


def save_trained(model: Any, tokenizer: Any, out_dir: Path, tuning: TuningConfig, base_path: str,
                 model_cfg: ModelConfig, kind: str = "causal_lm", state_dict: dict | None = None) -> dict[str, Any]:
    """Write ``model/`` (merged 16-bit or full) and ``adapter/`` (PEFT). Returns manifest fields."""
    out_dir = Path(out_dir)
    info: dict[str, Any] = {"tuning_method": tuning.method, "base_model": base_path}
    if not tuning.is_peft:
        model.save_pretrained(out_dir / "model", safe_serialization=True, state_dict=state_dict)
        info["model_format"] = "full"
        return info
    model.save_pretrained(out_dir / "adapter", safe_serialization=True)
    info["adapter_path"] = "adapter"
    if tuning.method in MERGEABLE:
        merged = _merge_16bit(model, tuning, base_path, model_cfg, kind, out_dir / "adapter", tokenizer)
        merged.save_pretrained(out_dir / "model", safe_serialization=True)
        info["model_format"] = "merged"
    else:
        info["model_format"] = "adapter_on_base"
    return info


def _merge_16bit(model: Any, tuning: TuningConfig, base_path: str, model_cfg: ModelConfig, kind: str,
                 adapter_dir: Path, tokenizer: Any) -> Any:
    """Merge the adapter into an unquantised copy of the base (QLoRA's 4-bit base cannot be merged)."""
    if tuning.method != "qlora":
        return model.merge_and_unload()
    from peft import PeftModel

    from pipeline.models import load_model

    base = load_model(base_path, model_cfg, tokenizer, kind=kind)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def load_trained(stage_dir: Path, model_cfg: ModelConfig, tokenizer: Any, kind: str = "causal_lm",
                 trainable: bool = False, **kwargs: Any) -> Any:
    """Load a stage's trained model: ``model/`` if present, else base + ``adapter/`` from the manifest."""
    from pipeline.models import load_model

    stage_dir = Path(stage_dir)
    if (stage_dir / "model").exists():
        return load_model(str(stage_dir / "model"), model_cfg, tokenizer, kind=kind, **kwargs)
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    base = manifest.get("metrics", {}).get("base_model") or manifest.get("base_model")
    if not base or not (stage_dir / "adapter").exists():
        raise FileNotFoundError(f"{stage_dir}: neither model/ nor adapter/ + base_model in the manifest")
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base, model_cfg, tokenizer, kind=kind, **kwargs),
                                     str(stage_dir / "adapter"), is_trainable=trainable)


def load_adapters(base: Any, adapters: dict[str, str | Path]) -> Any:
    """Load several adapters on one base model; switch with ``model.set_adapter(name)``."""
    from peft import PeftModel

    items = list(adapters.items())
    if not items:
        raise ValueError("load_adapters needs at least one adapter")
    first_name, first_path = items[0]
    model = PeftModel.from_pretrained(base, str(first_path), adapter_name=first_name)
    for name, path in items[1:]:
        model.load_adapter(str(path), adapter_name=name)
    return model
