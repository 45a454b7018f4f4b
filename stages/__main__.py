"""Entry point of one stage process: ``python -m stages STAGE --config FILE [key=value ...]``.

FILE is a run config (YAML) or the resolved JSON the orchestrator writes next to the run. This is what
launchers (in-process, torchrun, deepspeed, srun) start, once per rank. Its logging is set up first,
before any library is imported (``pipeline.console``: under the orchestrator, without ``--verbose``, what
libraries say goes to stage.log only). Exit codes: 0 complete, 2 a bad config, 75 (``STOP_EXIT_CODE``)
stopped on request with its state saved (started again, it resumes), anything else failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.console import setup_stage_output
from pipeline.registry import RegistryError, spec_of
from pipeline.stage import STOP_EXIT_CODE, StageInterrupted
from stages import run_stage


def main(argv: list[str] | None = None, runner: Callable[[str, Any], dict] = run_stage) -> int:
    """``runner(stage, cfg)`` runs the stage (the tests' fake stages pass their own)."""
    parser = argparse.ArgumentParser(prog="python -m stages", description=__doc__)
    parser.add_argument("stage", help="a stage of the run's config (pipeline/registry.py; its extra_stages too)")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys)")
    args = parser.parse_intermixed_args(argv)
    # every stage of ours loads models with transformers; other entries (the tests' fake stages) need not
    setup_stage_output(transformers=runner is run_stage)
    try:
        if args.config.endswith(".json"):
            cfg = config_from_dict(json.loads(Path(args.config).read_text()), args.config)
            if args.overrides:
                from pipeline.config import apply_overrides

                cfg = config_from_dict(apply_overrides(cfg.to_dict(), args.overrides), args.config)
        else:
            cfg = load_config(args.config, args.overrides)
        spec_of(cfg, args.stage)  # the stages a config knows are its built-ins and its extra_stages
    except (ConfigError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        runner(args.stage, cfg)
        code = 0
    except StageInterrupted:  # a stop request (signal, stop file, deadline): saved and resumable
        code = STOP_EXIT_CODE
    # every rank completes, or stops at the same step, so all of them reach this (a failure skips it: a
    # barrier with ranks that died would wait forever); imported here so that torch loads after the logging
    from stages.engine import shutdown_distributed

    shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
