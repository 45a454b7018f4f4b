"""Held-out prompts and the models that answer them: a stage's policy, the base model (with or without few-shot
examples) or the distillation teacher, loaded as their stages load them, answering greedily.

torch, transformers and the stages' loaders are imported inside the functions that need them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from data.formats import last_user  # noqa: F401  (re-exported: compare and baselines read it from here)

from ..config import RunConfig

Messages = list[dict[str, str]]


def held_out_examples(cfg: RunConfig, n: int) -> list[Any]:
    """``n`` held-out ``PromptExample`` rows (prompt + reference): the head of ``report.eval_data``, else of
    ``ppo.eval_data``, else the tail of ``ppo.data`` (prompts PPO may have trained on: the report says so)."""
    from data.formats import load_examples

    source = cfg.report.eval_data or cfg.ppo.eval_data or cfg.ppo.data
    if source is None:
        raise ValueError("none of report.eval_data, ppo.eval_data, ppo.data is set, so there are no prompts "
                         "to sample")
    examples, _ = load_examples(source, "prompt")
    held_out = cfg.report.eval_data is not None or cfg.ppo.eval_data is not None
    return examples[:n] if held_out else examples[-n:]


def held_out_prompts(cfg: RunConfig, n: int) -> list[Messages]:
    """The prompts (message lists) of :func:`held_out_examples`."""
    return [ex.prompt for ex in held_out_examples(cfg, n)]


def with_shots(shots: Sequence[dict[str, str]], prompt: Messages) -> Messages:
    """``prompt`` with the few-shot example turns before it (a system message of the prompt stays first)."""
    head = [m for m in prompt[:1] if m.get("role") == "system"]
    return head + list(shots) + list(prompt[len(head):])


def stage_tokenizer(cfg: RunConfig, stage: str):
    from ..models import load_tokenizer

    return load_tokenizer(str(cfg.stage_dir(stage)), cfg.model, cfg.chat)


def prompt_ids(cfg: RunConfig, tokenizer: Any, prompt: Messages) -> list[int]:
    """The prompt in the PPO layout (``stages.chat.prompt_ids``), cut from the left."""
    from stages.chat import prompt_ids as prompt_ids_of

    return prompt_ids_of(tokenizer, prompt, cfg.chat.system_prompt)[-cfg.ppo.max_prompt_length:]


def load_answerer(cfg: RunConfig, stage: str) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of ``stage``: a stage folder's policy; "icl" and "base" the base model
    (``prepare_base``); "teacher" ``distill.teacher`` with its own tokenizer and chat template."""
    from stages.tuning import load_trained

    if stage == "teacher":
        model, tokenizer = teacher_model(cfg)
    elif stage in ("icl", "base"):
        from ..models import load_model, load_tokenizer, prepare_base

        base = prepare_base(cfg.model)
        tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
        model = load_model(base, cfg.model, tokenizer, kind="causal_lm")
    else:
        tokenizer = stage_tokenizer(cfg, stage)
        model = load_trained(cfg.stage_dir(stage), cfg.model, tokenizer, kind="causal_lm")
    model.eval()
    return model, tokenizer


def greedy_answers(cfg: RunConfig, model: Any, tokenizer: Any, prompts: list[Messages], batch_size: int = 8,
                   shots: list[dict[str, str]] | None = None) -> tuple[list[str], list[list[int]]]:
    """Greedy answers of a loaded model: (texts, token id lists up to and including the first eos), up to
    ``ppo.max_new_tokens`` each. With ``shots`` the prompt is not cut to ``ppo.max_prompt_length`` (the
    shots would be cut)."""
    import torch

    from stages.chat import prompt_ids as prompt_ids_of
    from stages.generation import neutral_generate, neutral_generation_config

    texts: list[str] = []
    ids: list[list[int]] = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        enc = ([prompt_ids(cfg, tokenizer, p) for p in batch] if shots is None else
               [prompt_ids_of(tokenizer, with_shots(shots, p), cfg.chat.system_prompt) for p in batch])
        width = max(len(e) for e in enc)
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])  # left padding
        attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
        with torch.no_grad():
            # greedy with no checkpoint generation_config defaults (repetition penalty ...) merged in
            out = neutral_generate(model, neutral_generation_config(tokenizer, cfg.ppo.max_new_tokens),
                                   input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device))
        for row in out[:, width:].tolist():
            row = row[: row.index(eos) + 1] if eos in row else [t for t in row if t != pad]
            ids.append(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts, ids


def generate(cfg: RunConfig, stage: str, prompts: list[Messages], batch_size: int = 8,
             shots: list[dict[str, str]] | None = None) -> tuple[list[str], list[list[int]]]:
    """Greedy responses of ``stage``'s model (:func:`load_answerer`, :func:`greedy_answers`): (texts, token
    id lists up to and including the first eos). ``stage`` "icl" is the base model with ``shots`` (few-shot
    example turns) put before each prompt's messages."""
    model, tokenizer = load_answerer(cfg, stage)
    try:
        return greedy_answers(cfg, model, tokenizer, prompts, batch_size, shots)
    finally:
        del model


def teacher_model(cfg: RunConfig) -> tuple[Any, Any]:
    """``distill.teacher`` as (model, tokenizer), loaded as the distill stage loads it (``build_teacher``)."""
    if cfg.distill.teacher.kind == "http":
        raise ValueError("distill.teacher is an http endpoint; the report answers held-out prompts with local "
                         "models only (kind hf or stage)")
    from stages.distill import build_teacher

    teacher, _ = build_teacher(cfg)
    return teacher.model, teacher.tokenizer


@contextmanager
def generation_threads(cfg: RunConfig) -> Iterator[None]:
    """``with generation_threads(cfg):`` torch on ``ppo.train.num_threads`` threads, the previous count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.ppo.train.num_threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
