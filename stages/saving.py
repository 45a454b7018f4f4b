"""Saving a finished training stage's model (SFT, RM): ``model/`` (+ ``adapter/`` for PEFT) and the
tokenizer, written on rank 0 after gathering ZeRO-3 shards (DESIGN §5.6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import RunConfig
from pipeline.models import save_tokenizer
from pipeline.stage import StageRun
from stages.tuning import save_trained


def save_stage_model(engine: Any, tokenizer: Any, run: StageRun, tuning: Any, base: str, cfg: RunConfig,
                     kind: str) -> None:
    """Save model/ (+ adapter/) and the tokenizer on rank 0; gathers ZeRO-3 shards first (DESIGN §5.6)."""
    model = engine.unwrap()
    if engine.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if run.is_main:
                _save(model, tokenizer, run, tuning, base, cfg, kind)
        torch.distributed.barrier()
    elif run.is_main:
        _save(model, tokenizer, run, tuning, base, cfg, kind)
    if engine.dist.world_size > 1:
        torch.distributed.barrier()


def _save(model: Any, tokenizer: Any, run: StageRun, tuning: Any, base: str, cfg: RunConfig, kind: str) -> None:
    out: Path = run.dir
    for sub in ("model", "adapter"):
        if (out / sub).exists():
            import shutil

            shutil.rmtree(out / sub)
    model.config.use_cache = True
    info = save_trained(model, tokenizer, out, tuning, base, cfg.model, kind=kind)
    save_tokenizer(tokenizer, out)
    if (out / "model").exists():
        save_tokenizer(tokenizer, out / "model")  # model/ loads on its own (serving, other tools)
    run.update(**info)
