"""What a run shows on the console, and what goes only to the logs.

By default the console of ``pipeline run`` shows alignpipe's own lines (a stage starting, its own
``[alignpipe]`` lines and progress bar, the stage ending with its key metric), the warnings raised by
alignpipe's code and errors from anywhere. What libraries say on their own (transformers' LOAD REPORT
about heads we initialise on purpose, bitsandbytes' kernel probe, FutureWarnings from inside
transformers, "Loading weights" bars) goes to the stage's ``stage.log`` only. ``--verbose`` shows
everything, as the libraries print it.

How the split works. The orchestrator tees a stage process's stdout+stderr to ``stage.log`` and the
console (``pipeline/procs.py``) and sets ``ALIGNPIPE_CONSOLE=quiet`` in the stage's environment. The stage
process (``stages/__main__.py`` calls ``setup_stage_output``) then writes every line of library log
records and library warnings behind ``LOG_ONLY`` (an invisible ASCII record separator); the tee
(``ConsoleSplit``) writes those lines to the log without the mark and leaves them off the console.
transformers' own console handler and its progress bars are switched off through its logging API, its
records handed to the root logger like every other library's. A stage started any other way (Slurm, by
hand) never sees the variable and prints everything, unmarked.

The orchestrator's own process loads models too (the report's sample generations): ``libraries_to_file``
sends what libraries say there to a file (``outputs/<run>/report.log``) for the duration.

Standard library only: the orchestrator imports this at start-up, and stage processes before torch.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CONSOLE_ENV = "ALIGNPIPE_CONSOLE"  # "quiet" in a stage's environment: mark library output log-only
LOG_ONLY = "\x1e"  # at the start of a line: that line goes to stage.log only
# Progress bars libraries draw with tqdm directly (no logging API turns them off): log-only at the tee.
LOG_ONLY_PREFIXES = ("Converting and de-quantizing GGUF tensors", "Loading weights", "Writing model shards",
                     "Loading checkpoint shards")
# Loggers of alignpipe's own code (``logging.getLogger("alignpipe.x")`` or ``__name__`` in our packages)
OWN_LOGGERS = ("alignpipe", "pipeline", "stages", "data")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # holds pipeline/, stages/, data/
OWN_DIRS = tuple(str(PACKAGE_ROOT / name) + os.sep for name in ("pipeline", "stages", "data"))

Write = Callable[[str, bool], None]  # (text, show on the console too)


def is_own_logger(name: str) -> bool:
    return name.split(".", 1)[0] in OWN_LOGGERS


def is_own_file(filename: str) -> bool:
    """Whether a warning was raised from alignpipe's source files (not a library's)."""
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    return path.startswith(OWN_DIRS)


# ------------------------------------------------------------------------------------- tee side
class ConsoleSplit:
    """Splits a stage's output stream into what goes to the log and what also goes to the console.

    Log-only: from a ``LOG_ONLY`` mark up to and including the next newline (a mark may start mid-line,
    after a progress bar's last update), and each ``\r``/``\n``-separated segment that starts with one of
    ``prefixes`` (a library's own progress bar, which no API turns off). Everything else goes to both.
    Text may arrive in any pieces: a segment start too short to tell is held back until it can be told
    (``close`` returns what is still held at the end). The marks themselves go to neither.
    """

    def __init__(self, prefixes: tuple[str, ...] = ()):
        self.prefixes = prefixes
        self._until = ""  # inside a log-only span that ends after the first of these characters
        self._at_start = True  # at the start of a segment (after \r or \n)
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """``text`` -> (for the log, for the console)."""
        text, self._held = self._held + text, ""
        log: list[str] = []
        console: list[str] = []
        pos = 0
        while pos < len(text):
            if self._until:
                ends = [i for i in (text.find(c, pos) for c in self._until) if i >= 0]
                if not ends:
                    log.append(text[pos:])
                    break
                log.append(text[pos:min(ends) + 1])
                pos, self._until, self._at_start = min(ends) + 1, "", True
                continue
            if self._at_start and self.prefixes:
                rest = text[pos:pos + max(map(len, self.prefixes))]
                if rest.startswith(self.prefixes):
                    self._until = "\r\n"
                    continue
                if any(p.startswith(rest) for p in self.prefixes):  # too short to tell yet
                    self._held = text[pos:]
                    break
            stops = [i for i in (text.find(c, pos) for c in ("\r", "\n", LOG_ONLY)) if i >= 0]
            stop = min(stops) if stops else len(text)
            if stop < len(text) and text[stop] == LOG_ONLY:
                log.append(text[pos:stop])
                console.append(text[pos:stop])
                pos, self._until = stop + len(LOG_ONLY), "\n"
                continue
            both = text[pos:stop + 1]
            log.append(both)
            console.append(both)
            pos, self._at_start = stop + 1, stop < len(text)
        return "".join(log), "".join(console)

    def close(self) -> str:
        """Text still held back at the end of the stream (it goes to both)."""
        held, self._held = self._held, ""
        return held


# ------------------------------------------------------------------------------- process side
class _LibraryHandler(logging.Handler):
    """Library log records (any logger not ours) -> ``write(text, show)``; shown on the console too from
    ERROR up."""

    def __init__(self, write: Write):
        super().__init__()
        self.write = write
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if is_own_logger(record.name):
            return
        try:
            text = f"[{record.name.split('.', 1)[0]}] {self.format(record)}\n"
            self.write(text, record.levelno >= logging.ERROR)
        except Exception:  # a logging call must never take the stage down
            self.handleError(record)


class _OwnHandler(logging.StreamHandler):
    """alignpipe's own log records, INFO and up, as plain lines on stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.addFilter(lambda record: is_own_logger(record.name))


def _warning_hook(write: Write, original: Callable) -> Callable:
    """A ``warnings.showwarning``: alignpipe's own warnings print as before; a library's go to ``write``."""

    def show(message, category, filename, lineno, file=None, line=None):
        if is_own_file(filename):
            original(message, category, filename, lineno, file, line)
        else:
            write(warnings.formatwarning(message, category, filename, lineno, line), False)

    return show


def _mark_lines(text: str) -> str:
    return "".join(LOG_ONLY + line for line in text.splitlines(keepends=True))


def _to_stderr(text: str, show: bool) -> None:
    sys.stderr.write(text if show else _mark_lines(text))
    sys.stderr.flush()


def _plain_stderr(text: str, show: bool) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _transformers_to_root() -> Callable[[], None]:
    """Turn off transformers' own console handler and progress bars; its records propagate to the root
    logger. Returns the undo."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    propagates = hf_logging._get_library_root_logger().propagate
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()

    def undo() -> None:
        hf_logging.enable_default_handler()
        if not propagates:
            hf_logging.disable_propagation()
        if bars:
            hf_logging.enable_progress_bar()

    return undo


def setup_stage_output(quiet: bool | None = None, transformers: bool = True) -> None:
    """Configure a stage process's logging (once, at its start, before libraries are imported).

    Always: alignpipe's loggers print INFO and up on stderr. ``quiet`` (default: ``ALIGNPIPE_CONSOLE=quiet``
    in the environment, set by the orchestrator unless ``--verbose``): library log records and warnings
    are written behind ``LOG_ONLY`` marks (errors unmarked), so the orchestrator's tee keeps them in
    stage.log only; with ``transformers`` also its own handler and progress bars are switched off (this
    imports it: stages that load no model, the tests' fake stages, pass False).
    """
    if quiet is None:
        quiet = os.environ.get(CONSOLE_ENV) == "quiet"
    root = logging.getLogger()
    if any(isinstance(h, _OwnHandler) for h in root.handlers):
        return  # already set up
    root.addHandler(_OwnHandler())
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    # with a handler on the root logger, logging's last-resort printer no longer shows library records
    root.addHandler(_LibraryHandler(_to_stderr if quiet else _plain_stderr))
    if not quiet:
        return
    warnings.showwarning = _warning_hook(_to_stderr, warnings.showwarning)
    if transformers:
        _transformers_to_root()


@contextmanager
def libraries_to_file(path: str | os.PathLike, transformers: bool = True) -> Iterator[None]:
    """For the duration: library log records and warnings are appended to ``path`` (errors also on stderr),
    transformers' progress bars are off. For the orchestrator's own process (the report's samples)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log, warnings.catch_warnings():

        def write(text: str, show: bool) -> None:
            log.write(text)
            log.flush()
            if show:
                sys.stderr.write(text)

        handler = _LibraryHandler(write)
        root = logging.getLogger()
        root.addHandler(handler)
        warnings.showwarning = _warning_hook(write, warnings.showwarning)
        undo = _transformers_to_root() if transformers else (lambda: None)
        try:
            yield
        finally:
            undo()
            root.removeHandler(handler)
