"""The rollout-backend interface (``Sampling``, ``Generation``, ``RolloutBackend``) and the ``hf`` backend;
see ``stages.rollout_backend`` for the whole picture."""


from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol, Sequence


@dataclass(frozen=True)
class Sampling:
    """What to sample, stated in full: nothing comes from a checkpoint's ``generation_config``.

    ``temperature`` 0 is greedy; otherwise plain sampling from ``softmax(logits / temperature)`` (no
    top-k / top-p / min-p, no repetition penalty, no minimum length). ``n`` samples per prompt.
    ``seed``: the base of every random stream (see the module docstring for each backend's rule);
    ``prompt_seeds``: optional, one seed per prompt, with ``n`` 1 (vllm: that prompt's stream; PPO passes
    each episode's seed). ``logprobs``: ask the engine for the sampled
    tokens' log-probs (diagnostic; vllm only).
    """

    max_new_tokens: int
    temperature: float = 1.0
    n: int = 1
    seed: int = 0
    prompt_seeds: Sequence[int] | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.n < 1 or self.temperature < 0:
            raise ValueError(f"Sampling needs max_new_tokens >= 1, n >= 1, temperature >= 0; got {self}")
        if self.prompt_seeds is not None and self.n != 1:
            raise ValueError(f"Sampling.prompt_seeds (one stream per prompt) needs n == 1, got n={self.n}")


@dataclass
class Generation:
    """One sampled response: ``token_ids`` up to and including the first eos when ``finished``, else every
    generated id (hf: except pad ids, the rule the stages always had, since ``generate`` pads rows that
    finished early; vllm: exactly what was sampled, as PPO needs); ``logprobs``: the engine's log-prob of
    each of them (vllm, when asked), else None."""

    token_ids: list[int]
    finished: bool
    logprobs: list[float] | None = None


class RolloutBackend(Protocol):
    name: str

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[Generation]]:
        """``sampling.n`` Generations per prompt, in prompt order."""

    def sync_weights(self, policy: Any) -> None:
        """Make the next ``generate`` sample from ``policy``'s current weights."""

    def close(self) -> None:
        """Free the engine (stop its worker process); safe to call twice."""


class RolloutEngineError(RuntimeError):
    """The rollout engine failed: its worker died, did not answer within its timeout, or refused a request."""


def stream_seed(seed: int, prompt: int, sample: int) -> int:
    """A 63-bit seed for sample ``sample`` of prompt ``prompt`` under base ``seed`` (independent streams)."""
    digest = hashlib.blake2b(f"rollout/{seed}/{prompt}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def cut_at_eos(seq: list[int], eos_id: int, pad_id: int | None) -> Generation:
    """HF ``generate`` output row -> Generation: up to and including the first eos, else the non-pad ids."""
    if eos_id in seq:
        return Generation(seq[:seq.index(eos_id) + 1], True)
    return Generation([t for t in seq if t != pad_id], False)


class HFBackend:
    """transformers ``generate`` on ``model`` (already on ``device``, in eval mode); see the module docstring."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, device: Any, batch_size: int):
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[list[Generation]]:
        import torch

        from stages.batching import left_pad
        from stages.generation import neutral_generate, neutral_generation_config

        tok, n = self.tokenizer, sampling.n
        greedy = sampling.temperature == 0
        gen_cfg = neutral_generation_config(tok, sampling.max_new_tokens, do_sample=not greedy,
                                            temperature=1.0 if greedy else sampling.temperature,
                                            num_return_sequences=n)
        out: list[list[Generation]] = []
        for b, start in enumerate(range(0, len(prompt_ids), self.batch_size)):
            ids, mask = left_pad(prompt_ids[start:start + self.batch_size], tok.pad_token_id)
            torch.manual_seed(sampling.seed + b)
            with torch.no_grad():
                rows = neutral_generate(self.model, gen_cfg, input_ids=ids.to(self.device),
                                        attention_mask=mask.to(self.device))[:, ids.shape[1]:].tolist()
            for i in range(ids.shape[0]):
                out.append([cut_at_eos(seq, tok.eos_token_id, tok.pad_token_id) for seq in rows[i * n:(i + 1) * n]])
        return out

    def sync_weights(self, policy: Any) -> None:
        """Nothing to do: ``generate`` runs on the live model."""

    def close(self) -> None:
        self.model = None
