"""Benchmark of the DPO stage against TRL's ``DPOTrainer`` at equal settings (not a test).

Both sides train the tiny random Llama of ``configs/tiny.yaml`` from the same base weights (same seed) on
the same training pairs (``data/demo/preferences.jsonl`` minus the held-out pairs, split by prompt), with
8 pairs per step, no accumulation, fp32, lr 1e-3 cosine with 10% warm-up, max_length 128, beta 0.1,
sigmoid loss, full fine-tuning, no gradient checkpointing, 1 torch thread. The reference is the starting
policy and neither side keeps a copy of it: alignpipe computes reference log-probs for the pairs the run's
steps train on (with full fine-tuning before the first step, with a PEFT method per micro-batch), TRL
(``precompute_ref_log_probs=True``) for the whole training set before training (``--trl-live-ref`` gives
TRL a live reference model instead).

Runs are interleaved A B A B, each in its own fresh process (peak RSS is per process):
- the comparison: the stage's whole wall time, from reading the data to the trained model and its held-out
  evaluation (alignpipe: ``stages.dpo.trainer.run``, model saving included; TRL: data, tokenisation, the
  reference precompute, ``trainer.train()`` and ``trainer.evaluate()``). What a user waits for.
- beside it, the training loop alone: pairs/s = optimizer steps x 8 / seconds of the loop (alignpipe:
  ``Engine.fit`` minus its evaluations; TRL: ``trainer.train()``), and the seconds spent on reference
  log-probs (alignpipe). A loop ratio alone hides the reference pass, which can cost more than the loop.
- memory = peak resident set size of the process (``ru_maxrss``), and its increment over the training
  loop (peak at the end minus peak just before the loop).
- held-out preference accuracy (implicit reward chosen > rejected) on the same held-out pairs, each side
  in its own layout.

Usage (from the repository root)::

    .venv/bin/python bench/dpo.py [--steps 60] [--repeats 3] [--trl-live-ref]

Prints JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BATCH = 8
MAX_LENGTH = 128
LR = 1e-3
BETA = 0.1


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), TRANSFORMERS_VERBOSITY="error",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", DS_ACCELERATOR="cpu")
    return env


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tiny_cfg(out: Path, steps: int) -> Any:
    from pipeline.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [
        f"output_root={out}", "logging.progress_bar=false", "stages=[dpo]", "dpo.init_from=base",
        f"dpo.max_length={MAX_LENGTH}", f"dpo.beta={BETA}", "dpo.loss=sigmoid", f"dpo.train.max_steps={steps}",
        f"dpo.train.per_device_batch_size={BATCH}", f"dpo.train.learning_rate={LR}", "dpo.train.warmup_ratio=0.1",
        "dpo.train.lr_scheduler=cosine", "dpo.train.save_steps=1000000", "dpo.train.logging_steps=10",
        "dpo.train.num_threads=1", "dpo.train.precision=fp32", "dpo.train.gradient_accumulation_steps=1",
    ])


# ---------------------------------------------------------------------------------------- workers
def worker_alignpipe(steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    import stages.dpo.trainer as dpo_mod
    from stages.engine import Engine

    timing = {"fit_s": 0.0, "eval_s": 0.0, "rss_before": 0.0, "ref_s": 0.0}

    class TimedEngine(Engine):
        def fit(self):  # type: ignore[override]
            timing["rss_before"] = peak_rss_mib()
            start = time.perf_counter()
            result = super().fit()
            timing["fit_s"] = time.perf_counter() - start
            return result

        def _evaluate(self, watch: bool = False):  # type: ignore[override]
            start = time.perf_counter()
            out = super()._evaluate(watch)
            timing["eval_s"] += time.perf_counter() - start
            return out

    real_reference = dpo_mod.compute_reference

    def timed_reference(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        real_reference(*args, **kwargs)
        timing["ref_s"] += time.perf_counter() - start

    dpo_mod.Engine, dpo_mod.compute_reference = TimedEngine, timed_reference
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _tiny_cfg(Path(tmp), steps)
        start = time.perf_counter()
        metrics = dpo_mod.run(cfg)
        total = time.perf_counter() - start
    train_s = timing["fit_s"] - timing["eval_s"]
    peak = peak_rss_mib()
    return {"side": "alignpipe", "steps": metrics["steps"], "train_pairs": metrics["train_pairs"],
            "train_s": train_s, "pairs_per_s": metrics["steps"] * BATCH / train_s, "stage_wall_s": total,
            "reference_s": timing["ref_s"], "eval_accuracy": metrics.get("eval_accuracy"), "peak_rss_mib": peak,
            "train_rss_increment_mib": peak - timing["rss_before"]}


def worker_trl(steps: int, live_ref: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from pipeline.models import load_model, load_tokenizer, prepare_base
    from stages.engine import set_seed
    from stages.preferences import load_preference_split

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _tiny_cfg(Path(tmp), steps)
        start_all = time.perf_counter()
        train, held, _ = load_preference_split(cfg.dpo, cfg.seed, None, "dpo")

        def as_dataset(pairs: list[Any]) -> Dataset:
            return Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])

        base = prepare_base(cfg.model)
        tok = load_tokenizer(base, cfg.model, cfg.chat)
        set_seed(0)
        model = load_model(base, cfg.model, tok)
        args = DPOConfig(
            output_dir=str(Path(tmp) / "trl"), max_steps=steps, per_device_train_batch_size=BATCH,
            per_device_eval_batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=LR,
            warmup_steps=int(round(0.1 * steps)), lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
            bf16=False, gradient_checkpointing=False, max_length=MAX_LENGTH, beta=BETA, loss_type=["sigmoid"],
            precompute_ref_log_probs=not live_ref, logging_steps=10, save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=True, seed=0, use_cpu=True, dataloader_pin_memory=False,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=as_dataset(train), eval_dataset=as_dataset(held),
                             processing_class=tok)
        rss_before = peak_rss_mib()
        start = time.perf_counter()
        out = trainer.train()
        train_s = time.perf_counter() - start
        peak = peak_rss_mib()
        ev = trainer.evaluate()
        total = time.perf_counter() - start_all
    return {"side": "trl", "steps": out.global_step, "train_pairs": len(train), "train_s": train_s,
            "pairs_per_s": out.global_step * BATCH / train_s, "stage_wall_s": total,
            "eval_accuracy": ev.get("eval_rewards/accuracies"), "peak_rss_mib": peak,
            "train_rss_increment_mib": peak - rss_before}


# ----------------------------------------------------------------------------------------- driver
def _spawn(args: list[str], timeout: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", *args, "--out", out]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"worker {' '.join(args)} failed (rc {proc.returncode}):\n{tail}")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def compare(steps: int, repeats: int, live_ref: bool) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"alignpipe": [], "trl": []}
    for i in range(repeats):
        for side in ("alignpipe", "trl"):  # interleaved: A B A B
            args = [side, "--steps", str(steps)] + (["--trl-live-ref"] if live_ref and side == "trl" else [])
            r = _spawn(args, timeout=1800)
            runs[side].append(r)
            print(f"[bench dpo] run {i + 1}/{repeats} {side}: stage {r['stage_wall_s']:.1f} s, loop "
                  f"{r['pairs_per_s']:.1f} pairs/s, peak RSS {r['peak_rss_mib']:.0f} MiB, eval acc "
                  f"{r['eval_accuracy']}", flush=True)
    summary: dict[str, Any] = {}
    for side, rs in runs.items():
        summary[side] = {k: statistics.median(r[k] for r in rs)
                         for k in ("pairs_per_s", "train_s", "stage_wall_s", "peak_rss_mib", "train_rss_increment_mib")}
        summary[side]["eval_accuracy"] = [r["eval_accuracy"] for r in rs]
        summary[side]["pairs_per_s_all"] = [round(r["pairs_per_s"], 1) for r in rs]
        summary[side]["stage_wall_s_all"] = [round(r["stage_wall_s"], 1) for r in rs]
    summary["alignpipe"]["reference_s"] = statistics.median(r["reference_s"] for r in runs["alignpipe"])
    a, t = summary["alignpipe"], summary["trl"]
    summary["ratio"] = {"stage_wall_s": a["stage_wall_s"] / t["stage_wall_s"],
                        "pairs_per_s": a["pairs_per_s"] / t["pairs_per_s"],
                        "peak_rss": a["peak_rss_mib"] / t["peak_rss_mib"]}
    summary["settings"] = {"steps": steps, "batch_pairs": BATCH, "max_length": MAX_LENGTH, "lr": LR, "beta": BETA,
                           "loss": "sigmoid", "threads": 1, "repeats": repeats, "precision": "fp32",
                           "tuning": "full", "trl_reference": "live model" if live_ref else "precomputed"}
    return summary


def markdown(s: dict[str, Any]) -> str:
    a, t, r = s["alignpipe"], s["trl"], s["ratio"]

    def accs(values: list[Any]) -> str:
        return ", ".join("-" if v is None else f"{v:.3f}" for v in values)

    return "\n".join([
        "| | alignpipe DPO stage | TRL DPOTrainer | ratio (alignpipe / TRL) |",
        "|---|---|---|---|",
        f"| **whole stage, wall time (s; median; per run)** | {a['stage_wall_s']:.1f} ({a['stage_wall_s_all']}) | "
        f"{t['stage_wall_s']:.1f} ({t['stage_wall_s_all']}) | {r['stage_wall_s']:.2f}x the time |",
        f"| training loop only, pairs/s (median; per run) | {a['pairs_per_s']:.1f} ({a['pairs_per_s_all']}) | "
        f"{t['pairs_per_s']:.1f} ({t['pairs_per_s_all']}) | {r['pairs_per_s']:.2f}x |",
        f"| reference log-probs (s) | {a['reference_s']:.1f} | (in its stage time) | |",
        f"| peak RSS (MiB) | {a['peak_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} | {r['peak_rss']:.2f}x |",
        f"| RSS increment over the loop (MiB) | {a['train_rss_increment_mib']:.0f} | "
        f"{t['train_rss_increment_mib']:.0f} | |",
        f"| held-out preference accuracy | {accs(a['eval_accuracy'])} | {accs(t['eval_accuracy'])} | |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trl-live-ref", action="store_true", help="TRL keeps a live reference model")
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker = argparse.ArgumentParser()
        worker.add_argument("_worker")
        worker.add_argument("side", choices=["alignpipe", "trl"])
        worker.add_argument("--steps", type=int, required=True)
        worker.add_argument("--trl-live-ref", action="store_true")
        worker.add_argument("--out", required=True)
        w = worker.parse_args()
        result = worker_alignpipe(w.steps) if w.side == "alignpipe" else worker_trl(w.steps, w.trl_live_ref)
        Path(w.out).write_text(json.dumps(result))
        return
    args = parser.parse_args()
    summary = compare(args.steps, args.repeats, args.trl_live_ref)
    print(json.dumps(summary, indent=2))
    print(markdown(summary))


if __name__ == "__main__":
    main()
