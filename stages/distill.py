"""The ``distill`` stage: sequence-level knowledge distillation into SFT data.

1. Every prompt of ``distill.data`` (system prompt applied) is a question for the teacher
   (``distill.teacher``):

   - ``hf``: a causal LM folder or hub name (``model: base`` is this run's base model), answering with
     the run's rollout backend (``rollout.backend``: HF ``generate`` by default, or a vLLM worker;
     ``stages.rollout_backend``) in batches of ``batch_size`` (greedy at ``temperature: 0``, else plain
     sampling; nothing from the checkpoint's ``generation_config``; batch ``b`` sampled under
     ``seed + b``), in its own tokenizer and chat template;
   - ``stage``: a complete stage folder of an earlier run (``outputs/<run>/<stage>``): its ``model/`` and
     tokenizer, as ``hf``;
   - ``http``: an OpenAI-compatible ``/v1/chat/completions`` endpoint (``pipeline serve``, vLLM, a hosted
     API; key from the environment variable ``api_key_env``) through ``stages.http_client.ChatClient``:
     ``concurrency`` requests in flight, retries with backoff on timeouts / 429 / 5xx, and an answer
     without a text (malformed) is asked again the same number of times.

2. Answers are cached per prompt (``distill/answers.sqlite``, keyed by the teacher's identity, the
   sampling settings and the prompt; the endpoint's URL is not part of the key), written as each arrives.
   A re-run, or a run after a teacher failure, asks only what the cache lacks. A teacher that stays down
   stops the stage with a message naming it, what was tried, and how many answers are kept.
3. ``distill.filter`` (reward sources as ``ppo.rewards``: ``function`` verifiers
   ``fn(prompts, responses, references)``, judges) scores the answers; an answer is kept when the
   weighted sum is >= ``threshold``. Unfinished (``require_eos``) and empty answers are dropped too.
   Every dropped answer is counted in the manifest and written to ``rejected.jsonl`` with its reason.
4. ``data.jsonl``: ``{"messages": [...prompt, {"role": "assistant", ...}], "teacher", "sampling",
   "answered_at", "finished", "score", "scores", "source"}`` per kept answer: the SFT data contract. With
   ``distill`` and ``sft`` in one run the sft stage trains on it (``sft.data`` is then unused).

Token-level (logit) distillation happens in the ``sft`` stage (``distill.token_level``; the divergences in
``stages.kd``): the same teacher, loaded by :func:`build_teacher`, scores the student's batches there.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from data.formats import DataError, load_examples
from pipeline.config import RunConfig
from pipeline.manifest import atomic_write_text
from stages.context import StageContext
from stages.distill_config import DistillConfig

OUTPUT_FILE = "data.jsonl"
REJECTED_FILE = "rejected.jsonl"
CACHE_FILE = "answers.sqlite"
logger = logging.getLogger("alignpipe.distill")


def distill_data(stage_dir: str | Path) -> Path:
    """The SFT data file a complete ``distill`` stage at ``stage_dir`` wrote."""
    return Path(stage_dir) / OUTPUT_FILE


class TeacherUnavailable(RuntimeError):
    """The teacher stayed down (or kept answering malformed output) through every retry."""


@dataclass
class Answer:
    """One teacher answer: its text, whether it finished (eos / finish_reason 'stop'), when it arrived."""

    text: str
    finished: bool
    answered_at: float


# ------------------------------------------------------------------------------------------ teachers
class HFTeacher:
    """A local causal LM answering with ``generate`` (``hf`` and ``stage`` teachers)."""

    def __init__(self, model_dir: str, tokenizer_dir: str, cfg: RunConfig, name: str, own_template: bool = True):
        import torch

        from pipeline.models import load_model, load_tokenizer

        self.name = name
        self.dcfg = cfg.distill
        # the teacher's own chat template, except for this run's base model (the run's chat.template applies)
        self.tokenizer = load_tokenizer(tokenizer_dir, cfg.model, None if own_template else cfg.chat,
                                        template_key="distill.teacher")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg, self.model_dir = cfg, model_dir
        self._model: Any = None
        self._load = lambda: load_model(model_dir, cfg.model, self.tokenizer).to(self.device).eval()

    @property
    def model(self) -> Any:
        """The teacher as an HF model in this process, loaded on first use (token-level distillation, the report,
        the hf rollout backend); a distill stage answering with ``rollout.backend: vllm`` never loads it here."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        from stages.chat import prompt_ids

        return prompt_ids(self.tokenizer, messages)

    def answer_batches(self, prompts: list[list[dict[str, str]]], done: Callable[[int, Answer], None]) -> None:
        """Answer ``prompts`` (messages, system prompt applied) batch by batch; ``done(i, answer)`` per answer.

        With the run's rollout backend (``rollout.backend``, ``stages.rollout_backend``): batch ``b`` of
        ``batch_size`` prompts is sampled under seed ``seed + b`` (hf: ``torch.manual_seed``, left padding;
        vllm: one stream per prompt); greedy at ``temperature: 0``; its log goes to the distill stage folder."""
        from stages.rollout_backend import Sampling, open_backend

        d, tok = self.dcfg, self.tokenizer
        with open_backend(self.cfg, self.model_dir, tok, lambda: self.model, self.device, d.batch_size,
                          d.max_prompt_length + d.max_new_tokens, self.cfg.stage_dir("distill")) as backend:
            for b, start in enumerate(range(0, len(prompts), d.batch_size)):
                ids = [self.prompt_ids(m) for m in prompts[start:start + d.batch_size]]
                groups = backend.generate(ids, Sampling(d.max_new_tokens, d.temperature, seed=d.seed + b))
                for j, (answer,) in enumerate(groups):
                    seq = answer.token_ids[:-1] if answer.finished else answer.token_ids
                    done(start + j, Answer(tok.decode(seq, skip_special_tokens=True).strip(), answer.finished,
                                           time.time()))

    def close(self) -> None:
        self._model = None


class HTTPTeacher:
    """An OpenAI-compatible endpoint (``stages.http_client.ChatClient``), ``concurrency`` requests at once."""

    def __init__(self, cfg: RunConfig):
        from stages.http_client import ChatClient

        t = cfg.distill.teacher
        self.dcfg = cfg.distill
        self.stats = {"requests": 0, "retries": 0, "malformed": 0}
        self._lock = threading.Lock()
        self.client = ChatClient(t.base_url, "distill teacher", api_key_env=t.api_key_env, timeout_s=t.timeout_s,
                                 max_retries=t.max_retries, backoff_s=t.backoff_s, count=self._count, logger=logger)
        self.name = f"{t.model or 'default model'} at {self.client.base_url}"

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _ask(self, messages: list[dict[str, str]]) -> Answer:
        from stages.http_client import EndpointUnavailable

        d, t = self.dcfg, self.dcfg.teacher
        body: dict[str, Any] = {"messages": messages, "max_tokens": d.max_new_tokens, "temperature": d.temperature}
        if t.model:
            body["model"] = t.model
        problem = ""
        for attempt in range(t.max_retries + 1):
            data = self.client.post(body)
            try:
                choice = data["choices"][0]
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
                return Answer(text.strip(), choice.get("finish_reason") in ("stop", "eos", None), time.time())
            except (KeyError, IndexError, TypeError) as exc:
                self._count("malformed")
                problem = f"malformed answer ({type(exc).__name__}: {exc}): {json.dumps(data)[:200]}"
                logger.warning("distill teacher: %s on attempt %d of %d", problem, attempt + 1, t.max_retries + 1)
                if attempt < t.max_retries:
                    self.client.stop.wait(min(30.0, t.backoff_s * 2 ** attempt))
        raise EndpointUnavailable(f"distill teacher: {self.client.url} answered malformed output "
                                  f"{t.max_retries + 1} times (last: {problem})", self.client.url, t.max_retries + 1)

    def answer_batches(self, prompts: list[list[dict[str, str]]], done: Callable[[int, Answer], None]) -> None:
        """Ask every prompt (``concurrency`` at once); ``done(i, answer)`` as each arrives. The first failure
        stops the others before their next attempt and is raised (as EndpointUnavailable/EndpointRefused)."""
        if not prompts:
            return
        lock = threading.Lock()

        def work(i: int) -> None:
            answer = self._ask(prompts[i])
            with lock:
                done(i, answer)

        self.client.stop.clear()
        with ThreadPoolExecutor(max_workers=min(self.dcfg.teacher.concurrency, len(prompts)),
                                thread_name_prefix="distill-teacher") as pool:
            futures = [pool.submit(work, i) for i in range(len(prompts))]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            error = next((f.exception() for f in futures if f.done() and f.exception() is not None), None)
            if error is not None:
                self.client.stop.set()
                for future in pending:
                    future.cancel()
        if error is not None:
            raise error

    def close(self) -> None:
        self.client.close()


def build_teacher(cfg: RunConfig) -> tuple[Any, dict[str, Any]]:
    """-> (the teacher, its identity: what the cache key and the provenance record name)."""
    from pipeline.manifest import read_manifest
    from pipeline.models import prepare_base

    t = cfg.distill.teacher
    if t.kind == "http":
        teacher = HTTPTeacher(cfg)
        return teacher, {"kind": "http", "model": t.model, "base_url": teacher.client.base_url}
    if t.kind == "stage":
        folder = Path(t.path)
        manifest = read_manifest(folder)
        if manifest is None or manifest.get("status") != "complete" or not (folder / "model").is_dir():
            raise DataError(f"distill.teacher.path={t.path}: not a complete stage folder with model/ "
                            f"(status: {(manifest or {}).get('status', 'no manifest')}); run that stage first")
        return HFTeacher(str(folder / "model"), str(folder), cfg, f"stage {folder}"), \
            {"kind": "stage", "path": str(folder.resolve()), "stage": manifest.get("stage"),
             "config_hash": manifest.get("config_hash")}
    location = prepare_base(cfg.model) if t.model == "base" else t.model
    return HFTeacher(location, location, cfg, f"model {location}", own_template=t.model != "base"), \
        {"kind": "hf", "model": str(location)}


# ------------------------------------------------------------------------------------------ the stage
def _cache_key(identity: dict[str, Any], sampling: dict[str, Any], messages: list[dict[str, str]]) -> str:
    from stages.rlaif.judges.cache import JudgmentCache

    key_identity = {k: v for k, v in identity.items() if k != "base_url"}  # a moved endpoint keeps its answers
    return JudgmentCache.key({"distill_teacher": key_identity, "sampling": sampling, "messages": messages})


def _filter_scores(d: DistillConfig, cfg: RunConfig, messages: list[list[dict[str, str]]], answers: list[Answer],
                   references: list[Any]) -> tuple[list[float], list[dict[str, float]], list[str]]:
    """-> (weighted score, score per source, source names) per answer, by ``distill.filter``."""
    import torch

    from stages.ppo.rewards import Responses, RewardSources

    sources = RewardSources(d.filter, cfg, None, None, 0, torch.device("cpu"), batch_size=d.batch_size)
    batch = Responses(messages=messages, prompt_ids=[[] for _ in answers], response_ids=[[] for _ in answers],
                      has_eos=[a.finished for a in answers], texts=[a.text for a in answers], references=references)
    scores = sources.score(batch)
    parts = [{name: float(values[i]) for name, values in scores.parts.items()} for i in range(len(answers))]
    return [float(x) for x in scores.total], parts, sources.names


def _sampling(cfg: RunConfig) -> dict[str, Any]:
    """The sampling settings an answer was made with (part of its cache key and provenance)."""
    d = cfg.distill
    sampling = {"max_new_tokens": d.max_new_tokens, "temperature": d.temperature,
                "seed": d.seed if d.temperature > 0 else None}
    if d.temperature > 0 and cfg.rollout.backend != "hf" and d.teacher.kind != "http":
        sampling["rollout_backend"] = cfg.rollout.backend  # other random streams: other cached answers
    return sampling


@dataclass
class Collected:
    """The teacher's answers by prompt index (``_collect``): which came from the cache, the counts so far, the
    seconds spent asking and the teacher's request counters."""

    answers: dict[int, Answer]
    from_cache: set[int]
    counts: dict[str, int]
    seconds: float
    teacher_stats: dict[str, int]


def _collect(ctx: StageContext, teacher: Any, identity: dict[str, Any], sampling: dict[str, Any],
             messages: list[list[dict[str, str]]]) -> Collected:
    """Every prompt's answer: from the cache (``distill.cache``) where it has one, else asked (and cached as it
    arrives). A teacher that stays down raises TeacherUnavailable, saying how many answers are kept."""
    from stages.http_client import EndpointError, EndpointUnavailable
    from stages.rlaif.judges.cache import JudgmentCache

    d = ctx.settings
    too_long: set[int] = set()
    if isinstance(teacher, HFTeacher):
        too_long = {i for i, m in enumerate(messages) if len(teacher.prompt_ids(m)) > d.max_prompt_length}
    cache = JudgmentCache(ctx.dir / CACHE_FILE) if d.cache else None
    keys = [_cache_key(identity, sampling, m) for m in messages]
    answers: dict[int, Answer] = {}
    for i, key in enumerate(keys):
        hit = cache.get(key) if cache is not None and i not in too_long else None
        if hit is not None:
            answers[i] = Answer(hit["text"], hit["finished"], hit["answered_at"])
    from_cache = set(answers)
    todo = [i for i in range(len(messages)) if i not in answers and i not in too_long]

    def done(j: int, answer: Answer) -> None:
        answers[todo[j]] = answer
        if cache is not None:
            cache.put(keys[todo[j]], {"text": answer.text, "finished": answer.finished,
                                      "answered_at": answer.answered_at, "teacher": identity, "sampling": sampling})

    counts = {"prompts": len(messages), "prompts_too_long": len(too_long), "from_cache": len(from_cache),
              "asked": len(todo)}
    ctx.say(f"teacher {teacher.name}: {len(from_cache)} answers from the cache, asking {len(todo)}")
    started = time.perf_counter()
    try:
        teacher.answer_batches([messages[i] for i in todo], done)
    except EndpointError as exc:
        answered = len(answers) - len(from_cache)
        counts.update(answered=answered, failed=len(todo) - answered,
                      **{f"teacher_{k}": v for k, v in getattr(teacher, "stats", {}).items()})
        ctx.run.update(counts=counts, teacher=identity)
        kept = (f"the {len(answers)} answers received so far ({len(from_cache)} from earlier runs) are kept "
                f"in {cache.path}; re-run to resume from them" if cache is not None
                else f"{answered} answers were received but distill.cache is off, so they are lost")
        what = "stayed unavailable" if isinstance(exc, EndpointUnavailable) else "refused a request"
        raise TeacherUnavailable(f"distill: the teacher {what}: {exc}; {kept}") from None
    finally:
        teacher.close()
        if cache is not None:
            cache.close()
    stats = {f"teacher_{k}": v for k, v in getattr(teacher, "stats", {}).items()}
    return Collected(answers, from_cache, counts, time.perf_counter() - started, stats)


def _sorted(cfg: RunConfig, examples: list[Any], messages: list[list[dict[str, str]]], got: Collected,
            identity: dict[str, Any], sampling: dict[str, Any]) -> tuple[list, list, dict[str, int], list, list[str]]:
    """Each answer as an SFT record with its provenance, kept or rejected (empty, unfinished with
    ``require_eos``, or below ``threshold`` by the ``filter`` sources) -> (kept records, rejected records,
    counts by reason, the filter's score per answer (None without a filter), the filter's source names)."""
    d, order = cfg.distill, sorted(got.answers)
    scores: list[float | None] = [None] * len(order)
    parts: list[dict[str, float]] = [{} for _ in order]
    names: list[str] = []
    if d.filter:
        scored, parts, names = _filter_scores(d, cfg, [messages[i] for i in order], [got.answers[i] for i in order],
                                              [examples[i].reference for i in order])
        scores = list(scored)
    records, rejected = [], []
    reasons = {"empty": 0, "unfinished": 0, "filtered_out": 0}
    for k, i in enumerate(order):
        a = got.answers[i]
        reason = ("empty" if not a.text else "unfinished" if d.require_eos and not a.finished
                  else "filtered_out" if scores[k] is not None and scores[k] < d.threshold else None)
        row = {"messages": [*examples[i].prompt, {"role": "assistant", "content": a.text}],
               "teacher": identity, "sampling": sampling,
               "answered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.answered_at)),
               "finished": a.finished, "from_cache": i in got.from_cache, "score": scores[k], "scores": parts[k],
               "source": examples[i].where}
        if reason is None:
            records.append(row)
        else:
            reasons[reason] += 1
            rejected.append({**row, "rejected": reason})
    return records, rejected, reasons, scores, names


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def run(cfg: RunConfig) -> dict[str, Any]:
    """The ``distill`` stage: 1. the teacher answers every prompt (cached), 2. the answers are filtered, 3. the
    kept ones are written as SFT data, the others to rejected.jsonl with their reason (see the module doc)."""
    from stages.chat import with_system
    from stages.http_client import EndpointError

    d = cfg.distill
    if d.data is None:
        raise DataError("distill.data is not set: point it at a prompt file (a 'prompt' per record)")
    with StageContext(cfg, "distill", distributed=False, num_threads=d.num_threads) as ctx:
        examples, report = load_examples(d.data, "prompt")
        messages = [with_system(ex.prompt, cfg.chat.system_prompt) for ex in examples]
        try:
            teacher, identity = build_teacher(cfg)
        except EndpointError as exc:
            raise DataError(str(exc)) from None
        sampling = _sampling(cfg)
        got = _collect(ctx, teacher, identity, sampling, messages)
        records, rejected, reasons, scores, names = _sorted(cfg, examples, messages, got, identity, sampling)
        atomic_write_text(ctx.dir / REJECTED_FILE, _jsonl(rejected))
        n = len(got.answers)
        if not records:
            raise DataError(f"distill: no answer kept of {n} ({reasons}); see {ctx.dir / REJECTED_FILE}: "
                            "lower distill.threshold, raise max_new_tokens or set require_eos: false")
        path = distill_data(ctx.dir)
        atomic_write_text(path, _jsonl(records))
        counts = {**got.counts, "answered": n - len(got.from_cache), "failed": 0, "kept": len(records), **reasons}
        metrics = {"kept": len(records), **counts, **got.teacher_stats,
                   "finished_rate": sum(a.finished for a in got.answers.values()) / n, "answer_s": got.seconds}
        if d.filter:
            metrics["score_mean_all"] = sum(s for s in scores if s is not None) / n
        ctx.run.log(0, metrics)
        ctx.say(f"kept {len(records)} of {n} answers ({counts['from_cache']} from the cache, {counts['answered']} "
                f"asked; {reasons['filtered_out']} filtered out, {reasons['unfinished']} unfinished, "
                f"{reasons['empty']} empty) -> {path}")
        return ctx.finish(metrics, data=report.as_dict(), output=str(path), counts=counts, teacher=identity,
                          sampling=sampling, filter_sources=names)
