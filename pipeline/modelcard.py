"""Model cards: a ``README.md`` in a stage's ``model/`` and ``adapter/`` that reads like any hub model's.

The card is the hub's format: YAML metadata between ``---`` lines (``base_model``, ``library_name``,
``license``, ``datasets``, ``tags``, ``pipeline_tag``, and an ``alignpipe`` block with the run, the stage,
the data files with their SHA-256 and the parent manifests' hashes), then a short Markdown body: what
the stage is, its key settings, its measured results, how to load it. Everything comes from the stage's
manifest, so a card can be written again for any complete stage (``write_model_cards``);
``StageRun`` writes it when a stage completes. Standard library + yaml only (this is part of the
contract that ``stages/`` imports through ``pipeline.stage``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .registry import loaded_spec

CARD = "README.md"

# train settings worth a line in the card (all stages); each stage's own scalar settings are added
TRAIN_KEYS = ("learning_rate", "max_steps", "epochs", "per_device_batch_size", "gradient_accumulation_steps",
              "global_batch_size", "precision", "seed")
TUNING_KEYS = ("method", "lora_r", "lora_alpha", "target_modules")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(manifest: dict[str, Any]) -> str | None:
    """The hub id of the model this stage started from, where the config names one (else None)."""
    config = manifest.get("config") or {}
    for key in ("ppo.policy.path",):  # a policy the user brought to PPO
        location = ((manifest.get("external_models") or {}).get(key) or {}).get("location")
        if isinstance(location, str) and _HUB_ID.match(location.removeprefix("hub:")):
            return location.removeprefix("hub:")
    model = config.get("model") or {}
    if isinstance(model.get("hub_id"), str):  # a local or GGUF copy of a hub model, named in the config
        return model["hub_id"]
    path = model.get("path")
    if model.get("source") == "hub" and isinstance(path, str):
        return path.removeprefix("hub:")
    if model.get("source") == "local" and isinstance(path, str) and path.startswith("hub:"):
        return path.removeprefix("hub:")
    return None


def gguf_license(model: dict[str, Any]) -> str | None:
    """``general.license`` of a GGUF base (``model.source: gguf``), where the file records one."""
    if model.get("source") != "gguf" or not model.get("gguf_file"):
        return None
    try:
        import gguf

        from .config import ModelConfig
        from .models import gguf_folder

        field = gguf.GGUFReader(gguf_folder(ModelConfig(**model)) / model["gguf_file"]).fields.get("general.license")
        value = field.contents() if field is not None else None
    except Exception:  # a card without a licence line is the fallback, never a failed stage
        return None
    return value if isinstance(value, str) and value else None


def base_license(manifest: dict[str, Any]) -> str | None:
    """The base model's licence: the ``license:`` of its own card where a local folder has one, or the
    ``general.license`` of a GGUF base."""
    model = (manifest.get("config") or {}).get("model") or {}
    if (from_gguf := gguf_license(model)) is not None:
        return from_gguf
    candidates = [manifest.get("base_model"), model.get("path")]
    for folder in candidates:
        if not isinstance(folder, str):
            continue
        card = Path(folder) / CARD
        if card.is_file():
            meta = read_card_metadata(card)
            if isinstance(meta.get("license"), str):
                return meta["license"]
    return None


def read_card_metadata(path: Path) -> dict[str, Any]:
    """The YAML metadata of a card (``{}`` when it has none or it does not parse)."""
    text = path.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def hub_datasets(section: Any) -> list[str]:
    """Hub dataset names (``hub:org/name``) anywhere in a stage's config section."""
    found: list[str] = []
    if isinstance(section, dict):
        for value in section.values():
            found += hub_datasets(value)
    elif isinstance(section, list):
        for value in section:
            found += hub_datasets(value)
    elif isinstance(section, str) and section.startswith("hub:") and _HUB_ID.match(section[4:]):
        found.append(section[4:])
    return sorted(set(found))


def key_settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The settings shown in the card: the stage's own scalars, the train and tuning keys above."""
    stage = manifest.get("stage", "")
    section = (manifest.get("config") or {}).get(stage) or {}
    out: dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, (int, float, str, bool)):
            out[key] = value
    for key in TRAIN_KEYS:
        value = (section.get("train") or {}).get(key)
        if value is not None:
            out[f"train.{key}"] = value
    for key in TUNING_KEYS:
        value = (section.get("tuning") or {}).get(key)
        if value is not None and (key == "method" or (section.get("tuning") or {}).get("method") != "full"):
            out[f"tuning.{key}"] = value
    return out


def results(manifest: dict[str, Any]) -> dict[str, Any]:
    """The final metrics that are numbers (the manifest's ``metrics``), without bookkeeping counters."""
    skip = {"finished_at", "resumed_from", "world_size"}
    return {k: v for k, v in (manifest.get("metrics") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


def stage_text(stage: str) -> tuple[str, list[str]]:
    """What the stage is, in one line, and its hub tags (its spec's ``card``)."""
    spec = loaded_spec(stage)
    if spec is None or spec.card is None:
        return f"the '{stage}' stage", [stage]
    return spec.card[0], list(spec.card[1])


def card_metadata(manifest: dict[str, Any], kind: str) -> dict[str, Any]:
    """The hub YAML metadata of a stage's ``model`` or ``adapter`` card."""
    stage = manifest.get("stage", "")
    _, stage_tags = stage_text(stage)
    meta: dict[str, Any] = {}
    base = base_model_id(manifest)
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    licence = base_license(manifest)
    if licence:
        meta["license"] = licence
    datasets = hub_datasets((manifest.get("config") or {}).get(stage))
    if datasets:
        meta["datasets"] = datasets
    method = manifest.get("tuning_method") or ((manifest.get("config") or {}).get(stage) or {}).get(
        "tuning", {}).get("method")
    meta["tags"] = ["alignpipe", *stage_tags, *([method] if method and method != "full" else [])]
    meta["pipeline_tag"] = "text-classification" if stage == "rm" else "text-generation"
    meta["alignpipe"] = {
        "run": manifest.get("run_name"),
        "stage": stage,
        "data_files": [{"path": p, "sha256": h} for p, h in (manifest.get("data_files") or {}).items()],
        "parents": {p: v.get("hash") for p, v in (manifest.get("parents") or {}).items() if isinstance(v, dict)},
        "config_hash": manifest.get("config_hash"),
        "chat_fingerprint": manifest.get("chat_fingerprint"),
        "git_commit": manifest.get("git_commit"),
    }
    return meta


def _table(rows: dict[str, Any], head: str) -> list[str]:
    lines = [f"| {head} | value |", "|---|---|"]
    for key, value in rows.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {text.replace('|', '/')} |")
    return lines


def card_text(manifest: dict[str, Any], kind: str) -> str:
    """The whole card (``kind``: ``model`` or ``adapter``)."""
    stage = manifest.get("stage", "")
    meta = card_metadata(manifest, kind)
    what, _ = stage_text(stage)
    base = meta.get("base_model") or "a local base model"
    run = manifest.get("run_name") or "run"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {run} / {stage}" + (" (adapter)" if kind == "adapter" else ""), "",
             f"Stage `{stage}` of an alignpipe run: {what}. Started from {base}"
             + (f"; licence of the base: {meta['license']}." if "license" in meta else
                "; the base model's licence was not found: check it before you publish."), ""]
    if kind == "adapter":
        lines += ["A PEFT adapter; `model/` of the same stage holds the merged model.", ""]
    lines += ["## Key settings", "", *_table(key_settings(manifest), "setting"), ""]
    measured = results(manifest)
    if measured:
        lines += ["## Results (measured at the end of the stage)", "", *_table(measured, "metric"), ""]
    data = manifest.get("data_files") or {}
    if data:
        lines += ["## Data", "", "| file | sha256 |", "|---|---|", *[f"| {p} | `{h}` |" for p, h in data.items()], ""]
    loader = ("from peft import AutoPeftModelForCausalLM as Model" if kind == "adapter" else
              "from transformers import AutoModelForSequenceClassification as Model" if stage == "rm" else
              "from transformers import AutoModelForCausalLM as Model")
    lines += ["## Use", "", "```python", loader, "", 'model = Model.from_pretrained("<this repo or folder>")',
              "```", ""]
    if stage == "rm" and kind == "model":  # transformers' own pooling reads another token (ChatML: the newline)
        lines += ["The score is the head's output at the response's closing eos: the prompt rendered with the chat "
                  "template and its generation prompt, then the response up to and including eos "
                  "(`reward_reading.json`). The model's own forward pools at the last non-pad token of its "
                  "input instead, which for a full chat-template render can be a later token (for ChatML the "
                  "newline after the eos). `python -m pipeline score <this folder> DATA` reads it where it was "
                  "trained.", ""]
    if manifest.get("wall_time_s") is not None:
        lines += [f"Wall time {manifest['wall_time_s']:.0f} s; libraries: "
                  + ", ".join(f"{k} {v}" for k, v in (manifest.get("libraries") or {}).items()) + ".", ""]
    return "\n".join(lines)


def write_model_cards(stage_dir: str | Path, manifest: dict[str, Any]) -> list[Path]:
    """Write ``README.md`` into the stage's ``model/`` and ``adapter/`` (those that exist); returns the paths."""
    written = []
    for kind in ("model", "adapter"):
        folder = Path(stage_dir) / kind
        if folder.is_dir():
            path = folder / CARD
            tmp = folder / f".{CARD}.tmp"
            tmp.write_text(card_text(manifest, kind))
            tmp.replace(path)
            written.append(path)
    return written
