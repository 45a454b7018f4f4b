"""PPO checkpoints: what ``checkpoints/step-N`` holds for the models of a run (``PPOModels``), written and
read through the shared mechanism (``stages.training.Checkpoints``: staged folder, index, atomic rename).

With DeepSpeed: both engines' own checkpoints (tags ``actor`` and ``critic``) and the client state per rank
(``client-rankR.{json,safetensors}``). Without: (rank 0) ``actor.safetensors`` and ``critic.safetensors``
(trainable weights) and ``state.{json,safetensors}`` (optimisers, schedulers, the client state). The client
state is the trainer's (step, episodes, PTX position, KL controller, reward normaliser, EMA, RNG states,
unfreezer); this module stores and returns it without reading it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from stages.engine import DistInfo
from stages.ppo.models import PPOModels
from stages.training import (
    Checkpoints,
    load_state,
    load_trainable,
    load_weights,
    save_state,
    save_weights,
    trainable_state,
)


def save_checkpoint(checkpoints: Checkpoints, step: int, models: PPOModels, dist: DistInfo,
                    client_state: Callable[[], dict[str, Any]]) -> Path:
    """Write ``checkpoints/step-<step>`` (collective: every rank calls it); ``client_state()`` is taken
    while the folder is written. -> the published folder."""
    actor, critic = models.actor_optim, models.critic_optim

    def write(folder: Path) -> None:
        if actor.engine is not None:
            actor.engine.save_checkpoint(str(folder), tag="actor", save_latest=False)
            if critic is not None:
                critic.engine.save_checkpoint(str(folder), tag="critic", save_latest=False)
            save_state(folder, f"client-rank{dist.rank}", client_state())
        elif dist.is_main:
            save_weights(folder, "actor", trainable_state(models.actor, everything=models.unfreezer is not None))
            state = {"actor_opt": actor.optimizer.state_dict(), "actor_sched": actor.scheduler.state_dict(),
                     "client": client_state()}
            if critic is not None:
                save_weights(folder, "critic", trainable_state(models.critic))
                state.update(critic_opt=critic.optimizer.state_dict(), critic_sched=critic.scheduler.state_dict())
            save_state(folder, "state", state)

    return checkpoints.save(step, write)


def load_checkpoint(folder: Path, models: PPOModels, dist: DistInfo) -> dict[str, Any]:
    """Put the weights, optimisers and schedulers of ``folder`` back into ``models``; -> the client state."""
    actor, critic = models.actor_optim, models.critic_optim
    if actor.engine is not None:
        # DeepSpeed unpickles its own files: only folders of this run's checkpoints/ that match their index
        actor.engine.load_checkpoint(str(folder), tag="actor")
        if critic is not None:
            critic.engine.load_checkpoint(str(folder), tag="critic")
        return load_state(folder, f"client-rank{dist.rank}")
    load_trainable(models.actor, load_weights(folder, "actor"))
    if critic is not None:
        load_trainable(models.critic, load_weights(folder, "critic"))
    state = load_state(folder, "state")
    actor.optimizer.load_state_dict(state["actor_opt"])
    actor.scheduler.load_state_dict(state["actor_sched"])
    if critic is not None:
        critic.optimizer.load_state_dict(state["critic_opt"])
        critic.scheduler.load_state_dict(state["critic_sched"])
    return state["client"]
