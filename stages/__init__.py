"""The pipeline stages: sft, rm, ppo, dpo, rlaif_label, best_of_n, distill, and any a run adds.

Each stage is declared once, by the ``SPEC`` of its declaration module (``pipeline/registry.py``), whose
``run(cfg) -> dict`` returns its final metrics. A stage runs in its own process (``python -m stages <stage>
--config <resolved config JSON or YAML>``), possibly under torchrun/deepspeed with several ranks.
"""

from __future__ import annotations

from typing import Any


def run_stage(stage: str, cfg: Any) -> dict:
    """Run ``stage`` of the run ``cfg`` in this process (its spec's ``run``), after putting the process in a
    known state (``stages.training.start_reproducibly``)."""
    from pipeline.registry import spec_of

    spec = spec_of(cfg, stage)  # an unknown stage is an error before anything is imported
    from stages.training import start_reproducibly

    start_reproducibly(cfg.seed, cfg.determinism)
    return spec.run(cfg)
