"""``python -m pipeline`` / ``alignpipe``: run, status, report, eval, slurm, serve, validate, push, export, score.

    python -m pipeline run CONFIG [--stages sft rm ...] [--force] [--no-parents] [key=value ...]
    python -m pipeline status CONFIG [--json] [key=value ...]
    python -m pipeline report CONFIG [--no-samples] [key=value ...]
    python -m pipeline eval CONFIG [--stages base sft ppo ...] [--force] [key=value ...]
    python -m pipeline slurm CONFIG [--submit] [--force] [--no-parents] [--stages ...] [key=value ...]
    python -m pipeline serve CHECKPOINT [--host 127.0.0.1] [--port 8000] [--api-key-env VAR]
    python -m pipeline validate CONFIG [--stages ...] [key=value ...]
    python -m pipeline push RUN STAGE --repo NAME [--adapter] [--dry-run] [--private] [--token-env VAR]
    python -m pipeline export RUN STAGE --gguf [--quant q8_0|f16|bf16|f32] [--output FILE]
    python -m pipeline score RM_PATH DATA [--out FILE] [--batch-size N] [--chat-template TEMPLATE]

CONFIG is a YAML file or the name of a config alignpipe ships (``tiny``, ``demo``, ...). Config, manifest
and data errors print ``error: <message>`` and exit 2; a failed stage exits 1 with the path of its log;
Ctrl-C exits 130 (re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from data.formats import DataError

from . import serve
from .config import ConfigError, load_config, model_location
from .launch import has_cuda
from .manifest import ManifestError
from .memory import MemoryPlanError
from .models import check_model_sources, describe_chat_templates
from .orchestrator import StageFailed, format_status, run_pipeline, status_json
from .paths import shipped_configs
from .plan import check_deepspeed, memory_plans, select_stages
from .preemption import STOP_EXIT_CODE
from .registry import specs
from .report import report_for
from .slurm import SlurmError, slurm_pipeline

# Every module above imports only the standard library, pydantic and yaml at import time, so the CLI
# starts fast; torch, transformers and deepspeed are imported inside the functions that need them.

# Exceptions that are the user's to fix: printed as one message, no traceback.
USER_ERRORS = (ConfigError, ManifestError, DataError, MemoryPlanError, SlurmError)

# The example that ends each command's --help ({prog}: how this program was started).
EXAMPLES = {
    "run": ["{prog} run tiny                     # the tiny test config: every stage in seconds",
            "{prog} run demo --stages sft rm     # SmolLM2, SFT then the reward model",
            "{prog} run my.yaml sft.train.max_steps=10 run_name=try2 --verbose"],
    "status": ["{prog} status tiny", "{prog} status my.yaml run_name=try2 --json"],
    "report": ["{prog} report tiny --no-samples"],
    "eval": ["{prog} eval demo --stages base ppo eval.limit=30"],
    "slurm": ["{prog} slurm configs/examples/llama3-8b-lora-zero2-8gpu.yaml --submit"],
    "validate": ["{prog} validate demo --stages ppo"],
    "serve": ["{prog} serve outputs/tiny/ppo --port 8000"],
    "push": ["{prog} push tiny ppo --repo me/tiny-ppo --dry-run"],
    "export": ["{prog} export tiny ppo --gguf --quant q8_0"],
    "score": ["{prog} score outputs/tiny/rm data/demo/preferences.jsonl --out scored.jsonl"],
}


def program_name() -> str:
    """``alignpipe`` when started as the console script, else ``python -m pipeline``."""
    return "alignpipe" if Path(sys.argv[0]).name == "alignpipe" else "python -m pipeline"


def _examples(lines: list[str], prog: str) -> str:
    return "example" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join("  " + line.format(prog=prog)
                                                                         for line in lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    prog = prog or program_name()
    first_steps = ["{prog} run tiny                # a tiny model through SFT -> RM -> PPO, in seconds",
                   "{prog} status tiny             # what ran, its metrics, where the outputs are",
                   "{prog} run demo                # SmolLM2-135M, the same stages (minutes on a CPU)",
                   "{prog} run --help              # one command's options, with an example"]
    parser = argparse.ArgumentParser(prog=prog, description="alignpipe: SFT -> RM -> PPO pipeline",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2].replace("python -m pipeline", prog)
                                     .replace("``", "") + "\n" + _examples(first_steps, prog))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = ("run config: a YAML file, or the name of a shipped config ("
                   + ", ".join(shipped_configs()) + ")")

    def config_command(name: str, help_text: str, stages: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help=config_help)
        if stages:
            p.add_argument("--stages", nargs="+", metavar="STAGE",
                           help=f"stages to run, of {', '.join(s.name for s in specs())} and the config's "
                                "extra_stages (default: the config's stages)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. sft.train.max_steps=10 run_name=try2")
        return p

    _add_pipeline_commands(config_command)
    _add_model_commands(sub)
    _add_score_command(sub)
    for name, command in sub.choices.items():
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        command.epilog = _examples(EXAMPLES[name], prog)
    return parser


def _add_pipeline_commands(config_command: Callable[..., argparse.ArgumentParser]) -> None:
    """run, status, report, slurm, validate and eval: the commands that take a run config."""
    run = config_command("run", "run the stages of a config, each as its own process", stages=True)
    run.add_argument("--force", action="store_true",
                     help="re-run the requested stages from scratch even when complete and unchanged")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    shown = run.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="do not echo stage output (it still goes to stage.log)")
    shown.add_argument("--verbose", action="store_true",
                       help="echo everything: what libraries print (by default in stage.log only) and the full "
                            "memory tables")
    run.add_argument("--no-parents", action="store_true",
                     help="refuse a requested stage whose parents are not complete (default: run them first)")

    status = config_command("status", "each stage's state, metrics and folder, and Slurm job states")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    report = config_command("report", "write outputs/<run>/report.md with plots and sample generations")
    report.add_argument("--no-samples", action="store_true", help="do not generate sample generations")

    slurm = config_command("slurm", "write one sbatch script per stage (and submit them with --submit)",
                           stages=True)
    slurm.add_argument("--submit", action="store_true", help="submit the chain with sbatch (afterok dependencies)")
    slurm.add_argument("--force", action="store_true", help="submit stages even when complete and unchanged")
    slurm.add_argument("--no-parents", action="store_true",
                       help="refuse a requested stage whose parents are not complete (default: submit them first)")

    config_command("validate", "load the config and print the memory plan of each stage", stages=True)

    evaluate = config_command("eval", "lm-evaluation-harness tasks (eval.tasks, local data) on the base model and "
                                      "each complete policy stage -> outputs/<run>/standard_eval.json")
    evaluate.add_argument("--stages", nargs="+", metavar="MODEL",
                          help="models to evaluate, of base, sft, ppo, dpo (default: base and every complete one)")
    evaluate.add_argument("--force", action="store_true",
                          help="evaluate again models whose weights and settings already have results")


def _add_model_commands(sub: Any) -> None:
    """serve, push and export: the commands that take a stage's model."""
    serve = sub.add_parser("serve", help="serve a stage's model with an OpenAI-compatible HTTP API",
                           description="serve a stage's model with an OpenAI-compatible HTTP API")
    serve.add_argument("checkpoint_pos", nargs="*", metavar="CHECKPOINT",
                       help="a stage folder (outputs/<run>/<stage>) or a Hugging Face folder; several: each is "
                            "its own model name (LoRA stages on one base share it, the adapter switched per request)")
    serve.add_argument("--checkpoint", dest="checkpoint_opt", metavar="DIR", help="same as CHECKPOINT")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key-env", default=None, metavar="VAR",
                       help="name of the environment variable holding the bearer token clients must send")
    serve.add_argument("--model-name", default=None, help="the model id to serve under")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--best-of", type=int, default=0, metavar="N",
                       help="answer each choice with the best of N samples by --best-of-rm (sampled requests only)")
    serve.add_argument("--best-of-rm", default=None, metavar="DIR", help="the rm stage folder that picks")

    push = sub.add_parser("push", help="upload a stage's model (or adapter) with its model card to the hub",
                          description="upload a stage's model (or adapter) with its model card to the hub")
    push.add_argument("run", metavar="RUN", help="the run folder (outputs/<run>) or the run name")
    push.add_argument("stage", metavar="STAGE", help="the stage, e.g. sft, ppo")
    push.add_argument("--repo", required=True, metavar="NAME", help="hub repository, NAME or ORG/NAME")
    push.add_argument("--adapter", action="store_true", help="send adapter/ instead of model/")
    push.add_argument("--dry-run", action="store_true", help="list the files that would be sent; send nothing")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token-env", default="HF_TOKEN", metavar="VAR",
                      help="environment variable holding the hub token (default HF_TOKEN; never printed)")

    export = sub.add_parser("export", help="write a stage's model as a GGUF file (llama.cpp and friends)",
                            description="write a stage's model as a GGUF file (llama.cpp and friends)")
    export.add_argument("run", metavar="RUN", help="the run folder (outputs/<run>) or the run name")
    export.add_argument("stage", metavar="STAGE", help="the stage, e.g. sft, ppo")
    export.add_argument("--gguf", action="store_true", required=True, help="GGUF (the one format for now)")
    export.add_argument("--quant", default="q8_0", choices=["q8_0", "f16", "bf16", "f32"], help="default q8_0")
    export.add_argument("--output", default=None, metavar="FILE",
                        help="default <stage>/export/<run>-<stage>.<quant>.gguf")


def _add_score_command(sub: Any) -> None:
    """score: a data file scored by a reward model."""
    score_help = "score a data file with a reward model (rows come back with 'score' added)"
    score = sub.add_parser(
        "score", help=score_help, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=score_help + ".\n\n"
        "Rows: {\"messages\": [...]} (a whole conversation ending with the assistant's answer, rendered as given),\n"
        "{\"prompt\", \"response\"}, or {\"prompt\", \"chosen\", \"rejected\"} (chosen_score and rejected_score).\n"
        "The input rows are written as JSONL with the scores added; a summary line (mean score, preference\n"
        "accuracy) goes to stderr. A reward model the rm stage trained is read at its trained position (the\n"
        "response's eos, with the system prompt it was trained with on prompt rows); any other one exactly as\n"
        "transformers reads it (the full chat-template render, last non-pad token).",
        epilog="example:\n  python -m pipeline score outputs/tiny/rm data/demo/preferences.jsonl --out scored.jsonl")
    score.add_argument("rm", metavar="RM_PATH",
                       help="an rm stage folder (outputs/<run>/rm), its model/, any one-label sequence classifier "
                            "folder, or a hub name")
    score.add_argument("data", metavar="DATA", help="a JSONL / JSON / CSV / Parquet file (optionally .gz)")
    score.add_argument("--out", default=None, metavar="FILE", help="where the scored rows go (default: stdout)")
    score.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per forward (default 16)")
    score.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                       help="for a reward model trained elsewhere whose tokenizer has none (or the wrong one): "
                            "Jinja text, a file, chatml or raw")


def unknown_command(word: str) -> str | None:
    """The message for a first argument that is no command (None: it is one): the closest command, or
    ``run WORD`` for a config."""
    if word in COMMANDS:
        return None
    if word in shipped_configs() or word.endswith((".yaml", ".yml")):
        return f"{word!r} is not a command; to run that config: {program_name()} run {word}"
    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown command {word!r}{hint} (commands: {', '.join(COMMANDS)})"


def _cmd_run(args: argparse.Namespace) -> int:
    run_pipeline(args.config, args.overrides, stages=args.stages, force=args.force, echo=not args.quiet,
                 report=not args.no_report, parents=not args.no_parents, verbose=args.verbose)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(status_json(cfg) if args.json else format_status(cfg))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    path = report_for(args.config, args.overrides, generate_samples=not args.no_samples)
    print(f"report: {path}")
    html = path.with_suffix(".html")
    if html.exists():
        print(f"report: {html} (one self-contained page: open it in a browser)")
    return 0


def _cmd_slurm(args: argparse.Namespace) -> int:
    slurm_pipeline(args.config, args.overrides, stages=args.stages, do_submit=args.submit, force=args.force,
                   parents=not args.no_parents)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    stages = select_stages(cfg, args.stages)
    check_model_sources(cfg, stages)  # a model that is not there: exit 2 before "valid"
    print(f"{args.config}: valid. run '{cfg.run_name}' -> {cfg.run_dir()}; stages {' -> '.join(stages)}; "
          f"launcher {cfg.launch.launcher}")
    for line in describe_chat_templates(cfg):
        print(line)
    memory_plans(cfg, stages, print)
    check_deepspeed(cfg, stages, has_cuda(), print)
    print("ok")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    positional = list(args.checkpoint_pos or [])
    checkpoint = args.checkpoint_opt or (positional[0] if len(positional) == 1 else positional)
    if not checkpoint:
        raise ConfigError("serve needs a checkpoint: python -m pipeline serve outputs/<run>/<stage> "
                          "(or --checkpoint DIR)")
    if args.checkpoint_opt and positional and [args.checkpoint_opt] != positional:
        raise ConfigError(f"serve got CHECKPOINT {' '.join(positional)} and --checkpoint {args.checkpoint_opt}: "
                          "name several checkpoints as CHECKPOINT arguments only")
    namespace = argparse.Namespace(checkpoint=checkpoint, host=args.host, port=args.port,
                                   api_key_env=args.api_key_env, model_name=args.model_name, dtype=args.dtype,
                                   best_of=args.best_of, best_of_rm=args.best_of_rm)
    return int(serve.main(namespace) or 0)


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push

    push(args.run, args.stage, args.repo, adapter=args.adapter, dry_run=args.dry_run, private=args.private,
         token_env=args.token_env)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_gguf

    export_gguf(args.run, args.stage, quant=args.quant, output=args.output)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from stages.scoring import score_file

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be at least 1")
    # a path that exists from here is taken as it is; otherwise relative to the repository root, or a hub name
    try:
        location = str(Path(args.rm).resolve()) if Path(args.rm).is_dir() else model_location(args.rm)
    except ValueError as exc:
        raise ConfigError(f"RM_PATH: {exc}") from None
    data = str(Path(args.data).resolve()) if Path(args.data).is_file() else args.data
    try:
        score_file(location, data, out=args.out, batch_size=args.batch_size, chat_template=args.chat_template)
    except (DataError, ConfigError):
        raise
    except (OSError, ValueError) as exc:  # not a reward model, or one that does not load
        raise ConfigError(f"{args.rm}: {exc}") from None
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .standard_eval import eval_for

    path = eval_for(args.config, args.overrides, models=args.stages, force=args.force)
    print(f"eval: {path} (python -m pipeline report CONFIG shows it)")
    return 0


COMMANDS = {"run": _cmd_run, "status": _cmd_status, "report": _cmd_report, "slurm": _cmd_slurm,
            "validate": _cmd_validate, "serve": _cmd_serve, "push": _cmd_push, "export": _cmd_export,
            "eval": _cmd_eval, "score": _cmd_score}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default sys.argv[1:]) and run the command; returns the exit code.

    Called with no argument (console script, ``python -m pipeline``) it exits the process with that code.
    """
    exit_on_return = argv is None
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    first = next((w for w in words if not w.startswith("-")), None)
    if first is not None and (problem := unknown_command(first)):
        parser.error(problem)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere: after options, or after the --stages list
    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "stages", None):
        overrides += [s for s in args.stages if "=" in s]
        args.stages = [s for s in args.stages if "=" not in s] or None
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if hasattr(args, "overrides"):
        args.overrides = overrides + [a for a in extra if "=" in a]
    try:
        code = COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = STOP_EXIT_CODE if exc.returncode == STOP_EXIT_CODE else 1  # 75: a job script may requeue
    except KeyboardInterrupt:
        print("\ninterrupted: re-run the same command to resume (completed stages are skipped)", file=sys.stderr)
        code = 130
    if exit_on_return:
        sys.exit(code)
    return code
