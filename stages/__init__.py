"""The pipeline stages, one module each: sft, rm, ppo, rlaif (rlaif_label).

Each stage module exposes ``run(cfg: RunConfig) -> dict`` returning its final metrics. A stage runs in
its own process (``python -m stages <stage> --config <resolved config JSON or YAML>``), possibly
under torchrun/deepspeed with several ranks.
"""

from __future__ import annotations

import importlib
from typing import Any

STAGE_MODULES = {
    "sft": "stages.sft",
    "rm": "stages.rm",
    "ppo": "stages.ppo.trainer",
    "rlaif_label": "stages.rlaif.label",
    "best_of_n": "stages.best_of_n",
    "distill": "stages.distill",
    "dpo": "stages.dpo.trainer",
}


def run_stage(stage: str, cfg: Any) -> dict:
    if stage not in STAGE_MODULES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGE_MODULES)}")
    module = importlib.import_module(STAGE_MODULES[stage])
    return module.run(cfg)
