"""The ``ppo`` stage's declaration: its settings (``ppo:``) and its ``SPEC`` (pipeline/registry.py).

Light on purpose (no torch): the control plane reads it. The stage itself is ``stages/ppo/trainer.py``.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import PPOConfig, model_location
from pipeline.registry import StageSpec, lazy

#: ``rollout`` keys that shape only PPO's loss: part of PPO's identity, left out of the other sampling stages'.
PPO_ONLY_ROLLOUT_KEYS = ("importance_sampling", "importance_sampling_cap")


def parents(cfg: Any) -> list[str]:
    """The sft stage's policy (``policy_from: sft``); the rm stage when PPO uses a reward model and none is
    brought (``ppo.reward_model``)."""
    ppo = cfg.ppo
    out = ["sft"] if ppo.policy_from == "sft" else []
    if ppo.reward_model is None and (any(r.kind == "rm" for r in ppo.rewards) or ppo.critic_from == "rm"):
        out.append("rm")
    return out


def identity_extra(cfg: Any, data: dict[str, Any]) -> dict[str, Any]:
    """With another rollout engine, the importance-sampling keys shape PPO's loss: they are part of it."""
    if cfg.rollout.backend == "hf":
        return {}
    return {"rollout": {k: v for k, v in data["rollout"].items() if k != "engine_logp_warn"}}


def external_models(cfg: Any) -> dict[str, str]:
    """``ppo.policy``, ``ppo.reward_model`` and a ``critic_from`` path: config key -> location."""
    ppo = cfg.ppo
    out: dict[str, str] = {}
    if ppo.policy is not None:
        out["ppo.policy.path"] = ppo.policy.path
        if ppo.policy.tokenizer:
            out["ppo.policy.tokenizer"] = ppo.policy.tokenizer
    if ppo.reward_model is not None:
        out["ppo.reward_model.path"] = ppo.reward_model.path
        if ppo.reward_model.tokenizer:
            out["ppo.reward_model.tokenizer"] = ppo.reward_model.tokenizer
    if ppo.critic_from not in ("auto", "rm", "policy"):
        out["ppo.critic_from"] = ppo.critic_from
    return {key: model_location(value) for key, value in out.items()}


SPEC = StageSpec(
    name="ppo", order=60, title="PPO", config_model=PPOConfig, run=lazy("stages.ppo.trainer:run"), parents=parents,
    reads=("sft", "rm"), samples=True, identity_extra=identity_extra,
    former_names={"episodes_per_rollout": "rollout_batch_size"}, external_models=external_models,
    headline=("score", "kl", "eos_rate"), evaluated_policy=True,
    card=("PPO with a KL penalty to the reference policy (RLHF)", ("ppo", "rlhf")),
)
