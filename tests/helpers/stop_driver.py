"""A stage process (``python -m stages`` semantics and exit codes) that signals itself on one rank after one step.

Usage (per rank, e.g. under torchrun): ``python -m tests.helpers.stop_driver STAGE --config FILE [k=v ...]``
with ``STOP_TEST_SIGNAL_AT=RANK:STEP:SIGNAL`` (e.g. ``1:4:SIGUSR1``): that rank sends itself SIGNAL once the
shared engine has finished optimizer step STEP; the other ranks are told nothing and must stop with it.
"""

from __future__ import annotations

import os
import signal
import sys

from stages.__main__ import main
from stages.engine import Engine


def _signal_on_one_rank(spec: str) -> None:
    rank, step, name = spec.split(":")
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    original = Engine._after_step

    def after_step(self, row, bar):
        original(self, row, bar)
        if self.global_step == int(step):
            os.kill(os.getpid(), getattr(signal, name))

    Engine._after_step = after_step


if __name__ == "__main__":
    if os.environ.get("STOP_TEST_SIGNAL_AT"):
        _signal_on_one_rank(os.environ["STOP_TEST_SIGNAL_AT"])
    sys.exit(main(sys.argv[1:]))
