"""A busy machine: the demo's SFT step alone and beside one competing single-threaded CPU process,
with the old thread settings (torch/OpenMP defaults) and the new CPU default of stage processes
(``pipeline.launch.cpu_thread_env``: OMP_WAIT_POLICY=PASSIVE, KMP_BLOCKTIME=0, OMP_NUM_THREADS = the
cores this process may use).

Each measurement is a fresh process (OpenMP reads its settings when torch is loaded) that runs the SFT
stage of CONFIG for ``--steps`` steps and reports training seconds per step. The competitor is
``python -c "while True: pass"``, started before the job and stopped after it. Runs are interleaved
(for each repeat: alone/before, alone/after, busy/before, busy/after), so drift hits all four alike.
Prints a table of medians, the slowdown busy/alone of each setting and the speed-up after/before.

    python bench/busy.py [--config configs/demo.yaml] [--steps 6] [--repeats 3] [--json out.json]

Run it on an otherwise quiet machine: anything else running changes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def worker(args) -> None:
    """One SFT job in this process; prints RESULT {seconds_per_step, steps, threads}."""
    import torch

    from pipeline.config import load_config
    from stages import engine as engine_mod
    from stages import sft

    with tempfile.TemporaryDirectory() as out:
        overrides = [f"output_root={out}", "run_name=busy", "logging.progress_bar=false",
                     f"sft.train.max_steps={args.steps}", "sft.train.save_steps=100000", "sft.eval_fraction=0"]
        if args.threads:
            overrides.append(f"sft.train.num_threads={args.threads}")
        cfg = load_config(REPO / args.config, overrides)
        timing: dict[str, float] = {}
        original_fit = engine_mod.Engine.fit

        def timed_fit(self):
            start = time.perf_counter()
            result = original_fit(self)
            timing["train_s"] = time.perf_counter() - start
            timing["steps"] = result.global_step
            return result

        engine_mod.Engine.fit = timed_fit
        sft.run(cfg)
    print("RESULT " + json.dumps({"seconds_per_step": timing["train_s"] / max(1, timing["steps"]),
                                  "steps": timing["steps"], "threads": torch.get_num_threads()}), flush=True)


def setting_env(setting: str) -> dict[str, str]:
    """The worker's environment: 'before' = no thread variables (torch/OpenMP defaults), 'after' = the
    stage processes' CPU default."""
    from pipeline.launch import cpu_thread_env

    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    if setting == "after":
        env.update(cpu_thread_env())
    return env


def measure(args, setting: str, busy: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--config", args.config, "--steps", str(args.steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    competitor = None
    if busy:
        competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=setting_env(setting), cwd=REPO)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{setting}/{'busy' if busy else 'alone'} failed:\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="sft.train.num_threads override (default: "
                        "the config's)")
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from pipeline.launch import available_cpus, cpu_thread_env

    print(f"# {args.config}, SFT {args.steps} steps, {args.repeats} repeats; available cpus {available_cpus()}, "
          f"os.cpu_count {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; after = {cpu_thread_env()}",
          flush=True)
    runs: dict[tuple[str, str], list[float]] = {}
    for repeat in range(args.repeats):
        for busy in (False, True):
            for setting in ("before", "after"):
                result = measure(args, setting, busy)
                key = (setting, "busy" if busy else "alone")
                runs.setdefault(key, []).append(result["seconds_per_step"])
                print(f"repeat {repeat + 1}: {setting:6s} {key[1]:5s} {result['seconds_per_step']:.3f} s/step "
                      f"(torch threads {result['threads']})", flush=True)
    med = {key: statistics.median(values) for key, values in runs.items()}
    print("\n| setting | alone s/step | busy s/step | busy / alone |\n|---|---|---|---|")
    for setting in ("before", "after"):
        alone, busy = med[(setting, "alone")], med[(setting, "busy")]
        print(f"| {setting} | {alone:.3f} | {busy:.3f} | {busy / alone:.2f}x |")
    print(f"\nafter / before: alone {med[('after', 'alone')] / med[('before', 'alone')]:.2f}x, "
          f"busy {med[('after', 'busy')] / med[('before', 'busy')]:.2f}x (time per step; below 1 is faster)")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s}/{c}": v for (s, c), v in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
