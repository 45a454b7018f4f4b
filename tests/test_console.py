"""The quiet console (pipeline/console.py): what libraries say goes to stage.log only, alignpipe's own lines
and errors reach the console, ``--verbose`` shows everything.

The splitter is checked on hand-written streams cut into every possible pair of pieces; the stage-side
set-up in a subprocess that logs and warns as libraries and alignpipe do; the whole path on the tiny
config (a reward model initialised from the base model: transformers' LOAD REPORT names the new score head).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.console import LOG_ONLY, ConsoleSplit

REPO = Path(__file__).resolve().parent.parent
NOISE = ("LOAD REPORT", "MISSING", "FutureWarning", "Failed to load", "Loading weights")


def split_in_pieces(text: str, prefixes: tuple[str, ...], cut: int) -> tuple[str, str]:
    split = ConsoleSplit(prefixes)
    log1, con1 = split.feed(text[:cut])
    log2, con2 = split.feed(text[cut:])
    held = split.close()
    return log1 + log2 + held, con1 + con2 + held


def test_split_marked_lines_go_to_the_log_only():
    stream = (f"[alignpipe] sft: 380 rows\n{LOG_ONLY}[transformers] WARNING LOAD REPORT\n{LOG_ONLY}score | MISSING\n"
              f"\rsft: 50%\rsft: 100%{LOG_ONLY}FutureWarning: x\n\n[sft] done\n")
    log = ("[alignpipe] sft: 380 rows\n[transformers] WARNING LOAD REPORT\nscore | MISSING\n"
           "\rsft: 50%\rsft: 100%FutureWarning: x\n\n[sft] done\n")
    console = "[alignpipe] sft: 380 rows\n\rsft: 50%\rsft: 100%\n[sft] done\n"
    for cut in range(len(stream) + 1):  # the same result however the pipe cuts the stream
        assert split_in_pieces(stream, (), cut) == (log, console), cut


def test_split_library_progress_bars_by_prefix():
    prefixes = ("Loading weights", "Converting GGUF")
    stream = ("[rm] start\n\rLoading weights: 0%\rLoading weights: 100%\n"
              "Loading tokenizer\n\rConverting GGUF: 1/2\rConverting GGUF: 2/2\n\rrm: 10%\rrm: 100%\nLoad")
    console = "[rm] start\n\rLoading tokenizer\n\r\rrm: 10%\rrm: 100%\nLoad"
    for cut in range(len(stream) + 1):
        log, shown = split_in_pieces(stream, prefixes, cut)
        assert log == stream, cut  # the log keeps every byte
        assert shown == console, cut
    # without prefixes (--verbose) everything is shown
    assert split_in_pieces(stream, (), 7) == (stream, stream)


STAGE_SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from pipeline.console import setup_stage_output
    setup_stage_output(quiet=QUIET, transformers=True)
    from transformers.utils import logging as hf_logging
    hf_logging.get_logger("transformers.modeling_utils").warning("LlamaForX LOAD REPORT\\nscore.bias | MISSING")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    logging.getLogger("peft.tuners").error("library error: shown")
    logging.getLogger("alignpipe.distill").info("our info line")
    exec(compile("import warnings; warnings.warn('old api', FutureWarning)", "/site-packages/lib/x.py", "exec"))
    import pipeline.config  # a warning raised from our own source file is ours
    exec(compile("import warnings; warnings.warn('config: ours', FutureWarning)", pipeline.config.__file__, "exec"))
    print("[alignpipe] plain print")
""")


@pytest.mark.parametrize("quiet", [True, False])
def test_stage_process_marks_library_output(quiet):
    script = STAGE_SCRIPT.replace("QUIET", str(quiet))
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    log, console = ConsoleSplit().feed(out.stderr + out.stdout)
    for line in ("LOAD REPORT", "score.bias | MISSING", "Failed to load CPU gemm_4bit_forward", "old api"):
        assert line in log
        assert (line in console) is not quiet, line
    for line in ("library error: shown", "our info line", "config: ours", "[alignpipe] plain print"):
        assert line in console, line
    assert LOG_ONLY not in log


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("ALIGNPIPE_STAGE_ENTRY", None)
    return subprocess.run([sys.executable, "-m", "pipeline", "run", "configs/tiny.yaml", *args,
                           f"output_root={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.parametrize("verbose", [False, True])
def test_rm_from_base_load_report_in_stage_log_only(tmp_path, verbose):
    """rm.init_from=base: transformers reports lm_head UNEXPECTED and score.weight MISSING (a head we add on
    purpose). Quiet: not on the console, in stage.log. --verbose: on the console too."""
    args = ["--stages", "rm", "--no-report", "rm.init_from=base", "rm.train.max_steps=2", "rm.eval_fraction=0.02"]
    result = run_cli(tmp_path, *args, *(["--verbose"] if verbose else []))
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    log = (tmp_path / "out" / "tiny" / "rm" / "stage.log").read_text()
    assert "LOAD REPORT" in log and "score.weight" in log and "MISSING" in log
    assert LOG_ONLY not in log
    shown = [n for n in NOISE if n in console]
    assert shown == (["LOAD REPORT", "MISSING", "Loading weights"] if verbose else []), console
    assert "[rm] complete in" in console and "eval_accuracy=" in console


@pytest.mark.slow
def test_tiny_pipeline_console_is_quiet(tmp_path):
    """The whole tiny pipeline (sft -> rm -> ppo, report): no library noise on the console, our lines there."""
    result = run_cli(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert [n for n in NOISE if n in console] == [], console
    for line in ("[sft] complete in", "[rm] complete in", "[ppo] complete in", "report: "):
        assert line in console
    assert "MISSING" in (tmp_path / "out" / "tiny" / "ppo" / "stage.log").read_text()  # the critic's score.bias
