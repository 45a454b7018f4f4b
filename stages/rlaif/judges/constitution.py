"""The rubric: a constitution file (``configs/constitutions/default.yaml``) of principles, one sampled
per prompt (seeded, deterministic) as in Constitutional AI, or all of them, and the judge prompts built
from it (``pair_messages``, ``score_messages``)."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import yaml

from pipeline.config import resolve_path

from .interface import JudgeError, Prompt, canonical, prompt_text

TEMPLATE_VERSION = 1  # bump when the judge prompts below change: it is part of every cache key


# ------------------------------------------------------------------------------------- constitution
@dataclass(frozen=True)
class Principle:
    name: str
    compare: str
    rate: str


@dataclass
class Constitution:
    """The rubric: principles, the judge's system message and the score scale."""

    name: str
    principles: list[Principle]
    system: str = "You are a careful, impartial evaluator of AI assistant responses."
    score_min: int = 1
    score_max: int = 10
    mode: str = "sample"  # "sample": one principle per prompt; "all": every principle
    seed: int = 0
    version: int = 1
    source: str = "<built-in>"

    @classmethod
    def load(cls, path: str | os.PathLike | None, mode: str = "sample", seed: int = 0) -> "Constitution":
        """Read a constitution YAML (``None``: a single built-in helpfulness/harmlessness principle)."""
        if mode not in ("sample", "all"):
            raise JudgeError(f"principles must be 'sample' or 'all', got {mode!r}")
        if path is None:
            general = Principle("general", "Which response is more helpful, honest and harmless?",
                                "The response is helpful, honest and harmless.")
            return cls("built-in", [general], mode=mode, seed=seed)
        file = resolve_path(path)
        if not file.exists():
            raise JudgeError(f"constitution file not found: {path} (looked at {file}); see "
                             "configs/constitutions/default.yaml for the format")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise JudgeError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("principles"), list) or not data["principles"]:
            raise JudgeError(f"{path}: expected a mapping with a non-empty 'principles' list")
        principles = []
        for i, item in enumerate(data["principles"]):
            missing = [k for k in ("name", "compare", "rate") if not isinstance(item, dict) or not item.get(k)]
            if missing:
                raise JudgeError(f"{path}: principles[{i}] needs {', '.join(missing)} (strings)")
            principles.append(Principle(str(item["name"]), str(item["compare"]).strip(), str(item["rate"]).strip()))
        scale = data.get("score_scale") or {}
        lo, hi = int(scale.get("min", 1)), int(scale.get("max", 10))
        if not 0 <= lo < hi <= 100:
            raise JudgeError(f"{path}: score_scale must have 0 <= min < max <= 100, got {lo}..{hi}")
        return cls(
            name=str(data.get("name", file.stem)), principles=principles,
            system=str(data.get("system") or cls.system).strip(), score_min=lo, score_max=hi, mode=mode,
            seed=seed, version=int(data.get("version", 1)), source=str(path),
        )

    def principles_for(self, prompt: Prompt) -> list[Principle]:
        """The principle(s) for a prompt: all, or one drawn deterministically from (seed, prompt)."""
        if self.mode == "all" or len(self.principles) == 1:
            return list(self.principles)
        digest = hashlib.sha256(f"{self.seed}\0{canonical(prompt)}".encode()).hexdigest()
        return [random.Random(int(digest[:16], 16)).choice(self.principles)]

    def rubric_key(self, principles: Sequence[Principle]) -> dict[str, Any]:
        """What the rubric contributes to a cache key (texts, not file names)."""
        return {"system": self.system, "principles": [asdict(p) for p in principles],
                "scale": [self.score_min, self.score_max], "template": TEMPLATE_VERSION}


def _criteria(principles: Sequence[Principle], kind: str) -> str:
    if len(principles) == 1:
        p = principles[0]
        return p.compare if kind == "pair" else f"Criterion: {p.rate}"
    if kind == "pair":
        lines = "\n".join(f"- {p.name}: {p.compare}" for p in principles)
        return f"Weigh all of these principles together:\n{lines}\nWhich response is better overall?"
    lines = "\n".join(f"- {p.name}: {p.rate}" for p in principles)
    return f"Criteria (weigh them together):\n{lines}"


def pair_messages(constitution: Constitution, principles: Sequence[Principle], prompt: Prompt, first: str,
                  second: str, style: str) -> list[dict[str, str]]:
    """The judge's chat for one order. style "label": answer one letter; "json": a JSON object."""
    if style == "label":
        answer = 'Answer with a single letter, "A" or "B", and nothing else.'
    else:
        answer = ('Reply with only a JSON object, the choice first: {"choice": "A" or "B", '
                  '"rationale": "<one short sentence>"}.')
    user = (f"Compare two responses of an AI assistant to the same conversation.\n\n"
            f"[Conversation]\n{prompt_text(prompt)}\n\n[Response A]\n{first}\n\n[Response B]\n{second}\n\n"
            f"{_criteria(principles, 'pair')}\n{answer}")
    return [{"role": "system", "content": constitution.system}, {"role": "user", "content": user}]


def score_messages(constitution: Constitution, principles: Sequence[Principle], prompt: Prompt, response: str,
                   style: str) -> list[dict[str, str]]:
    lo, hi = constitution.score_min, constitution.score_max
    if style == "label":
        answer = f"Answer with a single integer from {lo} (worst) to {hi} (best) and nothing else."
    else:
        answer = (f'Reply with only a JSON object, the score first: {{"score": <integer {lo} (worst) to {hi} '
                  f'(best)>, "rationale": "<one short sentence>"}}.')
    user = (f"Rate a response of an AI assistant.\n\n[Conversation]\n{prompt_text(prompt)}\n\n"
            f"[Response]\n{response}\n\n{_criteria(principles, 'point')}\n{answer}")
    return [{"role": "system", "content": constitution.system}, {"role": "user", "content": user}]
