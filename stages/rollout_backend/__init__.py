"""Rollout backends: one interface for sampling responses from a local policy (docs/ROLLOUT.md).

``generate(prompt_ids, sampling) -> per prompt, sampling.n Generations`` and ``sync_weights(policy)``,
``close()``. Two backends:

- ``hf`` (:class:`HFBackend`, the default and the reference for correctness): transformers ``generate`` in
  the stage's own process through ``stages.generation.neutral_generate`` (no checkpoint generation
  defaults), left-padded batches of ``batch_size`` prompts, batch ``b`` sampled under
  ``torch.manual_seed(sampling.seed + b)`` with ``num_return_sequences = n``: exactly what rlaif_label,
  best_of_n and distill did before this interface. PPO keeps its own per-episode sampler
  (``stages.ppo.rollout.EpisodeSampler``) for ``hf``: bit-identical rollouts whatever the ranks or resume.
- ``vllm`` (:class:`stages.rollout_backend.vllm_client.VLLMBackend`): a vLLM engine in a worker process
  with its own environment, over HTTP on 127.0.0.1. Sample ``k`` of prompt ``i`` is drawn from its own
  random stream seeded with ``stream_seed(sampling.seed, i, k)``, or ``sampling.prompt_seeds[i]`` when the
  caller names one per prompt (PPO: the episode's seed), so a response does not depend on the batch it
  shared.

Both return the response token ids up to and including the first eos (``finished``) or every generated
id (cut at ``max_new_tokens``). Engine log-probs (``logprobs``, vLLM only) are diagnostics: nothing
trains on them (PPO's old log-probs come from the trainer's own forward pass).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from stages.rollout_backend.base import (
    Generation,
    HFBackend,
    RolloutBackend,
    RolloutEngineError,
    Sampling,
    cut_at_eos,
    stream_seed,
)

__all__ = ["Generation", "HFBackend", "RolloutBackend", "RolloutEngineError", "Sampling", "cut_at_eos",
           "open_backend", "stream_seed"]


@contextmanager
def open_backend(cfg: Any, model_dir: str, tokenizer: Any, load_hf_model: Callable[[], Any], device: Any,
                 batch_size: int, max_model_len: int, work_dir: Any) -> Iterator[RolloutBackend]:
    """The run's backend (``cfg.rollout.backend``) for sampling from the model at ``model_dir`` (an HF folder),
    closed on exit, exceptions included. ``load_hf_model()`` -> the model on ``device`` in eval mode (hf only,
    so a vllm run never loads it into the stage's process); ``max_model_len``: the longest prompt plus
    ``max_new_tokens``; ``work_dir``: where the vllm worker writes its log."""
    if cfg.rollout.backend == "vllm":
        from stages.rollout_backend.vllm_client import VLLMBackend

        backend: RolloutBackend = VLLMBackend(cfg.rollout.vllm, model_dir, tokenizer, work_dir,
                                              max_model_len=max_model_len, model_dtype=cfg.model.dtype)
    else:
        backend = HFBackend(load_hf_model(), tokenizer, device, batch_size)
    try:
        yield backend
    finally:
        backend.close()
