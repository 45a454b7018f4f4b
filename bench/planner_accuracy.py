"""Memory planner accuracy: pipeline/memory.py's per-stage estimate against the peak each stage process
recorded in its manifest (``peak_memory``; pipeline/stage.py), on CPU.

    .venv/bin/python bench/planner_accuracy.py                      # configs/tiny.yaml (~1 min)
    .venv/bin/python bench/planner_accuracy.py configs/demo.yaml    # the SmolLM2 demo (~6-10 min)

Measured = RSS growth of the stage process from the moment the stage began (after its imports) to its peak
(ru_maxrss); on CUDA bench/gpu_check.py uses torch's max allocated instead. The base model is prepared first,
so that building or converting it is not counted in the SFT stage. Targets: within 25% for SFT and RM,
within 40% for PPO. Writes outputs/planner-accuracy/<config>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_check import MIB, STAGES, stage_figures  # noqa: E402

TARGET = {"sft": 0.25, "rm": 0.25, "ppo": 0.40}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    ap.add_argument("--run-dir", help="read the peaks of an existing, complete run folder (e.g. the demo run of "
                                      "bench/quality.py) instead of running the stages again")
    args = ap.parse_args(argv)
    from pipeline.config import load_config
    from pipeline.models import prepare_base

    name = f"planner-accuracy-{Path(args.config).stem}"
    root = REPO / "outputs" / "planner-accuracy"
    t0 = time.time()
    if args.run_dir:
        run_dir, code = Path(args.run_dir).resolve(), 0
    else:
        overrides = [f"run_name={name}", f"output_root={root}", "logging.progress_bar=false", *args.overrides]
        prepare_base(load_config(REPO / args.config, overrides).model)
        cmd = [sys.executable, "-m", "pipeline", "run", args.config, "--force", "--no-report", "--stages", *STAGES,
               *overrides]
        code = subprocess.run(cmd, cwd=REPO).returncode
        run_dir = root / name
    root.mkdir(parents=True, exist_ok=True)
    rows = {s: stage_figures(run_dir, s) for s in STAGES}
    print(f"\nplanner accuracy, {args.config} ({time.time() - t0:.0f} s, exit {code}); measured = RSS growth of the "
          "stage process since the stage began")
    print(f"{'stage':6} {'planner MiB':>12} {'measured MiB':>13} {'error':>8} {'target':>7}  verdict")
    ok = code == 0
    for stage, f in rows.items():
        est, peak = f.get("planner_estimate_bytes"), f.get("peak_bytes")
        if not est or peak is None:
            print(f"{stage:6} {'-':>12} {'-':>13}   (status {f.get('status')})")
            ok = False
            continue
        err = (est - peak) / peak  # > 0: the planner over-estimates
        f["planner_error"] = round(err, 3)
        within = abs(err) <= TARGET[stage]
        ok &= within
        print(f"{stage:6} {est / MIB:12,.1f} {peak / MIB:13,.1f} {err:+8.0%} {TARGET[stage]:>6.0%}  "
              f"{'within' if within else 'OUTSIDE'}")
    out = root / f"{Path(args.config).stem}.json"
    out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "stages": rows}, indent=2))
    print(f"written: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
