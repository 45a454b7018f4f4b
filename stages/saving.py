"""Saving a finished training stage's model (SFT, RM): ``model/`` (+ ``adapter/`` for PEFT) and the
tokenizer, written on rank 0 after gathering ZeRO-3 shards (DESIGN §5.6)."""

from __future__ import annotations

from typing import Any

from pipeline.config import RunConfig
from pipeline.stage import StageRun
from stages.training import save_final_model


def save_stage_model(engine: Any, tokenizer: Any, run: StageRun, tuning: Any, base: str, cfg: RunConfig,
                     kind: str) -> None:
    """Save model/ (+ adapter/) and the tokenizer on rank 0 (``stages.training.save_final_model``, the
    one save PPO uses too); gathers ZeRO-3 shards first (DESIGN §5.6)."""
    save_final_model(engine.unwrap(), tokenizer, run, tuning, base, cfg.model, kind, engine.zero_stage,
                     engine.dist.world_size)
