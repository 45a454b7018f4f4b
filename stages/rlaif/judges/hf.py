"""``HFJudge``: a local causal LM as judge. The choice is read from the next-token probabilities of the
answer labels ("A"/"B") and the score is the expected value over the score labels ("1".."10"); labels
that tokenise into several tokens ("10", " A") are scored exactly by the chain rule. Free text is never
parsed."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from .cache import JudgmentCache
from .constitution import Constitution, pair_messages, score_messages
from .interface import LABELS, JudgeError, RawPair, RawScore
from .judge import Judge, _Job


def _weights_fingerprint(model_dir: Path) -> str:
    """A content fingerprint of a model folder: config, tokenizer files and (sampled) weights."""
    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        path = model_dir / name
        if path.exists():
            digest.update(name.encode() + path.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            if size <= 16 << 20:
                digest.update(fh.read())
            else:  # sample the head (header + first tensors) and the tail
                digest.update(fh.read(4 << 20))
                fh.seek(size - (4 << 20))
                digest.update(fh.read())
    return digest.hexdigest()[:24]


class LabelScorer:
    """Exact probabilities of short label strings as the model's next output, by the chain rule.

    Each label is considered with and without a leading space; each variant is a token sequence, and
    P(variant) = prod_j P(t_j | prompt, t_<j) x P(the sequence ends there), where "ends there" removes
    the mass of continuing into a longer label (so "1" does not also count "10").
    """

    def __init__(self, tokenizer: Any, labels: Sequence[str]):
        self.labels = list(labels)
        self.seqs: dict[tuple[int, ...], int] = {}
        for index, label in enumerate(self.labels):
            for variant in (label, " " + label):
                ids = tuple(tokenizer.encode(variant, add_special_tokens=False))
                if ids and ids not in self.seqs:
                    self.seqs[ids] = index
        if not self.seqs:
            raise JudgeError(f"the judge's tokenizer cannot encode the labels {labels}")
        self.prefixes = sorted({seq[:j] for seq in self.seqs for j in range(len(seq))}, key=len)
        # which next tokens matter after each prefix
        self.next_tokens = {p: sorted({s[len(p)] for s in self.seqs if len(s) > len(p) and s[:len(p)] == p})
                            for p in self.prefixes}
        # the longest prefixes: one forward pass over prompt + chain gives the distributions after every
        # prefix of the chain (causal attention), so only these need their own sequences
        self.chains = [p for p in self.prefixes
                       if not any(len(q) > len(p) and q[:len(p)] == p for q in self.prefixes)]

    def probabilities(self, next_logprobs: dict[tuple[int, ...], dict[int, float]]) -> tuple[list[float], float]:
        """From {prefix: {token: logprob}}, the label distribution (normalised) and its raw mass."""
        mass = [0.0] * len(self.labels)
        for seq, index in self.seqs.items():
            logp = sum(next_logprobs[seq[:j]][seq[j]] for j in range(len(seq)))
            p = math.exp(logp)
            if seq in next_logprobs:  # a longer label continues this one: keep only "stops here"
                p *= max(0.0, 1.0 - sum(math.exp(v) for v in next_logprobs[seq].values()))
            mass[index] += p
        total = sum(mass)
        if total <= 0 or not math.isfinite(total):
            return [1.0 / len(mass)] * len(mass), 0.0
        return [m / total for m in mass], total


class HFJudge(Judge):
    """A local causal LM as judge: label probabilities, never parsed text (see ``LabelScorer``)."""

    kind = "hf"

    def __init__(self, model_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                 constitution: Constitution | None = None, cache: JudgmentCache | None = None,
                 name: str = "hf", swap: bool = True, batch_size: int = 8, device: str | None = None,
                 dtype: str = "auto", trust_remote_code: bool = False):
        super().__init__(constitution, cache, name, swap)
        import torch

        from pipeline.config import ModelConfig
        from pipeline.models import load_model, load_tokenizer

        self.model_path = str(model_path)
        tokenizer_path = str(tokenizer_path or model_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
        mcfg = ModelConfig(source="local", path=self.model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.tokenizer = load_tokenizer(tokenizer_path, mcfg)
        adapter_stage = (Path(self.model_path) / "adapter" / "adapter_config.json").exists() and not (
            Path(self.model_path) / "config.json").exists()
        if adapter_stage:
            from stages.tuning import load_trained  # a PEFT stage folder: its base with the adapter on top

            self.model = load_trained(Path(self.model_path), mcfg, self.tokenizer).to(self.device).eval()
        else:
            self.model = load_model(self.model_path, mcfg, self.tokenizer).to(self.device).eval()
        self.batch_size = batch_size
        self._lock = threading.Lock()
        c = self.constitution
        self.pair_scorer = LabelScorer(self.tokenizer, LABELS)
        self.score_values = list(range(c.score_min, c.score_max + 1))
        self.score_scorer = LabelScorer(self.tokenizer, [str(v) for v in self.score_values])
        folder = Path(self.model_path)
        self._fingerprint = _weights_fingerprint(folder) if folder.is_dir() else self.model_path
        if adapter_stage:  # the adapter's weights and its base's make the judge's identity (cache keys)
            manifest = json.loads((folder / "manifest.json").read_text())
            base = str((manifest.get("metrics") or {}).get("base_model") or manifest.get("base_model") or "")
            base_print = _weights_fingerprint(Path(base)) if base and Path(base).is_dir() else base
            self._fingerprint = hashlib.sha256((self._fingerprint + _weights_fingerprint(folder / "adapter")
                                                + base_print).encode()).hexdigest()
        self._template_hash = hashlib.sha256((self.tokenizer.chat_template or "").encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        return {"kind": "hf", "weights": self._fingerprint, "chat_template": self._template_hash}

    def _prompt_ids(self, job: _Job) -> list[int]:
        c = self.constitution
        if job.kind == "pair":
            messages = pair_messages(c, job.principles, job.prompt, job.responses[0], job.responses[1], "label")
        else:
            messages = score_messages(c, job.principles, job.prompt, job.responses[0], "label")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def _tail_logprobs(self, sequences: list[list[int]], tails: list[int]) -> list[Any]:
        """For each sequence, log-softmax of the next token at its last ``tail + 1`` positions
        (a ``(tail + 1, vocab)`` tensor, oldest first); left-padded batches of ``batch_size``."""
        import torch

        from stages.batching import left_pad
        from stages.chat import position_ids_from_mask

        pad = self.tokenizer.pad_token_id
        out = []
        for start in range(0, len(sequences), self.batch_size):
            ids, mask = left_pad(sequences[start:start + self.batch_size], pad)
            position_ids = position_ids_from_mask(mask)
            longest = max(tails[start:start + self.batch_size]) + 1
            inputs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          position_ids=position_ids.to(self.device))
            with torch.no_grad():
                try:  # only the last positions' logits: saves a (batch, width, vocab) tensor
                    logits = self.model(**inputs, logits_to_keep=longest).logits
                except TypeError:  # an architecture without logits_to_keep
                    logits = self.model(**inputs).logits[:, -longest:, :]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, tail in enumerate(tails[start:start + self.batch_size]):
                out.append(logprobs[row, longest - tail - 1:])
        return out

    def _answer(self, job: _Job) -> RawPair | RawScore:
        result: list[RawPair | RawScore] = []
        self._answer_many([job], lambda _job, raw: result.append(raw))
        return result[0]

    def _answer_many(self, jobs: list[_Job], done: Callable[[_Job, RawPair | RawScore], None]) -> None:
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            prompts = [self._prompt_ids(job) for job in chunk]
            requests: list[tuple[int, tuple[int, ...]]] = []
            for i, job in enumerate(chunk):
                scorer = self.pair_scorer if job.kind == "pair" else self.score_scorer
                requests.extend((i, chain) for chain in scorer.chains)
            with self._lock:
                dists = self._tail_logprobs([prompts[i] + list(chain) for i, chain in requests],
                                            [len(chain) for _, chain in requests])
            self.stats.add("requests", len(chunk))
            per_job: list[dict[tuple[int, ...], dict[int, float]]] = [{} for _ in chunk]
            for (i, chain), rows in zip(requests, dists):
                scorer = self.pair_scorer if chunk[i].kind == "pair" else self.score_scorer
                for j in range(len(chain) + 1):
                    prefix = chain[:j]
                    per_job[i][prefix] = {t: float(rows[j][t]) for t in scorer.next_tokens[prefix]}
            for job, logprobs in zip(chunk, per_job):
                if job.kind == "pair":
                    probs, mass = self.pair_scorer.probabilities(logprobs)
                    raw = json.dumps({"A": probs[0], "B": probs[1], "label_mass": mass})
                    done(job, RawPair(probs[0], None, raw, "probs") if mass > 0
                         else RawPair(None, None, raw, "probs", "no probability on the labels"))
                else:
                    probs, mass = self.score_scorer.probabilities(logprobs)
                    expected = sum(p * v for p, v in zip(probs, self.score_values))
                    raw = json.dumps({"expected": expected, "label_mass": mass,
                                      "probs": {str(v): p for v, p in zip(self.score_values, probs)}})
                    done(job, RawScore(expected, raw, "probs") if mass > 0
                         else RawScore(None, raw, "probs", "no probability on the score labels"))
