"""What every stage process does around its algorithm, in one place: ``with StageContext(cfg, "rm") as ctx:``.

On entry: the process group (``init_distributed``, for the stages that train on several ranks), torch's
CPU threads (the stage's ``num_threads``), the ``StageRun`` (manifest ``running``, parents checked,
metrics log). Inside, on demand: the base model prepared once on rank 0 and its folder broadcast
(``base_model``), the model a stage starts from (``starting_model``: the sft stage's or the base), the
tokenizer with the chat format in force recorded and checked against the parents' (``use_tokenizer``), a
trainable model for the shared engine (``trainable_model``) and its saving (``save_model``). On exit: the
final metrics and manifest fields (``finish``), and the ``StageRun``'s ``complete`` / ``failed`` /
``interrupted`` manifest. A stage's ``run`` is then its algorithm: data, model, loop, metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.models import chat_fingerprint, chat_format, load_model, load_tokenizer, prepare_base
from pipeline.stage import StageRun
from stages.engine import DistInfo, init_distributed, set_seed


def shared_base_model(cfg: RunConfig, dist: DistInfo) -> str:
    """The base model folder (``prepare_base``): prepared on rank 0 (a tiny build or a GGUF conversion happens
    once), its location broadcast to every rank."""
    base = prepare_base(cfg.model) if dist.is_main else None
    if dist.world_size > 1:
        holder = [base]
        torch.distributed.broadcast_object_list(holder, src=0)
        base = holder[0]
    return base


@dataclass(frozen=True)
class StartingModel:
    """The model a stage starts from: its weights' folder, its tokenizer's folder, and what it is (for messages
    and the manifest: ``sft stage (<folder>)`` or ``base model (<folder>)``)."""

    model_dir: str
    tokenizer_dir: str
    description: str
    from_sft: bool


class StageContext:
    """One stage process's shared set-up and tear-down (see the module doc).

    ``distributed``: start the process group and place the stage on this rank's device (the stages on the
    shared engine, PPO); else one process on the first CUDA device or the CPU. ``num_threads``: torch's CPU
    threads (None: torch's default). ``settings`` is the stage's own config section.
    """

    def __init__(self, cfg: RunConfig, stage: str, *, distributed: bool = True, num_threads: int | None = None):
        self.cfg, self.stage = cfg, stage
        self.settings: Any = getattr(cfg, stage)
        self._distributed, self._num_threads = distributed, num_threads
        self._base: str | None = None

    # -------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "StageContext":
        if self._distributed:
            self.dist = init_distributed()
        else:
            self.dist = DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        self.run = StageRun(self.cfg, self.stage, is_main=self.dist.is_main)
        self.run.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return self.run.__exit__(exc_type, exc, tb)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def dir(self) -> Path:
        return self.run.dir

    def say(self, text: str) -> None:
        """``[alignpipe] <stage>: text`` on the console, from rank 0 only."""
        if self.is_main:
            print(f"[alignpipe] {self.stage}: {text}", flush=True)

    def finish(self, metrics: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """Record the final ``metrics`` (and more manifest ``fields``); returns ``metrics`` (the stage's result)."""
        self.run.update(**fields)
        self.run.manifest["metrics"] = metrics
        return metrics

    # ----------------------------------------------------------------------------------- models
    def base_model(self) -> str:
        """The base model's folder (``shared_base_model``), prepared once per process."""
        if self._base is None:
            self._base = shared_base_model(self.cfg, self.dist)
        return self._base

    def starting_model(self, from_sft: bool, needs_full_model: str | None = None) -> StartingModel:
        """The sft stage's model (a parent) or the base model. ``needs_full_model``: what needs it (``"a reward
        model"``): an sft stage that saved only an adapter is then an error saying how to fix it."""
        if not from_sft:
            base = self.base_model()
            return StartingModel(base, base, f"base model ({base})", False)
        sft_dir = self.run.parent_dir("sft")
        if needs_full_model and not (sft_dir / "model").exists():
            method = self.run.parents["sft"].get("tuning_method")
            raise FileNotFoundError(
                f"{sft_dir}/model not found: the sft stage (tuning method {method!r}) saved only an adapter, and "
                f"{needs_full_model} needs a full or merged SFT model to start from. Re-run sft with a mergeable "
                f"method (full, lora, dora, ...) or set {self.stage}.init_from=base.")
        return StartingModel(str(sft_dir / "model"), str(sft_dir), f"sft stage ({sft_dir})", True)

    def use_tokenizer(self, folder: str, distinct_pad: str | None = None) -> Any:
        """The tokenizer at ``folder`` with the run's chat settings; its chat format is recorded in the manifest
        and must match the parents'. ``distinct_pad``: what needs pad != eos (``"DPO"``): else an error."""
        tokenizer = load_tokenizer(folder, self.cfg.model, self.cfg.chat)
        if distinct_pad and (tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id):
            raise ValueError(f"the tokenizer's pad must differ from eos for {distinct_pad} (set model.pad_token; "
                             "DESIGN §3)")
        fmt = chat_format(tokenizer, self.cfg.chat)
        self.run.set_chat_format(fmt, chat_fingerprint(fmt))
        return tokenizer

    def trainable_model(self, init_path: str, tokenizer: Any, kind: str, n_rows: int) -> tuple[Any, Any, dict]:
        """The model a stage on the shared engine trains -> (model, unfreezer, trainable-parameter summary): loaded
        from ``init_path`` as ``kind`` (causal_lm, seq_cls), its new weights (LoRA's A, a score head, a resized
        embedding) drawn under ``train.seed``, tuned by the section's ``tuning`` (the unfreezing schedule sized
        by the steps ``n_rows`` rows give)."""
        from stages.tuning import apply_tuning, quantization_kwargs, trainable_summary

        train, tuning = self.settings.train, self.settings.tuning
        steps = train.max_steps or max(1, math.ceil(train.epochs * n_rows / (
            train.per_device_batch_size * self.dist.world_size * train.gradient_accumulation_steps)))
        set_seed(train.seed)
        model = load_model(init_path, self.cfg.model, tokenizer, kind=kind, **quantization_kwargs(tuning))
        model.config.use_cache = False
        model, unfreezer = apply_tuning(model, tuning, kind, steps)
        return model, unfreezer, trainable_summary(model)

    def save_model(self, engine: Any, tokenizer: Any, init_path: str, kind: str) -> None:
        """model/ (+ adapter/) and the tokenizer, on rank 0 (``stages.saving.save_stage_model``)."""
        from stages.saving import save_stage_model

        save_stage_model(engine, tokenizer, self.run, self.settings.tuning, init_path, self.cfg, kind)


def numeric(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of a metrics row (what a manifest's ``metrics`` keeps of a training result)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
