"""Stopping a training loop at a step boundary, on every rank at the same step (``pipeline/preemption.py``).

``StepBoundaries(run, dist, total_steps)`` is what a training loop (``Engine.fit``, ``PPOTrainer.train``)
holds while it trains. ``start()`` makes the stage's stop signals wait for a step boundary instead of
interrupting; ``after_step(step, save)`` is called once an optimizer step (PPO: a rollout and its update,
with its log row and any periodic checkpoint) is complete. It asks each rank why it should stop (a
signal it received, the stop file, the deadline less than the margin away), takes the most urgent answer
over all ranks (one all-reduce of a single number), and when there is one: writes a checkpoint at this
step (unless the loop has just written it), removes the stop file and raises ``StageStopped``, which the
stage's ``StageRun`` records as ``interrupted`` with its step and the stage process turns into exit code
``STOP_EXIT_CODE``. Nothing stops at the last step: the stage finishes instead.

The margin comes from this run's own timings (``stop_margin``): the longest interval between two step
boundaries (the step, its logging, evaluation and checkpoint) and the longest checkpoint written
(``note_checkpoint_seconds``, reported by ``stages.training.Checkpoints.save``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pipeline import preemption
from pipeline.stage import StageStopped, resume_step

_checkpoint_seconds: list[float] = []  # this process's checkpoint writes, for the margin


def note_checkpoint_seconds(seconds: float) -> None:
    """Record how long a checkpoint took to write (the margin before a deadline keeps room for one)."""
    _checkpoint_seconds.append(float(seconds))


def longest_checkpoint_seconds() -> float | None:
    return max(_checkpoint_seconds) if _checkpoint_seconds else None


class StepBoundaries:
    """A training loop's stop checks (see the module doc). ``run``: the ``StageRun`` (its ``stop`` request and
    folder; a stand-in without ``stop`` never stops); ``dist``: the ranks that must agree; ``total_steps``:
    the step the loop ends at."""

    def __init__(self, run: Any, dist: Any, total_steps: int):
        self.run, self.dist, self.total_steps = run, dist, total_steps
        self.request: preemption.StopRequest | None = getattr(run, "stop", None)
        self.longest_step_s = 0.0
        self._last = preemption.clock()

    def start(self) -> None:
        """From here on a stop signal waits for the next step boundary."""
        if self.request is not None:
            self.request.begin_graceful()
        self._last = preemption.clock()

    def margin_s(self) -> float:
        floor = self.request.margin_floor_s if self.request is not None else 0.0
        return preemption.stop_margin(floor, self.longest_step_s, longest_checkpoint_seconds())

    def after_step(self, step: int, save: Callable[[], Any]) -> None:
        """At the boundary after ``step`` (collective): checkpoint and raise ``StageStopped`` if a stop is due."""
        now = preemption.clock()
        self.longest_step_s = max(self.longest_step_s, now - self._last)
        self._last = now
        if self.request is None or step >= self.total_steps:
            return
        urgency, reason = self.request.pending(self.margin_s())
        agreed = self._most_urgent(urgency)
        if not agreed:
            return
        if agreed != urgency:
            reason = "a stop request on another rank"
        if resume_step(self.run.dir) != step:  # not just written by the loop's own save_steps
            save()
        if self.dist.is_main:
            self.request.clear_file()
            print(f"[alignpipe] {self.run.stage}: stopped after step {step} of {self.total_steps} with a checkpoint "
                  f"({reason}); it resumes from there when started again", flush=True)
        raise StageStopped(reason, step)

    def _most_urgent(self, urgency: int) -> int:
        """The largest urgency over the ranks (each rank's own without a process group)."""
        if self.dist.world_size == 1 or not torch.distributed.is_initialized():
            return urgency
        flag = torch.tensor([urgency], dtype=torch.int64, device=self.dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())
