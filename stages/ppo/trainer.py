"""PPO stage (``run(cfg)``): policy from SFT (or the base, or a model you bring: ``ppo.policy``), reward
from the RM (the rm stage's or ``ppo.reward_model``, and/or functions, judges), critic from the RM
(``ppo.critic_from``), KL to a frozen reference. One readable loop on torch + transformers + peft (+ DeepSpeed).

One PPO step (``rollout_batch_size`` prompts per rank):

1. Rollout: HF ``generate`` on left-padded prompts; sampling (``ppo.temperature``; top-k/top-p are
   refused by the config, they would change the sampling distribution but not the log-probs) is drawn
   from per-episode random streams (``rollout.EpisodeSampler``) so it does not depend on ranks or
   resume. Nothing from the checkpoint's ``generation_config`` applies (``stages.generation``).
   Tokens after the first eos are masked and set to pad; responses are padded to the longest response
   across ranks, so every rank's tensors have the same shape.
2. Experience: fp32 log-probs of the response under the policy and the reference (the LoRA policy with
   its adapter disabled, or a separate frozen copy for full fine-tuning with the actor's weight dtype, so
   at step 0 both give the same numbers), critic values (token-level value head initialised from the
   RM); under bf16 the lm_heads, the value head and the RM's score head run in fp32. Then the sequence
   score: sum of weighted reward sources (the RM scores the prompt ids + the generated ids up to and
   including eos when it shares the policy's tokenizer, else the text in its own template; see
   ``stages.ppo.rewards``), optionally normalised with running moments (statistics over all ranks) and
   clipped, minus ``|missing_eos_penalty|`` (1.0 by default) for responses without eos.
3. Rewards per token: ``-beta * KL_t`` on every response token (k1 by default, or k3) plus the score at
   the last token; with ``kl_in_loss`` the KL term moves from the reward into the policy loss, with an
   estimator whose gradient depends on the reference (k2 or k3; k1 is refused there). GAE (gamma,
   lambda), advantages whitened over the whole global batch (masked).
4. Update: ``ppo_epochs`` passes over ``rollout_batch_size / mini_batch_size`` minibatches, each split
   into ``gradient_accumulation_steps`` micro-batches. Losses are token means over the whole global
   minibatch (each micro-batch is weighted by its share of the minibatch's response tokens), so the
   gradient does not depend on how a minibatch is split over micro-batches and ranks. Clipped policy
   loss and clipped value loss (x ``vf_coef``), both in fp32; optional PTX (SFT cross-entropy x
   ``ptx_coef``) and actor EMA. A micro-batch whose max ratio exceeds ``ratio_skip_threshold`` (on any
   rank) contributes no policy gradient and its minibatch is counted as skipped; when every micro-batch
   of a minibatch is skipped the actor's optimizer step is skipped too (under DeepSpeed the engine
   still steps, with a zero gradient). A non-finite loss stops the run with the offending micro-batch
   saved as ``nan_batch_step<N>_rank<R>.pt`` in the stage folder. During the first
   ``critic_warmup_steps`` steps only the critic trains (the actor's learning-rate schedule spans the
   steps after them).
5. Adaptive KL (if on): beta updated from the step's mean per-sequence KL (Ziegler et al. 2019).

Dropout is off (dropout modules get p=0, models stay in eval mode except for the update passes when
gradient checkpointing is on), so the first minibatch's ratio is exactly 1.

Checkpoints every ``save_steps`` under ``checkpoints/step-N`` (written to a temporary folder, then
renamed; ``checkpoints/latest`` names the newest): actor and critic trainable weights, both optimisers
and schedulers (or both DeepSpeed engines' checkpoints), RNG states per rank, the step (which fixes
the data position: the prompt order is a function of seed and epoch), KL controller, reward
normaliser, EMA weights, PTX position. A run restarted with the same config resumes from it and gives
the same result as an uninterrupted run.

Metrics (``metrics.jsonl``, one row per step; means over the global batch unless stated):

- ``score``: weighted sum of the reward sources before normalisation; ``score/<source>`` each raw source.
- ``missing_eos_penalty``: mean penalty subtracted per sequence (the penalty x the share without eos);
  ``rm_truncated``: RM inputs cut to the RM's max length (when an RM is used); ``reward_metric/<name>``:
  step means of the extra per-sample metrics reward functions return.
- ``reward``: the sequence reward used for RL (after normalisation, clipping and eos penalty).
- ``non_score_reward``: mean over sequences of the summed ``-beta * KL_t`` (0 with ``kl_in_loss``).
- ``kl``: mean over sequences of the summed per-token KL estimate (``kl_estimator``) to the reference.
- ``kl_coef``: beta used for this step.
- ``entropy``: mean per-token entropy of the policy over response tokens (update passes).
- ``clipfrac``: fraction of response tokens where the policy ratio was clipped (update passes).
- ``approx_kl``: ``0.5 * mean((logp - old_logp)^2)``, how far the update moved the policy.
- ``ratio_max``: the largest probability ratio seen in the update (over all minibatches and ranks);
  ``ratio_mean``: the mean ratio over response tokens (1 means the update barely moved the policy).
- ``policy_loss``, ``value_loss``: clipped PPO losses (means over micro-batches); ``vf_clipfrac``.
- ``kl_loss`` / ``ptx_loss``: the KL loss term (``kl_in_loss``) and PTX loss, when on.
- ``explained_variance``: of the returns by the rollout values (1 is a perfect critic).
- ``response_length``: mean real response tokens (eos included); ``eos_rate``: share ending in eos.
- ``skipped_minibatches``: minibatches with a skipped micro-batch this step (ratio explosion).
- ``time_generate``, ``time_forward`` (policy/reference/critic passes on the rollout),
  ``time_score`` (reward sources), ``time_update`` (seconds); ``episodes_per_s`` (all ranks, whole step);
  ``time_cpu``: CPU seconds this process used for the step (all its threads; on a shared machine
  ``B / time_cpu`` estimates the uncontended single-thread throughput).
- ``lr``, ``critic_lr``, ``episodes`` (cumulative, all ranks), ``truncated_prompts``.
- Eval rows (``eval_data``; before training, every ``eval_steps`` and at the end): ``eval_score``,
  ``eval_response_length``, ``eval_eos_rate`` on the held-out prompts with fixed sampling streams.

Manifest ``metrics``: the last step's row and final eval, plus ``steps``, ``episodes``, ``world_size``,
``load_seconds`` (building the trainer: data, models, optimisers), ``train_seconds`` (the PPO steps only:
no loading, evals or checkpoints; steps run by this process, so after a resume those since the resume),
``episodes_per_s_mean`` and ``response_tokens_per_s_mean`` (all ranks, over ``train_seconds``).

``samples.jsonl``: at step 1 and every ``log_samples_every`` steps, a few (prompt, response, score,
reward, eos) rows.

Several processes (torchrun / deepspeed launcher) need ``ppo.deepspeed`` (a ZeRO-1/2/3 JSON): actor and
critic become DeepSpeed engines; the reference and the reward model are plain frozen copies per rank.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from data.formats import DataError, load_examples
from pipeline.config import ChatConfig, RunConfig, model_location, resolve_path
from pipeline.manifest import atomic_write_text
from pipeline.models import chat_fingerprint, chat_format, load_model, load_tokenizer, prepare_base, save_tokenizer
from pipeline.stage import StageRun
from stages.engine import DistInfo, enable_activation_checkpointing, epoch_order, init_distributed, lr_lambda, use_bf16
from stages.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    per_token_rewards,
)
from stages.batching import left_pad, pad_collate
from stages.chat import position_ids_from_mask, tokenize_sft
from stages.generation import neutral_generate, neutral_generation_config
from stages.ppo.rewards import Responses, RewardSources, Scores
from stages.ppo.rollout import (
    EpisodeSampler,
    encode_prompts,
    episode_uniforms,
    response_mask,
    response_rows,
)
from stages.tuning import apply_tuning, load_trained, quantization_kwargs, save_trained, trainable_summary

#: Test hook: called as ``after_step_hook(step)`` after each step (and its checkpoint), on every rank.
after_step_hook: Callable[[int], None] | None = None

SAMPLES_PER_LOG = 4


# ------------------------------------------------------------------------------------- collectives
class Comm:
    """All-reduce helpers that are no-ops in a single process."""

    def __init__(self, dist: DistInfo):
        self.dist = dist
        self.on = dist.world_size > 1

    def _reduce(self, values: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.on:
            return values
        values = values.detach().to(self.dist.device).clone()
        torch.distributed.all_reduce(values, op=op)
        return values.cpu()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, torch.distributed.ReduceOp.SUM if self.on else None)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, torch.distributed.ReduceOp.MAX if self.on else None)

    def mean_dict(self, stats: dict[str, float]) -> dict[str, float]:
        if not self.on or not stats:
            return stats
        keys = sorted(stats)
        total = self.sum(torch.tensor([stats[k] for k in keys], dtype=torch.float64))
        return {k: float(v) / self.dist.world_size for k, v in zip(keys, total)}

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate a (B,) tensor from every rank (same B on every rank), rank order."""
        if not self.on:
            return values
        parts = [torch.zeros_like(values, device=self.dist.device) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(parts, values.to(self.dist.device))
        return torch.cat([p.cpu() for p in parts])

    def barrier(self) -> None:
        if self.on:
            torch.distributed.barrier()


def global_whiten(x: torch.Tensor, mask: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Masked whitening over the batch of every rank (unbiased variance), 0 on masked entries."""
    if not comm.on:
        return masked_whiten(x, mask)
    m = mask.bool()
    xf = torch.where(m, x.double(), torch.zeros((), dtype=torch.float64))
    s = comm.sum(torch.stack([xf.sum(), xf.square().sum(), m.sum().double()]))
    n = float(s[2])
    mean = float(s[0]) / n
    var = (float(s[1]) / n - mean * mean) * n / max(n - 1, 1)
    out = (x - mean) * torch.rsqrt(torch.tensor(max(var, 0.0) + 1e-8, dtype=x.dtype))
    return torch.where(m, out, torch.zeros((), dtype=out.dtype))


# ---------------------------------------------------------------------------------------- numerics
def _fp32_linear_forward(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)


def head_in_fp32(module: Any) -> None:
    """Make a plain ``nn.Linear`` head compute in fp32 whatever autocast or its weight dtype says:
    (..., in) -> (..., out) fp32. fp32 weights are used as they are; bf16 ones (DeepSpeed bf16 mode) are
    upcast per call. Other modules (a LoRA-wrapped head) are left alone. Bound as a method, so a
    ``deepcopy`` of the module (PEFT's modules_to_save) stays bound to its own copy."""
    if type(module) is torch.nn.Linear:
        module.forward = types.MethodType(_fp32_linear_forward, module)


# ------------------------------------------------------------------------------------------- state
def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Rollout:
    """One step's experience on this rank. P: padded prompt length, T: padded response length."""

    query: torch.Tensor          # (B, P) left-padded prompt ids
    query_mask: torch.Tensor     # (B, P)
    response: torch.Tensor       # (B, T) ids, pad after eos
    mask: torch.Tensor           # (B, T) 1 on real response tokens (eos included)
    has_eos: torch.Tensor        # (B,) bool
    logp: torch.Tensor           # (B, T) fp32 rollout log-probs
    ref_logp: torch.Tensor       # (B, T) fp32
    values: torch.Tensor         # (B, T) fp32
    advantages: torch.Tensor     # (B, T) fp32 (whitened when configured)
    returns: torch.Tensor        # (B, T) fp32
    score: torch.Tensor          # (B,) raw weighted source sum
    reward: torch.Tensor         # (B,) sequence reward used for RL
    kl: torch.Tensor             # (B, T) per-token KL estimate to the reference (0 after the end)
    texts: list[str]
    prompts: list[list[dict[str, str]]]
    parts: dict[str, torch.Tensor]
    truncated: int               # prompts cut to max_prompt_length in this batch
    reward_stats: dict[str, float] = field(default_factory=dict)  # logged per step: eos penalty, reward_metric/*

    def sequences(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """[prompt | response] ids and attention mask for rows ``idx``."""
        ids = torch.cat([self.query[idx], self.response[idx]], dim=1)
        att = torch.cat([self.query_mask[idx], self.mask[idx]], dim=1)
        return ids, att


# ----------------------------------------------------------------------------------------- trainer
class PPOTrainer:
    """Holds the models, optimisers and run state of one PPO stage; ``train()`` runs it."""

    def __init__(self, cfg: RunConfig, run: StageRun, dist: DistInfo):
        self.cfg, self.p, self.run, self.dist = cfg, cfg.ppo, run, dist
        self.comm = Comm(dist)
        p = self.p
        if p.num_threads:
            torch.set_num_threads(p.num_threads)
        if dist.world_size > 1 and not p.deepspeed:
            raise ValueError(f"PPO on {dist.world_size} processes needs ppo.deepspeed "
                             "(e.g. configs/deepspeed/zero2.json); plain multi-process PPO is not supported")
        self.bf16 = use_bf16(p.precision, dist.device)
        self.device = dist.device
        self.micro = p.mini_batch_size // p.gradient_accumulation_steps
        self.n_minibatches = p.rollout_batch_size // p.mini_batch_size
        self.total_steps = max(1, math.ceil(p.total_episodes / (p.rollout_batch_size * dist.world_size)))
        self.optim_steps = self.total_steps * p.ppo_epochs * self.n_minibatches

        # new heads (a critic without an RM stage) are initialised from the global RNG: same on all ranks
        torch.manual_seed(p.seed)
        self._load_data_and_models()
        self._heads_in_fp32()
        self._build_optimisers()
        self.kl_ctl = (AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.adaptive_kl
                       else FixedKLController(p.kl_coef))
        self.reward_norm = RunningMoments()
        self.ema: dict[str, torch.Tensor] | None = None
        if p.ema_decay is not None:
            if self.zero_stage == 3:
                raise ValueError("ppo.ema_decay is not supported with ZeRO-3 (parameters are partitioned); "
                                 "use ZeRO-2 or turn the EMA off")
            self.ema = {n: q.detach().float().clone() for n, q in self.actor.named_parameters() if q.requires_grad}
        self.step = 0
        self.episodes = 0
        self.ptx_pos = 0

    # ------------------------------------------------------------------------------- set-up
    def _load_data_and_models(self) -> None:
        cfg, p, run, dist = self.cfg, self.p, self.run, self.dist
        # policy source: the SFT stage (default), the base model, or a policy you bring (ppo.policy)
        if p.policy_from == "sft":
            policy_dir = run.parent_dir("sft")
            self.base_path = str(policy_dir / "model") if (policy_dir / "model").exists() else None
            tok_dir = str(policy_dir)
            self.policy_source = f"sft stage ({policy_dir})"
        elif p.policy_from == "path":
            policy_dir, self.base_path = None, model_location(p.policy.path)
            tok_dir = model_location(p.policy.tokenizer) if p.policy.tokenizer else self.base_path
            self.policy_source = self.base_path
        else:
            base = prepare_base(cfg.model) if dist.is_main else None
            if dist.world_size > 1:
                holder = [base]
                torch.distributed.broadcast_object_list(holder, src=0)
                base = holder[0]
            policy_dir, self.base_path, tok_dir = None, base, base
            self.policy_source = f"base model ({base})"
        tokenizer = load_tokenizer(tok_dir, cfg.model, cfg.chat)
        fmt = chat_format(tokenizer, cfg.chat)
        run.set_chat_format(fmt, chat_fingerprint(fmt))
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("pad token equals eos: fix the tokenizer (model.pad_token) before PPO (DESIGN §3)")

        # data
        if p.data is None:
            raise DataError("ppo.data is not set: point it at a prompt file (JSONL with 'prompt', optional 'reference')")
        examples, self.data_report = load_examples(p.data, "prompt")
        self.prompts = encode_prompts(tokenizer, examples, p.max_prompt_length, cfg.chat.system_prompt)
        self.eval_prompts = []
        if p.eval_data is not None:
            eval_examples, _ = load_examples(p.eval_data, "prompt")
            self.eval_prompts = encode_prompts(tokenizer, eval_examples, p.max_prompt_length, cfg.chat.system_prompt)
        self.ptx_rows: list[dict[str, Any]] = []
        if p.ptx_coef > 0:
            source = p.ptx_data or cfg.sft.data
            if source is None:
                raise DataError("ppo.ptx_coef > 0 needs SFT data: set ppo.ptx_data (or sft.data)")
            sft_examples, _ = load_examples(source, "sft")
            max_len = p.max_prompt_length + p.max_new_tokens
            self.ptx_rows = [tokenize_sft(tokenizer, ex.messages, max_len, cfg.chat.system_prompt) for ex in sft_examples]

        # actor (+ reference)
        qkw = quantization_kwargs(p.tuning)
        if policy_dir is not None:
            actor = load_trained(policy_dir, cfg.model, tokenizer, kind="causal_lm", **qkw)
            if hasattr(actor, "peft_config"):
                actor = actor.merge_and_unload()  # an SFT adapter becomes part of the PPO base
            if self.base_path is None:
                self.base_path = json.loads((policy_dir / "manifest.json").read_text()).get("base_model")
        else:
            actor = load_model(self.base_path, cfg.model, tokenizer, **qkw)
        self.lora = p.tuning.is_peft
        if p.tuning.is_peft and not p.tuning.is_lora_family and p.tuning.method != "ia3":
            raise ValueError(f"ppo.tuning.method={p.tuning.method!r}: PPO supports full, freeze, the LoRA family "
                             "and ia3 (the reference is the base with the adapter disabled)")
        self.ref = None
        if not self.lora:
            ref = load_trained(policy_dir, cfg.model, tokenizer, kind="causal_lm") if policy_dir is not None \
                else load_model(self.base_path, cfg.model, tokenizer)
            if hasattr(ref, "peft_config"):
                ref = ref.merge_and_unload()
            self.ref = self._frozen(ref, reference=True)
        actor, self.unfreezer = apply_tuning(actor, p.tuning, "causal_lm", self.total_steps)
        if p.gradient_checkpointing:
            enable_activation_checkpointing(actor)
        actor.config.use_cache = True
        self.actor = self._no_dropout(actor).to(self.device).eval()

        # reward model (the rm stage's or one you bring) and critic (ppo.critic_from)
        rm, rm_tokenizer, rm_location = self._load_reward_model(tokenizer)
        critic = self._load_critic(tokenizer, rm, rm_tokenizer, rm_location)
        self.rm = self._frozen(rm) if rm is not None else None
        if p.tuning.is_lora_family:
            import peft

            critic = peft.get_peft_model(critic, peft.LoraConfig(
                task_type=peft.TaskType.TOKEN_CLS, r=p.tuning.lora_r, lora_alpha=p.tuning.lora_alpha,
                lora_dropout=p.tuning.lora_dropout, target_modules=p.tuning.target_modules,
                exclude_modules=["score", "classifier"]))  # the value head trains in full (modules_to_save)
            for name, param in critic.named_parameters():
                if "score" in name or "classifier" in name:
                    param.requires_grad_(True)
        else:
            for param in critic.parameters():
                param.requires_grad_(True)
        if p.gradient_checkpointing:
            enable_activation_checkpointing(critic)
        self.critic = self._no_dropout(critic).to(self.device).eval()
        self.rewards = RewardSources(p.rewards, cfg, tokenizer, self.rm, self.rm_max_length, self.device,
                                     autocast_bf16=self.bf16, batch_size=max(self.micro, 8),
                                     rm_tokenizer=rm_tokenizer)
        run.update(policy_source=self.policy_source, critic_from=self.critic_from, critic_source=self.critic_source,
                   rm_source=rm_location, rm_scoring=self.rewards.rm_scoring if self.rm is not None else None)

    def _load_reward_model(self, tokenizer: Any) -> tuple[Any | None, Any | None, str | None]:
        """-> (reward model, its own tokenizer or None, where it was loaded from), unfrozen; (None, None,
        None) when no kind 'rm' source and no ``critic_from: rm`` needs one.

        ``ppo.reward_model`` (any AutoModelForSequenceClassification with one label, with its tokenizer and
        chat template) when set, else the ``rm`` stage's model (same tokenizer: the stage fingerprints
        match, so its tokenizer is not loaded again). Sets ``self.rm_max_length``.
        """
        cfg, p = self.cfg, self.p
        self.rm_max_length = cfg.rm.max_length
        if not (any(r.kind == "rm" for r in p.rewards) or p.critic_from == "rm"):
            return None, None, None
        if p.reward_model is None:
            from stages.scoring import load_reward_model

            rm_dir = self.run.parent_dir("rm")
            rm, _ = load_reward_model(rm_dir, cfg.model)
            return rm, None, str(rm_dir)
        source = p.reward_model
        location = model_location(source.path)
        from transformers import AutoConfig

        labels = AutoConfig.from_pretrained(location, trust_remote_code=cfg.model.trust_remote_code).num_labels
        if labels != 1:
            raise ValueError(f"ppo.reward_model.path={source.path!r} has num_labels={labels}: a reward model is an "
                             "AutoModelForSequenceClassification with one label (one scalar score per sequence)")
        chat = ChatConfig(template=source.chat_template, system_prompt=cfg.chat.system_prompt)
        rm_tokenizer = load_tokenizer(model_location(source.tokenizer) if source.tokenizer else location, cfg.model,
                                      chat, template_key="ppo.reward_model.chat_template", foreign=True)
        rm_model_cfg = cfg.model.model_copy(update={"pad_token": rm_tokenizer.pad_token})
        rm = load_model(location, rm_model_cfg, rm_tokenizer, kind="seq_cls").eval()
        self.rm_max_length = source.max_length or cfg.rm.max_length
        return rm, rm_tokenizer, location

    def _load_critic(self, tokenizer: Any, rm: Any | None, rm_tokenizer: Any | None, rm_location: str | None) -> Any:
        """The critic (token-level value model) by ``ppo.critic_from``; sets ``critic_from`` / ``critic_source``.

        ``rm``: the reward model's weights with its score head as the value head (needs an RM with the
        policy's tokenizer and chat format); ``policy``: the policy's weights with a new value head;
        a folder / hub name: that model (same tokenizer as the policy). ``auto``: ``rm`` when the run has
        an RM that shares the policy's tokenizer, else ``policy``. Value-head biases start at 0.
        """
        from stages.ppo.rewards import same_chat_format

        cfg, p = self.cfg, self.p
        rm_shares = rm is not None and (rm_tokenizer is None or same_chat_format(tokenizer, rm_tokenizer, cfg))
        choice = p.critic_from
        if choice == "auto":
            choice = "rm" if rm_shares else "policy"
        if choice == "policy":
            self.critic_from, self.critic_source = "policy", f"{self.base_path} (the policy, new value head)"
            return load_model(self.base_path, cfg.model, tokenizer, kind="token_cls")
        if choice == "rm":
            if not rm_shares:
                raise ValueError(f"ppo.critic_from='rm' needs a reward model with the policy's tokenizer and chat "
                                 f"format, but the one at {rm_location} has another (it scores text in its own "
                                 "template). Use ppo.critic_from: policy (or a folder with the policy's tokenizer)")
            if rm_tokenizer is None:  # the rm stage: model/ or base + adapter
                critic = load_trained(Path(rm_location), cfg.model, tokenizer, kind="token_cls")
                critic = critic.merge_and_unload() if hasattr(critic, "peft_config") else critic
            else:
                critic = load_model(rm_location, cfg.model, tokenizer, kind="token_cls")
            self._check_critic_head(critic, rm)
            self.critic_from, self.critic_source = "rm", rm_location
        else:
            location = model_location(choice)
            self._check_same_tokenizer(location, tokenizer)
            critic = load_model(location, cfg.model, tokenizer, kind="token_cls")
            self.critic_from, self.critic_source = "path", location
        with torch.no_grad():  # an RM head has no bias; the token head's new bias starts at 0
            for name, param in critic.named_parameters():
                if name.endswith("score.bias"):
                    param.zero_()
        return critic

    def _check_same_tokenizer(self, location: str, tokenizer: Any) -> None:
        """A critic from a folder / hub name must read the policy's token ids (same vocabulary and eos)."""
        from transformers import AutoTokenizer

        try:
            theirs = AutoTokenizer.from_pretrained(location, trust_remote_code=self.cfg.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ValueError(f"ppo.critic_from={self.p.critic_from!r}: cannot load its tokenizer ({exc}); the critic "
                             "must come with the policy's tokenizer") from exc
        ours = {t: i for t, i in tokenizer.get_vocab().items() if t != tokenizer.pad_token}
        mine = {t: i for t, i in theirs.get_vocab().items() if t != theirs.pad_token}
        if ours != mine or theirs.eos_token_id != tokenizer.eos_token_id:
            raise ValueError(f"ppo.critic_from={self.p.critic_from!r}: its tokenizer differs from the policy's "
                             "(vocabulary or eos); the critic reads the policy's token ids. Use ppo.critic_from: "
                             "policy, or rm with a reward model that shares the policy's tokenizer")

    @staticmethod
    def _no_dropout(model: Any) -> Any:
        """PPO runs without dropout (the ratio must be exactly 1 before the first update)."""
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "attention_dropout"):
            config.attention_dropout = 0.0
        return model

    def _train_mode(self, on: bool) -> None:
        """Train mode only matters for gradient checkpointing (dropout is off); generation stays in eval."""
        if self.p.gradient_checkpointing:
            for model in (self.actor, self.critic):
                model.train(on)

    def _frozen(self, model: Any, reference: bool = False) -> Any:
        """An inference-only copy on the device. The reference computes exactly as the actor does (at
        step 0 its log-probs equal the actor's): it keeps the actor's weight dtype, fp32 under autocast,
        bf16 only where DeepSpeed's bf16 mode casts the actor. The reward model may hold bf16 weights
        on CUDA to halve its memory; its score head still runs in fp32 (:meth:`_heads_in_fp32`)."""
        for param in model.parameters():
            param.requires_grad_(False)
        bf16_weights = bool(self.p.deepspeed) if reference else self.device.type == "cuda"
        if self.bf16 and bf16_weights:
            model = model.to(torch.bfloat16)
        return model.to(self.device).eval()

    def _heads_in_fp32(self) -> None:
        """Log-probs, values and RM scores come out of their heads in fp32 (DESIGN §4): the lm_head of the
        actor and the reference, the critic's value head, the RM's score head. Under bf16 autocast a head
        rounds its output to bf16 (spacing 0.016 near a value of 2, more than a per-token KL reward)."""
        for model in (self.actor, self.ref):
            if model is not None:
                head_in_fp32(model.get_output_embeddings())
        for model in (self.critic, self.rm):
            if model is not None:
                for name, module in model.named_modules():  # PEFT keeps the head twice (modules_to_save)
                    if {"score", "classifier"} & set(name.split(".")):
                        head_in_fp32(module)

    @staticmethod
    def _check_critic_head(critic: Any, rm: Any) -> None:
        """The critic's value head must start as the RM's score head (token-level value on the RM)."""
        def head(model: Any) -> torch.Tensor | None:
            for name, param in model.named_parameters():
                if name.endswith("score.weight"):
                    return param.detach().float().cpu()
            return None

        a, b = head(critic), head(rm)
        if a is None or b is None or a.shape != b.shape or not torch.allclose(a, b):
            raise RuntimeError("the critic's value head was not initialised from the RM's score head (weights "
                               "differ or are missing); the RM checkpoint must hold a 'score' head")

    def _build_optimisers(self) -> None:
        p = self.p
        actor_params = [q for q in self.actor.parameters() if q.requires_grad or self.unfreezer is not None]
        critic_params = [q for q in self.critic.parameters() if q.requires_grad]
        if not actor_params or not critic_params:
            raise ValueError("no trainable parameters in the actor or critic: check ppo.tuning")
        # fused AdamW (one kernel for all tensors; CPU and CUDA) unless DeepSpeed manages the step, then
        # foreach (the CPU default would loop over tensors in Python)
        fast = {"foreach": True} if p.deepspeed else {"fused": True}
        self.actor_params, self.critic_params = actor_params, critic_params
        self.actor_opt = torch.optim.AdamW(actor_params, lr=p.learning_rate, weight_decay=p.weight_decay, **fast)
        self.critic_opt = torch.optim.AdamW(critic_params, lr=p.critic_learning_rate or p.learning_rate,
                                            weight_decay=p.weight_decay, **fast)
        # the actor steps only after the critic warm-up, so its schedule spans only those steps
        actor_steps = max(1, self.optim_steps - min(p.critic_warmup_steps, self.total_steps) * p.ppo_epochs
                          * self.n_minibatches)
        self.actor_sched = torch.optim.lr_scheduler.LambdaLR(self.actor_opt, lr_lambda(p.lr_scheduler, 0, actor_steps))
        self.critic_sched = torch.optim.lr_scheduler.LambdaLR(self.critic_opt, lr_lambda(p.lr_scheduler, 0, self.optim_steps))
        self.actor_engine = self.critic_engine = None
        self.zero_stage = 0
        if p.deepspeed:
            import deepspeed

            from pipeline.deepspeed_check import fill_auto

            raw = json.loads(resolve_path(p.deepspeed).read_text())
            self.zero_stage = int(raw.get("zero_optimization", {}).get("stage", 0))

            def ds(model: Any, opt: Any, sched: Any, lr: float) -> tuple[Any, Any, Any]:
                conf = fill_auto(json.loads(json.dumps(raw)), micro_batch=self.micro,
                                 grad_accum=p.gradient_accumulation_steps, world_size=self.dist.world_size,
                                 lr=lr, max_grad_norm=p.max_grad_norm, bf16=self.bf16,
                                 hidden_size=getattr(model.config, "hidden_size", None))
                engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                             config=conf)
                engine.module.eval()
                return engine, opt, sched

            self.actor_engine, self.actor_opt, self.actor_sched = ds(
                self.actor, self.actor_opt, self.actor_sched, p.learning_rate)
            self.critic_engine, self.critic_opt, self.critic_sched = ds(
                self.critic, self.critic_opt, self.critic_sched, p.critic_learning_rate or p.learning_rate)

    # ----------------------------------------------------------------------------- forwards
    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def policy_logits(self, model: Any, ids: torch.Tensor, att: torch.Tensor, T: int) -> torch.Tensor:
        """(B, T, V) logits predicting the T response tokens (scaled by 1/temperature)."""
        with self._autocast():
            out = model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att), use_cache=False,
                        logits_to_keep=T + 1)
        logits = out.logits[:, :T].float()
        return logits if self.p.temperature == 1.0 else logits / self.p.temperature

    def critic_values(self, model: Any, ids: torch.Tensor, att: torch.Tensor, T: int) -> torch.Tensor:
        """(B, T) fp32 values of the state before each response token."""
        with self._autocast():
            out = model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att), use_cache=False)
        S = ids.size(1)
        return out.logits[:, S - T - 1:S - 1, 0].float()

    def reference_logits(self, ids: torch.Tensor, att: torch.Tensor, T: int) -> torch.Tensor:
        if self.ref is not None:
            return self.policy_logits(self.ref, ids, att, T)
        with self.actor.disable_adapter():  # LoRA: the reference is the same base, adapter off
            return self.policy_logits(self.actor, ids, att, T)

    # ------------------------------------------------------------------------------ rollout
    def step_prompts(self, step: int) -> tuple[list[int], list[int]]:
        """(dataset indices, global positions) of this rank's prompts for PPO step ``step``."""
        p, d = self.p, self.dist
        per_epoch = len(epoch_order(len(self.prompts), 0, p.seed, d.rank, d.world_size, p.rollout_batch_size))
        epoch, index = divmod(step, per_epoch)
        batches = epoch_order(len(self.prompts), epoch, p.seed, d.rank, d.world_size, p.rollout_batch_size)
        indices = batches[index]
        positions = [d.rank + d.world_size * j for j in range(len(indices))]
        return indices, positions

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], positions: list[int], stream: int) -> tuple[torch.Tensor, ...]:
        """-> (query, query_mask, response (pad after eos, global padded length), mask, has_eos)."""
        p, tok = self.p, self.tokenizer
        # identical shapes on every rank: prompts padded to the longest prompt anywhere
        longest = int(self.comm.max(torch.tensor([max(len(x) for x in prompt_ids)]))[0])
        query, query_mask = left_pad(prompt_ids, tok.pad_token_id, longest)
        query, query_mask = query.to(self.device), query_mask.to(self.device)
        sampler = EpisodeSampler(episode_uniforms(p.seed, stream, positions, p.max_new_tokens), query.size(1),
                                 p.temperature, p.top_k, p.top_p)
        from transformers import LogitsProcessorList

        # greedy over the sampler's one-hot logits, and nothing else: the checkpoint's generation_config
        # (repetition penalty, top-k/p, temperature, min length) must not reshape them (DESIGN §4)
        gen_cfg = neutral_generation_config(tok, p.max_new_tokens)
        kwargs = dict(input_ids=query, attention_mask=query_mask, logits_processor=LogitsProcessorList([sampler]))
        if self.zero_stage == 3:
            # ZeRO-3: the engine's hooks gather each layer's shards for every decoding forward; all ranks
            # keep stepping until every rank is done (synced_gpus), so the collectives stay matched
            kwargs["synced_gpus"] = self.comm.on
        with self._autocast():
            out = neutral_generate(self.actor, gen_cfg, **kwargs)
        response = out[:, query.size(1):]
        if response.size(1) == 0:  # nothing generated (max_new_tokens reached at once): keep one pad
            response = torch.full((query.size(0), 1), tok.pad_token_id, dtype=torch.long, device=self.device)
        mask, has_eos = response_mask(response, tok.eos_token_id)
        # identical shapes on every rank: pad to the longest real response anywhere
        length = int(self.comm.max(torch.tensor([int(mask.sum(1).max())]))[0])
        response = response[:, :length] if response.size(1) >= length else torch.cat(
            [response, torch.full((response.size(0), length - response.size(1)), tok.pad_token_id,
                                  dtype=torch.long, device=self.device)], dim=1)
        mask, has_eos = response_mask(response, tok.eos_token_id)
        response = torch.where(mask.bool(), response, torch.full_like(response, tok.pad_token_id))
        return query, query_mask, response, mask, has_eos

    @torch.no_grad()
    def make_rollout(self, step: int, timings: dict[str, float]) -> Rollout:
        p = self.p
        indices, positions = self.step_prompts(step)
        prompts = [self.prompts[i] for i in indices]
        t0 = time.perf_counter()
        query, query_mask, response, mask, has_eos = self.generate([x.ids for x in prompts], positions, step)
        t1 = time.perf_counter()
        T = response.size(1)
        logp, ref_logp, values = [], [], []
        seq_ids = torch.cat([query, response], dim=1)
        seq_att = torch.cat([query_mask, mask], dim=1)
        # rollout passes need no graph: chunk by a logits budget (~512 MB of fp32), not by micro-batch
        vocab = int(self.actor.config.vocab_size)
        chunk = max(1, min(len(prompts), (1 << 27) // max(1, (T + 1) * vocab)))
        for s in range(0, len(prompts), chunk):
            ids, att, resp = seq_ids[s:s + chunk], seq_att[s:s + chunk], response[s:s + chunk]
            logp.append(logprobs_from_logits(self.policy_logits(self.actor, ids, att, T), resp))
            ref_logp.append(logprobs_from_logits(self.reference_logits(ids, att, T), resp))
            values.append(self.critic_values(self.critic, ids, att, T))
        logp, ref_logp, values = torch.cat(logp).cpu(), torch.cat(ref_logp).cpu(), torch.cat(values).cpu()
        query, query_mask, response, mask, has_eos = (x.cpu() for x in (query, query_mask, response, mask, has_eos))
        t2 = time.perf_counter()
        scores, texts = self.score_responses(prompts, response, mask, has_eos)
        score, parts, messages = scores.total, scores.parts, [x.messages for x in prompts]
        t3 = time.perf_counter()

        reward = score.clone()
        if p.normalize_reward:
            self.reward_norm.update(self.comm.gather(score))
            reward = self.reward_norm.normalize(reward, clip=p.reward_clip)
        elif p.reward_clip is not None:
            reward = reward.clamp(-p.reward_clip, p.reward_clip)
        # a response that did not end with eos is never rewarded as finished (DESIGN §3)
        eos_penalty = torch.where(has_eos, torch.zeros(()), torch.tensor(abs(p.missing_eos_penalty or 0.0)))
        reward = reward - eos_penalty
        reward_stats = {"missing_eos_penalty": float(eos_penalty.mean()),
                        **{f"reward_metric/{k}": float(torch.nanmean(v)) for k, v in scores.metrics.items()}}
        if self.rm is not None:
            reward_stats["rm_truncated"] = float(scores.rm_truncated)

        kl = kl_penalty(logp, ref_logp, p.kl_estimator)
        beta = 0.0 if p.kl_in_loss else self.kl_ctl.value
        rewards = per_token_rewards(reward, kl, mask, beta)
        advantages, returns = compute_gae(rewards, values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = global_whiten(advantages, mask, self.comm)
        timings.update(time_generate=t1 - t0, time_forward=t2 - t1, time_score=t3 - t2)
        return Rollout(query, query_mask, response, mask, has_eos, logp, ref_logp, values, advantages, returns,
                       score, reward, kl * mask, texts, messages, parts, sum(x.truncated for x in prompts),
                       reward_stats=reward_stats)

    def score_responses(self, prompts: list[Any], response: torch.Tensor, mask: torch.Tensor,
                        has_eos: torch.Tensor) -> tuple[Scores, list[str]]:
        """Score this rank's responses with every reward source -> (scores, decoded texts).

        ``prompts``: the EncodedPrompts that were generated from; ``response`` (B, T) / ``mask`` (B, T) /
        ``has_eos`` (B,) on the CPU, as ``generate`` returns them. The reward model is handed the prompt ids
        the policy saw and the generated ids up to and including eos (see ``stages.ppo.rewards``).
        """
        rows = response_rows(response, mask)
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        batch = Responses([x.messages for x in prompts], [list(x.ids) for x in prompts], rows,
                          [bool(e) for e in has_eos.tolist()], texts, [x.reference for x in prompts])
        return self.rewards.score(batch), texts

    # ------------------------------------------------------------------------------- update
    def _ptx_batch(self) -> dict[str, torch.Tensor]:
        n = len(self.ptx_rows)
        start = (self.ptx_pos * self.dist.world_size + self.dist.rank) * self.micro
        rows = [self.ptx_rows[(start + i) % n] for i in range(self.micro)]
        self.ptx_pos += 1
        return {k: v.to(self.device) for k, v in pad_collate(self.tokenizer.pad_token_id)(rows).items()}

    def _backward(self, engine: Any, loss: torch.Tensor) -> None:
        if engine is not None:
            engine.backward(loss)
        else:
            (loss / self.p.gradient_accumulation_steps).backward()

    def _optimizer_step(self, engine: Any, params: list[torch.nn.Parameter], opt: Any, sched: Any, skip: bool) -> None:
        if engine is not None:
            return  # DeepSpeed steps inside engine.step() at its accumulation boundary
        if skip:
            opt.zero_grad(set_to_none=True)
            return
        if self.p.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.p.max_grad_norm, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    def _save_bad_batch(self, ro: Rollout, idx: torch.Tensor, losses: dict[str, float]) -> Path:
        path = self.run.dir / f"nan_batch_step{self.step}_rank{self.dist.rank}.pt"
        ids, att = ro.sequences(idx)
        torch.save({"step": self.step, "losses": losses, "input_ids": ids, "attention_mask": att,
                    "response": ro.response[idx], "mask": ro.mask[idx], "old_logp": ro.logp[idx],
                    "ref_logp": ro.ref_logp[idx], "values": ro.values[idx], "advantages": ro.advantages[idx],
                    "returns": ro.returns[idx], "reward": ro.reward[idx],
                    "texts": [ro.texts[i] for i in idx.tolist()]}, path)
        return path

    def update(self, ro: Rollout) -> dict[str, float]:
        """PPO epochs over the rollout; returns this rank's mean statistics."""
        p = self.p
        actor_fw = self.actor_engine or self.actor
        critic_fw = self.critic_engine or self.critic
        train_actor = self.step >= p.critic_warmup_steps
        T = ro.response.size(1)
        sums: dict[str, float] = {}
        n_micro = 0
        ratio_max = 0.0
        skipped = 0
        world, accum = self.dist.world_size, p.gradient_accumulation_steps
        for epoch in range(p.ppo_epochs):
            g = torch.Generator().manual_seed(p.seed * 1_000_003 + self.step * 1_009 + epoch)
            order = torch.randperm(p.rollout_batch_size, generator=g)
            minibatches = order.view(self.n_minibatches, p.mini_batch_size)
            # global response tokens per minibatch: each micro-batch's loss is weighted by its share
            counts = self.comm.sum(torch.stack([ro.mask[mb].sum() for mb in minibatches]).double())
            for mb, n_tokens in zip(minibatches, counts.tolist()):
                mb_skipped = 0
                for micro_idx in mb.view(accum, self.micro):
                    ids, att = ro.sequences(micro_idx)
                    ids, att = ids.to(self.device), att.to(self.device)
                    mask = ro.mask[micro_idx].to(self.device)
                    weight = float(mask.sum()) * accum * world / max(n_tokens, 1.0)
                    stats: dict[str, float] = {}
                    # critic
                    values = self.critic_values(critic_fw, ids, att, T)
                    vf_loss, vf_stats = clipped_value_loss(values, ro.values[micro_idx].to(self.device),
                                                           ro.returns[micro_idx].to(self.device), mask,
                                                           p.cliprange_value)
                    stats.update(value_loss=float(vf_loss.detach()), vf_clipfrac=float(vf_stats["vf_clipfrac"]))
                    # actor
                    pg_loss = None
                    if train_actor:
                        logits = self.policy_logits(actor_fw, ids, att, T)
                        resp = ro.response[micro_idx].to(self.device)
                        logp = logprobs_from_logits(logits, resp)
                        pg_loss, pg_stats = clipped_policy_loss(logp, ro.logp[micro_idx].to(self.device),
                                                                ro.advantages[micro_idx].to(self.device), mask,
                                                                p.cliprange)
                        stats.update({k: float(v) for k, v in pg_stats.items()})
                        stats["policy_loss"] = float(pg_loss.detach())
                        with torch.no_grad():
                            stats["entropy"] = float(entropy_from_logits(logits.detach(), mask))
                        if p.kl_in_loss:
                            kl_term = masked_mean(kl_penalty(logp, ro.ref_logp[micro_idx].to(self.device),
                                                             p.kl_estimator), mask)
                            stats["kl_loss"] = float(kl_term.detach())
                            pg_loss = pg_loss + self.kl_ctl.value * kl_term
                        pg_loss = pg_loss * weight
                        if p.ptx_coef > 0:
                            batch = self._ptx_batch()
                            with self._autocast():
                                ptx = actor_fw(**batch, use_cache=False).loss.float()
                            stats["ptx_loss"] = float(ptx.detach())
                            pg_loss = pg_loss + p.ptx_coef * ptx
                    vf_total = p.vf_coef * vf_loss * weight
                    # NaN / inf: stop with the batch saved (every rank agrees before anyone raises)
                    finite = torch.tensor([float(torch.isfinite(vf_total)) * (
                        1.0 if pg_loss is None else float(torch.isfinite(pg_loss)))])
                    if float(self.comm.sum(finite)[0]) < world:
                        path = self._save_bad_batch(ro, micro_idx, {k: v for k, v in stats.items()
                                                                    if k in ("policy_loss", "value_loss")})
                        raise FloatingPointError(
                            f"ppo: non-finite loss at step {self.step} (epoch {epoch}); policy_loss="
                            f"{stats.get('policy_loss')}, value_loss={stats.get('value_loss')}. The micro-batch is "
                            f"saved to {path} (load with torch.load). Lower ppo.learning_rate, check the reward "
                            "scale (ppo.normalize_reward / reward_clip) or use bf16/fp32 (never fp16).")
                    self._backward(self.critic_engine, vf_total)
                    if self.critic_engine is not None:
                        self.critic_engine.step()
                    if pg_loss is not None:
                        r_max = float(self.comm.max(torch.tensor([stats["ratio_max"]]))[0])
                        ratio_max = max(ratio_max, r_max)
                        if r_max > p.ratio_skip_threshold:
                            mb_skipped += 1
                            pg_loss = pg_loss * 0.0  # keeps DeepSpeed's accumulation bookkeeping intact
                            if self.actor_engine is None:
                                pg_loss = None
                        if pg_loss is not None:
                            self._backward(self.actor_engine, pg_loss)
                        if self.actor_engine is not None:
                            self.actor_engine.step()
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n_micro += 1
                self._optimizer_step(self.critic_engine, self.critic_params, self.critic_opt, self.critic_sched, False)
                if train_actor:
                    self._optimizer_step(self.actor_engine, self.actor_params, self.actor_opt, self.actor_sched,
                                         skip=mb_skipped == accum)
                    if mb_skipped:
                        skipped += 1
                    if self.ema is not None and mb_skipped < accum:
                        self._ema_update()
        out = {k: v / max(n_micro, 1) for k, v in sums.items()}
        out["ratio_max"] = ratio_max
        out["skipped_minibatches"] = float(skipped)
        return out

    @torch.no_grad()
    def _ema_update(self) -> None:
        decay = self.p.ema_decay
        for name, param in self.actor.named_parameters():
            if name in self.ema:
                self.ema[name].mul_(decay).add_(param.detach().float(), alpha=1.0 - decay)

    # ------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward-source score on the held-out prompts (fixed sampling streams: comparable over time)."""
        if not self.eval_prompts:
            return {}
        d, p = self.dist, self.p
        n = len(self.eval_prompts)
        mine = list(range(d.rank, n, d.world_size))
        per_rank = math.ceil(n / d.world_size)
        mine += [-1] * (per_rank - len(mine))  # equal work on every rank; -1 rows are not counted
        totals = torch.zeros(4, dtype=torch.float64)
        for s in range(0, per_rank, p.rollout_batch_size):
            chunk = mine[s:s + p.rollout_batch_size]
            real = torch.tensor([i >= 0 for i in chunk])
            prompts = [self.eval_prompts[max(i, 0)] for i in chunk]
            _, _, response, mask, has_eos = self.generate([x.ids for x in prompts], [max(i, 0) for i in chunk],
                                                          stream=-1)
            response, mask, has_eos = response.cpu(), mask.cpu(), has_eos.cpu()
            score = self.score_responses(prompts, response, mask, has_eos)[0].total
            totals += torch.stack([score[real].sum().double(), mask.sum(1)[real].sum().double(),
                                   has_eos[real].sum().double(), real.sum().double()])
        totals = self.comm.sum(totals)
        count = max(float(totals[3]), 1.0)
        return {"eval_score": float(totals[0]) / count, "eval_response_length": float(totals[1]) / count,
                "eval_eos_rate": float(totals[2]) / count}

    # --------------------------------------------------------------------------- checkpoints
    def _client_state(self) -> dict[str, Any]:
        return {"step": self.step, "episodes": self.episodes, "ptx_pos": self.ptx_pos,
                "kl_ctl": self.kl_ctl.state_dict(), "reward_norm": self.reward_norm.state_dict(),
                "ema": self.ema, "rng": rng_state(),
                "unfreezer": self.unfreezer.state_dict() if self.unfreezer is not None else None}

    @staticmethod
    def _trainable(model: Any, everything: bool = False) -> dict[str, torch.Tensor]:
        return {n: q.detach().cpu().clone() for n, q in model.named_parameters() if q.requires_grad or everything}

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N, written under a temporary name and renamed; ``latest`` updated last."""
        root = self.run.checkpoints
        tag = f"step-{self.step}"
        final, tmp = root / tag, root / f".tmp-{tag}"
        if self.dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.comm.barrier()
        if self.actor_engine is not None:
            self.actor_engine.save_checkpoint(str(tmp), tag="actor", save_latest=False)
            self.critic_engine.save_checkpoint(str(tmp), tag="critic", save_latest=False)
            torch.save(self._client_state(), tmp / f"client-rank{self.dist.rank}.pt")
        elif self.dist.is_main:
            torch.save({"actor": self._trainable(self.actor, self.unfreezer is not None),
                        "critic": self._trainable(self.critic),
                        "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                        "actor_sched": self.actor_sched.state_dict(), "critic_sched": self.critic_sched.state_dict(),
                        "client": self._client_state()}, tmp / "state.pt")
        self.comm.barrier()
        if self.dist.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(root / "latest", tag)
            for old in sorted(root.glob("step-*"), key=lambda q: int(q.name.split("-")[1]))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        self.comm.barrier()
        return final

    def maybe_resume(self) -> bool:
        latest = self.run.checkpoints / "latest"
        if not (self.run.resuming and latest.exists()):
            return False
        folder = self.run.checkpoints / latest.read_text().strip()
        if self.actor_engine is not None:
            self.actor_engine.load_checkpoint(str(folder), tag="actor")
            self.critic_engine.load_checkpoint(str(folder), tag="critic")
            client = torch.load(folder / f"client-rank{self.dist.rank}.pt", map_location="cpu", weights_only=False)
        else:
            state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
            with torch.no_grad():
                for model, key in ((self.actor, "actor"), (self.critic, "critic")):
                    named = dict(model.named_parameters())
                    for name, value in state[key].items():
                        named[name].copy_(value)
            self.actor_opt.load_state_dict(state["actor_opt"])
            self.critic_opt.load_state_dict(state["critic_opt"])
            self.actor_sched.load_state_dict(state["actor_sched"])
            self.critic_sched.load_state_dict(state["critic_sched"])
            client = state["client"]
        self.step, self.episodes, self.ptx_pos = client["step"], client["episodes"], client["ptx_pos"]
        self.kl_ctl.load_state_dict(client["kl_ctl"])
        self.reward_norm.load_state_dict(client["reward_norm"])
        if client.get("ema") is not None:
            self.ema = {k: v.to(self.device) for k, v in client["ema"].items()}
        if self.unfreezer is not None and client.get("unfreezer"):
            self.unfreezer.load_state_dict(client["unfreezer"])
        set_rng_state(client["rng"])
        if self.dist.is_main:  # rows written after the checkpoint belong to the lost part of the run
            for name in ("metrics.jsonl", "samples.jsonl"):
                path = self.run.dir / name
                if path.exists():
                    keep = [line for line in path.read_text().splitlines()
                            if line and json.loads(line).get("step", 0) <= self.step]
                    atomic_write_text(path, "".join(line + "\n" for line in keep))
            print(f"[alignpipe] ppo: resumed from {folder} (step {self.step})", flush=True)
        return True

    # ------------------------------------------------------------------------------- loop
    def _log_samples(self, ro: Rollout) -> None:
        if not self.dist.is_main:
            return
        with open(self.run.dir / "samples.jsonl", "a") as fh:
            for i in range(min(SAMPLES_PER_LOG, len(ro.texts))):
                prompt = next((m["content"] for m in reversed(ro.prompts[i]) if m["role"] == "user"), "")
                row = {"step": self.step, "prompt": prompt, "response": ro.texts[i], "score": float(ro.score[i]),
                       "reward": float(ro.reward[i]), "eos": bool(ro.has_eos[i]),
                       **{f"score/{k}": float(v[i]) for k, v in ro.parts.items()}}
                fh.write(json.dumps(row) + "\n")

    def train(self) -> dict[str, Any]:
        p = self.p
        resumed = self.maybe_resume()
        if not resumed:
            torch.manual_seed(p.seed + self.dist.rank)
            random.seed(p.seed + self.dist.rank)
            np.random.seed(p.seed + self.dist.rank)
        first_eval: dict[str, float] = {}
        if not resumed and self.eval_prompts:
            first_eval = self.evaluate()
            self.run.log(0, first_eval)
        bar = None
        if self.dist.is_main and self.cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="ppo", dynamic_ncols=True)
        row: dict[str, float] = {}
        # run-level throughput: steps only (no model loading, evals, checkpoints), this process's steps
        train_seconds = episodes_run = response_tokens = 0.0
        while self.step < self.total_steps:
            start, cpu_start = time.perf_counter(), time.process_time()
            timings: dict[str, float] = {}
            kl_coef = self.kl_ctl.value
            ro = self.make_rollout(self.step, timings)
            t_update = time.perf_counter()
            self._train_mode(True)
            try:
                stats = self.update(ro)
            finally:
                self._train_mode(False)
            timings["time_update"] = time.perf_counter() - t_update

            B = ro.mask.size(0)
            seq_kl = ro.kl.sum(1)
            local = {
                "score": float(ro.score.mean()), "reward": float(ro.reward.mean()),
                "kl": float(seq_kl.mean()),
                "non_score_reward": 0.0 if p.kl_in_loss else float((-kl_coef * seq_kl).mean()),
                "explained_variance": float(explained_variance(ro.values, ro.returns, ro.mask)),
                "response_length": float(ro.mask.sum(1).float().mean()),
                "eos_rate": float(ro.has_eos.float().mean()),
                "truncated_prompts": float(ro.truncated),
                **{f"score/{k}": float(v.mean()) for k, v in ro.parts.items()},
                **ro.reward_stats,
                **{k: v for k, v in stats.items() if k not in ("ratio_max", "skipped_minibatches")},
                **timings,
            }
            row = self.comm.mean_dict(local)
            row["ratio_max"] = stats["ratio_max"]  # already a max over ranks
            row["skipped_minibatches"] = stats["skipped_minibatches"]  # identical on every rank
            if not math.isfinite(row["explained_variance"]):
                row["explained_variance"] = 0.0
            row["kl_coef"] = kl_coef
            if p.adaptive_kl:
                self.kl_ctl.update(row["kl"], B * self.dist.world_size)
            self.step += 1
            if self.unfreezer is not None:
                self.unfreezer.step(self.step)
            self.episodes += B * self.dist.world_size
            row["episodes"] = self.episodes
            row["lr"] = self.actor_sched.get_last_lr()[0]
            row["critic_lr"] = self.critic_sched.get_last_lr()[0]
            step_seconds = time.perf_counter() - start
            row["episodes_per_s"] = B * self.dist.world_size / max(step_seconds, 1e-9)
            train_seconds += step_seconds
            episodes_run += B * self.dist.world_size
            response_tokens += row["response_length"] * B * self.dist.world_size  # equal B on every rank
            row["time_cpu"] = time.process_time() - cpu_start  # this process's CPU seconds (all threads)
            self.run.log(self.step, row)
            if self.step % p.log_samples_every == 0 or self.step == 1:
                self._log_samples(ro)
            if p.eval_steps and self.step % p.eval_steps == 0 and self.step < self.total_steps:
                self.run.log(self.step, self.evaluate())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['score']:.3f}", kl=f"{row['kl']:.3f}")
            if self.step % p.save_steps == 0 and self.step < self.total_steps:
                self.save_checkpoint()
            if after_step_hook is not None:
                after_step_hook(self.step)
        if bar is not None:
            bar.close()
        final = dict(row)
        last_eval = self.evaluate()
        if last_eval:
            self.run.log(self.step, last_eval)
            final.update(last_eval)
        if first_eval:
            final["eval_score_before"] = first_eval["eval_score"]
        if train_seconds > 0:
            final.update(train_seconds=train_seconds, episodes_per_s_mean=episodes_run / train_seconds,
                         response_tokens_per_s_mean=response_tokens / train_seconds)
        return final

    # ------------------------------------------------------------------------------- save
    def save_policy(self) -> None:
        """model/ (merged for LoRA; EMA weights when on) + adapter/ + tokenizer, on rank 0."""
        model = self.actor
        if self.ema is not None:
            with torch.no_grad():
                named = dict(model.named_parameters())
                for name, value in self.ema.items():
                    named[name].copy_(value.to(named[name].dtype))
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                if self.dist.is_main:
                    self._save(model)
        elif self.dist.is_main:
            self._save(model)
        self.comm.barrier()

    def _save(self, model: Any) -> None:
        out = self.run.dir
        for sub in ("model", "adapter"):
            if (out / sub).exists():
                shutil.rmtree(out / sub)
        model.config.use_cache = True
        info = save_trained(model, self.tokenizer, out, self.p.tuning, self.base_path, self.cfg.model)
        save_tokenizer(self.tokenizer, out)
        if (out / "model").exists():
            save_tokenizer(self.tokenizer, out / "model")
        self.run.update(**info)


def run(cfg: RunConfig) -> dict[str, Any]:
    """The ``ppo`` stage: train, save the policy, write the manifest; returns the final metrics."""
    dist = init_distributed()
    with StageRun(cfg, "ppo", is_main=dist.is_main) as run_:
        t_load = time.perf_counter()
        trainer = PPOTrainer(cfg, run_, dist)
        load_seconds = time.perf_counter() - t_load
        if dist.is_main:
            print(f"[alignpipe] ppo: {len(trainer.prompts)} prompts, {trainer.total_steps} steps x "
                  f"{cfg.ppo.rollout_batch_size * dist.world_size} episodes, actor {cfg.ppo.tuning.method} "
                  f"({trainable_summary(trainer.actor)['params_trainable']:,} trainable), critic from "
                  f"{trainer.critic_source}, rewards {', '.join(trainer.rewards.names)}", flush=True)
        final = trainer.train()
        trainer.save_policy()
        run_.update(data=trainer.data_report.as_dict(), params=trainable_summary(trainer.actor),
                    critic_source=trainer.critic_source, reward_sources=trainer.rewards.names)
        run_.manifest["metrics"] = {
            **{k: v for k, v in final.items() if isinstance(v, (int, float))},
            "steps": trainer.step, "episodes": trainer.episodes, "world_size": dist.world_size,
            "load_seconds": load_seconds,
        }
        return run_.manifest["metrics"]
