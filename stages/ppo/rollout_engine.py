"""PPO's link to a rollout engine (``rollout.backend: vllm``; docs/ROLLOUT.md): a worker on rank 0 that
samples every rank's episodes, synced with the actor's weights before the first rollout after each update.

The trainer starts it (``RolloutEngine.start``), marks it stale after each update and on resume
(``weights_changed``) and stops it with the stage (``close``); the rollout asks it for responses
(``responses``). With ``rollout.backend: hf`` there is none: the trainer samples with HF ``generate``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from stages.ppo.distributed import Comm
from stages.ppo.rollout import episode_seed


class RolloutEngine:
    """A started rollout engine. ``worker``: the backend on rank 0 (None on the other ranks); ``stale``: the
    actor changed since the last weight sync; ``sync_seconds``: time spent syncing weights (rank 0)."""

    def __init__(self, cfg: RunConfig, comm: Comm, worker: Any | None, work_dir: Path, stale: bool):
        self.cfg, self.comm, self.worker, self.work_dir = cfg, comm, worker, work_dir
        self.stale = stale
        self.sync_seconds = 0.0

    @classmethod
    def start(cls, cfg: RunConfig, comm: Comm, actor: Any, tokenizer: Any, zero_stage: int,
              work_dir: Path) -> RolloutEngine:
        """Rank 0 starts a vLLM worker on the actor's weights as they are in memory (written to
        ``work_dir/start``: the base weights, for a LoRA actor the engine gets the adapter at each sync).
        Every rank learns whether it started (no rank waits forever). ZeRO-3 partitions the actor's
        parameters over ranks, so rank 0 has no full copy to send: refused."""
        if zero_stage == 3:
            raise ValueError("rollout.backend 'vllm' with ZeRO-3 (ppo.train.deepspeed) is not supported: the engine "
                             "needs the full actor weights on rank 0 after each update; use ZeRO-1/2 or "
                             "rollout.backend: hf")
        worker, failure = None, None
        if comm.dist.is_main:
            from stages.rollout_backend.vllm_client import VLLMBackend, peft_lora_rank, write_policy_folder

            ppo = cfg.ppo
            try:
                # a worker already running (base_url) loaded its model itself
                folder = work_dir / "start" if cfg.rollout.vllm.base_url else write_policy_folder(actor,
                                                                                                work_dir / "start")
                worker = VLLMBackend(cfg.rollout.vllm, str(folder), tokenizer, work_dir,
                                     max_model_len=ppo.max_prompt_length + ppo.max_new_tokens,
                                     model_dtype=cfg.model.dtype, lora_rank=peft_lora_rank(actor))
            except Exception as exc:  # noqa: BLE001  (sent to every rank, then raised)
                failure = exc
        # a worker already running (rollout.vllm.base_url) holds whatever it was started on: send the actor's
        # weights before the first rollout (a LoRA actor's base must be the one the worker was started on)
        engine = cls(cfg, comm, worker, work_dir, stale=cfg.rollout.vllm.base_url is not None)
        error = comm.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if error is not None:
            from stages.rollout_backend import RolloutEngineError

            raise RolloutEngineError(f"rank 0 could not start the rollout engine: {error}")
        return engine

    def weights_changed(self) -> None:
        """The actor's weights moved (an update, a resume): sync them before the next rollout."""
        self.stale = True

    def close(self) -> None:
        """Stop the worker (rank 0) and remove the weights written for it (its log stays)."""
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.close()
            shutil.rmtree(self.work_dir / "start", ignore_errors=True)

    def responses(self, actor: Any, prompt_ids: list[list[int]], positions: list[int],
                  stream: int) -> tuple[list[list[int]], list[Any]]:
        """The engine's responses to this rank's prompts -> (ids up to and including eos, the engine's
        log-probs of them: a list per response, None where it gave none).

        Only rank 0 talks to the engine: it gathers every rank's prompts and episode seeds, first syncs the
        engine with ``actor``'s weights if they changed since the last sync, asks for all episodes in one
        request and hands each rank its rows. Episode ``p`` of step ``stream`` samples under
        ``episode_seed(seed, stream, p)``, so a rollout does not depend on the number of ranks. An engine
        failure is broadcast too, so every rank raises instead of waiting for rows that never come."""
        from stages.rollout_backend import RolloutEngineError

        ppo = self.cfg.ppo
        seeds = [episode_seed(ppo.train.seed, stream, p) for p in positions]
        everyone = self.comm.all_gather_objects((prompt_ids, seeds))
        answer: dict[str, Any] = {}
        failure: Exception | None = None
        if self.comm.dist.is_main:
            try:
                answer = self._ask_everyones(actor, everyone)
            except Exception as exc:  # noqa: BLE001  (sent to every rank, then raised)
                failure, answer = exc, {"error": f"{type(exc).__name__}: {exc}"}
        answer = self.comm.broadcast_object(answer)
        if "error" in answer:
            if failure is not None:
                raise failure
            raise RolloutEngineError(f"rank 0's rollout engine failed: {answer['error']}")
        rank = self.comm.dist.rank
        return answer["rows"][rank], answer["logprobs"][rank]

    def _ask_everyones(self, actor: Any, everyone: list[tuple[list[list[int]], list[int]]]) -> dict[str, Any]:
        """Rank 0: sync if stale, then one request for every rank's (prompts, seeds) -> rows and log-probs
        per rank."""
        from stages.rollout_backend import Sampling

        ppo = self.cfg.ppo
        if self.stale:
            started = time.perf_counter()
            self.worker.sync_weights(actor)
            self.sync_seconds += time.perf_counter() - started
            self.stale = False
        sampling = Sampling(ppo.max_new_tokens, ppo.temperature, logprobs=True,
                            prompt_seeds=[s for _, rank_seeds in everyone for s in rank_seeds])
        out = [g[0] for g in self.worker.generate([p for rank_ids, _ in everyone for p in rank_ids], sampling)]
        sizes = [len(rank_ids) for rank_ids, _ in everyone]
        starts = [sum(sizes[:r]) for r in range(len(sizes))]
        return {"rows": [[g.token_ids for g in out[a:a + n]] for a, n in zip(starts, sizes)],
                "logprobs": [[g.logprobs for g in out[a:a + n]] for a, n in zip(starts, sizes)]}
