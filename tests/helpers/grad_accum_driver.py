"""The gradient the shared engine (stages/engine.py) has accumulated when it reaches its first optimizer
step, training a tiny causal LM with the SFT loss on four rows of unequal lengths and target counts
(tests/test_loss_normalisation.py compares it with one forward over all rows).

In a test process: ``accumulated_gradient(per_device_batch, accumulation, deepspeed=None)``. Under torchrun,
per rank:
    python -m tests.helpers.grad_accum_driver OUT_DIR SPEC [SPEC ...]
with SPEC ``batch,accumulation`` or ``batch,accumulation,configs/deepspeed/zeroN.json``; writes
OUT_DIR/spec<i>-rank<R>.pt: {"grads", "loss" (the logged loss), "world_size", "engine", "rows" (the item
indices this rank trained on)}.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import torch

IGNORE = -100
# (length, first target position): rows of 6..23 tokens with 3..18 target tokens each, all different
ROW_SHAPES = [(6, 3), (23, 5), (11, 1), (17, 12)]
VOCAB = 64


def rows() -> list[dict[str, list[int]]]:
    """Four SFT rows: random ids, labels IGNORE before the first target position (as a prompt)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for length, first in ROW_SHAPES:
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * first + ids[first:]})
    return out


def target_count() -> int:
    """Targets of all rows, by construction (every labelled position is after position 0)."""
    return sum(length - first for length, first in ROW_SHAPES)


def tiny_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0)
    return LlamaForCausalLM(config).float()


class _Run:
    """What the engine needs of a StageRun: a folder, checkpoints/ and a metrics log."""

    def __init__(self, folder: Path):
        self.dir, self.checkpoints = folder, folder / "checkpoints"
        self.cfg = types.SimpleNamespace(logging=types.SimpleNamespace(progress_bar=False))
        self.rows: list[dict] = []

    def log(self, step: int, row: dict) -> None:
        self.rows.append({"step": step, **row})


def accumulated_gradient(per_device_batch: int, accumulation: int, deepspeed: str | None = None,
                         per_token: bool = True, folder: Path | None = None) -> dict[str, Any]:
    """Run the engine for one optimizer step -> {"grads": name -> gradient just before the step, "loss": the
    logged loss, "world_size", "engine", "rows"}. ``per_token=False``: no ``loss_units`` (every micro-batch
    weighs the same)."""
    import tempfile

    from pipeline.config import TrainConfig
    from stages.batching import pad_collate, target_tokens
    from stages.engine import Engine, init_distributed
    from stages.sft import sft_loss

    dist = init_distributed()
    train = TrainConfig(per_device_batch_size=per_device_batch, gradient_accumulation_steps=accumulation,
                        max_steps=1, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant",
                        max_grad_norm=None, precision="fp32", save_steps=1000, deepspeed=deepspeed)
    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    seen: list[int] = []
    items = rows()

    def collate(batch_rows: list[dict]) -> dict[str, torch.Tensor]:
        seen.extend(items.index(r) for r in batch_rows)
        return pad_collate(0)(batch_rows)

    run = _Run(folder or Path(tempfile.mkdtemp()))
    engine = Engine(model, train, run, dist, items, collate, sft_loss, loss_units=target_tokens if per_token else None)
    grads: dict[str, torch.Tensor] = {}
    if engine.ds_engine is None:
        def capture(optimizer, args, kwargs):
            for p in model.parameters():
                grads[names[id(p)]] = p.grad.detach().clone()

        engine.optimizer.register_step_pre_hook(capture)
    else:
        from deepspeed.utils import safe_get_full_grad

        ds_engine, ds_step = engine.ds_engine, engine.ds_engine.step

        def step(*args, **kwargs):
            if ds_engine.is_gradient_accumulation_boundary():
                for p in model.parameters():
                    grads[names[id(p)]] = safe_get_full_grad(p).detach().clone()
            return ds_step(*args, **kwargs)

        ds_engine.step = step
    engine.fit()
    return {"grads": grads, "loss": run.rows[0]["loss"], "world_size": dist.world_size,
            "engine": type(engine.ds_engine).__name__ if engine.ds_engine is not None else "plain", "rows": seen}


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    for i, spec in enumerate(sys.argv[2:]):
        parts = spec.split(",")
        result = accumulated_gradient(int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else None,
                                      folder=out / f"run{i}-rank{rank}")
        torch.save(result, out / f"spec{i}-rank{rank}.pt")
    from stages.engine import shutdown_distributed

    shutdown_distributed()


if __name__ == "__main__":
    main()
