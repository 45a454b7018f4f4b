"""PPO's guards on what the reward does not see: a held-out check during the run, keep-best, early stopping
and a KL budget (``ppo.eval_verifier``, ``keep_best``, ``early_stopping_patience``, ``max_kl``).

A policy can raise its reward while getting worse at what the user meant (a reward model that learned the
surface). The guards watch a held-out signal instead: the eval of ``ppo.eval_data`` (before training, every
``eval_every`` steps, at the end) scored by the reward sources (``eval_score``) and, when given, by a
verifier the rewards do not include (``eval_verifier``, with its metrics such as a format share). The
watched value is ``eval_verifier`` when there is one, else ``eval_score``; higher is better.

- ``keep_best``: the saved policy is the one of the best eval (the starting policy's included: a run that
  never beats it saves it back), its weights kept in ``checkpoints/best/step-N`` when it is seen.
- ``early_stopping_patience``: stop after that many evals in a row without a new best.
- ``max_kl``: stop after a step whose mean per-sequence KL to the reference exceeds the budget.

The watch (best value, its step, evals since, why and when the run stopped) is part of the run state
saved in checkpoints, so a resumed run decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from stages.training import (
    Checkpoints,
    load_trainable,
    load_weights,
    save_weights,
    trainable_state,
    verify_checkpoint,
)


def verifier_sums(fn: Callable[..., Any], prompts: list[str], responses: list[str], references: list[Any],
                  spec: str) -> dict[str, float]:
    """Run a verifier in the reward-function signature on one batch -> sums over the batch:
    ``{"eval_verifier": sum of scores, "eval_verifier/<metric>": sum of the metric's non-missing values,
    "eval_verifier/<metric>#n": how many}`` (the caller adds them over batches and ranks, then divides)."""
    result = fn(list(prompts), list(responses), list(references))
    metrics = {}
    if isinstance(result, dict):
        if "scores" not in result:
            raise ValueError(f"ppo.eval_verifier {spec!r} returned a dict without 'scores' "
                             "(expected {'scores': [...], 'metrics': {name: [...]}})")
        metrics = result.get("metrics") or {}
        result = result["scores"]
    scores = [float(x) for x in result]
    if len(scores) != len(responses):
        raise ValueError(f"ppo.eval_verifier {spec!r} returned {len(scores)} scores for {len(responses)} responses")
    sums = {"eval_verifier": sum(scores)}
    for name, values in sorted(metrics.items()):
        present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        sums[f"eval_verifier/{name}"] = sum(present)
        sums[f"eval_verifier/{name}#n"] = float(len(present))
    return sums


def verifier_means(sums: dict[str, float], n: float) -> dict[str, float]:
    """``verifier_sums`` added over batches (and ranks) -> the eval row's means."""
    out = {"eval_verifier": sums["eval_verifier"] / max(n, 1.0)}
    for key, value in sums.items():
        if key.startswith("eval_verifier/") and not key.endswith("#n"):
            out[key] = value / max(sums[f"{key}#n"], 1.0)
    return out


class PPOGuards:
    """The watch of one PPO run. ``after_eval`` and ``after_step`` update it; ``stopped`` ends the loop;
    ``restore_best`` puts the best eval's weights into the actor before the final save."""

    def __init__(self, ppo: Any, checkpoints_root: Path, is_main: bool, world_size: int):
        self.ppo = ppo
        self.monitor = "eval_verifier" if ppo.eval_verifier else "eval_score"
        self.best_checkpoints = Checkpoints(checkpoints_root / "best", is_main, world_size)
        self.is_main = is_main
        self.best: float | None = None
        self.best_step: int | None = None
        self.since_best = 0
        self.stop_reason: str | None = None
        self.stop_step: int | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best,
                "stop_reason": self.stop_reason, "stop_step": self.stop_step}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        for key, value in (state or {}).items():
            setattr(self, key, value)

    def after_eval(self, step: int, evals: dict[str, float], actor: Any, everything: bool = False) -> dict[str, float]:
        """Update the watch after the eval of ``step`` (``evals``: its row; {} without eval_data); with
        keep_best, a new best's trainable weights are written (collective: every rank calls it).
        -> the fields to log with the eval row."""
        if self.monitor not in evals:
            return {}
        value = float(evals[self.monitor])
        if self.best is None or value > self.best:
            self.best, self.best_step, self.since_best = value, step, 0
            if self.ppo.keep_best:
                def write(folder: Path) -> None:
                    if self.is_main:
                        save_weights(folder, "weights", trainable_state(actor, everything=everything))

                self.best_checkpoints.save(step, write)
        else:
            self.since_best += 1
            patience = self.ppo.early_stopping_patience
            if patience is not None and self.since_best >= patience and not self.stopped:
                self._stop("early_stopping", step, f"{self.monitor} has not improved for {self.since_best} evals "
                                                   f"(best {self.best:.4g} at step {self.best_step})")
        return {f"best_{self.monitor}": self.best, "evals_since_best": float(self.since_best)}

    def after_step(self, step: int, row: dict[str, float]) -> None:
        """The KL budget: stop after a step whose ``kl`` (mean per-sequence KL, all ranks) exceeds ``max_kl``."""
        budget = self.ppo.max_kl
        if budget is not None and row.get("kl", 0.0) > budget and not self.stopped:
            self._stop("max_kl", step, f"kl {row['kl']:.4g} is above ppo.max_kl={budget:g}")

    def _stop(self, reason: str, step: int, why: str) -> None:
        self.stop_reason, self.stop_step = reason, step
        if self.is_main:
            print(f"[alignpipe] ppo: stopping after step {step}: {why}", flush=True)

    def restore_best(self, actor: Any, step: int) -> int:
        """With keep_best: load the best eval's weights into ``actor`` (unless the best is the current step).
        -> the step whose weights the policy now has."""
        if not self.ppo.keep_best or self.best_step is None or self.best_step == step:
            return step
        folder = self.best_checkpoints.root / Checkpoints.tag(self.best_step)
        if verify_checkpoint(folder) is not None:
            raise RuntimeError(f"ppo: the best eval's weights {folder} are missing or damaged")
        load_trainable(actor, load_weights(folder, "weights"))
        if self.is_main:
            print(f"[alignpipe] ppo: keep_best: the saved policy is step {self.best_step}'s "
                  f"({self.monitor} {self.best:.4g})", flush=True)
        return self.best_step

    def summary(self, kept_step: int) -> dict[str, Any]:
        """The manifest's fields: the watch's outcome."""
        out: dict[str, Any] = {}
        if self.best is not None:
            out.update({f"best_{self.monitor}": self.best, "best_step": self.best_step})
        if self.ppo.keep_best:
            out["kept_step"] = kept_step
        if self.stopped:
            out.update(stop_reason=self.stop_reason, stop_step=self.stop_step)
        return out
