"""Stopping a stage on request: signals, the stop file, the deadline, and the exit code that asks for a requeue.

A cluster stops jobs before it kills them: Slurm sends ``SIGUSR1`` ahead of the time limit (``#SBATCH
--signal=B:USR1@N``, to the batch script) and ``SIGTERM`` on preemption, a requeue or a cancel, then kills
the job after a grace period. A stage that stops at once loses everything since its last checkpoint; one
that ignores the warning is killed, and a job killed at its time limit is not requeued, so the jobs after
it in an ``afterok`` chain are cancelled. Here a training stage instead finishes the optimizer step (PPO:
the rollout and update) it is in, writes a checkpoint at that step, records ``interrupted`` with the
resume step in its manifest and exits with ``STOP_EXIT_CODE``; the batch script then requeues the job,
which resumes from that checkpoint under the same job id (pipeline/slurm.py).

What asks a stage to stop, checked by the training loops at every step boundary (``stages.stopping``):

- ``SIGTERM`` or ``SIGUSR1`` to the stage process (``StopRequest``). Until a training loop starts polling
  (model loading, data), there is nothing to save and a signal interrupts at once (``StageInterrupted``);
- the stop file ``<stage>/stop-request``, written by the batch script's trap: with ``B:`` Slurm signals
  only the batch shell, and signalling the job step instead would reach the launchers first (a SIGTERM
  to ``srun`` cancels the step, a SIGUSR1 ends ``torchrun``), so the script forwards the request through
  the file, which every rank on every node sees;
- the deadline: ``$ALIGNPIPE_DEADLINE`` (epoch seconds; the batch script sets it from the job's end
  time), else ``$SLURM_JOB_END_TIME``, else ``launch.time_limit`` counted from the stage's start. The
  stage stops when less than a margin is left: 1.5 x (the longest step + the longest checkpoint seen
  so far), at least ``launch.time_limit_margin_s`` (``stop_margin``).

Standard library only: the control plane (pipeline/slurm.py) and the stage processes both read it.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The exit code of a stage that saved its state at a step and asks to be started again (EX_TEMPFAIL).
STOP_EXIT_CODE = 75
#: Written into the stage folder by the batch script's trap; its text says what the script received.
STOP_FILE = "stop-request"
#: Epoch seconds by which the stage must have stopped (set by the batch script from the job's end time).
DEADLINE_ENV = "ALIGNPIPE_DEADLINE"
#: The signals a stage stops on at its next step boundary.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")

#: The clock the deadline is read on (tests replace it).
clock = time.time


class StageInterrupted(KeyboardInterrupt):
    """A stop signal inside a stage (a scheduler's or a launcher's stop, a node going away) where it cannot
    wait for a step boundary: like Ctrl-C, the stage ends ``interrupted``, resumable, not ``failed``."""


class StageStopped(StageInterrupted):
    """A training stage stopped at a step boundary on request (``reason``), after a checkpoint at ``step``."""

    def __init__(self, reason: str, step: int):
        super().__init__(reason)
        self.reason, self.step = reason, step


# ------------------------------------------------------------------------------------------ time limits
_TIME_LIMIT = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_time_limit(value: int | str) -> int:
    """A time limit in Slurm's ``--time`` forms -> seconds. An integer is minutes; a string is ``M``,
    ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` or ``D-H:M:S``. ValueError (saying the forms) otherwise."""
    forms = "'01:30:00' (H:M:S), '90' (minutes), '1-12' (D-H), '1-12:00:00' (D-H:M:S) or an integer of minutes"
    if isinstance(value, bool):
        raise ValueError(f"time limit {value!r}: use {forms}")
    if isinstance(value, int):
        seconds = value * 60
    else:
        match = _TIME_LIMIT.match(str(value).strip())
        if match is None:
            raise ValueError(f"time limit {value!r} is not a Slurm time: use {forms}")
        days, a, b, c = (int(v) if v is not None else None for v in match.group("days", "a", "b", "c"))
        if days is not None:  # D-H, D-H:M, D-H:M:S
            seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        elif c is not None:  # H:M:S
            seconds = a * 3600 + b * 60 + c
        elif b is not None:  # M:S
            seconds = a * 60 + b
        else:  # M
            seconds = a * 60
    if seconds <= 0:
        raise ValueError(f"time limit {value!r}: must be more than zero ({forms})")
    return seconds


def format_time_limit(seconds: int) -> str:
    """Seconds -> ``H:MM:SS`` (``D-HH:MM:SS`` from a day on), as ``#SBATCH --time`` takes it."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}" if days else f"{hours:02d}:{minutes:02d}:{secs:02d}"


def deadline_from(env: Mapping[str, str], time_limit_s: int | None, started: float) -> tuple[float | None, str]:
    """When the stage must have stopped, and where that comes from: ``$ALIGNPIPE_DEADLINE``, else
    ``$SLURM_JOB_END_TIME`` (epoch seconds), else ``started + time_limit_s``; (None, '') when none applies."""
    for name in (DEADLINE_ENV, "SLURM_JOB_END_TIME"):
        value = env.get(name, "").strip()
        if value:
            try:
                return float(value), name
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} must be epoch seconds") from None
    if time_limit_s is not None:
        return started + time_limit_s, "launch.time_limit"
    return None, ""


def stop_margin(floor_s: float, longest_step_s: float, longest_checkpoint_s: float | None) -> float:
    """Seconds before the deadline at which a stage stops: room for one more step and a checkpoint, half
    again to spare, never less than ``floor_s``. Before a checkpoint has been timed, one is taken to cost
    as much as a step (the floor covers the first, slower one)."""
    checkpoint = longest_step_s if longest_checkpoint_s is None else longest_checkpoint_s
    return max(float(floor_s), 1.5 * (longest_step_s + checkpoint))


# ------------------------------------------------------------------------------------------ the request
class StopRequest:
    """This stage process's stop request: a stop signal received, the stop file, the deadline.

    ``install()`` (main thread only; a no-op elsewhere) puts handlers on SIGTERM and SIGUSR1; until
    ``begin_graceful()`` (a training loop that checks at every step boundary) they raise
    ``StageInterrupted`` at once, afterwards they only record the signal. ``restore()`` puts the previous
    handlers back. ``pending(margin)`` says why to stop now, if anything does; ``margin_floor_s`` is the
    least margin before the deadline (``stop_margin``).
    """

    def __init__(self, stage_dir: Path, deadline: float | None = None, deadline_source: str = "",
                 margin_floor_s: float = 60.0):
        self.stop_file = Path(stage_dir) / STOP_FILE
        self.deadline, self.deadline_source, self.margin_floor_s = deadline, deadline_source, margin_floor_s
        self.received: str | None = None
        self.graceful = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self.graceful:
            raise StageInterrupted(name)
        if self.received is None:
            self.received = name
            print(f"[alignpipe] {name} received: stopping after the current step, with a checkpoint", flush=True)

    def begin_graceful(self) -> None:
        """From now on a stop signal waits for the next step boundary (a training loop checks ``pending``)."""
        self.graceful = True

    def requested_by_file(self) -> str | None:
        """The stop file's reason ('' when it is empty), None when there is no stop file."""
        try:
            return self.stop_file.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"stop file unreadable ({exc})"

    def clear_file(self) -> None:
        """Remove the stop file (acted on; a leftover must not stop the next run)."""
        self.stop_file.unlink(missing_ok=True)

    def seconds_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - clock()

    def pending(self, margin_s: float) -> tuple[int, str]:
        """(urgency, reason) of a stop due now, (0, '') when none: 3 a signal, 2 the stop file, 1 the deadline
        less than ``margin_s`` away. Ranks agree on the largest urgency (``stages.stopping``)."""
        if self.received is not None:
            return 3, self.received
        by_file = self.requested_by_file()
        if by_file is not None:
            return 2, f"stop request ({by_file or STOP_FILE})"
        left = self.seconds_left()
        if left is not None and left < margin_s:
            return 1, f"time limit ({max(left, 0.0):.0f} s left by {self.deadline_source}, margin {margin_s:.0f} s)"
        return 0, ""


def stop_request_for(stage_dir: Path, time_limit_s: int | None, margin_floor_s: float,
                     env: Mapping[str, str] | None = None) -> StopRequest:
    """The ``StopRequest`` of a stage starting now, its deadline from ``env`` or ``time_limit_s``."""
    deadline, source = deadline_from(os.environ if env is None else env, time_limit_s, clock())
    return StopRequest(stage_dir, deadline, source, margin_floor_s)
