"""PPO at ``kl_coef`` 0 with and without the reference model, side by side (not a test), in one process.

At ``ppo.kl_coef`` 0 (no adaptive_kl, no max_kl) the stage neither loads nor runs the reference
(``PPOConfig.uses_reference``). This times whole PPO steps of two trainers on the same config that differ
only in that: A as the stage runs now, B with the reference loaded and its forward pass run every step (the
KL then multiplied by 0, as before). Their weights stay bit-identical (tests/test_ppo_rollout_features.py),
so every step does the same work but the reference pass. Steps alternate A B, B A, ...; the first pair is
a warm-up and is left out. Reported: episodes/s of each (medians), the median of the per-pair ratios
A / B of wall time and of CPU time (``time_cpu``: with one thread, on a machine shared with other jobs, the
steadier of the two), the same for the rollout's forward passes alone (``time_forward``, where the
reference pass was), and the weights' largest difference at the end (0). Absolute rates depend on the
machine and its load; compare the ratios.

    .venv/bin/python bench/no_reference.py                  # the tiny task: GAE, full fine-tuning
    .venv/bin/python bench/no_reference.py --tuning lora    # reference = the actor with its adapter off
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_trainer(args: argparse.Namespace, root: str, name: str, with_reference: bool):
    """-> (stage run, trainer); ``with_reference``: load and run the reference though nothing reads the KL."""
    from pipeline.config import load_config
    from pipeline.stage import StageRun
    from stages.engine import init_distributed
    from stages.ppo.config import PPOConfig
    from stages.ppo.trainer import PPOTrainer

    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"output_root={root}", f"run_name={name}", "logging.progress_bar=false", "stages=[ppo]",
        "ppo.policy_from=base", "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]",
        "ppo.kl_coef=0", "ppo.episodes_per_rollout=16", "ppo.mini_batch_size=8", "ppo.ppo_epochs=4",
        "ppo.max_new_tokens=24", "ppo.train.learning_rate=3e-4", f"ppo.total_episodes={16 * 2 * args.pairs}",
        f"ppo.tuning.method={args.tuning}", f"ppo.train.num_threads={args.threads}", "ppo.train.save_steps=100000"])
    run = StageRun(cfg, "ppo")
    run.__enter__()
    forced = property(lambda self: True) if with_reference else PPOConfig.uses_reference
    with mock.patch.object(PPOConfig, "uses_reference", forced):
        trainer = PPOTrainer(cfg, run, init_distributed())
    assert trainer.models.has_reference is with_reference
    return run, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=30, help="A B step pairs, the first a warm-up")
    parser.add_argument("--tuning", default="full", choices=["full", "lora"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        runs, trainers = zip(*(build_trainer(args, root, name, with_ref)
                               for name, with_ref in (("without", False), ("with", True))))
        rates: dict[int, list[float]] = {0: [], 1: []}
        ratios: dict[str, list[float]] = {"step_seconds": [], "time_cpu": [], "time_forward": []}
        for pair in range(args.pairs):
            rows = {}
            for i in ((0, 1) if pair % 2 == 0 else (1, 0)):
                rows[i], _ = trainers[i]._ppo_step()
            if pair == 0:
                continue  # warm-up
            for i in (0, 1):
                rates[i].append(trainers[i].sizes.global_batch / rows[i]["step_seconds"])
            for key, values in ratios.items():
                values.append(rows[1][key] / rows[0][key])
        a, b = (dict(t.models.actor.named_parameters()) for t in trainers)
        max_diff = max(float((a[n].detach() - b[n].detach()).abs().max()) for n in a)
        for run in runs:
            run.manifest["metrics"] = {}
            run.__exit__(None, None, None)
    result = {"task": "tiny (GAE, 16 episodes x 24 tokens, 4 epochs)", "tuning": args.tuning, "threads": args.threads,
              "pairs_timed": args.pairs - 1, "episodes_per_s_without_reference": statistics.median(rates[0]),
              "episodes_per_s_with_reference": statistics.median(rates[1]),
              **{f"speedup_{key}": statistics.median(values) for key, values in ratios.items()},
              "ratios": ratios, "weights_max_diff": max_diff}
    print(f"| kl_coef 0 | episodes/s (median of {args.pairs - 1} steps) |\n|---|---|\n"
          f"| no reference (now) | {result['episodes_per_s_without_reference']:.2f} |\n"
          f"| reference loaded and run (before) | {result['episodes_per_s_with_reference']:.2f} |\n\n"
          + "\n".join(f"speed-up (with / without), median of per-pair ratios, {key}: "
                      f"{result[f'speedup_{key}']:.3f}" for key in ratios)
          + f"\nweights' largest difference: {max_diff:g}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
