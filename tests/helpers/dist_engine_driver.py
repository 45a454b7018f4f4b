"""Run a stage on the shared engine (SFT, RM, DPO) on one rank of a torchrun job and record what the
distributed checks need.

Usage (per rank, under torchrun):
    python -m tests.helpers.dist_engine_driver CONFIG OUT_DIR [--stage=sft|rm|dpo] [--unsync] [k=v ...]
Writes OUT_DIR/rank<R>.json (world size, engine type, item indices seen) and OUT_DIR/rank<R>.pt (final
trainable parameters). ``--unsync`` is the negative control: no DeepSpeed and no DDP, so each rank
trains alone on its own shard while believing the run is distributed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from pipeline.config import load_config  # noqa: E402
from stages import engine as engine_mod  # noqa: E402
from stages import run_stage  # noqa: E402


def main() -> None:
    config, out = sys.argv[1], Path(sys.argv[2])
    unsync = "--unsync" in sys.argv
    stage = next((a.split("=", 1)[1] for a in sys.argv[3:] if a.startswith("--stage=")), "sft")
    overrides = [a for a in sys.argv[3:] if "=" in a and not a.startswith("--")]
    if unsync:
        overrides.append(f"{stage}.train.deepspeed=null")
        real_init, real_ddp = engine_mod.Engine.__init__, torch.nn.parallel.DistributedDataParallel

        def init_without_ddp(self, *args, **kwargs):
            # only while the engine wires itself: later isinstance checks need the real class
            torch.nn.parallel.DistributedDataParallel = lambda model, **kw: model
            try:
                real_init(self, *args, **kwargs)
            finally:
                torch.nn.parallel.DistributedDataParallel = real_ddp

        engine_mod.Engine.__init__ = init_without_ddp
    cfg = load_config(config, overrides)
    rank = int(os.environ.get("RANK", "0"))
    record: dict = {"indices": []}
    original_batches = engine_mod.Engine._epoch_batches
    original_fit = engine_mod.Engine.fit

    def epoch_batches(self, epoch):
        batches = original_batches(self, epoch)
        record["indices"].append([i for b in batches for i in b])
        return batches

    def fit(self):
        result = original_fit(self)
        record["world_size"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        record["engine"] = type(self.ds_engine).__name__ if self.ds_engine is not None else None
        record["zero_stage"] = self.zero_stage
        record["steps"] = result.global_step
        params = {n: p.detach().float().cpu().clone() for n, p in self.model.named_parameters()}
        torch.save(params, out / f"rank{rank}.pt")
        return result

    engine_mod.Engine._epoch_batches = epoch_batches
    engine_mod.Engine.fit = fit
    out.mkdir(parents=True, exist_ok=True)
    run_stage(stage, cfg)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    engine_mod.shutdown_distributed()


if __name__ == "__main__":
    main()
