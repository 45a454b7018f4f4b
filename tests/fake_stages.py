"""Quick fake stages (no torch) for the orchestrator, Slurm and report tests.

Run as a stage process: ``python -m tests.fake_stages STAGE --config FILE`` (the orchestrator does this
when ``ALIGNPIPE_STAGE_ENTRY=tests.fake_stages``). It runs the real ``stages.__main__`` entry with this
module's ``run_fake`` as every stage's body, so the config loading and the ``StageRun`` manifest lifecycle
are the real ones.

Each fake stage logs a few steps of metrics named like the real stage's, writes a checkpoint after every
step (so an interrupted run resumes where it stopped), then ``model/weights.txt``. Environment knobs:

- ``FAKE_STEPS`` (default 3), ``FAKE_SLEEP`` seconds per step (default 0);
- ``FAKE_FAIL=stage``: that stage raises (manifest ``failed``, exit 1);
- ``FAKE_CRASH=stage:step``: that stage dies hard at that step (``os._exit``; manifest stays ``running``);
- ``FAKE_STOP=stage:step``: that stage stops on request after that step, as a real one does on SIGTERM
  (``StageStopped``: manifest ``interrupted``, exit code 75);
- ``FAKE_FINGERPRINT_<STAGE>``: the chat-format fingerprint that stage reports (default the same for all).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from pipeline.stage import StageRun, StageStopped

FINGERPRINT = "fake-chat-format-0001"


def stage_metrics(stage: str, step: int) -> dict[str, float]:
    if stage == "sft":
        return {"loss": 3.0 / step, "eval_loss": 3.2 / step}
    if stage == "rm":
        return {"loss": 0.7 / step, "accuracy": 0.5 + 0.1 * step, "eval_accuracy": 0.45 + 0.1 * step}
    if stage == "ppo":
        return {"score": 0.1 * step, "kl": 0.01 * step, "response_length": 10.0 + step, "entropy": 2.0 - 0.1 * step,
                "eos_rate": 0.5 + 0.1 * step, "kl_coef": 0.05}
    return {"labelled": float(step)}


def final_metrics(stage: str) -> dict[str, Any]:
    if stage == "rm":
        return {"eval_accuracy": 0.75, "eval_mean_margin": 0.4,
                "accuracy_by_margin_bucket": {"small": 0.6, "large": 0.9}}
    if stage == "ppo":
        return {"score": 0.3, "kl": 0.03}
    if stage == "sft":
        return {"loss": 1.0, "eval_loss": 1.1}
    return {"pairs": 4}


def run_fake(cfg: Any, stage: str) -> dict[str, Any]:
    """The body of a fake stage (also callable in-process)."""
    steps = int(os.environ.get("FAKE_STEPS", "3"))
    sleep = float(os.environ.get("FAKE_SLEEP", "0"))
    crash = os.environ.get("FAKE_CRASH", "")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    with StageRun(cfg, stage, is_main=rank == 0) as run:
        fingerprint = os.environ.get(f"FAKE_FINGERPRINT_{stage.upper()}", FINGERPRINT)
        run.set_chat_format({"fake": fingerprint}, fingerprint)
        state = run.checkpoints / "state.json"
        start = json.loads(state.read_text())["step"] if run.resuming and state.exists() else 0
        print(f"[fake {stage}] rank {rank}/{world} starting at step {start} (resuming={run.resuming})", flush=True)
        if rank != 0:
            return {}
        for step in range(start + 1, steps + 1):
            if os.environ.get("FAKE_FAIL") == stage:
                raise RuntimeError(f"fake failure in stage {stage} at step {step}")
            if crash == f"{stage}:{step}":
                print(f"[fake {stage}] crashing hard at step {step}", flush=True)
                sys.stdout.flush()
                os._exit(3)
            run.log(step, stage_metrics(stage, step))
            run.checkpoints.mkdir(parents=True, exist_ok=True)
            state.write_text(json.dumps({"step": step}))
            if os.environ.get("FAKE_STOP") == f"{stage}:{step}":
                raise StageStopped("SIGTERM", step)
            time.sleep(sleep)
        model = run.dir / "model"
        model.mkdir(parents=True, exist_ok=True)
        (model / "weights.txt").write_text(f"{stage} {time.time()}\n")
        if stage == "ppo":
            rows = [{"prompt": [{"role": "user", "content": f"question {i} | with pipe"}],
                     "sft": f"sft answer {i}", "ppo": f"ppo answer {i}\nline two", "rm_sft": 0.1 * i,
                     "rm_ppo": 0.2 * i + 0.05} for i in range(3)]
            (run.dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        run.manifest["metrics"] = {**final_metrics(stage), "resumed_from": start, "finished_at": time.time()}
        return run.manifest["metrics"]


def main(argv: list[str] | None = None) -> int:
    from stages.__main__ import main as stage_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m tests.fake_stages STAGE --config FILE", file=sys.stderr)
        return 2
    return stage_main(argv, runner=lambda stage, cfg: run_fake(cfg, stage))


if __name__ == "__main__":
    sys.exit(main())
