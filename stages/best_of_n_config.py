"""The ``best_of_n`` stage's declaration: its settings (``best_of_n:``) and its ``SPEC``
(pipeline/registry.py). Light on purpose (no torch): the control plane reads it. The stage itself is
``stages/best_of_n.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.registry import StageSpec, lazy
from pipeline.sections import DataSource, RewardSourceConfig, Section


class BestOfNConfig(Section):
    """``best_of_n``: rejection sampling. For each prompt of ``data`` the policy (``policy_from``: the sft
    stage's model or the base) samples ``n`` responses; every reward source scores them; the best is kept
    (only when its score is >= ``threshold``, if set) and written as SFT data (``messages``) with its score
    and provenance to ``best_of_n/data.jsonl``, which an ``sft`` stage of a next run trains on (RAFT/ReST:
    see docs/PPO.md)."""

    data: DataSource | None = Field(None, description="Prompts (a 'prompt' per record, optional 'reference').")
    policy_from: Literal["sft", "base"] = Field("sft", description="The policy that samples: the sft stage's model "
                                                                   "or the base model.")
    n: int = Field(4, ge=1, description="Responses sampled per prompt.")
    threshold: float | None = Field(None, description="Keep the best response only when its score is >= this.")
    require_eos: bool = Field(True, description="Only responses that ended with eos (finished) are candidates.")
    max_prompt_length: int = Field(128, gt=0, description="Longer prompts (in tokens) are skipped (and counted).")
    max_new_tokens: int = Field(64, gt=0, description="Most tokens sampled per response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (no top-k/top-p).")
    rewards: list[RewardSourceConfig] = Field(
        default_factory=list, description="Reward sources (as ppo.rewards: rm, function, judge); required.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (each gives n sequences).")
    seed: int = Field(0, description="Seed of the sampling (batch b samples under seed + b).")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")


def parents(cfg: Any) -> list[str]:
    """The sft stage's policy (``policy_from: sft``) and the rm stage when a reward source is kind 'rm'."""
    bon = cfg.best_of_n
    return (["sft"] if bon.policy_from == "sft" else []) + (["rm"] if any(r.kind == "rm" for r in bon.rewards)
                                                             else [])


def check(cfg: Any) -> None:
    """best_of_n needs a reward source, and the stages its policy and RM come from."""
    if "best_of_n" not in cfg.stages:
        return
    bon = cfg.best_of_n
    if not bon.rewards:
        raise ValueError("best_of_n.rewards is empty: best-of-N needs a reward source to pick the best, e.g. "
                         "best_of_n.rewards=[{kind: rm}] (with the rm stage) or [{kind: function, function: "
                         "'module:function'}] or [{kind: judge, judge: <name>}]")
    if bon.data is None:
        raise ValueError("best_of_n.data is not set: point it at a prompt file (a 'prompt' per record)")
    if any(r.kind == "rm" for r in bon.rewards) and "rm" not in cfg.stages:
        raise ValueError(f"best_of_n.rewards has a kind 'rm' source but stages {cfg.stages} do not include 'rm'")
    if bon.policy_from == "sft" and "sft" not in cfg.stages:
        raise ValueError(f"best_of_n.policy_from is 'sft' but stages {cfg.stages} do not include 'sft'; add it "
                         "or set best_of_n.policy_from: base")


def memory_estimate(cfg: Any, plan: Any) -> None:
    """The sampling policy, the reward model of a kind 'rm' source, and the KV cache of n responses per prompt."""
    bon = cfg.best_of_n
    plan.frozen("policy")
    if any(r.kind == "rm" for r in bon.rewards):
        plan.frozen("reward_model", "seq_cls")
    plan.kv_cache(bon.max_prompt_length + bon.max_new_tokens, bon.batch_size * bon.n)


SPEC = StageSpec(
    name="best_of_n", order=50, config_model=BestOfNConfig, run=lazy("stages.best_of_n:run"), parents=parents,
    reads=("rm",), check=check, samples=True, memory_estimate=memory_estimate, headline=("kept", "score_mean_kept"),
    card=("best-of-N / rejection-sampling fine-tuning", ("best-of-n", "rejection-sampling")),
)
