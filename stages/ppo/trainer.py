"""PPO stage (``run(cfg)``): policy from SFT (or the base, or a model you bring: ``ppo.policy``), reward
from the RM (the rm stage's or ``ppo.reward_model``, and/or functions, judges), critic from the RM
(``ppo.critic_from``), KL to a frozen reference. One readable loop on torch + transformers + peft (+ DeepSpeed).

Code, by part: ``stages.ppo.setup`` builds the models (one record, ``PPOModels`` in ``stages.ppo.models``:
actor, reference, critic, reward model and sources, tokenizer, optimisers / DeepSpeed engines) and the data;
``stages.ppo.experience`` makes each step's ``Rollout`` and its advantages (``PPORollout``, steps 1-2);
``stages.ppo.update`` runs the minibatch updates (``PPOUpdate``, step 3); ``stages.ppo.checkpoint`` writes
and reads checkpoints; ``stages.ppo.rollout_engine`` links to a vLLM worker; ``stages.ppo.distributed``
holds the collectives. This module is the loop (``PPOTrainer.train``: steps 1-4 in order) and the stage's
entry point; the math is ``stages.ppo.core``. Each part is built once with what it reads and holds no
state another part sets: the run state (step, episodes, KL controller, reward normaliser, EMA, PTX
position) is the trainer's, handed to the parts that use it.

One PPO step (``episodes_per_rollout`` episodes per rank: ``episodes_per_rollout / num_samples_per_prompt``
prompts, each sampled ``num_samples_per_prompt`` times):

1. Collect a rollout (``PPORollout.make_rollout``).
   Sampling: HF ``generate`` on left-padded prompts; sampling (``ppo.temperature``; top-k/top-p are
   refused by the config, they would change the sampling distribution but not the log-probs) is drawn
   from per-episode random streams (``rollout.EpisodeSampler``) so it does not depend on ranks or
   resume. Nothing from the checkpoint's ``generation_config`` applies (``stages.generation``).
   Tokens after the first eos are masked and set to pad; responses are padded to the longest response
   across ranks, so every rank's tensors have the same shape. With ``rollout.backend: vllm`` a vLLM worker
   samples instead (rank 0 asks for every rank's episodes, each with its own seed; the actor's weights are
   synced before the first rollout after each update; docs/ROLLOUT.md); what follows is the same either way.
   Scoring: fp32 log-probs of the response under the policy and the reference (the LoRA policy with
   its adapter disabled, or a separate frozen copy for full fine-tuning with the actor's weight dtype, so
   at step 0 both give the same numbers), critic values (token-level value head initialised from the
   RM); under bf16 the lm_heads, the value head and the RM's score head run in fp32. Then the sequence
   score: sum of weighted reward sources (the RM scores the prompt ids + the generated ids up to and
   including eos when it shares the policy's tokenizer, else the text in its own template; see
   ``stages.ppo.rewards``), optionally normalised with running moments (statistics over all ranks) and
   clipped, minus ``|missing_eos_penalty|`` (1.0 by default) for responses without eos.
2. Advantages (``PPORollout.add_advantages``). Rewards per token: ``-beta * KL_t`` on every response token
   (k1 by default, or k3) plus the score at the last token; with ``kl_in_loss`` the KL term moves from the
   reward into the policy loss, with an estimator whose gradient depends on the reference (k2 or k3; k1 is
   refused there). GAE (gamma, lambda), advantages whitened over the whole global batch (masked); or a
   critic-free estimator (``advantage_estimator``: grpo, rloo, reinforce_pp).
3. Update (``PPOUpdate.update``): ``ppo_epochs`` passes over ``episodes_per_rollout / mini_batch_size``
   minibatches, each split into ``gradient_accumulation_steps`` micro-batches. Losses are token means over
   the whole global minibatch (each micro-batch is weighted by its share of the minibatch's response
   tokens), so the gradient does not depend on how a minibatch is split over micro-batches and ranks.
   Clipped policy loss and clipped value loss (x ``vf_coef``), both in fp32; optional PTX (SFT
   cross-entropy x ``ptx_coef``, a mean over the target tokens of the minibatch's PTX batches on all ranks)
   and actor EMA. A micro-batch whose max ratio exceeds ``ratio_skip_threshold`` (on any rank) contributes
   no policy gradient and its minibatch is counted as skipped; when every micro-batch of a minibatch is
   skipped the actor's optimizer step is skipped too: weights, optimiser state and learning-rate schedule
   stay as they were, under DeepSpeed as well (its boundary step runs with the update switched off). A
   non-finite loss stops the run with the offending micro-batch saved as ``nan_batch_step<N>_rank<R>.pt``
   in the stage folder. During the first ``critic_warmup_steps`` steps only the critic trains (the actor's
   learning-rate schedule spans the steps after them).
4. Bookkeeping: adaptive KL (if on: beta updated from the step's mean per-sequence KL, Ziegler et al.
   2019); the step's log row and samples; evaluation every ``eval_every``; the guards (``stages.ppo.guards``:
   keep-best, early stopping, the KL budget ``max_kl``); a checkpoint every ``ppo.train.save_steps``.

Dropout is off (dropout modules get p=0, models stay in eval mode except for the update passes when
gradient checkpointing is on), so the first minibatch's ratio is exactly 1.

Checkpoints every ``ppo.train.save_steps`` under ``checkpoints/step-N`` (written to a temporary folder, then
renamed; ``checkpoints/latest`` names the newest): actor and critic trainable weights, both optimisers
and schedulers (or both DeepSpeed engines' checkpoints), RNG states per rank, the step (which fixes
the data position: the prompt order is a function of seed and epoch), KL controller, reward
normaliser, EMA weights, PTX position. A run restarted with the same config resumes from it and gives
the same result as an uninterrupted run.

Metrics (``metrics.jsonl``, one row per step; means over the global batch unless stated):

- ``score``: weighted sum of the reward sources before normalisation; ``score/<source>`` each raw source.
- ``missing_eos_penalty``: mean penalty subtracted per sequence (the penalty x the share without eos);
  with ``ppo.overlong_penalty``, ``overlong_penalty`` (mean length penalty added) and
  ``overlong_penalised_frac``; with ``ppo.mask_truncated``, ``truncated_masked_frac`` (share of responses
  left out of the policy loss);
  ``rm_truncated``: RM inputs cut to the RM's max length (when an RM is used); ``reward_metric/<name>``:
  step means of the extra per-sample metrics reward functions return.
- ``reward``: the sequence reward used for RL (after normalisation, clipping, eos and overlong penalties).
- ``non_score_reward``: mean over sequences of the summed ``-beta * KL_t`` (0 with ``kl_in_loss``).
- ``kl``: mean over sequences of the summed per-token KL estimate (``kl_estimator``) to the reference;
  ``kl`` and ``non_score_reward`` are not logged when the run has no reference (``kl_coef`` 0 without
  ``adaptive_kl`` or ``max_kl``: ``PPOConfig.uses_reference``), the KL is then never measured.
- ``kl_coef``: beta used for this step.
- ``entropy``: mean per-token entropy of the policy over response tokens (update passes).
- ``clipfrac``: fraction of response tokens where the policy ratio was clipped (update passes):
  ``clipfrac_low`` (below ``1 - cliprange_low`` with a negative advantage) + ``clipfrac_high`` (above
  ``1 + cliprange_high`` with a positive one); ``clipfrac_dual``: share bounded by the dual clip
  (``ppo.clip_ratio_c``). With ``ppo.importance_level: sequence`` the ratio is the sequence's (GSPO).
- ``approx_kl``: ``0.5 * mean((logp - old_logp)^2)``, how far the update moved the policy.
- ``ratio_max``: the largest probability ratio seen in the update (over all minibatches and ranks);
  ``ratio_mean``: the mean ratio over response tokens (1 means the update barely moved the policy).
- ``policy_loss``, ``value_loss``: clipped PPO losses (means over micro-batches); ``vf_clipfrac``.
- ``kl_loss`` / ``ptx_loss``: the KL loss term (``kl_in_loss``) and PTX loss, when on.
- ``explained_variance``: of the returns by the rollout values (1 is a perfect critic).
- ``response_length``: mean real response tokens (eos included); ``eos_rate``: share ending in eos.
- ``skipped_minibatches``: minibatches with a skipped micro-batch this step (ratio explosion).
- Dynamic sampling (``filter_tied_groups``): ``tied_group_frac`` (share of the groups sampled this step,
  every round, whose rewards tied), ``sampling_rounds``, ``tied_groups_trained`` (tied groups that filled
  the batch because ``max_sampling_rounds`` ran out; 0 normally).
- ``rollout_engine_logp_diff`` (``rollout.backend: vllm``): mean |engine log-prob - ``old_logp``| per response
  token, how far the engine's numbers are from the trainer's (the ratio uses ``old_logp``); above
  ``rollout.engine_logp_warn`` a warning is logged once. With ``rollout.importance_sampling`` (on with an
  engine unless false) each token's policy loss is multiplied by ``min(exp(old_logp - engine log-prob),
  rollout.importance_sampling_cap)``: ``rollout_is_weight_mean`` is the mean weight over response tokens,
  ``rollout_is_capped_frac`` the share of tokens at the cap.
- ``time_generate``, ``time_forward`` (policy/reference/critic passes on the rollout),
  ``time_score`` (reward sources), ``time_update`` (seconds); ``episodes_per_s`` (all ranks, whole step);
  ``time_cpu``: CPU seconds this process used for the step (all its threads; on a shared machine
  ``B / time_cpu`` estimates the uncontended single-thread throughput).
- ``lr``, ``critic_lr``: the learning rates the step's update began with (its first optimizer step's; the
  schedules step once per minibatch); ``episodes`` (cumulative, all ranks), ``truncated_prompts``.
- Eval rows (``eval_data``; before training, every ``eval_every`` and at the end): ``eval_score``,
  ``eval_response_length``, ``eval_eos_rate`` on the held-out prompts with fixed sampling streams; with
  ``eval_verifier``, ``eval_verifier`` and ``eval_verifier/<metric>`` (its metrics' means, e.g. a format
  share); ``best_<watched>`` and ``evals_since_best`` (the guards' watch).

Manifest ``metrics``: the last step's row and final eval, plus ``steps``, ``episodes``, ``world_size``,
``load_seconds`` (building the trainer: data, models, optimisers), ``train_seconds`` (the PPO steps only:
no loading, evals or checkpoints; steps run by this process, so after a resume those since the resume),
``episodes_per_s_mean`` and ``response_tokens_per_s_mean`` (all ranks, over ``train_seconds``).

``samples.jsonl``: at step 1 and every ``log_samples_every`` steps, a few (prompt, response, score,
reward, eos) rows.

Several processes (torchrun / deepspeed launcher) need ``ppo.train.deepspeed`` (a ZeRO-1/2/3 JSON): actor and
critic become DeepSpeed engines; the reference and the reward model are plain frozen copies per rank.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.config import RunConfig
from pipeline.stage import StageRun
from stages.context import StageContext, numeric
from stages.engine import DistInfo, use_bf16
from stages.ppo.checkpoint import load_checkpoint, save_checkpoint
from stages.ppo.core import AdaptiveKLController, FixedKLController, RunningMoments, explained_variance
from stages.ppo.distributed import Comm, global_whiten  # noqa: F401  (re-exported: the trainer's collectives)
from stages.ppo.experience import PPORollout, Rollout, Sampled
from stages.ppo.guards import PPOGuards
from stages.ppo.models import update_mode
from stages.ppo.rollout_engine import RolloutEngine
from stages.ppo.setup import build, head_in_fp32  # noqa: F401  (head_in_fp32: re-exported)
from stages.ppo.update import ActorEMA, PPOUpdate, PTXStream
from stages.stopping import StepBoundaries
from stages.training import Checkpoints, rng_state, save_final_model, seed_everything, set_rng_state, trim_logs_after
from stages.tuning import trainable_summary

#: ``on_step_end(step)``: called after each PPO step (and its checkpoint) on every rank (tests use it to
#: simulate a kill).
StepCallback = Callable[[int], None]

SAMPLES_PER_LOG = 4

logger = logging.getLogger("alignpipe.ppo")


class PPOTrainer:
    """One PPO stage: its models (``models``), data (``data``), run state (``step``, ``episodes``,
    ``kl_ctl``, ``reward_norm``, ``ema``, ``ptx``) and the parts that act on them, each built here with what
    it reads: ``experience`` (steps 1-2), ``updater`` (step 3), ``engine`` (the rollout engine, None with
    ``rollout.backend: hf``). ``train()`` runs the loop; ``save_policy()`` the final save.

    ``base_model``: the base model folder when the policy starts from it (``run`` prepares it with the other
    shared set-up); prepared here when not given."""

    def __init__(self, cfg: RunConfig, run: StageRun, dist: DistInfo, on_step_end: StepCallback | None = None,
                 base_model: str | None = None):
        self.cfg, self.run, self.dist, self.on_step_end = cfg, run, dist, on_step_end
        self.comm = Comm(dist)
        ppo = cfg.ppo
        if ppo.train.num_threads:
            torch.set_num_threads(ppo.train.num_threads)
        if dist.world_size > 1 and not ppo.train.deepspeed:
            raise ValueError(f"PPO on {dist.world_size} processes needs ppo.train.deepspeed "
                             "(e.g. configs/deepspeed/zero2.json); plain multi-process PPO is not supported")
        self.sizes = ppo.sizes(dist.world_size)
        self.total_steps = self.sizes.total_steps
        # new heads (a critic without an RM stage, LoRA) are initialised from the global RNG: same on all ranks
        torch.manual_seed(ppo.train.seed)
        bf16 = use_bf16(ppo.train.precision, dist.device)
        models, self.data = build(cfg, run, dist, self.sizes, bf16, base_model)
        self.models = models
        # the run state, saved in checkpoints
        self.step = self.episodes = 0
        self.kept_step = 0  # the step whose weights the saved policy has (keep_best: the best eval's)
        self.kl_ctl = (AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon) if ppo.adaptive_kl
                       else FixedKLController(ppo.kl_coef))
        self.reward_norm = RunningMoments()
        self.ema = self._actor_ema()
        self.ptx = PTXStream(self.data.ptx_rows, models.tokenizer.pad_token_id, self.sizes, self.comm, dist.device)
        self.engine_logp_warned = False  # rollout.engine_logp_warn: the warning is logged once per run
        # the parts, each given what it reads
        self.engine = None if cfg.rollout.backend == "hf" else RolloutEngine.start(
            cfg, self.comm, models.actor, models.tokenizer, models.zero_stage, run.dir / "rollout_engine")
        self.experience = PPORollout(cfg, models, self.data.prompts, self.comm, self.kl_ctl, self.reward_norm,
                                     self.engine)
        self.updater = PPOUpdate(cfg, models, self.sizes, self.comm, self.ptx, self.ema, run.dir)
        if ppo.keep_best and models.zero_stage == 3:
            raise ValueError("ppo.keep_best is not supported with ZeRO-3 (the best weights are kept from the "
                             "unpartitioned parameters); use ZeRO-2 or drop keep_best")
        self.guards = PPOGuards(ppo, run.checkpoints, dist.is_main, dist.world_size)

    def _actor_ema(self) -> ActorEMA | None:
        if self.cfg.ppo.ema_decay is None:
            return None
        if self.models.zero_stage == 3:
            raise ValueError("ppo.ema_decay is not supported with ZeRO-3 (parameters are partitioned); "
                             "use ZeRO-2 or turn the EMA off")
        return ActorEMA(self.models.actor, self.cfg.ppo.ema_decay)

    # ------------------------------------------------------------------------------- loop
    def train(self) -> dict[str, Any]:
        """The PPO loop, from the start or the newest checkpoint: steps 1-4 of the module docstring until
        ``total_steps``; -> the final metrics (the last step's row, the final eval, run throughput)."""
        resumed = self.maybe_resume()
        if not resumed:
            seed_everything(self.cfg.ppo.train.seed + self.dist.rank)
        first_eval = {} if resumed else self.evaluate()  # {} without eval_data
        if first_eval:
            self.run.log(0, {**first_eval, **self._watch(first_eval)})
        bar = self._progress_bar()
        row: dict[str, float] = {}
        # run-level throughput: steps only (no model loading, evals, checkpoints), this process's steps
        train_seconds = episodes_run = response_tokens = 0.0
        boundaries = StepBoundaries(self.run, self.dist, self.total_steps)  # a stop request: checkpoint, exit
        boundaries.start()
        while self.step < self.total_steps and not self.guards.stopped:
            row, rollout = self._ppo_step()  # steps 1-3 and the KL coefficient
            train_seconds += row.pop("step_seconds")
            episodes_run += self.sizes.global_batch
            response_tokens += row["response_length"] * self.sizes.global_batch  # equal B on every rank
            self._after_step(row, rollout, bar)  # step 4: log, evaluate, checkpoint
            boundaries.after_step(self.step, self.save_checkpoint)
        if bar is not None:
            bar.close()
        final = dict(row)
        last_eval = self.evaluate()
        if last_eval:
            watched = self._watch(last_eval)
            self.run.log(self.step, {**last_eval, **watched})
            final.update(last_eval)
        self.kept_step = self.guards.restore_best(self.models.actor, self.step)  # keep_best: the best eval's
        if first_eval:
            final["eval_score_before"] = first_eval["eval_score"]
        if train_seconds > 0:
            final.update(train_seconds=train_seconds, episodes_per_s_mean=episodes_run / train_seconds,
                         response_tokens_per_s_mean=response_tokens / train_seconds)
        return final

    def _ppo_step(self) -> tuple[dict[str, float], Rollout]:
        """One PPO step: steps 1-3, then the KL coefficient from the step's KL -> (log row, rollout).
        Advances ``step`` and ``episodes``."""
        start, cpu_start = time.perf_counter(), time.process_time()
        timings: dict[str, float] = {}
        kl_coef = self.kl_ctl.value
        # 1. collect a rollout: sample, score the sampled tokens and the responses
        rollout = self.experience.make_rollout(self.step, timings)
        # 2. advantages and returns
        self.experience.add_advantages(rollout)
        rates = self._learning_rates()  # the rates the update begins with (the schedules move on during it)
        # 3. ppo_epochs of minibatch updates
        t_update = time.perf_counter()
        with update_mode(self.models, self.cfg.ppo.train.gradient_checkpointing):
            stats = self.update(rollout)
        if self.engine is not None:
            self.engine.weights_changed()  # synced before the next rollout
        timings["time_update"] = time.perf_counter() - t_update
        row = self._step_row(rollout, {**stats, **timings}, kl_coef)
        # 4. (first part) beta from the step's mean per-sequence KL; the counters
        episodes = self.sizes.global_batch
        if self.cfg.ppo.adaptive_kl:
            self.kl_ctl.update(row["kl"], episodes)
        self.step += 1
        if self.models.unfreezer is not None:
            self.models.unfreezer.step(self.step)
        self.episodes += episodes
        row.update(episodes=self.episodes, **rates)
        row["step_seconds"] = time.perf_counter() - start
        row["episodes_per_s"] = episodes / max(row["step_seconds"], 1e-9)
        row["time_cpu"] = time.process_time() - cpu_start  # this process's CPU seconds (all threads)
        self._check_engine_logp(row)
        return row, rollout

    def update(self, rollout: Rollout) -> dict[str, float]:
        """Step 3 on this step's rollout (``PPOUpdate.update``) -> its statistics."""
        return self.updater.update(rollout, self.step, self.kl_ctl.value)

    def make_rollout(self, step: int, timings: dict[str, float]) -> Rollout:
        """Steps 1-2 for step ``step``, as the loop runs them: the rollout with its advantages."""
        rollout = self.experience.make_rollout(step, timings)
        self.experience.add_advantages(rollout)
        return rollout

    def evaluate(self) -> dict[str, float]:
        """The eval row on ``ppo.eval_data`` ({} without it)."""
        return self.experience.evaluate(self.data.eval_prompts)

    def _after_step(self, row: dict[str, float], rollout: Rollout, bar: Any) -> None:
        """Step 4: log the row and samples, evaluate, checkpoint, call ``on_step_end``."""
        ppo = self.cfg.ppo
        self.run.log(self.step, row)
        if self.step % ppo.log_samples_every == 0 or self.step == 1:
            self._log_samples(rollout)
        self.guards.after_step(self.step, row)
        if (ppo.eval_every and self.step % ppo.eval_every == 0 and self.step < self.total_steps
                and not self.guards.stopped):
            evals = self.evaluate()
            self.run.log(self.step, {**evals, **self._watch(evals)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{row['score']:.3f}", **({"kl": f"{row['kl']:.3f}"} if "kl" in row else {}))
        if self.step % ppo.train.save_steps == 0 and self.step < self.total_steps:
            self.save_checkpoint()
        if self.on_step_end is not None:
            self.on_step_end(self.step)

    def _watch(self, evals: dict[str, float]) -> dict[str, float]:
        """The guards' update after an eval (``stages.ppo.guards``) -> the fields logged with it."""
        return self.guards.after_eval(self.step, evals, self.models.actor,
                                      everything=self.models.unfreezer is not None)

    def _progress_bar(self) -> Any:
        if not (self.dist.is_main and self.cfg.logging.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="ppo", dynamic_ncols=True)

    def _learning_rates(self) -> dict[str, float]:
        """The learning rates of the next optimizer steps (the log row's ``lr`` and ``critic_lr``)."""
        rates = {"lr": self.models.actor_optim.scheduler.get_last_lr()[0]}
        if self.models.critic_optim is not None:
            rates["critic_lr"] = self.models.critic_optim.scheduler.get_last_lr()[0]
        return rates

    # ------------------------------------------------------------------------------- logs
    def _step_row(self, rollout: Rollout, stats: dict[str, float], kl_coef: float) -> dict[str, float]:
        """The step's log row: rollout and update statistics, means over all ranks."""
        mask = rollout.response_mask
        local = {
            "score": float(rollout.score.mean()), "reward": float(rollout.reward.mean()),
            "response_length": float(mask.sum(1).float().mean()),
            "eos_rate": float(rollout.has_eos.float().mean()),
            "truncated_prompts": float(rollout.truncated_prompts),
            **{f"score/{k}": float(v.mean()) for k, v in rollout.reward_parts.items()},
            **rollout.reward_stats,
            **{k: v for k, v in stats.items() if k not in ("ratio_max", "skipped_minibatches")},
        }
        if rollout.kl is not None:  # no reference (ppo.uses_reference): no KL measured, none logged
            seq_kl = rollout.kl.sum(1)
            local["kl"] = float(seq_kl.mean())
            local["non_score_reward"] = 0.0 if self.cfg.ppo.kl_in_loss else float((-kl_coef * seq_kl).mean())
        if self.models.critic is not None:
            local["explained_variance"] = float(explained_variance(rollout.old_values, rollout.returns, mask))
        row = self.comm.mean_dict(local)
        row["ratio_max"] = stats["ratio_max"]  # already a max over ranks
        row["skipped_minibatches"] = stats["skipped_minibatches"]  # identical on every rank
        if not math.isfinite(row.get("explained_variance", 0.0)):
            row["explained_variance"] = 0.0
        row["kl_coef"] = kl_coef
        return row

    def _log_samples(self, rollout: Rollout) -> None:
        if not self.dist.is_main:
            return
        with open(self.run.dir / "samples.jsonl", "a") as fh:
            for i in range(min(SAMPLES_PER_LOG, len(rollout.response_texts))):
                prompt = next((m["content"] for m in reversed(rollout.prompt_messages[i]) if m["role"] == "user"), "")
                row = {"step": self.step, "prompt": prompt, "response": rollout.response_texts[i],
                       "score": float(rollout.score[i]), "reward": float(rollout.reward[i]),
                       "eos": bool(rollout.has_eos[i]),
                       **{f"score/{k}": float(v[i]) for k, v in rollout.reward_parts.items()}}
                fh.write(json.dumps(row) + "\n")

    def _check_engine_logp(self, row: dict[str, float]) -> None:
        """Warn (once, rank 0) when the engine's log-probs are further from the trainer's than
        ``rollout.engine_logp_warn``: the engine then samples from a noticeably different policy."""
        limit, diff = self.cfg.rollout.engine_logp_warn, row.get("rollout_engine_logp_diff")
        if limit is None or diff is None or diff <= limit or self.engine_logp_warned or not self.dist.is_main:
            return
        self.engine_logp_warned = True
        correction = (f"each token's policy loss is reweighted by min(exp(old_logp - engine_logp), "
                      f"{self.cfg.rollout.importance_sampling_cap}); see rollout_is_capped_frac"
                      if self.cfg.rollout.uses_importance_sampling else
                      "rollout.importance_sampling is off, so nothing corrects for it")
        logger.warning(
            "[alignpipe] ppo: warning: step %d: rollout_engine_logp_diff=%.4g is above rollout.engine_logp_warn=%g: "
            "the rollout engine's log-probs differ from the trainer's by that much per token on average (engine "
            "dtype, rollout.vllm.dtype, vs ppo.train.precision; or a weight sync that did not apply); %s. "
            "Not repeated this run.", self.step, diff, limit, correction)

    # ------------------------------------------------------------------------ checkpoints
    @property
    def checkpoints(self) -> Checkpoints:
        return Checkpoints(self.run.checkpoints, self.dist.is_main, self.dist.world_size)

    def _client_state(self) -> dict[str, Any]:
        """The run state a checkpoint keeps besides the models and optimisers (``stages.ppo.checkpoint``)."""
        unfreezer = self.models.unfreezer
        return {"step": self.step, "episodes": self.episodes, "ptx_pos": self.ptx.position,
                "kl_ctl": self.kl_ctl.state_dict(), "reward_norm": self.reward_norm.state_dict(),
                "ema": self.ema.weights if self.ema is not None else None, "rng": rng_state(),
                "unfreezer": unfreezer.state_dict() if unfreezer is not None else None,
                "guards": self.guards.state_dict()}

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-N`` (``stages.ppo.checkpoint.save_checkpoint``)."""
        return save_checkpoint(self.checkpoints, self.step, self.models, self.dist, self._client_state)

    def maybe_resume(self) -> bool:
        """Resume from the newest checkpoint when the stage run is a resume; -> whether it did."""
        folder = self.checkpoints.latest() if self.run.resuming else None
        if folder is None:
            return False
        client = load_checkpoint(folder, self.models, self.dist)
        self.step, self.episodes, self.ptx.position = client["step"], client["episodes"], client["ptx_pos"]
        self.kl_ctl.load_state_dict(client["kl_ctl"])
        self.reward_norm.load_state_dict(client["reward_norm"])
        if self.ema is not None and client.get("ema") is not None:
            self.ema.weights = {k: v.to(self.dist.device) for k, v in client["ema"].items()}
        if self.models.unfreezer is not None and client.get("unfreezer"):
            self.models.unfreezer.load_state_dict(client["unfreezer"])
        self.guards.load_state_dict(client.get("guards"))
        set_rng_state(client["rng"])
        if self.engine is not None:
            self.engine.weights_changed()  # the engine still holds the starting weights
        if self.dist.is_main:
            trim_logs_after(self.run.dir, self.step, ("metrics.jsonl", "samples.jsonl"))
            print(f"[alignpipe] ppo: resumed from {folder} (step {self.step})", flush=True)
        return True

    # ------------------------------------------------------------------------------- save
    def save_policy(self) -> None:
        """model/ (merged for LoRA; EMA weights when on) + adapter/ + tokenizer, on rank 0."""
        models = self.models
        if self.ema is not None:
            self.ema.copy_into(models.actor)
        save_final_model(models.actor, models.tokenizer, self.run, self.cfg.ppo.tuning, models.sources.base_path,
                         self.cfg.model, "causal_lm", models.zero_stage, self.dist.world_size)

    def close_rollout_engine(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # ----------------------------------------------- read-only views of the parts (tests, bench/)
    actor = property(lambda self: self.models.actor)
    bf16 = property(lambda self: self.models.bf16)
    ref = property(lambda self: self.models.reference)
    lora = property(lambda self: self.models.adapter_reference)
    critic = property(lambda self: self.models.critic)
    rm = property(lambda self: self.models.reward_model)
    rewards = property(lambda self: self.models.rewards)
    tokenizer = property(lambda self: self.models.tokenizer)
    base_path = property(lambda self: self.models.sources.base_path)
    zero_stage = property(lambda self: self.models.zero_stage)
    actor_params = property(lambda self: self.models.actor_optim.params)
    actor_opt = property(lambda self: self.models.actor_optim.optimizer)
    actor_sched = property(lambda self: self.models.actor_optim.scheduler)
    actor_engine = property(lambda self: self.models.actor_optim.engine)
    critic_opt = property(lambda self: None if self.models.critic_optim is None else self.models.critic_optim.optimizer)
    critic_engine = property(lambda self: None if self.models.critic_optim is None else self.models.critic_optim.engine)
    prompts = property(lambda self: self.data.prompts)
    ptx_rows = property(lambda self: self.data.ptx_rows)
    ptx_pos = property(lambda self: self.ptx.position)
    rollout_engine = property(lambda self: self.engine.worker if self.engine is not None else None)
    engine_stale = property(lambda self: self.engine is not None and self.engine.stale)

    def step_prompts(self, step: int) -> tuple[list[int], list[int]]:
        return self.experience.step_prompts(step)

    def generate(self, prompt_ids: list[list[int]], positions: list[int], stream: int) -> Sampled:
        return self.experience.generate(prompt_ids, positions, stream)

    def _autocast(self) -> Any:
        return self.models.autocast()

    def policy_logits(self, model: Any, ids: torch.Tensor, att: torch.Tensor, T: int) -> torch.Tensor:
        return self.models.policy_logits(model, ids, att, T)

    def reference_logits(self, ids: torch.Tensor, att: torch.Tensor, T: int) -> torch.Tensor:
        return self.models.reference_logits(ids, att, T)

    def critic_values(self, model: Any, ids: torch.Tensor, att: torch.Tensor, T: int) -> torch.Tensor:
        return self.models.critic_values(model, ids, att, T)

    def _ptx_minibatch(self) -> Any:
        return self.ptx.minibatch()


def run(cfg: RunConfig, on_step_end: StepCallback | None = None) -> dict[str, Any]:
    """The ``ppo`` stage: train, save the policy, write the manifest; returns the final metrics.
    ``on_step_end(step)`` is called after every step (and its checkpoint), on every rank."""
    with StageContext(cfg, "ppo") as ctx:  # processes, the stage run (manifest, logs), the base model
        t_load = time.perf_counter()
        base_model = ctx.base_model() if cfg.ppo.policy_from == "base" else None
        trainer = PPOTrainer(cfg, ctx.run, ctx.dist, on_step_end=on_step_end, base_model=base_model)
        load_seconds = time.perf_counter() - t_load
        models = trainer.models
        ctx.say(f"{len(trainer.data.prompts)} prompts, {trainer.total_steps} steps x {trainer.sizes.global_batch} "
                f"episodes, actor {cfg.ppo.tuning.method} ({trainable_summary(models.actor)['params_trainable']:,} "
                f"trainable), critic from {models.sources.critic_source}, rewards {', '.join(models.rewards.names)}, "
                f"rollouts by {cfg.rollout.backend}")
        try:
            final = trainer.train()
        finally:  # the vllm worker stops with the stage, also on errors and interrupts
            trainer.close_rollout_engine()
        if trainer.engine is not None:
            final["rollout_engine_sync_seconds"] = trainer.engine.sync_seconds
        trainer.save_policy()
        metrics = {**numeric(final), "steps": trainer.step, "episodes": trainer.episodes,
                   "world_size": ctx.dist.world_size, "load_seconds": load_seconds}
        return ctx.finish(metrics, data=trainer.data.report.as_dict(), params=trainable_summary(models.actor),
                          critic_source=models.sources.critic_source, reward_sources=models.rewards.names,
                          guards=trainer.guards.summary(trainer.kept_step))
