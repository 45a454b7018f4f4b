"""The models of a PPO run in one record (``PPOModels``), and how they are run: the forward passes that
give the policy's logits, the reference's logits and the critic's values.

``stages.ppo.setup`` builds the record; the rollout (``stages.ppo.experience``), the update
(``stages.ppo.update``), checkpoints and the final save (``stages.ppo.trainer``) receive it.

Shapes: B sequences, S = P + T tokens each ([prompt | response]), T response tokens, V vocabulary.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from stages.chat import position_ids_from_mask
from stages.ppo.rewards import RewardSources


@dataclass
class Optimisation:
    """What moves one trained model: its trainable parameters, optimiser and learning-rate schedule, and
    with ``ppo.train.deepspeed`` the DeepSpeed engine that wraps the model (it then runs the forward, the
    backward and, at its accumulation boundary, the optimiser step); ``engine`` is None on the plain path."""

    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    engine: Any | None = None


@dataclass
class ModelSources:
    """Where the models came from, for the manifest and the console: ``policy_source`` (the SFT stage, the
    base model or ``ppo.policy``), ``base_path`` (the base the policy's weights and a merged save build on),
    ``critic_from`` (rm / policy / path; None without a critic) and ``critic_source``, ``rm_location`` and
    ``rm_read`` (where the reward model is read, ``stages.scoring.reward_reading``; None without an RM)."""

    policy_source: str
    base_path: str | None
    critic_from: str | None
    critic_source: str
    rm_location: str | None
    rm_read: str | None


@dataclass
class PPOModels:
    """Every model of one PPO run, on this rank's device.

    ``actor``: the policy being trained (tuning applied, dropout off). ``reference``: the frozen starting
    policy the KL is measured to, when it is a separate copy (full fine-tuning); with a PEFT actor it is the
    actor with its adapter disabled (``adapter_reference``) and ``reference`` is None; with neither there is
    no reference (:meth:`reference_logits` refuses): a run that never reads the KL (``ppo.uses_reference``)
    neither loads nor runs one. ``critic``: the token-level value model, None for the
    critic-free estimators. ``reward_model``: the frozen RM, None when no reward source or critic needs one.
    ``rewards``: every reward source of ``ppo.rewards``. ``actor_optim`` / ``critic_optim``: what steps them.
    ``unfreezer``: the gradual-unfreeze schedule (``ppo.tuning``), else None. ``zero_stage``: 0 without
    DeepSpeed. ``bf16``: forwards run under bf16 autocast (heads in fp32); ``temperature`` scales the
    policy's logits (the sampling distribution is ``softmax(logits / temperature)``).
    """

    tokenizer: Any
    actor: Any
    actor_optim: Optimisation
    reference: Any | None
    adapter_reference: bool
    critic: Any | None
    critic_optim: Optimisation | None
    reward_model: Any | None
    rewards: RewardSources
    unfreezer: Any | None
    zero_stage: int
    sources: ModelSources
    device: torch.device
    bf16: bool
    temperature: float

    @property
    def has_reference(self) -> bool:
        """Whether there is a reference to compute the KL to (a frozen copy, or the adapter-disabled actor)."""
        return self.reference is not None or self.adapter_reference

    @property
    def actor_forward(self) -> Any:
        """The module a training forward goes through: the DeepSpeed engine when there is one."""
        return self.actor_optim.engine if self.actor_optim.engine is not None else self.actor

    @property
    def critic_forward(self) -> Any:
        return self.critic_optim.engine if self.critic_optim.engine is not None else self.critic

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def policy_logits(self, model: Any, ids: torch.Tensor, att: torch.Tensor, T: int) -> torch.Tensor:
        """``model``'s (B, T, V) fp32 logits predicting the T response tokens of ``ids`` / ``att`` (B, S),
        scaled by 1/temperature."""
        with self.autocast():
            out = model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att), use_cache=False,
                        logits_to_keep=T + 1)
        logits = out.logits[:, :T].float()
        return logits if self.temperature == 1.0 else logits / self.temperature

    def critic_values(self, model: Any, ids: torch.Tensor, att: torch.Tensor, T: int) -> torch.Tensor:
        """(B, T) fp32 values of the state before each response token (``model``: the critic or its engine)."""
        with self.autocast():
            out = model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att), use_cache=False)
        S = ids.size(1)
        return out.logits[:, S - T - 1:S - 1, 0].float()

    def reference_logits(self, ids: torch.Tensor, att: torch.Tensor, T: int) -> torch.Tensor:
        """The reference's (B, T, V) logits, as :meth:`policy_logits`."""
        if self.reference is not None:
            return self.policy_logits(self.reference, ids, att, T)
        if not self.adapter_reference:
            raise ValueError("this PPO run has no reference model to compute the KL to")
        with self.actor.disable_adapter():  # PEFT: the reference is the same base, adapter off
            return self.policy_logits(self.actor, ids, att, T)


@contextmanager
def update_mode(models: PPOModels, gradient_checkpointing: bool) -> Iterator[None]:
    """The actor and critic in train mode while the update passes run, when gradient checkpointing is on
    (it only works in train mode; dropout is off, so train and eval forwards agree); eval mode otherwise
    and after, so sampling always runs in eval mode."""

    def train(on: bool) -> None:
        if gradient_checkpointing:
            for model in (models.actor, models.critic):
                if model is not None:  # no critic with a critic-free estimator
                    model.train(on)

    train(True)
    try:
        yield
    finally:
        train(False)
