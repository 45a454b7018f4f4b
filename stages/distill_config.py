"""The ``distill`` stage's declaration: its settings (``distill:``, with the teacher and the token-level
settings the sft stage reads) and its ``SPEC`` (pipeline/registry.py). Light on purpose (no torch): the
control plane reads it. The stage itself is ``stages/distill.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.registry import StageSpec, lazy
from pipeline.sections import DataSource, RewardSourceConfig, Section, section


class TeacherConfig(Section):
    """The ``distill`` teacher. kind: ``hf`` (a causal LM folder or hub name in ``model``), ``stage`` (a
    complete stage folder of an earlier run in ``path``, e.g. outputs/big/ppo: its model/ and tokenizer),
    ``http`` (an OpenAI-compatible endpoint at ``base_url`` serving ``model``; key from ``api_key_env``)."""

    kind: Literal["hf", "stage", "http"] = Field(
        "hf", description="hf: a causal LM (model); stage: a complete stage folder (path); http: an endpoint "
                          "(base_url).")
    model: str | None = Field(None, description="hf: folder or hub name ('base', the default for hf: this run's "
                                                "model.*); http: the served model name.")
    path: str | None = Field(None, description="stage: a stage folder (outputs/<run>/<stage>) with model/.")
    base_url: str | None = Field(None, description="http: the API base, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(None, description="http: environment variable holding the API key.")
    timeout_s: float = Field(60.0, gt=0, description="http: seconds one request may take.")
    max_retries: int = Field(4, ge=0, description="http: retries of a failed or malformed answer.")
    backoff_s: float = Field(0.5, ge=0, description="http: first retry delay (doubles per retry, jittered).")
    concurrency: int = Field(4, gt=0, description="http: requests in flight.")

    @model_validator(mode="before")
    @classmethod
    def _hf_model_defaults_to_base(cls, data: Any) -> Any:
        """An hf teacher without ``model`` is this run's base model, however much of the section is given
        (``distill.teacher.timeout_s=30`` alone keeps it)."""
        if isinstance(data, dict) and data.get("kind", "hf") == "hf" and data.get("model") is None:
            data = {**data, "model": "base"}
        return data

    @model_validator(mode="after")
    def _needs(self) -> "TeacherConfig":
        need = {"hf": "model", "stage": "path", "http": "base_url"}[self.kind]
        if not getattr(self, need):
            raise ValueError(f"distill.teacher kind {self.kind!r} needs {need}")
        return self


class TokenLevelDistillConfig(Section):
    """``distill.token_level``: logit distillation in the ``sft`` stage (stages/kd.py). The student's loss on
    each response token becomes (1 - weight) x cross-entropy + weight x the divergence between the teacher's
    and the student's next-token distributions. The teacher is ``distill.teacher`` (hf or stage: it must
    share the student's vocabulary; an http teacher gives no logits)."""

    enabled: bool = Field(False, description="Train the sft stage on the teacher's logits too.")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl: KL(teacher||student); reverse_kl: KL(student||teacher); jsd: "
                                  "generalized Jensen-Shannon with the teacher's weight beta (GKD).")
    beta: float = Field(0.5, gt=0, lt=1, description="jsd: the teacher's weight in the mixture (0 < beta < 1).")
    temperature: float = Field(1.0, gt=0, description="Both logit sets are divided by it; the divergence is "
                                                      "multiplied by its square.")
    weight: float = Field(0.5, ge=0, le=1, description="The divergence's share of the loss; 1 - weight goes to "
                                                       "the cross-entropy on the data's tokens.")


class DistillConfig(Section):
    """``distill``: sequence-level distillation. A teacher answers every prompt of ``data``; the answers
    (cached per prompt, so a re-run asks nothing twice), filtered by ``filter`` reward sources when set
    (kept: total score >= ``threshold``), become SFT data with provenance in ``distill/data.jsonl``. With
    ``distill`` and ``sft`` in one run, the sft stage trains on that file instead of ``sft.data``."""

    data: DataSource | None = Field(None, description="Prompts (a 'prompt' per record, optional 'reference').")
    teacher: TeacherConfig = section(TeacherConfig)
    max_new_tokens: int = Field(128, gt=0, description="Most tokens per answer.")
    temperature: float = Field(0.0, ge=0, description="0: greedy; else plain sampling (no top-k/top-p).")
    max_prompt_length: int = Field(256, gt=0, description="hf/stage teachers: longer prompts are skipped.")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (hf/stage) or per cache flush (http).")
    filter: list[RewardSourceConfig] = Field(
        default_factory=list, description="Reward sources / verifiers (as ppo.rewards); empty: keep every answer.")
    threshold: float = Field(0.5, description="With a filter: keep an answer whose weighted score is >= this.")
    require_eos: bool = Field(False, description="Drop answers the teacher did not finish (cut at max_new_tokens).")
    cache: bool = Field(True, description="Cache answers per prompt in distill/answers.sqlite (resume, re-run).")
    seed: int = Field(0, description="Seed of the sampling when temperature > 0 (batch b samples under seed + b).")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")
    token_level: TokenLevelDistillConfig = Field(
        default_factory=TokenLevelDistillConfig, description="Logit distillation in the sft stage (off by default).")


def check(cfg: Any) -> None:
    """distill needs prompts and runs before sft; a filter of kind 'rm' would need the rm stage, which runs after
    it. ``distill.token_level`` trains in the sft stage on a teacher's logits: sft must run, and the teacher must
    be a model this process loads (hf/stage), not an endpoint. (Same vocabulary: checked by ``validate``/``run``
    before any stage starts, ``pipeline.models.model_source_problems``.)"""
    d = cfg.distill
    if "distill" in cfg.stages:
        if d.data is None:
            raise ValueError("distill.data is not set: point it at a prompt file (a 'prompt' per record)")
        if "sft" in cfg.stages and cfg.stages.index("sft") < cfg.stages.index("distill"):
            raise ValueError(f"stages {cfg.stages}: distill must come before sft (sft trains on its answers)")
        if any(r.kind == "rm" for r in d.filter):
            raise ValueError("distill.filter has a kind 'rm' source, but distill runs before rm; filter with a "
                             "function (verifier 'module:function') or a judge")
    if not d.token_level.enabled:
        return
    if "sft" not in cfg.stages:
        raise ValueError(f"distill.token_level.enabled is true but stages {cfg.stages} do not include 'sft' "
                         "(the student learns the teacher's distribution in the sft stage); add sft or set "
                         "distill.token_level.enabled: false")
    if d.teacher.kind == "http":
        raise ValueError("distill.token_level.enabled needs the teacher's logits, but distill.teacher.kind is "
                         "'http' (an endpoint returns text, not per-token distributions); use kind hf (a model "
                         "folder or hub name) or stage (a stage folder), or set distill.token_level.enabled: "
                         "false for sequence-level distillation only")


def memory_estimate(cfg: Any, plan: Any) -> None:
    """An hf/stage teacher and its KV cache, with the teacher's own dims (a stage folder not made yet: the base
    model's); an http teacher loads nothing here."""
    d = cfg.distill
    if d.teacher.kind == "http":
        plan.note("the teacher is an HTTP endpoint: nothing is loaded on this device")
        return
    if d.teacher.kind == "stage":
        plan.use_model(str(Path(d.teacher.path) / "model"), may_be_missing=True)
    elif d.teacher.model != "base":
        plan.use_model(d.teacher.model)
    plan.frozen("teacher")
    plan.kv_cache(d.max_prompt_length + d.max_new_tokens, d.batch_size)


SPEC = StageSpec(
    name="distill", order=10, config_model=DistillConfig, run=lazy("stages.distill:run"), check=check, samples=True,
    memory_estimate=memory_estimate, headline=("kept", "finished_rate"),
)
