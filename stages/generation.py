"""HF ``generate`` with the run's settings only (DESIGN §4): the checkpoint's ``generation_config`` never
leaks in.

transformers 5 fills every field a passed ``GenerationConfig`` leaves unset (``None``) from the model's
own ``generation_config`` (``GenerationMixin._prepare_generation_config``: ``update(**model_defaults,
defaults_only=True)``). A checkpoint's ``generation_config.json`` therefore adds its repetition penalty
(Qwen2.5 Instruct ships 1.05), ``no_repeat_ngram_size``, ``min_new_tokens``, suppressed tokens, and, when
sampling, its temperature / top-k / top-p, to a call that never asked for them. Passing explicit neutral
values is not enough, because some neutral values are ``None`` themselves (``bad_words_ids``,
``suppress_tokens``, ``forced_eos_token_id``, ...). So :func:`neutral_generate` swaps every model's
``generation_config`` for a blank one for the duration of the call (the checkpoint's own stays in place
for saving and serving) and passes :func:`neutral_generation_config`, where every setting that changes
the logits is explicit.

PPO, the report's greedy answers and RLAIF labelling all generate through here (one home).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


def neutral_generation_config(tokenizer: Any, max_new_tokens: int, *, do_sample: bool = False,
                              temperature: float = 1.0, **extra: Any) -> Any:
    """A ``GenerationConfig`` that is greedy (``do_sample=False``) or plain sampling from
    ``softmax(logits / temperature)``: no top-k/top-p/min-p/typical filtering, no repetition or n-gram
    penalty, no minimum length; stops at the tokenizer's eos, pads with its pad token. ``extra``: other
    fields that do not change the logits (``num_return_sequences``, ...)."""
    from transformers import GenerationConfig

    sampling = dict(temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0) if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=do_sample, num_beams=1,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, length_penalty=1.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, use_cache=True, **sampling, **extra)


@contextmanager
def checkpoint_generation_defaults_off(model: Any) -> Iterator[None]:
    """Within the block, every module of ``model`` (PEFT wrappers included) that holds a
    ``generation_config`` holds a blank one instead, so ``generate`` has no checkpoint defaults to merge."""
    from transformers import GenerationConfig

    swapped = []
    for module in model.modules():
        current = vars(module).get("generation_config")
        if isinstance(current, GenerationConfig):
            swapped.append((module, current))
            module.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for module, original in swapped:
            module.generation_config = original


def neutral_generate(model: Any, generation_config: Any, **kwargs: Any) -> Any:
    """``model.generate(generation_config=..., **kwargs)`` with the checkpoint's defaults switched off.

    ``generation_config`` is normally :func:`neutral_generation_config`; ``kwargs`` carry the inputs,
    logits processors, ``num_return_sequences``, ``synced_gpus``.
    """
    with checkpoint_generation_defaults_off(model):
        return model.generate(generation_config=generation_config, **kwargs)
