"""Processes on this machine: whether a stage's recorded pid is still alive, running a stage process
with its output teed to a log, and the lock that keeps two orchestrators off one run.

- ``process_state(manifest)``: ``alive`` / ``dead`` / ``other-host`` for a ``running`` manifest, from
  ``os.kill(pid, 0)`` and Linux ``/proc`` (a reused pid whose process started after the manifest counts
  as dead, so does a zombie).
- ``run_process(cmd, env, log_path, ...)``: run from the repo root, stdout+stderr to the log and the
  console (lines the stage marked log-only, ``pipeline.console``, to the log alone); Ctrl-C is passed on
  and the process gets 60 s to save its state.
- ``RunLock(run_dir)``: ``flock`` on ``outputs/<run>/.orchestrator.lock``, released by the kernel when
  the holder dies.
"""

from __future__ import annotations

import codecs
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import REPO_ROOT
from .console import LOG_ONLY_PREFIXES, ConsoleSplit
from .launch import describe
from .manifest import ManifestError

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- liveness
def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def _process_start_time(pid: int) -> float | None:
    """Epoch seconds at which ``pid`` started (Linux /proc), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    boot = _boot_time()
    if boot is None or len(fields) < 20:
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def process_state(manifest: dict[str, Any]) -> str:
    """For a ``running`` manifest: ``alive``, ``dead`` (its process is gone) or ``other-host``.

    A pid that exists but whose process started well after the manifest was written belongs to another
    program (pid reuse) and counts as ``dead``.
    """
    host = manifest.get("host")
    if host and host != socket.gethostname():
        return "other-host"
    pid = manifest.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "dead"
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the pid exists
    except ProcessLookupError:
        return "dead"
    except PermissionError:  # it exists but belongs to another user: still check it is the stage's process
        logger.debug("pid %d exists but is not ours to signal", pid)
    if pid == os.getpid():
        return "alive"
    started = _process_start_time(pid)
    if started is not None and isinstance(manifest.get("started_at"), (int, float)):
        if started > float(manifest["started_at"]) + 5.0:
            return "dead"
    zombie = False
    try:
        zombie = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        pass
    return "dead" if zombie else "alive"


# ---------------------------------------------------------------------------------------------- tee
def run_process(cmd: list[str], env: dict[str, str], log_path: Path, append: bool, echo: bool = True,
                quiet: bool = False) -> int:
    """Run ``cmd`` from the repo root, tee its stdout+stderr to ``log_path`` (and the console), return its code.

    Lines the process marks log-only (``pipeline.console.LOG_ONLY``) go to the log alone; with ``quiet`` so
    do the library progress bars of ``LOG_ONLY_PREFIXES``. Ctrl-C is passed on to the process, which gets
    60 s to save its state before it is terminated.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    split = ConsoleSplit(LOG_ONLY_PREFIXES if quiet else ())
    with open(log_path, "ab" if append else "wb") as log:
        header = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {describe(cmd)}\n"
        log.write(header.encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = proc.stdout.fileno()
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                to_log, to_console = split.feed(decoder.decode(chunk))
                log.write(to_log.encode())
                log.flush()
                if echo and to_console:
                    sys.stdout.write(to_console)
                    sys.stdout.flush()
            rest = split.close()
            log.write(rest.encode())
            if echo and rest:
                sys.stdout.write(rest)
            return proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            raise
        finally:
            proc.stdout.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        # a terminal's Ctrl-C reached the stage too (same process group): give it a moment to save and exit
        proc.wait(timeout=3)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A TCP port that is free on this machine right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive lock on ``outputs/<run>/.orchestrator.lock`` while one ``pipeline run`` drives the run.

    ``flock`` is released by the kernel when the process dies, so a crashed orchestrator never leaves a
    stale lock behind. A second orchestrator on the same run gets a ManifestError naming the holder.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".orchestrator.lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ManifestError(
                f"another `pipeline run` is driving {self.path.parent} ({holder}); wait for it to finish "
                "or stop it, then re-run"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
