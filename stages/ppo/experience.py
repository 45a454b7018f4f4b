"""PPO experience: steps 1 and 2 of the trainer's loop (``stages.ppo.trainer``), and the ``Rollout``
record the update reads.

``PPORollout`` is built once per run from what it reads (config, models, prompts, the process group, the
KL controller, the reward normaliser, the rollout engine or None) and then, each step:

1. ``make_rollout(step)``: this rank's prompts of the step, sampled responses, the forward passes that
   score the sampled tokens (policy and reference log-probs, critic values), the reward sources' scores
   and the sequence reward -> a ``Rollout`` without advantages;
2. ``add_advantages(rollout)``: per-token rewards, then GAE or a critic-free estimator (the math is
   ``stages.ppo.core``) -> ``rollout.advantages`` / ``rollout.returns``.

``evaluate(prompts)`` samples and scores held-out prompts with fixed streams.

Shapes: B episodes on this rank, P padded prompt length, T padded response length (the same on every
rank: prompts and responses are padded to the longest anywhere), V vocabulary.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from data.formats import last_user
from pipeline.config import RunConfig
from stages.batching import left_pad, right_pad
from stages.chat import position_ids_from_mask
from stages.engine import epoch_order
from stages.generation import neutral_generate, neutral_generation_config
from stages.ppo.core import (
    RunningMoments,
    compute_gae,
    discounted_returns,
    group_rows,
    grpo_advantages,
    kl_penalty,
    kl_return,
    logprobs_from_logits,
    overlong_penalty,
    per_token_rewards,
    rloo_advantages,
    select_groups,
    tied_groups,
    truncated_importance_weights,
)
from stages.ppo.distributed import Comm, global_whiten
from stages.ppo.guards import verifier_means, verifier_sums
from stages.ppo.models import PPOModels
from stages.ppo.rewards import Responses, Scores, import_function
from stages.ppo.rollout import (
    EncodedPrompt,
    EpisodeSampler,
    engine_logp_diff,
    engine_logp_tensor,
    episode_uniforms,
    refill_order,
    response_mask,
    response_rows,
)
from stages.ppo.rollout_engine import RolloutEngine

logger = logging.getLogger("alignpipe.ppo")


@dataclass
class Rollout:
    """One PPO step's experience on this rank (all tensors on the CPU).

    Trajectory: ``prompt_ids`` / ``prompt_mask`` (B, P) left-padded; ``response_ids`` (B, T) pad after eos;
    ``response_mask`` (B, T) 1 on real response tokens (eos included); ``has_eos`` (B,) bool.
    Policy at sampling time: ``old_logp`` (B, T) fp32 log-probs of the sampled tokens; ``ref_logp`` (B, T)
    fp32 under the frozen reference; ``kl`` (B, T) per-token KL estimate to the reference (0 after the end);
    both None when the run has no reference (``ppo.uses_reference``: nothing reads the KL).
    Critic at sampling time: ``old_values`` (B, T) fp32 (zeros with a critic-free estimator).
    With ``num_samples_per_prompt`` K > 1 the rows come in groups: rows ``g*K .. g*K + K - 1`` are the K
    samples of one prompt (each with its own sampling stream).
    Outcome: ``score`` (B,) weighted sum of the reward sources; ``reward_parts`` each source's (B,) score;
    ``reward`` (B,) the sequence reward used for RL (normalised, clipped, minus the missing-eos penalty).
    For logs: ``response_texts``, ``prompt_messages``, ``truncated_prompts`` (prompts cut to
    ``max_prompt_length`` in this batch), ``reward_stats`` (eos penalty, ``rm_truncated``, ``reward_metric/*``;
    with a rollout engine also ``rollout_engine_logp_diff``: mean |engine log-prob - old_logp| per token, and
    with importance sampling ``rollout_is_weight_mean`` / ``rollout_is_capped_frac``).
    Engine correction: ``is_weights`` (B, T) fp32 truncated importance weights ``min(exp(old_logp -
    engine_logp), rollout.importance_sampling_cap)`` that multiply each token's policy loss; None when the
    trainer sampled itself (``rollout.backend: hf``) or ``rollout.importance_sampling: false``.
    Step 2 (``PPORollout.add_advantages``) fills ``advantages`` (B, T) fp32 (whitened when configured) and
    ``returns`` (B, T) fp32; they are None before.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    old_values: torch.Tensor
    score: torch.Tensor
    reward: torch.Tensor
    kl: torch.Tensor | None
    response_texts: list[str]
    prompt_messages: list[list[dict[str, str]]]
    reward_parts: dict[str, torch.Tensor]
    truncated_prompts: int
    reward_stats: dict[str, float] = field(default_factory=dict)
    is_weights: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def policy_mask(self, idx: torch.Tensor | slice, drop_truncated: bool) -> torch.Tensor:
        """(b, T) the tokens of rows ``idx`` the policy loss is over: ``response_mask``, less the responses that
        reached max_new_tokens without eos when ``drop_truncated`` (``ppo.mask_truncated``, DAPO's overlong
        filtering)."""
        mask = self.response_mask[idx]
        if not drop_truncated:
            return mask
        return mask * self.has_eos[idx].unsqueeze(1).to(mask.dtype)

    def sequences(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """[prompt | response] ids and attention mask for rows ``idx``: (b, P + T) each."""
        ids = torch.cat([self.prompt_ids[idx], self.response_ids[idx]], dim=1)
        att = torch.cat([self.prompt_mask[idx], self.response_mask[idx]], dim=1)
        return ids, att


class Sampled(NamedTuple):
    """What sampling gives, on the device: ``query`` / ``query_mask`` (B, P) left-padded prompts,
    ``response`` (B, T) pad after eos, ``mask`` (B, T), ``has_eos`` (B,); P and T are the longest prompt /
    real response on any rank."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    mask: torch.Tensor
    has_eos: torch.Tensor


class Episodes(NamedTuple):
    """Episodes sampled and scored by the reward sources, before the forward passes: ``prompts`` (B),
    ``sampled`` (on the device), ``engine_logprobs`` (the rollout engine's, a list per row; None when the
    trainer sampled itself), ``scores`` (the reward sources') and the decoded ``texts`` (B)."""

    prompts: list[EncodedPrompt]
    sampled: Sampled
    engine_logprobs: list[Any] | None
    scores: Scores
    texts: list[str]


class PPORollout:
    """Makes each step's experience (steps 1-2 of the PPO loop) and evaluates; holds no state of its own
    beyond what it was given: ``kl_ctl`` (its value is the step's beta) and ``reward_norm`` (updated with
    each step's scores) are the trainer's, shared by reference, as is ``engine``.

    ``share_prefill``: with the ``hf`` backend the K samples of a prompt share one forward pass over it
    (:meth:`_shared_prefill`); False runs each sample's prompt forward apart (the same tokens; for
    comparisons, ``bench/shared_prefill.py``)."""

    share_prefill = True
    short_batch_warned = False  # dynamic sampling's short-batch warning is logged once per run

    def __init__(self, cfg: RunConfig, models: PPOModels, prompts: list[EncodedPrompt], comm: Comm, kl_ctl: Any,
                 reward_norm: RunningMoments, engine: RolloutEngine | None):
        self.cfg, self.models, self.prompts, self.comm = cfg, models, prompts, comm
        self.kl_ctl, self.reward_norm, self.engine = kl_ctl, reward_norm, engine
        spec = cfg.ppo.eval_verifier
        self.eval_verifier = import_function(spec) if spec else None  # ppo.eval_verifier: scored at each eval

    # ------------------------------------------------------------------------------ step 1
    @torch.no_grad()
    def make_rollout(self, step: int, timings: dict[str, float]) -> Rollout:
        """Step 1: one step's experience on this rank, without advantages; adds the seconds each part took
        to ``timings``.

        a. Take this rank's prompts of step ``step``, sample responses (per-episode random streams) and score
           them with the reward sources; with ``filter_tied_groups``, drop the groups whose rewards tie and
           sample more prompts until the batch is full (:meth:`_informative_groups`).
        b. Score the sampled tokens: policy and reference log-probs (none without a reference), critic
           values, per-token KL.
        c. The sequence reward (normalise, clip, eos penalty).
        """
        # a. prompts, sampling and the reward sources' scores
        indices, positions = self.step_prompts(step)
        episodes = self._sample_and_score([self.prompts[i] for i in indices], positions, step, timings)
        sampling_stats: dict[str, float] = {}
        if self.cfg.ppo.filter_tied_groups:
            episodes, sampling_stats = self._informative_groups(step, episodes, timings)
        prompts, sampled, scores, texts = episodes.prompts, episodes.sampled, episodes.scores, episodes.texts
        # b. log-probs and values of the sampled tokens
        t0 = time.perf_counter()
        ids = torch.cat([sampled.query, sampled.response], dim=1)
        att = torch.cat([sampled.query_mask, sampled.mask], dim=1)
        old_logp, ref_logp, old_values = self._score_sampled_tokens(ids, att, sampled.response)
        query, query_mask, response, mask, has_eos = (x.cpu() for x in sampled)
        timings["time_forward"] = time.perf_counter() - t0
        # c. reward
        reward, reward_stats = self._sequence_reward(scores, has_eos, mask.sum(1))
        reward_stats.update(sampling_stats)
        is_weights = self._engine_correction(old_logp, mask, episodes.engine_logprobs, reward_stats)
        kl = None if ref_logp is None else kl_penalty(old_logp, ref_logp, self.cfg.ppo.kl_estimator) * mask
        return Rollout(query, query_mask, response, mask, has_eos, old_logp, ref_logp, old_values, scores.total,
                       reward, kl, texts, [x.messages for x in prompts], scores.parts,
                       sum(x.truncated for x in prompts), reward_stats=reward_stats, is_weights=is_weights)

    def _sample_and_score(self, prompts: list[EncodedPrompt], positions: list[int], step: int,
                          timings: dict[str, float]) -> Episodes:
        """Sample a response to each of ``prompts`` (groups of K consecutive rows share a prompt; episode
        ``positions[i]`` of step ``step``) and score it with the reward sources; adds the seconds to
        ``timings`` (``time_generate``, ``time_score``)."""
        t0 = time.perf_counter()
        sampled, engine_logprobs = self.sample([x.ids for x in prompts], positions, step,
                                               group_size=self.cfg.ppo.num_samples_per_prompt)
        t1 = time.perf_counter()
        scores, texts = self.score_responses(prompts, sampled.response.cpu(), sampled.mask.cpu(),
                                             sampled.has_eos.cpu())
        timings["time_generate"] = timings.get("time_generate", 0.0) + t1 - t0
        timings["time_score"] = timings.get("time_score", 0.0) + time.perf_counter() - t1
        return Episodes(prompts, sampled, engine_logprobs, scores, texts)

    def step_prompts(self, step: int) -> tuple[list[int], list[int]]:
        """(dataset indices, global episode positions) of this rank's episodes for PPO step ``step``:
        ``episodes_per_rollout / K`` prompts, each repeated K = ``num_samples_per_prompt`` times in a row (a
        group stays on one rank); the prompt at global position p gives episodes p*K .. p*K + K - 1."""
        return self._episodes_of(self._step_prompt_indices(step, self.comm.dist.rank), 0)

    def _step_prompt_indices(self, step: int, rank: int) -> list[int]:
        """The dataset indices of rank ``rank``'s ``episodes_per_rollout / K`` prompts of step ``step``."""
        ppo, d = self.cfg.ppo, self.comm.dist
        seed, batch = ppo.train.seed, ppo.episodes_per_rollout // ppo.num_samples_per_prompt
        per_epoch = len(epoch_order(len(self.prompts), 0, seed, rank, d.world_size, batch))
        epoch, index = divmod(step, per_epoch)
        return epoch_order(len(self.prompts), epoch, seed, rank, d.world_size, batch)[index]

    def _episodes_of(self, prompt_indices: list[int], first_position: int) -> tuple[list[int], list[int]]:
        """This rank's prompts -> (dataset indices, each repeated K times; global episode positions from
        ``first_position``: this rank's j-th prompt is global prompt ``rank + world_size * j``)."""
        d, k = self.comm.dist, self.cfg.ppo.num_samples_per_prompt
        indices = [i for i in prompt_indices for _ in range(k)]
        positions = [first_position + (d.rank + d.world_size * j) * k + s
                     for j in range(len(prompt_indices)) for s in range(k)]
        return indices, positions

    def refill_prompts(self, step: int, round_index: int, groups: int, start: int) -> tuple[list[int], list[int]]:
        """(dataset indices, global episode positions) of this rank's episodes in extra sampling round
        ``round_index`` (>= 1) of step ``step`` (``ppo.filter_tied_groups``): ``groups`` prompts per rank, K
        samples each, read from :func:`refill_order` from its entry ``start`` on (the entries earlier rounds
        took, all ranks). Round r's positions start at r x the global batch, so every episode of the step has
        its own sampling stream."""
        ppo, d = self.cfg.ppo, self.comm.dist
        used = [i for rank in range(d.world_size) for i in self._step_prompt_indices(step, rank)]
        order = refill_order(len(self.prompts), used, ppo.train.seed, step)
        taken = [order[(start + i) % len(order)] for i in range(groups * d.world_size)]
        return self._episodes_of(taken[d.rank::d.world_size], round_index * ppo.episodes_per_rollout * d.world_size)

    def _informative_groups(self, step: int, first: Episodes,
                            timings: dict[str, float]) -> tuple[Episodes, dict[str, float]]:
        """Dynamic sampling (DAPO; ``ppo.filter_tied_groups``): the step's batch without the groups whose
        rewards tie, sampling extra rounds of prompts (:meth:`refill_prompts`) while any rank is short, up to
        ``max_sampling_rounds`` rounds in all (every rank runs the same rounds: sampling has collectives).
        Still short after them, the batch is filled with tied groups in sampling order.
        -> (the batch's episodes, statistics: ``tied_group_frac`` the share of groups sampled this step that
        tied, ``sampling_rounds``, ``tied_groups_trained`` the tied groups in the batch)."""
        ppo, world = self.cfg.ppo, self.comm.dist.world_size
        k, needed = ppo.num_samples_per_prompt, ppo.episodes_per_rollout // ppo.num_samples_per_prompt
        rounds, tied = [first], [self._tied_groups(first)]
        taken = 0  # entries of the refill order read so far, all ranks
        while len(rounds) < ppo.max_sampling_rounds:
            found = int((~torch.cat(tied)).sum())
            short = int(self.comm.max(torch.tensor([max(needed - found, 0)]))[0])
            if short == 0:
                break
            indices, positions = self.refill_prompts(step, len(rounds), short, taken)
            taken += short * world
            rounds.append(self._sample_and_score([self.prompts[i] for i in indices], positions, step, timings))
            tied.append(self._tied_groups(rounds[-1]))
        all_tied = torch.cat(tied)
        chosen = select_groups(all_tied, needed)
        stats = {"tied_group_frac": float(all_tied.float().mean()), "sampling_rounds": float(len(rounds)),
                 "tied_groups_trained": float(all_tied[chosen].sum())}
        if stats["tied_groups_trained"] and not self.short_batch_warned and self.comm.dist.is_main:
            self.short_batch_warned = True
            logger.warning(
                "[alignpipe] ppo: warning: step %d: after ppo.max_sampling_rounds=%d rounds, %d of the %d groups "
                "of this rank's batch are tied groups (equal rewards: no task advantage). The prompts are too "
                "easy or too hard for the policy; raise max_sampling_rounds or change the data. Logged per step "
                "as tied_groups_trained; not repeated this run.", step, ppo.max_sampling_rounds,
                int(stats["tied_groups_trained"]), needed)
        return self._merge(rounds, group_rows(chosen, k)), stats

    def _tied_groups(self, episodes: Episodes) -> torch.Tensor:
        """(G,) bool: the groups of ``episodes`` whose sequence rewards before normalisation and clipping
        (the reward sources' score less the missing-eos penalty) all tie."""
        penalty = abs(self.cfg.ppo.missing_eos_penalty or 0.0)
        unfinished = (~episodes.sampled.has_eos.cpu()).float()
        return tied_groups(episodes.scores.total - penalty * unfinished, self.cfg.ppo.num_samples_per_prompt)

    def _merge(self, rounds: list[Episodes], rows: torch.Tensor) -> Episodes:
        """The episodes at ``rows`` (indices into every round's rows, round after round) as one batch, padded
        as :meth:`sample` pads: prompts to the longest kept prompt, responses to the longest kept response,
        on any rank."""
        keep = rows.tolist()
        prompts = [x for r in rounds for x in r.prompts]
        responses = [x for r in rounds for x in response_rows(r.sampled.response.cpu(), r.sampled.mask.cpu())]
        engine = None if any(r.engine_logprobs is None for r in rounds) else [
            x for r in rounds for x in r.engine_logprobs]
        texts = [x for r in rounds for x in r.texts]
        sampled = self._padded([prompts[i].ids for i in keep], [responses[i] for i in keep])
        return Episodes([prompts[i] for i in keep], sampled, None if engine is None else [engine[i] for i in keep],
                        Scores.rows_of([r.scores for r in rounds], rows), [texts[i] for i in keep])

    def _padded(self, prompt_ids: list[list[int]], responses: list[list[int]]) -> Sampled:
        """Prompts and responses (each up to and including its eos) as a ``Sampled`` on the device, padded to
        the longest prompt and the longest response on any rank."""
        tok, device = self.models.tokenizer, self.models.device
        longest = int(self.comm.max(torch.tensor([max(len(x) for x in prompt_ids)]))[0])
        query, query_mask = left_pad(prompt_ids, tok.pad_token_id, longest)
        length = int(self.comm.max(torch.tensor([max(1, max(len(x) for x in responses))]))[0])
        response = torch.full((len(responses), length), tok.pad_token_id, dtype=torch.long)
        for i, row in enumerate(responses):
            response[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask, has_eos = response_mask(response, tok.eos_token_id)
        return Sampled(query.to(device), query_mask.to(device), response.to(device), mask.to(device),
                       has_eos.to(device))

    def generate(self, prompt_ids: list[list[int]], positions: list[int], stream: int) -> Sampled:
        """:meth:`sample` without the engine's log-probs."""
        return self.sample(prompt_ids, positions, stream)[0]

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], positions: list[int], stream: int,
               group_size: int = 1) -> tuple[Sampled, list[Any] | None]:
        """Sample a response to each prompt (episode ``positions[i]`` of sampling stream ``stream``: the PPO
        step, or -1 for evaluation), with the rollout engine when there is one, else HF ``generate``
        (``group_size`` K: rows come in groups of K sharing a prompt, whose forward pass they then share).
        Responses are padded to the longest real response on any rank, so every rank's shapes agree.
        -> (the samples, the engine's log-probs of each response: a list per row, None where it gave none;
        None when the trainer sampled itself)."""
        tok, device = self.models.tokenizer, self.models.device
        longest = int(self.comm.max(torch.tensor([max(len(x) for x in prompt_ids)]))[0])
        query, query_mask = left_pad(prompt_ids, tok.pad_token_id, longest)
        query, query_mask = query.to(device), query_mask.to(device)
        engine_logprobs = None
        if self.engine is not None:
            rows, engine_logprobs = self.engine.responses(self.models.actor, prompt_ids, positions, stream)
            response = right_pad(rows, tok.pad_token_id)[0].to(device)
        else:
            response = self._hf_responses(query, query_mask, positions, stream, group_size)
        if response.size(1) == 0:  # nothing generated (max_new_tokens reached at once): keep one pad
            response = torch.full((query.size(0), 1), tok.pad_token_id, dtype=torch.long, device=device)
        mask, has_eos = response_mask(response, tok.eos_token_id)
        # identical shapes on every rank: pad to the longest real response anywhere
        length = int(self.comm.max(torch.tensor([int(mask.sum(1).max())]))[0])
        response = response[:, :length] if response.size(1) >= length else torch.cat(
            [response, torch.full((response.size(0), length - response.size(1)), tok.pad_token_id,
                                  dtype=torch.long, device=device)], dim=1)
        mask, has_eos = response_mask(response, tok.eos_token_id)
        response = torch.where(mask.bool(), response, torch.full_like(response, tok.pad_token_id))
        return Sampled(query, query_mask, response, mask, has_eos), engine_logprobs

    def _hf_responses(self, query: torch.Tensor, query_mask: torch.Tensor, positions: list[int],
                      stream: int, group_size: int = 1) -> torch.Tensor:
        """HF ``generate`` with the per-episode sampler -> (B, T') generated ids (pad after eos); rows in groups
        of ``group_size`` identical prompts start from one shared prompt forward (:meth:`_shared_prefill`)."""
        ppo, models = self.cfg.ppo, self.models
        sampler = EpisodeSampler(episode_uniforms(ppo.train.seed, stream, positions, ppo.max_new_tokens),
                                 query.size(1), ppo.temperature, ppo.top_k, ppo.top_p)
        from transformers import LogitsProcessorList

        # greedy over the sampler's one-hot logits, and nothing else: the checkpoint's generation_config
        # (repetition penalty, top-k/p, temperature, min length) must not reshape them (DESIGN §4)
        gen_cfg = neutral_generation_config(models.tokenizer, ppo.max_new_tokens)
        kwargs = dict(input_ids=query, attention_mask=query_mask, logits_processor=LogitsProcessorList([sampler]))
        if models.zero_stage == 3:
            # ZeRO-3: the engine's hooks gather each layer's shards for every decoding forward; all ranks
            # keep stepping until every rank is done (synced_gpus), so the collectives stay matched
            kwargs["synced_gpus"] = self.comm.on
        with models.autocast():
            cache = self._shared_prefill(query, query_mask, group_size) if self.share_prefill else None
            if cache is not None:
                kwargs["cache"] = cache  # generate runs only the last prompt token, then decodes
            out = neutral_generate(models.actor, gen_cfg, **kwargs)
        return out[:, query.size(1):]

    def _shared_prefill(self, query: torch.Tensor, query_mask: torch.Tensor, group_size: int) -> Any | None:
        """One forward pass per prompt for its K samples: ``query`` / ``query_mask`` (B, P) hold groups of K
        identical rows; all but the last token of each group's prompt run once, and the KV cache is repeated K
        times (``Cache.batch_repeat_interleave``) -> that cache (B rows, P - 1 positions), from which
        ``generate`` runs the last prompt token of every row and decodes. The sampler's per-episode streams
        are untouched, so the tokens are those of K separate prompt passes up to floating-point rounding
        (identical on the tiny model: tests/test_ppo_rollout_features.py). None (every row runs its own
        prompt pass) with K = 1, a one-token prompt, groups whose rows differ, or a model whose cache cannot
        be repeated."""
        k = group_size
        rows, width = query.shape
        if k < 2 or width < 2 or rows % k:
            return None
        ids, att = query.view(-1, k, width), query_mask.view(-1, k, width)
        if not (bool((ids == ids[:, :1]).all()) and bool((att == att[:, :1]).all())):
            return None
        ids, att = query[::k, :-1], query_mask[::k, :-1]
        out = self.models.actor(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att),
                                use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
        cache.batch_repeat_interleave(k)
        return cache

    @torch.no_grad()
    def _score_sampled_tokens(self, ids: torch.Tensor, att: torch.Tensor,
                              response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (old_logp, ref_logp, old_values), each (B, T) fp32 on the CPU; ``ref_logp`` None when the run has
        no reference (``ppo.uses_reference``). No graph: chunked by a logits budget (~512 MB of fp32), not by
        micro-batch."""
        models = self.models
        B, T = response.shape
        vocab = int(models.actor.config.vocab_size)
        chunk = max(1, min(B, (1 << 27) // max(1, (T + 1) * vocab)))
        logp, ref_logp, values = [], [], []
        for s in range(0, B, chunk):
            c_ids, c_att, c_resp = ids[s:s + chunk], att[s:s + chunk], response[s:s + chunk]
            logp.append(logprobs_from_logits(models.policy_logits(models.actor, c_ids, c_att, T), c_resp))
            if models.has_reference:
                ref_logp.append(logprobs_from_logits(models.reference_logits(c_ids, c_att, T), c_resp))
            if models.critic is not None:
                values.append(models.critic_values(models.critic, c_ids, c_att, T))
        old_values = torch.cat(values).cpu() if values else torch.zeros(B, T)
        return torch.cat(logp).cpu(), torch.cat(ref_logp).cpu() if ref_logp else None, old_values

    def score_responses(self, prompts: list[EncodedPrompt], response: torch.Tensor, mask: torch.Tensor,
                        has_eos: torch.Tensor) -> tuple[Scores, list[str]]:
        """Score this rank's responses with every reward source -> (scores, decoded texts).

        ``prompts``: the prompts that were generated from; ``response`` (B, T) / ``mask`` (B, T) /
        ``has_eos`` (B,) on the CPU, as ``generate`` returns them. The reward model is handed the prompt ids
        the policy saw and the generated ids up to and including eos (see ``stages.ppo.rewards``).
        """
        rows = response_rows(response, mask)
        texts = self.models.tokenizer.batch_decode(rows, skip_special_tokens=True)
        batch = Responses([x.messages for x in prompts], [list(x.ids) for x in prompts], rows,
                          [bool(e) for e in has_eos.tolist()], texts, [x.reference for x in prompts])
        return self.models.rewards.score(batch), texts

    def _sequence_reward(self, scores: Scores, has_eos: torch.Tensor,
                         lengths: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(B,) reward used for RL: the score normalised (running moments over all ranks) and/or clipped,
        minus ``|missing_eos_penalty|`` where there is no eos, plus DAPO's overlong penalty of each response's
        length ``lengths`` (B,) (``ppo.overlong_penalty``); and the per-step reward statistics."""
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
        if self.models.reward_model is not None:
            stats["rm_truncated"] = float(scores.rm_truncated)
        reward = reward - eos_penalty
        if ppo.mask_truncated:
            stats["truncated_masked_frac"] = float((~has_eos).float().mean())  # dropped from the policy loss
        if ppo.overlong_penalty is not None:
            length_penalty = overlong_penalty(lengths, ppo.max_new_tokens, ppo.overlong_penalty.buffer,
                                              ppo.overlong_penalty.factor)
            stats["overlong_penalty"] = float(length_penalty.mean())
            stats["overlong_penalised_frac"] = float((length_penalty < 0).float().mean())
            reward = reward + length_penalty.to(reward.dtype)
        return reward, stats

    def _engine_correction(self, old_logp: torch.Tensor, mask: torch.Tensor, engine_logprobs: list[Any] | None,
                           stats: dict[str, float]) -> torch.Tensor | None:
        """With a rollout engine: log how far its log-probs are from ``old_logp`` (B, T), and return the
        truncated importance weights (B, T) that move each token's policy loss from the engine's sampling
        distribution to the trainer's (``rollout.importance_sampling``), else None. Adds the statistics to
        ``stats``."""
        rollout = self.cfg.rollout
        if engine_logprobs is None:  # the trainer sampled itself
            return None
        if any(x is None for x in engine_logprobs):
            if rollout.uses_importance_sampling:
                raise ValueError("the rollout engine returned no log-probs for some responses; "
                                 "rollout.importance_sampling needs them (set it to false to train without)")
            return None
        stats["rollout_engine_logp_diff"] = engine_logp_diff(engine_logprobs, old_logp, mask)
        if not rollout.uses_importance_sampling:
            return None
        engine_logp = engine_logp_tensor(engine_logprobs, old_logp)
        weights, is_stats = truncated_importance_weights(old_logp, engine_logp, mask, rollout.importance_sampling_cap)
        stats.update({f"rollout_{key}": float(value) for key, value in is_stats.items()})
        return weights

    # ------------------------------------------------------------------------------ step 2
    def add_advantages(self, rollout: Rollout) -> None:
        """Step 2: ``rollout.advantages`` and ``rollout.returns`` from its rewards, KL, values and mask."""
        kl = rollout.kl if rollout.kl is not None else torch.zeros_like(rollout.old_logp)  # no reference: beta is 0
        rollout.advantages, rollout.returns = self.advantages(rollout.reward, kl, rollout.old_values,
                                                              rollout.response_mask)

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
            # the batch std is over every rank's rewards (the global batch), as TRL's over all processes'
            batch = self.comm.gather(reward) if ppo.scale_rewards == "batch" else None
            task_advantages = grpo_advantages(reward, mask, k, ppo.group_std_eps, ppo.scale_rewards, batch)
        else:
            task_advantages = rloo_advantages(reward, mask, k)
        return task_advantages + kl_return(kl, mask, beta, ppo.gamma), returns

    # ------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, prompts: list[EncodedPrompt]) -> dict[str, float]:
        """Mean reward-source score on held-out ``prompts`` (fixed sampling streams: comparable over time);
        {} without prompts."""
        if not prompts:
            return {}
        d, batch = self.comm.dist, self.cfg.ppo.episodes_per_rollout
        n = len(prompts)
        mine = list(range(d.rank, n, d.world_size))
        per_rank = math.ceil(n / d.world_size)
        mine += [-1] * (per_rank - len(mine))  # equal work on every rank; -1 rows are not counted
        totals = torch.zeros(4, dtype=torch.float64)
        verifier: dict[str, float] = {}
        for s in range(0, per_rank, batch):
            chunk = mine[s:s + batch]
            real = torch.tensor([i >= 0 for i in chunk])
            chunk_prompts = [prompts[max(i, 0)] for i in chunk]
            sampled = self.generate([x.ids for x in chunk_prompts], [max(i, 0) for i in chunk], stream=-1)
            response, mask, has_eos = sampled.response.cpu(), sampled.mask.cpu(), sampled.has_eos.cpu()
            scores, texts = self.score_responses(chunk_prompts, response, mask, has_eos)
            score = scores.total
            totals += torch.stack([score[real].sum().double(), mask.sum(1)[real].sum().double(),
                                   has_eos[real].sum().double(), real.sum().double()])
            if self.eval_verifier is not None:
                kept = [j for j, i in enumerate(chunk) if i >= 0]
                sums = verifier_sums(self.eval_verifier, [last_user(chunk_prompts[j].messages) for j in kept],
                                     [texts[j] for j in kept], [chunk_prompts[j].reference for j in kept],
                                     self.cfg.ppo.eval_verifier)
                for key, value in sums.items():
                    verifier[key] = verifier.get(key, 0.0) + value
        totals = self.comm.sum(totals)
        count = max(float(totals[3]), 1.0)
        row = {"eval_score": float(totals[0]) / count, "eval_response_length": float(totals[1]) / count,
               "eval_eos_rate": float(totals[2]) / count}
        if self.eval_verifier is not None:
            keys = sorted(verifier)  # the same metric names on every rank (one verifier, same code)
            added = self.comm.sum(torch.tensor([verifier[k] for k in keys], dtype=torch.float64))
            row.update(verifier_means(dict(zip(keys, added.tolist())), float(totals[3])))
        return row
