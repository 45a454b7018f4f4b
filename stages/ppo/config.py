"""The ``ppo`` stage's declaration: its settings (``ppo:``, with ``ppo.train`` and the models it may bring)
and its ``SPEC`` (pipeline/registry.py). Light on purpose (no torch): the control plane reads it. The stage
itself is ``stages/ppo/trainer.py``; docs/PPO.md maps every key to the recipe and to TRL's names.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from pipeline.registry import StageSpec, TrainingShape, lazy
from pipeline.sections import (
    DataSource,
    RewardSourceConfig,
    Section,
    TuningConfig,
    added_setting,
    check_location,
    deepspeed_exists,
    model_location,
    section,
)


class PPOTrainConfig(Section):
    """``ppo.train``: the actor's and critic's optimisation settings, each meaning what it means under
    ``sft.train`` / ``rm.train``. PPO's batch shape (``episodes_per_rollout``, ``mini_batch_size``,
    ``gradient_accumulation_steps``, ``ppo_epochs``) stays in ``ppo`` next to the algorithm it shapes."""

    learning_rate: float = Field(1e-5, gt=0, description="The actor's peak learning rate (AdamW).")
    critic_learning_rate: float | None = Field(None, gt=0, description="Default: learning_rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay (actor and critic).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Schedule over each model's PPO optimizer steps (the actor's exclude "
                                "critic_warmup_steps).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip each model's gradient norm to this (None: off).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU; fp16 is refused.")
    save_steps: int = Field(20, gt=0, description="Write a resumable checkpoint every N PPO steps.")
    seed: int = Field(0, description="Seed of the prompt order, the sampling and new weights (value head, LoRA).")
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed JSON (configs/deepspeed/...).")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")

    @field_validator("deepspeed")
    @classmethod
    def _ds_exists(cls, value: str | None) -> str | None:
        return deepspeed_exists(value)


#: PPO keys that moved from ``ppo.<key>`` to ``ppo.train.<key>`` (old configs still load, with a warning).
PPO_TRAIN_KEYS = tuple(PPOTrainConfig.model_fields)


#: ``ppo.rollout_batch_size`` was renamed ``ppo.episodes_per_rollout``: it always counted episodes, never
#: prompts (old configs still load, with this warning; stage hashes use the old name, see pipeline.stage).
RENAMED_ROLLOUT_BATCH_SIZE = (
    "ppo.rollout_batch_size is renamed ppo.episodes_per_rollout (read as ppo.episodes_per_rollout={value}; "
    "write it so). It counts episodes (one prompt, one response) per rollout per device, not prompts: a "
    "rollout takes episodes_per_rollout / ppo.num_samples_per_prompt prompts. OpenRLHF's --rollout_batch_size "
    "R counts prompts over all devices, each sampled --n_samples_per_prompt K times: the same number here "
    "takes R x devices / K prompts per step instead of R; OpenRLHF's setting is episodes_per_rollout = "
    "R x K / devices")



@dataclass(frozen=True)
class PPOSizes:
    """PPO's batch sizes at one world size, derived once (``PPOConfig.sizes``). Per rank unless ``global_``."""

    world_size: int
    episodes_per_rollout: int  # episodes (prompt, response) per rollout per rank
    global_batch: int          # episodes per PPO step, all ranks
    mini_batch: int            # episodes per optimizer step per rank
    grad_accum: int
    micro_batch: int           # episodes per forward/backward
    n_minibatches: int         # optimizer steps per PPO epoch
    total_steps: int           # PPO steps (rollout + update)
    optimizer_steps: int       # optimizer steps of the critic over the run



class PolicySourceConfig(Section):
    """A policy PPO starts from that this run did not train (``ppo.policy``): a causal LM folder or hub name.

    Its tokenizer comes from ``tokenizer`` (a folder or hub name) or else from ``path``; the chat
    template in force is ``chat.template`` or the tokenizer's own (none: the run stops and says so).
    """

    path: str = Field(description="Folder or hub name (org/name or hub:org/name) of the policy's weights.")
    tokenizer: str | None = Field(None, description="Folder or hub name of its tokenizer (default: path).")

    @field_validator("path", "tokenizer")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        return check_location(value)



class RewardModelSourceConfig(Section):
    """A reward model this run did not train (``ppo.reward_model``): any ``AutoModelForSequenceClassification``
    with one label, folder or hub name.

    One the ``rm`` stage trained (its ``model/``) is read at its trained position: the generated token ids
    themselves when its tokenizer and chat format equal the policy's, else the decoded text in its own
    chat template (``chat_template``, else its tokenizer's own). Any other is read as transformers reads
    it: the decoded text in its whole chat-template render, the model's own pooling. The manifest records
    which (``reward_model_read``, ``rm_scoring``); ``stages.scoring.reward_reading`` decides.
    """

    path: str = Field(description="Folder or hub name (org/name or hub:org/name) of the reward model.")
    tokenizer: str | None = Field(None, description="Folder or hub name of its tokenizer (default: path).")
    chat_template: str | None = Field(
        None, description="Its chat template: Jinja text, a file, 'chatml' or 'raw' (default: its tokenizer's own).")
    max_length: int | None = Field(
        None, gt=8,
        description="Longest sequence it scores; longer ones keep their last tokens (default: rm.max_length).")

    @field_validator("path", "tokenizer")
    @classmethod
    def _exists(cls, value: str | None) -> str | None:
        return check_location(value)



class OverlongPenaltyConfig(Section):
    """DAPO's soft overlong punishment (``ppo.overlong_penalty``): for a response of L tokens, with L_max =
    ppo.max_new_tokens and B = buffer, -factor * (L - (L_max - B)) / B is added to the sequence reward when
    L > L_max - B (0 below; -factor at the limit)."""

    buffer: int = Field(description="B: the last B tokens before ppo.max_new_tokens over which the penalty grows "
                                    "from 0 to -factor (0 < B <= max_new_tokens; DAPO: 4096 of 20480).")
    factor: float = Field(1.0, ge=0, description="The penalty at the length limit (DAPO: 1.0), on the scale of "
                                                 "the sequence reward after normalisation and clipping.")



class PPOConfig(Section):
    """PPO defaults follow one recipe: DESIGN §4, which is the N+ implementation details of RLHF with PPO
    (Huang et al. 2024, the TL;DR summarisation case study) except where docs/PPO.md lists otherwise.

    Models: the policy comes from the ``sft`` stage (``policy_from: sft``), the base model (``base``), or
    a model you bring (``policy``: folder or hub name; sets ``policy_from: path``). The reward model is
    the ``rm`` stage's, or one you bring (``reward_model``). The critic starts from the reward model
    (``critic_from: rm``), from the policy with a fresh value head (``policy``), or from a folder / hub
    name; ``auto`` picks ``rm`` when the run has a reward model sharing the policy's tokenizer, else
    ``policy``.
    """

    data: DataSource | None = Field(None, description="Training prompts (a 'prompt' per record, optional "
                                                      "'reference' for reward functions).")
    eval_data: DataSource | None = Field(None, description="Held-out prompts scored before, during (eval_every) and "
                                                           "after training.")
    policy_from: Literal["sft", "base", "path"] = Field(
        "sft", description="sft: the sft stage's model; base: model.*; path: ppo.policy (set by giving ppo.policy).")
    policy: PolicySourceConfig | None = Field(None, description="A policy you bring (folder or hub name).")
    reward_model: RewardModelSourceConfig | None = Field(
        None, description="A reward model you bring; used by kind 'rm' sources instead of the rm stage's.")
    critic_from: str = Field(
        "auto", description="auto | rm | policy | <folder or hub name of a model with the policy's tokenizer>.")
    rewards: list[RewardSourceConfig] = Field(
        default_factory=lambda: [RewardSourceConfig()], description="Reward sources, summed with their weights "
                                                                    "(default: the reward model).")
    total_episodes: int = Field(256, gt=0, description="Episodes (prompt, response) over the run, all devices "
                                                       "together; steps = total / (episodes_per_rollout x devices).")
    episodes_per_rollout: int = Field(
        16, gt=0, description="Episodes (one prompt, one sampled response) per rollout per device: "
                              "episodes_per_rollout / num_samples_per_prompt prompts, each sampled "
                              "num_samples_per_prompt times. Formerly rollout_batch_size (still read, with a "
                              "warning): OpenRLHF's rollout_batch_size counts prompts over all devices.")
    mini_batch_size: int = Field(8, gt=0, description="Episodes per optimizer step per device.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step (must divide "
                                                                   "mini_batch_size).")
    ppo_epochs: int = Field(1, gt=0, description="Passes of updates over each rollout.")
    max_prompt_length: int = Field(128, gt=0, description="Longer prompts (in tokens) are skipped (and counted).")
    max_new_tokens: int = Field(32, gt=0, description="Most tokens sampled per response.")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; the log-probs used for ratios and KL are taken at the "
                               "same temperature (logits / temperature), so it is the policy being optimised.")
    top_k: int = Field(0, ge=0, description="Must stay 0: top-k filtering would change the sampling distribution "
                                            "but not the log-probs used for ratios and KL (refused).")
    top_p: float = Field(1.0, gt=0, le=1, description="Must stay 1: nucleus filtering would change the sampling "
                                                      "distribution but not the log-probs used for ratios and KL "
                                                      "(refused).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of future rewards (GAE, reward-to-go).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda.")
    cliprange: float = Field(0.2, gt=0, description="Clip of the policy ratio: 1 +- cliprange (the default of "
                                                    "cliprange_low and cliprange_high).")
    cliprange_low: float | None = added_setting(
        None, gt=0, description="Lower clip of the policy ratio: clamp(ratio, 1 - cliprange_low, 1 + cliprange_high), "
                                "< 1 (default: cliprange).")
    cliprange_high: float | None = added_setting(
        None, gt=0, description="Upper clip of the policy ratio (default: cliprange). DAPO's clip-higher raises it "
                                "above cliprange_low (0.28 vs 0.2) so unlikely tokens can gain probability faster.")
    clip_ratio_c: float | None = added_setting(
        None, description="Dual clip (Ye et al. 2020; verl's clip_ratio_c, e.g. 3.0): for a token with a negative "
                          "advantage the policy loss is at most -A * clip_ratio_c, so a ratio that ran far above 1 "
                          "cannot push its loss without bound. > 1 + cliprange_high; null: off.")
    importance_level: Literal["token", "sequence"] = added_setting(
        "token", description="token: PPO's per-token ratio. sequence: GSPO's sequence ratio s = exp(mean over the "
                             "response's tokens of logp - old_logp), clipped as a whole (GSPO-token form: the value "
                             "is s on every token, the gradient s * grad logp_t). GSPO pairs it with "
                             "loss_aggregation seq-mean-token-mean and tiny clip ranges (cliprange_low 3e-4, "
                             "cliprange_high 4e-4).")
    loss_aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = added_setting(
        "token-mean", description="How the per-token policy loss (and the KL loss with kl_in_loss) becomes one number "
                                  "over the global minibatch: token-mean (every token weighs the same; DAPO), "
                                  "seq-mean-token-sum (each response's token sum / max_new_tokens, mean over "
                                  "responses; Dr. GRPO), seq-mean-token-mean (each response's token mean, mean over "
                                  "responses; the original GRPO). The value loss is always a token mean.")
    cliprange_value: float = Field(0.2, gt=0, description="Clip of the value update around the old values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (gae).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Per-token KL estimate to the reference. In the reward (default): k1 = logp - ref "
                          "(unbiased) or k3 (non-negative, lower variance); k2 works but is biased. As a loss "
                          "(kl_in_loss): k2 = 0.5 * (logp - ref)^2 (its gradient is the on-policy gradient of "
                          "KL(pi || ref)) or k3; k1 is refused there, its gradient does not depend on the reference.")
    kl_in_loss: bool = Field(False, description="Move the beta * KL term from the reward into the policy loss "
                                                "(needs kl_estimator k2 or k3).")
    kl_coef: float = Field(0.05, ge=0, description="beta: weight of the KL to the reference (the adaptive "
                                                  "controller's starting value).")
    adaptive_kl: bool = Field(False, description="Adapt kl_coef towards target_kl (Ziegler et al. 2019).")
    target_kl: float = Field(6.0, gt=0, description="adaptive_kl: the KL per response the controller aims at.")
    kl_horizon: int = Field(10000, gt=0, description="adaptive_kl: the controller's horizon, in episodes.")
    normalize_reward: bool = Field(False, description="Normalise the sequence reward by a running mean and std.")
    reward_clip: float | None = Field(None, gt=0, description="Clip the sequence reward (after normalisation) to "
                                                              "+- this (None: off).")
    missing_eos_penalty: float | None = Field(
        1.0, description="Subtracted from the sequence reward of a response that ends without eos (its absolute "
                         "value: 1 and -1 mean the same); 0 or null turns it off. Applied after normalisation "
                         "and clipping, so on the normalised scale when normalize_reward is on.")
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = Field(
        "gae", description="gae: PPO with a critic (GAE, gamma/lam). Critic-free (no critic is built or loaded; "
                           "critic_from, vf_coef, cliprange_value, critic_warmup_steps unused): grpo: each "
                           "prompt's num_samples_per_prompt samples, A = (r - group mean) / (group std + eps); "
                           "rloo: A = r - mean of the prompt's other samples (leave-one-out, no std); "
                           "reinforce_pp: REINFORCE++, per-token rewards (-beta * KL_t, score at the end), "
                           "A_t = reward-to-go whitened over the global batch (a global baseline). With the KL in "
                           "the reward, grpo/rloo normalise the task score alone and add the KL's reward-to-go "
                           "-beta * sum_{s>=t} KL_s at its own scale; kl_in_loss (k2/k3) works with all four. "
                           "See docs/PPO.md.")
    num_samples_per_prompt: int = Field(
        1, ge=1, description="Responses sampled per prompt (K). episodes_per_rollout counts episodes, so each "
                             "rollout takes episodes_per_rollout / K prompts per device; grpo and rloo need K >= 2.")
    group_std_eps: float = Field(1e-6, gt=0, description="grpo: added to the group std.")
    filter_tied_groups: bool = added_setting(
        False, description="Dynamic sampling (DAPO): drop the groups whose K sequence rewards all tie (every "
                           "answer right or every answer wrong: zero group advantage) and sample more prompts "
                           "until the batch has episodes_per_rollout episodes, in at most max_sampling_rounds "
                           "rounds; still short after them, tied groups fill the rest (logged as "
                           "tied_groups_trained). Needs a critic-free estimator and num_samples_per_prompt >= 2.")
    max_sampling_rounds: int = added_setting(
        3, ge=1, description="filter_tied_groups: most sampling rounds per step, the first included (each extra "
                             "round samples as many new prompts per device as the most short device lacks).")
    scale_rewards: Literal["group", "batch", "none"] = added_setting(
        "group", description="grpo: what the group-centred reward is divided by: group (the group's std + "
                             "group_std_eps: GRPO), batch (the std of every reward of the step, all ranks: TRL's "
                             "scale_rewards='batch'), none (no division: Dr. GRPO). Other estimators: leave group.")
    overlong_penalty: OverlongPenaltyConfig | None = added_setting(
        None, description="DAPO's soft overlong punishment {buffer, factor}: a penalty growing linearly to -factor "
                          "over the last buffer tokens before max_new_tokens, added to the sequence reward "
                          "(null: off). It adds to missing_eos_penalty for a response cut at the limit.")
    mask_truncated: bool = added_setting(
        False, description="DAPO's overlong filtering: responses that reach max_new_tokens without eos contribute "
                           "nothing to the policy loss (or the KL loss); they still count in the advantages' "
                           "baselines and the value loss. Needs missing_eos_penalty 0 (the penalty would only act "
                           "through the baselines).")
    whiten_advantages: bool = Field(
        True, description="Whiten advantages over the global batch (gae; reinforce_pp always does: it is its "
                          "baseline). grpo is normalised per group and rloo is used as it is.")
    ratio_skip_threshold: float = Field(10.0, gt=1, description="Skip minibatches whose max ratio exceeds this.")
    critic_warmup_steps: int = Field(
        0, ge=0, description="First PPO steps in which only the critic trains; the actor's learning-rate "
                             "schedule spans only the steps after them.")
    ptx_coef: float = Field(0.0, ge=0, description="Weight of the pretraining-mix (PTX) language-modelling loss on "
                                                  "ptx_data (InstructGPT's PPO-ptx; 0: off).")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Save an exponential moving average of the actor's "
                                                                  "weights with this decay (None: the last weights).")
    log_samples_every: int = Field(10, gt=0, description="Write a few samples to samples.jsonl every N steps.")
    tuning: TuningConfig = section(TuningConfig, "How the actor's parameters are trained; with the LoRA family the "
                                                 "critic gets LoRA too (its value head trains in full).")
    train: PPOTrainConfig = section(PPOTrainConfig)
    eval_every: int | None = Field(
        None, gt=0, description="Score eval_data prompts every N steps (always before and after training). "
                                "Formerly eval_steps (still read).")
    eval_verifier: str | None = added_setting(
        None, description="'module:function' in the reward-function signature (prompts, responses, references) "
                          "-> scores or {'scores': [...], 'metrics': {name: [...]}}: a check the rewards do not "
                          "see (e.g. a rule verifier of the right answer), run on eval_data's responses at each "
                          "eval and logged as eval_verifier and eval_verifier/<metric> (e.g. a format share). "
                          "With it, keep_best and early_stopping_patience follow eval_verifier, else eval_score.")
    keep_best: bool = added_setting(
        False, description="Save the policy of the best eval (eval_verifier, else eval_score; the starting "
                           "policy's eval included) instead of the last one. Needs eval_data; eval_every sets "
                           "how often a candidate is seen.")
    early_stopping_patience: int | None = added_setting(
        None, gt=0, description="Stop after this many evals in a row without a new best (needs eval_data and "
                                "eval_every). The manifest records stop_reason and stop_step.")
    max_kl: float | None = added_setting(
        None, gt=0, description="KL budget: stop after a step whose mean per-sequence KL to the reference (the "
                                "logged kl) exceeds this. With keep_best the saved policy is the best eval's.")
    ptx_data: DataSource | None = Field(
        None, description="SFT data for the PTX loss when ptx_coef > 0 (default: sft.data).")

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        """Old flat optimisation keys (``ppo.learning_rate``) are read as ``ppo.train.<key>``, with a note
        saying so; ``ppo.reward_from`` (never read: the reward is ``ppo.rewards``) is dropped, with a note."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        notes = []
        if "reward_from" in data:
            data.pop("reward_from")
            notes.append("ppo.reward_from is removed (it was never read; reward sources are ppo.rewards): delete it")
        if "eval_steps" in data:
            if "eval_every" in data:
                raise ValueError("ppo.eval_steps and ppo.eval_every are both set: keep ppo.eval_every only "
                                 "(the new name of the same setting)")
            data["eval_every"] = data.pop("eval_steps")
        if "rollout_batch_size" in data:
            if "episodes_per_rollout" in data:
                raise ValueError("ppo.rollout_batch_size and ppo.episodes_per_rollout are both set: "
                                 "keep ppo.episodes_per_rollout only (the new name of the same setting)")
            data["episodes_per_rollout"] = data.pop("rollout_batch_size")
            notes.append(RENAMED_ROLLOUT_BATCH_SIZE.format(value=data["episodes_per_rollout"]))
        moved = [key for key in PPO_TRAIN_KEYS if key in data]
        if moved:
            train = data.get("train") or {}
            train = dict(train.model_dump(exclude_unset=True) if isinstance(train, BaseModel) else train)
            for key in moved:
                if key in train:
                    raise ValueError(f"ppo.{key} and ppo.train.{key} are both set: keep ppo.train.{key} only")
                train[key] = data.pop(key)
            data["train"] = train
            notes.append("moved under ppo.train (read as such; write them there): "
                         + ", ".join(f"ppo.{k} -> ppo.train.{k}" for k in moved))
        for note in notes:
            warnings.warn(f"config: {note}", FutureWarning, stacklevel=2)
        return data

    @model_validator(mode="before")
    @classmethod
    def _policy_implies_path(cls, data: Any) -> Any:
        """Giving ``ppo.policy`` means the policy comes from it (``policy_from: path``) unless said otherwise."""
        if isinstance(data, dict) and data.get("policy") is not None and "policy_from" not in data:
            data = {**data, "policy_from": "path"}
        return data

    @model_validator(mode="after")
    def _model_sources(self) -> "PPOConfig":
        if self.policy_from == "path" and self.policy is None:
            raise ValueError("ppo.policy_from='path' needs ppo.policy: {path: <folder or hub name>}")
        if self.policy is not None and self.policy_from != "path":
            raise ValueError(f"ppo.policy is set but ppo.policy_from={self.policy_from!r}: the policy would not come "
                             "from it. Drop ppo.policy_from (giving ppo.policy implies 'path') or drop ppo.policy")
        if self.critic_from not in ("auto", "rm", "policy"):
            check_location(self.critic_from)
        return self

    @model_validator(mode="after")
    def _checks(self) -> "PPOConfig":
        if self.train.precision == "fp16":
            raise ValueError("ppo.train.precision='fp16' is refused: PPO diverges in fp16; use 'bf16' or 'fp32'")
        if self.episodes_per_rollout % self.mini_batch_size:
            raise ValueError(
                f"ppo.episodes_per_rollout ({self.episodes_per_rollout}) must be divisible by "
                f"ppo.mini_batch_size ({self.mini_batch_size})"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"ppo.mini_batch_size ({self.mini_batch_size}) must be divisible by "
                f"ppo.gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        if self.top_k != 0 or self.top_p != 1.0:
            key = f"ppo.top_k={self.top_k}" if self.top_k != 0 else f"ppo.top_p={self.top_p}"
            raise ValueError(
                f"{key} is refused: top-k/top-p filtering changes the distribution the rollout samples from "
                "but not the log-probs used for the ratio and the KL, so the data would "
                "come from another policy than the one optimised. Use ppo.top_k=0 and ppo.top_p=1 (ppo.temperature "
                "is supported: the log-probs use it too)")
        if self.advantage_estimator in ("grpo", "rloo") and self.num_samples_per_prompt < 2:
            raise ValueError(
                f"ppo.advantage_estimator={self.advantage_estimator!r} needs ppo.num_samples_per_prompt >= 2 (its "
                f"baseline is the other samples of the same prompt), got {self.num_samples_per_prompt}. Set "
                "ppo.num_samples_per_prompt (e.g. 4), or use advantage_estimator gae or reinforce_pp")
        if self.episodes_per_rollout % self.num_samples_per_prompt:
            raise ValueError(
                f"ppo.episodes_per_rollout ({self.episodes_per_rollout}) must be divisible by "
                f"ppo.num_samples_per_prompt ({self.num_samples_per_prompt}): it counts episodes, whole groups")
        if not self.uses_critic:
            if self.critic_warmup_steps:
                raise ValueError(f"ppo.critic_warmup_steps={self.critic_warmup_steps} but "
                                 f"ppo.advantage_estimator={self.advantage_estimator!r} has no critic; set it to 0")
            if self.critic_from != "auto":
                raise ValueError(f"ppo.critic_from={self.critic_from!r} but ppo.advantage_estimator="
                                 f"{self.advantage_estimator!r} builds no critic; drop ppo.critic_from")
        self._check_guards()
        if self.kl_in_loss and self.kl_estimator == "k1":
            raise ValueError(
                "ppo.kl_in_loss=true with ppo.kl_estimator='k1' is refused: the gradient of the k1 estimate "
                "(logp - ref_logp) does not depend on the reference, so the loss would not pull the policy "
                "towards it. Set ppo.kl_estimator to 'k2' (or 'k3') with kl_in_loss, or keep the KL in the reward")
        return self

    def _check_guards(self) -> None:
        """keep_best, early_stopping_patience and eval_verifier read evals of eval_data; early stopping needs evals
        during the run; keep_best keeps the actor's own weights, not an EMA of them."""
        wanted = [f"ppo.{key}" for key in ("eval_verifier", "keep_best", "early_stopping_patience")
                  if getattr(self, key)]
        if wanted and self.eval_data is None:
            verb = "need" if len(wanted) > 1 else "needs"
            raise ValueError(f"{' and '.join(wanted)} {verb} ppo.eval_data (held-out prompts, never among "
                             "ppo.data's): set ppo.eval_data: {path: ...}, or drop them")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("ppo.early_stopping_patience needs ppo.eval_every (evals during the run to compare); "
                             "set ppo.eval_every: N")
        if self.keep_best and self.ema_decay is not None:
            raise ValueError("ppo.keep_best with ppo.ema_decay is refused: the saved policy would be the EMA, not "
                             "the evaluated weights; drop one of them")

    @model_validator(mode="after")
    def _objective_checks(self) -> "PPOConfig":
        """The clip, the GRPO scale and the truncation settings against each other (docs/PPO.md)."""
        if self.cliprange_low is not None and self.cliprange_low >= 1:
            raise ValueError(f"ppo.cliprange_low={self.cliprange_low} must be < 1: the ratio's lower clip "
                             "1 - cliprange_low would be <= 0 (no lower clip at all)")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1 + self.clip_high:
            raise ValueError(
                f"ppo.clip_ratio_c={self.clip_ratio_c} must be > 1 + ppo.cliprange_high ({1 + self.clip_high:g}; "
                "cliprange_high defaults to cliprange): the dual clip bounds the loss of ratios far above the "
                "upper clip, a bound inside the clip range would cut the gradient of ordinary tokens")
        if self.scale_rewards != "group" and self.advantage_estimator != "grpo":
            raise ValueError(
                f"ppo.scale_rewards={self.scale_rewards!r} applies to ppo.advantage_estimator 'grpo' only (the "
                f"std its group-centred reward is divided by), but ppo.advantage_estimator is "
                f"{self.advantage_estimator!r}. Set ppo.advantage_estimator: grpo, or drop ppo.scale_rewards")
        if self.overlong_penalty is not None and self.overlong_penalty.buffer > self.max_new_tokens:
            raise ValueError(
                f"ppo.overlong_penalty.buffer={self.overlong_penalty.buffer} is longer than ppo.max_new_tokens="
                f"{self.max_new_tokens}: the penalty ramps over the last buffer tokens before the limit; use "
                "a buffer <= max_new_tokens")
        if self.mask_truncated and self.missing_eos_penalty:
            raise ValueError(
                f"ppo.mask_truncated=true with ppo.missing_eos_penalty={self.missing_eos_penalty} is refused: the "
                "truncated responses the penalty punishes are dropped from the policy loss, so it would only act "
                "through the group baseline / critic (raising the others' advantages). Set "
                "ppo.missing_eos_penalty: 0 with mask_truncated, or keep the penalty and drop mask_truncated")
        return self

    @property
    def clip_low(self) -> float:
        """The ratio's lower clip: ``cliprange_low``, else ``cliprange``."""
        return self.cliprange if self.cliprange_low is None else self.cliprange_low

    @property
    def clip_high(self) -> float:
        """The ratio's upper clip: ``cliprange_high``, else ``cliprange``."""
        return self.cliprange if self.cliprange_high is None else self.cliprange_high

    @model_validator(mode="after")
    def _dynamic_sampling(self) -> "PPOConfig":
        if self.filter_tied_groups and (self.uses_critic or self.num_samples_per_prompt < 2):
            raise ValueError(
                f"ppo.filter_tied_groups=true needs groups of samples: a critic-free ppo.advantage_estimator (grpo, "
                f"rloo or reinforce_pp) with ppo.num_samples_per_prompt >= 2; got advantage_estimator="
                f"{self.advantage_estimator!r}, num_samples_per_prompt={self.num_samples_per_prompt}. With gae the "
                "critic is the baseline, so a tied group still has advantages")
        # compared with the default, not "was it given": a resolved config (config.resolved.json) gives every key
        if (not self.filter_tied_groups
                and self.max_sampling_rounds != type(self).model_fields["max_sampling_rounds"].default):
            raise ValueError(f"ppo.max_sampling_rounds={self.max_sampling_rounds} is set but ppo.filter_tied_groups "
                             "is false: only dynamic sampling runs extra rounds. Set filter_tied_groups: true or "
                             "drop max_sampling_rounds")
        return self

    @property
    def uses_reference(self) -> bool:
        """Whether anything reads the KL to the reference, so the reference model is loaded and run: a KL
        coefficient above 0 (in the reward, or in the loss with ``kl_in_loss``), the adaptive controller
        (it steers by the measured KL) or the KL budget ``max_kl``. At ``kl_coef`` 0 the KL term is 0 x KL
        wherever it enters, so without the other two there is no reference."""
        return self.kl_coef > 0 or self.adaptive_kl or self.max_kl is not None

    @property
    def uses_critic(self) -> bool:
        """Whether the advantage estimator needs a critic (only ``gae``)."""
        return self.advantage_estimator == "gae"

    def sizes(self, world_size: int) -> PPOSizes:
        """Every derived batch size, computed here once (trainer, memory planner and orchestrator use it)."""
        total_steps = max(1, math.ceil(self.total_episodes / (self.episodes_per_rollout * world_size)))
        n_minibatches = self.episodes_per_rollout // self.mini_batch_size
        return PPOSizes(
            world_size=world_size, episodes_per_rollout=self.episodes_per_rollout,
            global_batch=self.episodes_per_rollout * world_size, mini_batch=self.mini_batch_size,
            grad_accum=self.gradient_accumulation_steps,
            micro_batch=self.mini_batch_size // self.gradient_accumulation_steps,
            n_minibatches=n_minibatches, total_steps=total_steps,
            optimizer_steps=total_steps * self.ppo_epochs * n_minibatches)


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


def check(cfg: Any) -> None:
    """PPO's reward sources, critic and policy must come from somewhere this run has, before any model loads;
    the vLLM backend syncs the policy as full weights (full / freeze / gradual_unfreeze) or as a LoRA adapter
    (lora / rslora): other PEFT methods have no vLLM form."""
    if "ppo" not in cfg.stages:
        return
    ppo = cfg.ppo
    reuse = ("(a complete stage of this run_name with the same config is skipped, not retrained, so listing "
             "it costs nothing when it already ran)")
    needs_rm = [f"ppo.rewards[{i}] is kind 'rm'" for i, r in enumerate(ppo.rewards) if r.kind == "rm"]
    if ppo.critic_from == "rm":
        needs_rm.append("ppo.critic_from is 'rm'")
    if needs_rm and ppo.reward_model is None and "rm" not in cfg.stages:
        raise ValueError(
            f"{'; '.join(needs_rm)}, but this run has no reward model: stages {cfg.stages} do not include 'rm' "
            "and ppo.reward_model is not set. Add 'rm' to stages " + reuse + ", or set ppo.reward_model.path to "
            "a reward model folder or hub name, or use another reward source (kind: function / judge)")
    if ppo.policy_from == "sft" and "sft" not in cfg.stages:
        raise ValueError(
            f"ppo.policy_from is 'sft' but stages {cfg.stages} do not include 'sft'. Add 'sft' to stages " + reuse
            + ", or set ppo.policy.path to a policy folder or hub name, or ppo.policy_from: base")
    method = ppo.tuning.method
    if cfg.rollout.backend == "vllm" and method not in ("full", "freeze", "gradual_unfreeze", "lora", "rslora"):
        raise ValueError(f"rollout.backend 'vllm' with ppo.tuning.method={method!r} is not supported: the "
                         "engine takes the updated policy as full weights (full, freeze, gradual_unfreeze) or a "
                         "LoRA adapter (lora, rslora). Use one of those, or rollout.backend: hf")


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


def training(cfg: Any) -> TrainingShape:
    """PPO's batch per device and its actor's settings, for the DeepSpeed check and the memory planner."""
    ppo, train = cfg.ppo, cfg.ppo.train
    sizes = ppo.sizes(cfg.world_size)
    return TrainingShape(
        deepspeed=train.deepspeed, micro_batch=max(1, sizes.micro_batch), grad_accum=sizes.grad_accum,
        learning_rate=train.learning_rate, precision=train.precision, max_grad_norm=train.max_grad_norm,
        tuning=ppo.tuning, gradient_checkpointing=train.gradient_checkpointing, rollout_batch=ppo.episodes_per_rollout,
        keys={"deepspeed": "ppo.deepspeed", "tuning": "ppo.tuning.method",
              "small_batch": f"ppo.gradient_accumulation_steps={ppo.mini_batch_size} "
                             "ppo.train.gradient_checkpointing=true",
              "rollout_batch": f"ppo.episodes_per_rollout={ppo.mini_batch_size}"},
        smaller_rollout_batch=ppo.mini_batch_size)


def memory_estimate(cfg: Any, plan: Any) -> None:
    """Actor, critic (gae), reference, reward model and the rollout's KV cache; with a policy you bring, its
    dims. A micro-step runs the critic's forward and the actor's before either backward (``update._losses``), so
    both graphs are held at once; the actor's LM head sees only the response positions (``logits_to_keep``)."""
    ppo = cfg.ppo
    if ppo.policy is not None:
        plan.use_model(model_location(ppo.policy.path))
    seq, micro = ppo.max_prompt_length + ppo.max_new_tokens, plan.knobs.micro_batch
    plan.trained("actor", "causal_lm",
                 plan.activations(seq, micro, lm_head=True, logit_positions=ppo.max_new_tokens + 1))
    if ppo.uses_critic:
        plan.trained("critic", "seq_cls", plan.activations(seq, micro, lm_head=False))
    else:
        plan.note(f"no critic: ppo.advantage_estimator={ppo.advantage_estimator} is critic-free")
    if not ppo.uses_reference:
        plan.note("no reference: ppo.kl_coef is 0 and neither adaptive_kl nor max_kl reads the KL")
    elif plan.knobs.tuning.is_peft:
        plan.shared("reference")
        plan.note("reference = actor base with the adapter disabled: no extra weights (DESIGN §4)")
    else:
        plan.frozen("reference")
    if any(r.kind == "rm" for r in ppo.rewards):
        plan.frozen("reward_model", "seq_cls")
    plan.kv_cache(seq)


def report_section(section: Any) -> list[str]:
    """The training curves (with the reward functions' own metrics, e.g. a format share, and the response
    length: what a reward can push without being asked), the held-out check's curves (``eval_data``: the
    reward sources' ``eval_score``, the ``eval_verifier`` and its metrics) and what the guards did."""
    logged = sorted({key for row in section.rows for key in row})
    extra = [key for key in logged if key.startswith("reward_metric/")]
    lines = section.grid("ppo_curves.png", "PPO", ("score", "kl", "response_length", "entropy", "eos_rate",
                                                   "kl_coef", *extra), missing="no PPO metrics logged")
    held_out = [key for key in logged if key.startswith("eval_verifier/")]
    lines += section.grid("ppo_eval_curves.png", "PPO held-out check",
                          ("eval_score", "eval_verifier", *held_out, "eval_response_length"))
    guards = section.manifest.get("guards") or {}
    if guards.get("stop_reason"):
        lines += [f"Stopped after step {guards['stop_step']} ({guards['stop_reason']}).", ""]
    if "kept_step" in guards:
        lines += [f"keep_best: the saved policy is step {guards['kept_step']}'s (the best held-out check).", ""]
    return lines


SPEC = StageSpec(
    name="ppo", order=60, title="PPO", config_model=PPOConfig, run=lazy("stages.ppo.trainer:run"), parents=parents,
    reads=("sft", "rm"), check=check, samples=True, identity_extra=identity_extra,
    former_names={"episodes_per_rollout": "rollout_batch_size", "eval_every": "eval_steps"},
    external_models=external_models,
    training=training, memory_estimate=memory_estimate, report_section=report_section,
    headline=("score", "kl", "eos_rate"), evaluated_policy=True,
    card=("PPO with a KL penalty to the reference policy (RLHF)", ("ppo", "rlhf")),
)
