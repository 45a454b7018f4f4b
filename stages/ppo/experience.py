"""PPO experience (``PPORollout``, a part of ``PPOTrainer``): the step's prompts, generation, the
forward passes that score the sampled tokens, the reward, and the ``Rollout`` record the update reads.

Shapes: B episodes on this rank, P padded prompt length, T padded response length (the same on every
rank: prompts and responses are padded to the longest anywhere), V vocabulary.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from stages.batching import left_pad, right_pad
from stages.chat import position_ids_from_mask
from stages.engine import epoch_order
from stages.generation import neutral_generate, neutral_generation_config
from stages.ppo.core import (
    compute_gae,
    discounted_returns,
    grpo_advantages,
    kl_penalty,
    kl_return,
    logprobs_from_logits,
    per_token_rewards,
    rloo_advantages,
    truncated_importance_weights,
)
from stages.ppo.distributed import global_whiten
from stages.ppo.rewards import Responses, Scores
from stages.ppo.rollout import (
    EpisodeSampler,
    engine_logp_diff,
    engine_logp_tensor,
    episode_seed,
    episode_uniforms,
    response_mask,
    response_rows,
)


@dataclass
class Rollout:
    """One PPO step's experience on this rank (all tensors on the CPU).

    Trajectory: ``prompt_ids`` / ``prompt_mask`` (B, P) left-padded; ``response_ids`` (B, T) pad after eos;
    ``response_mask`` (B, T) 1 on real response tokens (eos included); ``has_eos`` (B,) bool.
    Policy at sampling time: ``old_logp`` (B, T) fp32 log-probs of the sampled tokens; ``ref_logp`` (B, T)
    fp32 under the frozen reference; ``kl`` (B, T) per-token KL estimate to the reference (0 after the end).
    Critic at sampling time: ``old_values`` (B, T) fp32 (zeros with a critic-free estimator).
    With ``num_samples_per_prompt`` K > 1 the rows come in groups: rows ``g*K .. g*K + K - 1`` are the K
    samples of one prompt (each with its own sampling stream).
    Outcome: ``score`` (B,) weighted sum of the reward sources; ``reward_parts`` each source's (B,) score;
    ``reward`` (B,) the sequence reward used for RL (normalised, clipped, minus the missing-eos penalty);
    ``advantages`` (B, T) fp32 (whitened when configured); ``returns`` (B, T) fp32.
    For logs: ``response_texts``, ``prompt_messages``, ``truncated_prompts`` (prompts cut to
    ``max_prompt_length`` in this batch), ``reward_stats`` (eos penalty, ``rm_truncated``, ``reward_metric/*``;
    with a rollout engine also ``rollout_engine_logp_diff``: mean |engine log-prob - old_logp| per token, and
    with importance sampling ``rollout_is_weight_mean`` / ``rollout_is_capped_frac``).
    Engine correction: ``is_weights`` (B, T) fp32 truncated importance weights ``min(exp(old_logp -
    engine_logp), rollout.importance_sampling_cap)`` that multiply each token's policy loss; None when the
    trainer sampled itself (``rollout.backend: hf``) or ``rollout.importance_sampling: false``.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    score: torch.Tensor
    reward: torch.Tensor
    kl: torch.Tensor
    response_texts: list[str]
    prompt_messages: list[list[dict[str, str]]]
    reward_parts: dict[str, torch.Tensor]
    truncated_prompts: int
    reward_stats: dict[str, float] = field(default_factory=dict)
    is_weights: torch.Tensor | None = None

    def sequences(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """[prompt | response] ids and attention mask for rows ``idx``: (b, P + T) each."""
        ids = torch.cat([self.prompt_ids[idx], self.response_ids[idx]], dim=1)
        att = torch.cat([self.prompt_mask[idx], self.response_mask[idx]], dim=1)
        return ids, att


class PPORollout:
    """Forward passes, generation, rollouts and evaluation; mixed into ``PPOTrainer``."""

    # ----------------------------------------------------------------------------- forwards
    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def policy_logits(self, model: Any, ids: torch.Tensor, att: torch.Tensor, T: int) -> torch.Tensor:
        """(B, T, V) logits predicting the T response tokens (scaled by 1/temperature)."""
        with self._autocast():
            out = model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att), use_cache=False,
                        logits_to_keep=T + 1)
        logits = out.logits[:, :T].float()
        temperature = self.cfg.ppo.temperature
        return logits if temperature == 1.0 else logits / temperature

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

    # ----------------------------------------------------------------------- rollout engine
    def start_rollout_engine(self) -> None:
        """``rollout.backend: vllm``: rank 0 starts a vLLM worker on the actor's weights as they are in memory
        (written to ``rollout_engine/start`` in the stage folder: the base weights, for a LoRA actor the
        engine gets the adapter at each sync). Every rank learns whether it started (no rank waits forever).
        ZeRO-3 partitions the actor's parameters over ranks, so rank 0 has no full copy to send: refused."""
        self.rollout_engine, self.engine_stale, self.engine_sync_seconds = None, False, 0.0
        if self.cfg.rollout.backend == "hf":
            return
        if self.zero_stage == 3:
            raise ValueError("rollout.backend 'vllm' with ZeRO-3 (ppo.train.deepspeed) is not supported: the engine "
                             "needs the full actor weights on rank 0 after each update; use ZeRO-1/2 or "
                             "rollout.backend: hf")
        failure: Exception | None = None
        if self.dist.is_main:
            from stages.rollout_backend.vllm_client import VLLMBackend, peft_lora_rank, write_policy_folder

            ppo, work = self.cfg.ppo, self.run.dir / "rollout_engine"
            try:
                # a worker already running (base_url) loaded its model itself
                folder = work / "start" if self.cfg.rollout.vllm.base_url else write_policy_folder(self.actor,
                                                                                                 work / "start")
                self.rollout_engine = VLLMBackend(
                    self.cfg.rollout.vllm, str(folder), self.tokenizer, work,
                    max_model_len=ppo.max_prompt_length + ppo.max_new_tokens, model_dtype=self.cfg.model.dtype,
                    lora_rank=peft_lora_rank(self.actor))
            except Exception as exc:  # noqa: BLE001  (sent to every rank, then raised)
                failure = exc
        # a worker already running (rollout.vllm.base_url) holds whatever it was started on: send the actor's
        # weights before the first rollout (a LoRA actor's base must be the one the worker was started on)
        self.engine_stale = self.cfg.rollout.vllm.base_url is not None
        error = self.comm.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if error is not None:
            from stages.rollout_backend import RolloutEngineError

            raise RolloutEngineError(f"rank 0 could not start the rollout engine: {error}")

    def close_rollout_engine(self) -> None:
        """Stop the worker (rank 0) and remove the weights written for it (its log stays)."""
        engine, self.rollout_engine = getattr(self, "rollout_engine", None), None
        if engine is not None:
            engine.close()
            shutil.rmtree(self.run.dir / "rollout_engine" / "start", ignore_errors=True)

    # ------------------------------------------------------------------------------ rollout
    def step_prompts(self, step: int) -> tuple[list[int], list[int]]:
        """(dataset indices, global episode positions) of this rank's episodes for PPO step ``step``:
        ``episodes_per_rollout / K`` prompts, each repeated K = ``num_samples_per_prompt`` times in a row (a
        group stays on one rank); the prompt at global position p gives episodes p*K .. p*K + K - 1."""
        ppo, d = self.cfg.ppo, self.dist
        seed, k = ppo.train.seed, ppo.num_samples_per_prompt
        batch = ppo.episodes_per_rollout // k
        per_epoch = len(epoch_order(len(self.prompts), 0, seed, d.rank, d.world_size, batch))
        epoch, index = divmod(step, per_epoch)
        prompt_indices = epoch_order(len(self.prompts), epoch, seed, d.rank, d.world_size, batch)[index]
        indices = [i for i in prompt_indices for _ in range(k)]
        positions = [(d.rank + d.world_size * j) * k + s for j in range(len(prompt_indices)) for s in range(k)]
        return indices, positions

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], positions: list[int], stream: int) -> tuple[torch.Tensor, ...]:
        """-> (prompt ids (B, P), prompt mask (B, P), response ids (B, T) pad after eos, response mask (B, T),
        has_eos (B,)), on the device; P and T are the longest prompt / real response on any rank."""
        tok = self.tokenizer
        longest = int(self.comm.max(torch.tensor([max(len(x) for x in prompt_ids)]))[0])
        query, query_mask = left_pad(prompt_ids, tok.pad_token_id, longest)
        query, query_mask = query.to(self.device), query_mask.to(self.device)
        if self.cfg.rollout.backend != "hf":
            response = right_pad(self.engine_responses(prompt_ids, positions, stream), tok.pad_token_id)[0]
            response = response.to(self.device)
        else:
            response = self._hf_responses(query, query_mask, positions, stream)
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

    def _hf_responses(self, query: torch.Tensor, query_mask: torch.Tensor, positions: list[int],
                      stream: int) -> torch.Tensor:
        """HF ``generate`` with the per-episode sampler -> (B, T') generated ids (pad after eos)."""
        ppo, tok = self.cfg.ppo, self.tokenizer
        sampler = EpisodeSampler(episode_uniforms(ppo.train.seed, stream, positions, ppo.max_new_tokens),
                                 query.size(1), ppo.temperature, ppo.top_k, ppo.top_p)
        from transformers import LogitsProcessorList

        # greedy over the sampler's one-hot logits, and nothing else: the checkpoint's generation_config
        # (repetition penalty, top-k/p, temperature, min length) must not reshape them (DESIGN §4)
        gen_cfg = neutral_generation_config(tok, ppo.max_new_tokens)
        kwargs = dict(input_ids=query, attention_mask=query_mask, logits_processor=LogitsProcessorList([sampler]))
        if self.zero_stage == 3:
            # ZeRO-3: the engine's hooks gather each layer's shards for every decoding forward; all ranks
            # keep stepping until every rank is done (synced_gpus), so the collectives stay matched
            kwargs["synced_gpus"] = self.comm.on
        with self._autocast():
            out = neutral_generate(self.actor, gen_cfg, **kwargs)
        return out[:, query.size(1):]

    def engine_responses(self, prompt_ids: list[list[int]], positions: list[int], stream: int) -> list[list[int]]:
        """The rollout engine's responses (ids up to and including eos) to this rank's prompts.

        Only rank 0 talks to the engine: it gathers every rank's prompts and episode seeds, first syncs the
        engine with the actor's weights if an update happened since the last sync, asks for all episodes in
        one request and hands each rank its rows. Episode ``p`` of step ``stream`` samples under
        ``episode_seed(seed, stream, p)``, so a rollout does not depend on the number of ranks. An engine
        failure is broadcast too, so every rank raises instead of waiting for rows that never come."""
        from stages.rollout_backend import RolloutEngineError, Sampling

        ppo = self.cfg.ppo
        seeds = [episode_seed(ppo.train.seed, stream, p) for p in positions]
        everyone = self.comm.all_gather_objects((prompt_ids, seeds))
        answer: dict[str, Any] = {}
        failure: Exception | None = None
        if self.dist.is_main:
            try:
                if self.engine_stale:
                    started = time.perf_counter()
                    self.rollout_engine.sync_weights(self.actor)
                    self.engine_sync_seconds += time.perf_counter() - started
                    self.engine_stale = False
                sampling = Sampling(ppo.max_new_tokens, ppo.temperature, logprobs=True,
                                    prompt_seeds=[s for _, rank_seeds in everyone for s in rank_seeds])
                out = [g[0] for g in
                       self.rollout_engine.generate([p for rank_ids, _ in everyone for p in rank_ids], sampling)]
                sizes = [len(rank_ids) for rank_ids, _ in everyone]
                starts = [sum(sizes[:r]) for r in range(len(sizes))]
                answer = {"rows": [[g.token_ids for g in out[a:a + n]] for a, n in zip(starts, sizes)],
                          "logprobs": [[g.logprobs for g in out[a:a + n]] for a, n in zip(starts, sizes)]}
            except Exception as exc:  # noqa: BLE001  (sent to every rank, then raised)
                failure, answer = exc, {"error": f"{type(exc).__name__}: {exc}"}
        answer = self.comm.broadcast_object(answer)
        if "error" in answer:
            if failure is not None:
                raise failure
            raise RolloutEngineError(f"rank 0's rollout engine failed: {answer['error']}")
        # the engine's log-probs of these rows (make_rollout logs their distance to old_logp and, with
        # rollout.importance_sampling, turns them into per-token loss weights)
        self.engine_logprobs = answer["logprobs"][self.dist.rank]
        return answer["rows"][self.dist.rank]

    @torch.no_grad()
    def _score_sampled_tokens(self, ids: torch.Tensor, att: torch.Tensor,
                              response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (old_logp, ref_logp, old_values), each (B, T) fp32 on the CPU. No graph: chunked by a logits
        budget (~512 MB of fp32), not by micro-batch."""
        B, T = response.shape
        vocab = int(self.actor.config.vocab_size)
        chunk = max(1, min(B, (1 << 27) // max(1, (T + 1) * vocab)))
        logp, ref_logp, values = [], [], []
        for s in range(0, B, chunk):
            c_ids, c_att, c_resp = ids[s:s + chunk], att[s:s + chunk], response[s:s + chunk]
            logp.append(logprobs_from_logits(self.policy_logits(self.actor, c_ids, c_att, T), c_resp))
            ref_logp.append(logprobs_from_logits(self.reference_logits(c_ids, c_att, T), c_resp))
            if self.critic is not None:
                values.append(self.critic_values(self.critic, c_ids, c_att, T))
        old_values = torch.cat(values).cpu() if values else torch.zeros(B, T)
        return torch.cat(logp).cpu(), torch.cat(ref_logp).cpu(), old_values

    def _sequence_reward(self, scores: Scores, has_eos: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) reward used for RL: the score normalised (running moments over all ranks) and/or clipped,
        minus ``|missing_eos_penalty|`` where there is no eos; and the per-step reward statistics."""
        ppo = self.cfg.ppo
        reward = scores.total.clone()
        if ppo.normalize_reward:
            self.reward_norm.update(self.comm.gather(scores.total))
            reward = self.reward_norm.normalize(reward, clip=ppo.reward_clip)
        elif ppo.reward_clip is not None:
            reward = reward.clamp(-ppo.reward_clip, ppo.reward_clip)
        # a response that did not end with eos is never rewarded as finished (DESIGN §3)
        eos_penalty = torch.where(has_eos, torch.zeros(()), torch.tensor(abs(ppo.missing_eos_penalty or 0.0)))
        stats = {"missing_eos_penalty": float(eos_penalty.mean()),
                 **{f"reward_metric/{k}": float(torch.nanmean(v)) for k, v in scores.metrics.items()}}
        if self.rm is not None:
            stats["rm_truncated"] = float(scores.rm_truncated)
        return reward - eos_penalty, stats

    @torch.no_grad()
    def make_rollout(self, step: int, timings: dict[str, float]) -> Rollout:
        """One step's experience on this rank.

        1. Take this rank's prompts of step ``step`` and sample responses (per-episode random streams).
        2. Score the sampled tokens: policy and reference log-probs, critic values.
        3. Score the responses with the reward sources; sequence reward (normalise, clip, eos penalty).
        4. Advantages (``advantages``): GAE on per-token rewards, or a critic-free estimator.
        """
        ppo = self.cfg.ppo
        # 1. prompts and sampling
        indices, positions = self.step_prompts(step)
        prompts = [self.prompts[i] for i in indices]
        t0 = time.perf_counter()
        query, query_mask, response, mask, has_eos = self.generate([x.ids for x in prompts], positions, step)
        t1 = time.perf_counter()
        # 2. log-probs and values of the sampled tokens
        ids, att = torch.cat([query, response], dim=1), torch.cat([query_mask, mask], dim=1)
        old_logp, ref_logp, old_values = self._score_sampled_tokens(ids, att, response)
        query, query_mask, response, mask, has_eos = (x.cpu() for x in (query, query_mask, response, mask, has_eos))
        t2 = time.perf_counter()
        # 3. reward
        scores, texts = self.score_responses(prompts, response, mask, has_eos)
        t3 = time.perf_counter()
        reward, reward_stats = self._sequence_reward(scores, has_eos)
        is_weights = self._engine_correction(old_logp, mask, reward_stats)
        # 4. advantages, returns
        kl = kl_penalty(old_logp, ref_logp, ppo.kl_estimator)
        advantages, returns = self.advantages(reward, kl, old_values, mask)
        timings.update(time_generate=t1 - t0, time_forward=t2 - t1, time_score=t3 - t2)
        return Rollout(query, query_mask, response, mask, has_eos, old_logp, ref_logp, old_values, advantages,
                       returns, scores.total, reward, kl * mask, texts, [x.messages for x in prompts], scores.parts,
                       sum(x.truncated for x in prompts), reward_stats=reward_stats, is_weights=is_weights)

    def _engine_correction(self, old_logp: torch.Tensor, mask: torch.Tensor,
                           stats: dict[str, float]) -> torch.Tensor | None:
        """With a rollout engine: log how far its log-probs are from ``old_logp`` (B, T), and return the
        truncated importance weights (B, T) that move each token's policy loss from the engine's sampling
        distribution to the trainer's (``rollout.importance_sampling``), else None. Adds the statistics to
        ``stats``."""
        rollout = self.cfg.rollout
        if rollout.backend == "hf":
            return None
        if any(x is None for x in self.engine_logprobs):
            if rollout.uses_importance_sampling:
                raise ValueError("the rollout engine returned no log-probs for some responses; "
                                 "rollout.importance_sampling needs them (set it to false to train without)")
            return None
        stats["rollout_engine_logp_diff"] = engine_logp_diff(self.engine_logprobs, old_logp, mask)
        if not rollout.uses_importance_sampling:
            return None
        engine_logp = engine_logp_tensor(self.engine_logprobs, old_logp)
        weights, is_stats = truncated_importance_weights(old_logp, engine_logp, mask, rollout.importance_sampling_cap)
        stats.update({f"rollout_{key}": float(value) for key, value in is_stats.items()})
        return weights

    def advantages(self, reward: torch.Tensor, kl: torch.Tensor, old_values: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (advantages, returns), (B, T) fp32, by ``ppo.advantage_estimator``; ``reward`` (B,) sequence
        rewards, ``kl`` (B, T) per-token KL estimates, ``old_values`` (B, T), ``mask`` (B, T).

        The KL term is in the reward unless ``kl_in_loss``: per token (``-beta * KL_t``, the score at the
        last token) for gae and reinforce_pp; for grpo and rloo the group estimator normalises the task
        score alone and the KL's reward-to-go ``-beta * sum_{s >= t} KL_s`` is added to it at its own scale
        (:func:`kl_return`), so a group whose scores tie has zero task advantage whatever its KL.
        ``returns`` are the critic's targets (gae) or the reward-to-go (the others; for logs only)."""
        ppo = self.cfg.ppo
        beta = 0.0 if ppo.kl_in_loss else self.kl_ctl.value
        rewards = per_token_rewards(reward, kl, mask, beta)
        if ppo.advantage_estimator == "gae":
            advantages, returns = compute_gae(rewards, old_values, mask, ppo.gamma, ppo.lam)
            if ppo.whiten_advantages:
                advantages = global_whiten(advantages, mask, self.comm)
            return advantages, returns
        returns = discounted_returns(rewards, mask, ppo.gamma)
        if ppo.advantage_estimator == "reinforce_pp":  # global baseline: whitened over all ranks' episodes
            return global_whiten(returns, mask, self.comm), returns
        # the group baseline sees the task score only; the KL joins after it at its own scale (kl_return)
        k = ppo.num_samples_per_prompt
        if ppo.advantage_estimator == "grpo":
            task_advantages = grpo_advantages(reward, mask, k, ppo.group_std_eps)
        else:
            task_advantages = rloo_advantages(reward, mask, k)
        return task_advantages + kl_return(kl, mask, beta, ppo.gamma), returns

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

    # ------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward-source score on the held-out prompts (fixed sampling streams: comparable over time)."""
        if not self.eval_prompts:
            return {}
        d, batch = self.dist, self.cfg.ppo.episodes_per_rollout
        n = len(self.eval_prompts)
        mine = list(range(d.rank, n, d.world_size))
        per_rank = math.ceil(n / d.world_size)
        mine += [-1] * (per_rank - len(mine))  # equal work on every rank; -1 rows are not counted
        totals = torch.zeros(4, dtype=torch.float64)
        for s in range(0, per_rank, batch):
            chunk = mine[s:s + batch]
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
