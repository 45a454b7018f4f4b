"""Side by side: DPO, KTO, ORPO and SimPO in the ``dpo`` stage on the same preference pairs (not a test).

Every objective trains the same starting policy (the tiny random Llama of ``configs/tiny.yaml``, or
``--model demo``: SmolLM2-135M-Instruct as ``configs/demo.yaml`` builds it) on the same training pairs
(``data/demo/house_format/preferences.jsonl``, a quarter of its prompts held out), for the same steps, seed,
learning rate and schedule, full fine-tuning in fp32 on one thread. KTO trains on the same pairs unpaired
(chosen -> desirable, rejected -> undesirable) with twice the rows per micro-batch, so every step of every
objective has the gradient of the same 16 response sequences (8 pairs). Each objective keeps its own
defaults: DPO and KTO beta 0.1, SimPO beta 2.0 and gamma 0.5, ORPO lambda 0.1.

Reported, on the held-out pairs (prompts no objective trained on), each with a 95% Wilson interval:
- ``own``: the objective's own implicit reward ranks chosen above rejected (``eval_accuracy``: DPO and KTO
  beta (logp - ref_logp), SimPO beta x per-token mean log-prob, ORPO its log odds);
- ``policy``: the trained policy's per-token mean log-prob of chosen above rejected, the same criterion for
  all four (and for the starting policy: what training moved).
Speed, as ratios to DPO only (the machine is shared; absolute times mean little): ``loop``, pairs/s of the
training loop (``Engine.fit`` minus its evaluations; KTO: rows/s / 2), and ``stage``, the whole stage's wall
time (data, the reference pass for DPO and KTO, training, evaluations, saving). The runs are interleaved in
one process: a warm-up run first (discarded), then ``--repeats`` rounds, each running every objective, in an
order rotated from round to round; medians over the rounds.

Usage (from the repository root)::

    .venv/bin/python bench/preference_objectives.py [--steps 60] [--repeats 3] [--model tiny|demo]

Prints JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = "data/demo/house_format/preferences.jsonl"
PAIRS_PER_STEP = 8
MAX_LENGTH = 128
LR = 1e-3
EVAL_FRACTION = 0.25
#: each objective's settings beside the shared ones; KTO counts rows, two per pair
OBJECTIVES = {
    "dpo": ["dpo.loss=sigmoid", "dpo.beta=0.1"],
    "kto": ["dpo.loss=kto", "dpo.beta=0.1", f"dpo.train.per_device_batch_size={2 * PAIRS_PER_STEP}"],
    "orpo": ["dpo.loss=orpo", "dpo.beta=null"],
    "simpo": ["dpo.loss=simpo", "dpo.beta=null"],
}
REFERENCE = {"dpo": "yes", "kto": "yes", "orpo": "no", "simpo": "no"}


def _config(out: Path, model: str, name: str, steps: int, extra: list[str]) -> Any:
    from pipeline.config import load_config

    base = "tiny.yaml" if model == "tiny" else "demo.yaml"
    return load_config(REPO / "configs" / base, [
        f"output_root={out}", f"run_name={name}", "logging.progress_bar=false", "stages=[dpo]",
        "dpo.init_from=base", f"dpo.data={{path: {DATA}}}", f"dpo.eval_fraction={EVAL_FRACTION}",
        f"dpo.max_length={MAX_LENGTH}", f"dpo.train.max_steps={steps}",
        f"dpo.train.per_device_batch_size={PAIRS_PER_STEP}", "dpo.train.gradient_accumulation_steps=1",
        f"dpo.train.learning_rate={LR}", "dpo.train.warmup_ratio=0.1", "dpo.train.lr_scheduler=cosine",
        "dpo.train.save_steps=1000000", "dpo.train.logging_steps=10", "dpo.train.num_threads=1",
        "dpo.train.precision=fp32", "dpo.train.seed=0", "dpo.tuning.method=full", *extra,
    ])


# ------------------------------------------------------------------------------------------- timing
class Timing:
    """Seconds in ``Engine.fit`` and in its evaluations, for the run in progress (the stage's ``Engine`` is
    replaced by a subclass that measures them)."""

    def __init__(self) -> None:
        import stages.dpo.trainer as dpo_stage

        self.fit_s = self.eval_s = 0.0
        timing = self

        class TimedEngine(dpo_stage.Engine):
            def fit(self):  # type: ignore[override]
                start = time.perf_counter()
                result = super().fit()
                timing.fit_s += time.perf_counter() - start
                return result

            def _evaluate(self, watch: bool = False):  # type: ignore[override]
                start = time.perf_counter()
                out = super()._evaluate(watch)
                timing.eval_s += time.perf_counter() - start
                return out

        dpo_stage.Engine = TimedEngine

    def reset(self) -> None:
        self.fit_s = self.eval_s = 0.0


# ---------------------------------------------------------------------------------------- accuracy
def held_out_pairs(cfg: Any) -> tuple[Any, list[Any]]:
    """The tokenizer and the held-out pairs, encoded (the split every objective holds out: by prompt, same seed)."""
    from pipeline.models import load_tokenizer, prepare_base
    from stages.preferences import encode_pairs, load_preference_split

    base = prepare_base(cfg.model)
    tokenizer = load_tokenizer(base, cfg.model, cfg.chat)
    _, held, _ = load_preference_split(cfg.dpo, cfg.seed, None, "dpo")
    encoded, _ = encode_pairs(tokenizer, held, cfg.dpo.max_length, cfg.chat.system_prompt)
    return tokenizer, encoded


def policy_preferences(model_dir: str, cfg: Any, tokenizer: Any, pairs: list[Any]) -> list[bool]:
    """Per pair: whether the model at ``model_dir`` gives its chosen response the higher per-token mean log-prob."""
    import torch

    from pipeline.models import load_model
    from stages.dpo.layout import DPORow, dpo_collate, policy_logps

    model = load_model(model_dir, cfg.model, tokenizer).eval()
    collate = dpo_collate(tokenizer.pad_token_id)
    prefers: list[bool] = []
    with torch.no_grad():
        for i in range(0, len(pairs), 16):
            batch = collate([DPORow(p, i) for p in pairs[i:i + 16]])
            mean = policy_logps(model, batch, mean=True)
            n = batch["ref_chosen"].shape[0]
            prefers += (mean[:n] > mean[n:]).tolist()
    return prefers


def by_kind(prefers: list[bool], pairs: list[Any]) -> dict[str, dict[str, float]]:
    """``with_interval`` of ``prefers`` within each ``kind`` of pair (the data's column)."""
    kinds = sorted({p.kind or "-" for p in pairs})
    return {kind: with_interval(sum(w for w, p in zip(prefers, pairs) if (p.kind or "-") == kind),
                                sum(1 for p in pairs if (p.kind or "-") == kind)) for kind in kinds}


def with_interval(wins: int, n: int) -> dict[str, float]:
    from pipeline.evaluation.stats import wilson_interval

    low, high = wilson_interval(wins / n, n)
    return {"rate": wins / n, "wins": wins, "n": n, "low": low, "high": high}


# -------------------------------------------------------------------------------------------- runs
def run_objective(name: str, out: Path, model: str, steps: int, timing: Timing, tag: str) -> dict[str, Any]:
    import stages.dpo.trainer as dpo_stage

    cfg = _config(out, model, f"{name}-{tag}", steps, OBJECTIVES[name])
    timing.reset()
    start = time.perf_counter()
    metrics = dpo_stage.run(cfg)
    stage_s = time.perf_counter() - start
    loop_s = timing.fit_s - timing.eval_s
    pairs = metrics["steps"] * PAIRS_PER_STEP  # KTO: 2 x PAIRS_PER_STEP rows a step, PAIRS_PER_STEP pairs' worth
    return {"objective": name, "stage_s": stage_s, "loop_s": loop_s, "pairs_per_s": pairs / loop_s,
            "eval_accuracy": metrics["eval_accuracy"], "eval_pairs": metrics["eval_pairs"],
            "model_dir": str(cfg.stage_dir("dpo") / "model")}


def compare(steps: int, repeats: int, model: str) -> dict[str, Any]:
    names = list(OBJECTIVES)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    timing = Timing()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run_objective("dpo", out, model, min(steps, 5), timing, "warmup")  # imports, first forwards: discarded
        for round_ in range(repeats):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                r = run_objective(name, out, model, steps, timing, f"r{round_}")
                runs[name].append(r)
                print(f"[bench objectives] round {round_ + 1}/{repeats} {name}: loop {r['pairs_per_s']:.1f} pairs/s, "
                      f"stage {r['stage_s']:.1f} s, own held-out accuracy {r['eval_accuracy']:.3f} "
                      f"({r['eval_pairs']} pairs)", flush=True)
        cfg = _config(out, model, "split", steps, [])
        tokenizer, held = held_out_pairs(cfg)
        start = policy_preferences(_base_dir(cfg), cfg, tokenizer, held)
        summary: dict[str, Any] = {"start": with_interval(sum(start), len(start)),
                                   "start_by_kind": by_kind(start, held)}
        for name in names:
            first = runs[name][0]
            accuracies = {round(r["eval_accuracy"], 6) for r in runs[name]}
            prefers = policy_preferences(first["model_dir"], cfg, tokenizer, held)
            summary[name] = {
                "reference": REFERENCE[name],
                "own": with_interval(round(first["eval_accuracy"] * first["eval_pairs"]), first["eval_pairs"]),
                "own_same_every_round": len(accuracies) == 1,
                "policy": with_interval(sum(prefers), len(prefers)),
                "policy_by_kind": by_kind(prefers, held),
                "pairs_per_s": statistics.median(r["pairs_per_s"] for r in runs[name]),
                "stage_s": statistics.median(r["stage_s"] for r in runs[name]),
            }
    for name in names:
        summary[name]["loop_ratio"] = summary[name]["pairs_per_s"] / summary["dpo"]["pairs_per_s"]
        summary[name]["stage_ratio"] = summary[name]["stage_s"] / summary["dpo"]["stage_s"]
    summary["settings"] = {"model": model, "data": DATA, "eval_fraction": EVAL_FRACTION, "steps": steps,
                           "pairs_per_step": PAIRS_PER_STEP, "lr": LR, "max_length": MAX_LENGTH, "repeats": repeats,
                           "threads": 1, "precision": "fp32", "tuning": "full", "init_from": "base"}
    return summary


def _base_dir(cfg: Any) -> str:
    from pipeline.models import prepare_base

    return prepare_base(cfg.model)


def markdown(s: dict[str, Any]) -> str:
    def acc(a: dict[str, float]) -> str:
        return f"{a['rate']:.3f} ({a['wins']}/{a['n']}; {a['low']:.3f} to {a['high']:.3f})"

    lines = ["| objective | reference model | held-out accuracy, own implicit reward (95% CI) | held-out accuracy, "
             "policy per-token mean log-prob (95% CI) | loop pairs/s vs DPO | stage time vs DPO |",
             "|---|---|---|---|---|---|",
             f"| starting policy | | | {acc(s['start'])} | | |"]
    for name in OBJECTIVES:
        r = s[name]
        lines.append(f"| {name} | {r['reference']} | {acc(r['own'])} | {acc(r['policy'])} | {r['loop_ratio']:.2f}x | "
                     f"{r['stage_ratio']:.2f}x |")
    kinds = list(s["start_by_kind"])
    lines += ["", "| policy per-token mean log-prob accuracy, by kind of pair | "
              + " | ".join(f"{k} (n={s['start_by_kind'][k]['n']})" for k in kinds) + " |",
              "|---" * (len(kinds) + 1) + "|",
              "| starting policy | " + " | ".join(f"{s['start_by_kind'][k]['rate']:.2f}" for k in kinds) + " |"]
    for name in OBJECTIVES:
        lines.append(f"| {name} | " + " | ".join(f"{s[name]['policy_by_kind'][k]['rate']:.2f}" for k in kinds) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=["tiny", "demo"], default="tiny")
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                      TRANSFORMERS_VERBOSITY="error", DS_ACCELERATOR="cpu")
    summary = compare(args.steps, args.repeats, args.model)
    print(json.dumps(summary, indent=2))
    print(markdown(summary))


if __name__ == "__main__":
    main()
