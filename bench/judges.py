"""Benchmark the AI judges (RLAIF): judgments per second for the HF and HTTP backends, and the agreement
of the embedded SmolLM2-135M-Instruct judge with the human labels of Anthropic's hh-rlhf, with the
position-bias figures that explain it.

What it measures (one JSON object per line on stdout, and all of them in ``--out`` when given):

1. ``hf``: ``HFJudge`` on the run's base model (``--config``, default ``configs/demo.yaml``: SmolLM2) over the
   first ``--pairs`` preference pairs of ``--data`` (hh-rlhf harmless-base test split). Each pair is asked
   in both orders (human-chosen first, then second), so per pair two forward passes. Reported:
   ``pair_judgments_per_s`` (both orders), ``agree``/``disagree``/``ties`` after the order swap (an
   inconsistent pair is a tie), ``agreement_all`` (ties count half), per-order agreement (``order1``:
   chosen shown first; ``order2``: chosen shown second), ``first_position_rate`` (share of single-order
   answers that prefer whatever is shown first: 0.5 is unbiased), ``mean_prob_first``,
   ``order_averaged_agreement`` (the two orders' probabilities averaged, then > 0.5), and
   ``mean_label_mass`` (probability the model puts on "A"/"B" at all).
2. ``http``: ``HTTPJudge`` against our own ``pipeline.serve`` on 127.0.0.1 serving the same model, over
   the first ``--http-pairs`` pairs (text answers: the server generates ``--max-tokens`` tokens).
3. ``tiny`` (``--tiny``): both backends on the tiny random test model with short synthetic demo pairs:
   the per-judgment overhead of each backend with the model cost taken out.
4. ``function`` (``--function``): the rule-based demo-task judge (``stages.rlaif.rules:demo_task_judge``,
   the default judge of configs/demo.yaml) on ``data/demo/preferences.jsonl``: judgments/s and its
   agreement with the data set's chosen/rejected labels.

The judgment cache is off (every judgment is computed). hh-rlhf text is never printed, only counts.
Run from the repository root::

    .venv/bin/python bench/judges.py --pairs 24 --http-pairs 4 --tiny --out /tmp/judges.json

CPU threads: ``--threads`` (default 1: the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Anthropic's hh-rlhf harmless-base test split (anthropics/hh-rlhf, MIT), gzipped JSONL of chosen/rejected
# transcripts; not part of the repository
DEFAULT_DATA = os.path.expandvars("$ALIGNPIPE_DATA_DIR/hh-rlhf/harmless-base/test.jsonl.gz")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="run config whose base model judges")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="preference pairs with human labels (default: hh-rlhf under $ALIGNPIPE_DATA_DIR)")
    parser.add_argument("--pairs", type=int, default=24, help="pairs for the HF judge (0: skip)")
    parser.add_argument("--http-pairs", type=int, default=4, help="pairs for the HTTP judge (0: skip)")
    parser.add_argument("--tiny", action="store_true", help="also time both backends on the tiny test model")
    parser.add_argument("--tiny-pairs", type=int, default=32, help="synthetic pairs for --tiny")
    parser.add_argument("--function", action="store_true",
                        help="also time the rule-based demo judge on data/demo/preferences.jsonl")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=8, help="HF judge forward batch size")
    parser.add_argument("--principles", choices=("sample", "all"), default="sample",
                        help="one constitution principle per pair, or all of them")
    parser.add_argument("--constitution", default="configs/constitutions/default.yaml")
    parser.add_argument("--max-tokens", type=int, default=24, help="HTTP judge: tokens the server generates")
    parser.add_argument("--concurrency", type=int, default=2, help="HTTP judge: requests in flight")
    parser.add_argument("--out", help="write every result as one JSON document here")
    args = parser.parse_args(argv)
    if min(args.pairs, args.http_pairs, args.tiny_pairs) < 0:
        parser.error("pair counts must be >= 0")
    return args


def load_pairs(path: str, n: int) -> tuple[list[tuple[Any, Any, Any]], dict[str, Any]]:
    """The first ``n`` usable pairs as (prompt, chosen, rejected) message lists, and the loader's report."""
    from data.formats import load_examples
    from pipeline.config import DataSource

    source = DataSource(path=path, max_records=n + max(10, n // 5), max_bad_fraction=0.3)
    pairs, report = load_examples(source, "preference")
    if len(pairs) < n:
        raise SystemExit(f"{path}: only {len(pairs)} usable pairs, asked for {n}")
    return [(p.prompt, p.chosen, p.rejected) for p in pairs[:n]], {"read": report.as_dict().get("records"),
                                                                    "skipped": report.skipped}


def agreement(results: list[Any]) -> dict[str, Any]:
    """Agreement with the human label (response a = human-chosen) and position-bias figures."""
    n = len(results)
    agree = sum(r.choice == "A" for r in results)
    disagree = sum(r.choice == "B" for r in results)
    ties = n - agree - disagree
    out: dict[str, Any] = {"agree": agree, "disagree": disagree, "ties": ties,
                           "agreement_all": round((agree + 0.5 * ties) / n, 4),
                           "agreement_non_ties": round(agree / (agree + disagree), 4) if agree + disagree else None}
    firsts = [[o["prob_first"] for o in r.orders] for r in results]
    full = [f for f in firsts if len(f) == 2 and None not in f]
    if full:
        out.update(
            readable_pairs=len(full),  # pairs with a readable answer in both orders (the figures below)
            order1_agreement=round(sum(a > 0.5 for a, _ in full) / len(full), 4),
            order2_agreement=round(sum(b < 0.5 for _, b in full) / len(full), 4),
            first_position_rate=round(sum((a > 0.5) + (b > 0.5) for a, b in full) / (2 * len(full)), 4),
            mean_prob_first=round(sum(a + b for a, b in full) / (2 * len(full)), 4),
            order_averaged_agreement=round(sum((a + 1 - b) / 2 > 0.5 for a, b in full) / len(full), 4),
        )
    unreadable = sum(1 for f in firsts for p in f if p is None)
    if unreadable:
        out["unreadable_answers"] = unreadable
    return out


def label_mass(results: list[Any]) -> float | None:
    masses = []
    for r in results:
        for order in r.orders:
            try:
                masses.append(float(json.loads(order["raw"])["label_mass"]))
            except (TypeError, ValueError, KeyError):
                continue
    return round(sum(masses) / len(masses), 4) if masses else None


def timed_pairs(judge: Any, items: list[tuple[Any, Any, Any]]) -> tuple[list[Any], float]:
    started = time.perf_counter()
    results = judge.judge_pairs(items)
    return results, time.perf_counter() - started


def bench_hf(args: argparse.Namespace, base: str, constitution: Any, items: list) -> dict[str, Any]:
    from stages.rlaif.judges import HFJudge

    judge = HFJudge(base, constitution=constitution, batch_size=args.batch_size)
    results, seconds = timed_pairs(judge, items)
    return {"backend": "hf", "device": judge.device, "pairs": len(items), "seconds": round(seconds, 2),
            "pair_judgments_per_s": round(len(items) / seconds, 4),
            "single_order_judgments_per_s": round(2 * len(items) / seconds, 4),
            **agreement(results), "mean_label_mass": label_mass(results), "stats": judge.stats.as_dict()}


def bench_http(args: argparse.Namespace, base: str, constitution: Any, items: list, label: str) -> dict[str, Any]:
    from pipeline.serve import start_server_in_thread
    from stages.rlaif.judges import HTTPJudge

    server, url = start_server_in_thread(base, quiet=True, model_name="judge")
    try:
        judge = HTTPJudge(url, "judge", constitution=constitution, concurrency=args.concurrency,
                          max_tokens=args.max_tokens)
        results, seconds = timed_pairs(judge, items)
        judge.close()
    finally:
        server.close()
    return {"backend": "http", "server": "pipeline.serve on 127.0.0.1, same model", "model": label,
            "pairs": len(items), "max_tokens": args.max_tokens, "concurrency": args.concurrency,
            "seconds": round(seconds, 2), "pair_judgments_per_s": round(len(items) / seconds, 4),
            **agreement(results), "stats": judge.stats.as_dict()}


def bench_tiny(args: argparse.Namespace, constitution: Any) -> list[dict[str, Any]]:
    """Both backends on the tiny random model: backend overhead with (almost) no model cost."""
    from pipeline.config import load_config
    from pipeline.models import prepare_base
    from stages.rlaif.judges import HFJudge

    base = prepare_base(load_config("configs/tiny.yaml").model)
    items = [(f"What is {i} plus {i + 3}?", f"{i} plus {i + 3} is {2 * i + 3}.", f"It is {i * 7}, I think.")
             for i in range(args.tiny_pairs)]
    hf = HFJudge(base, constitution=constitution, batch_size=args.batch_size)
    _, seconds = timed_pairs(hf, items)
    out = [{"backend": "hf", "model": "tiny random Llama (tests)", "pairs": len(items), "seconds": round(seconds, 2),
            "pair_judgments_per_s": round(len(items) / seconds, 3)}]
    http = bench_http(args, base, constitution, items, "tiny random Llama (tests)")
    out.append({k: http[k] for k in ("backend", "model", "pairs", "max_tokens", "concurrency", "seconds",
                                     "pair_judgments_per_s", "stats")})
    return out


def bench_function(constitution: Any) -> dict[str, Any]:
    """The rule-based demo-task judge on the demo preference pairs (labels made by data/make_demo.py)."""
    from data.formats import load_examples
    from pipeline.config import DataSource
    from stages.rlaif.judges import FunctionJudge

    pairs, _ = load_examples(DataSource(path="data/demo/preferences.jsonl"), "preference")
    items = [(p.prompt, p.chosen, p.rejected) for p in pairs]
    judge = FunctionJudge("stages.rlaif.rules:demo_task_judge", constitution=constitution, name="default")
    results, seconds = timed_pairs(judge, items)
    return {"backend": "function", "judge": "stages.rlaif.rules:demo_task_judge", "data": "data/demo/preferences.jsonl",
            "pairs": len(items), "seconds": round(seconds, 3), "pair_judgments_per_s": round(len(items) / seconds, 1),
            **agreement(results), "stats": judge.stats.as_dict()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from pipeline.config import load_config
    from pipeline.models import prepare_base
    from stages.rlaif.judges import Constitution

    cfg = load_config(args.config)
    constitution = Constitution.load(args.constitution, args.principles, seed=0)
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "config": args.config, "principles": args.principles, "batch_size": args.batch_size}
    results: list[dict[str, Any]] = [{"env": env}]
    print(json.dumps(results[0]), flush=True)
    base = prepare_base(cfg.model)
    label = f"{cfg.model.package or cfg.model.path or cfg.model.source} {cfg.model.gguf_file or ''}".strip()
    n = max(args.pairs, args.http_pairs)
    if n:
        items, info = load_pairs(args.data, n)
        print(json.dumps({"data": args.data, **info, "pairs_used": n}), flush=True)
        if args.pairs:
            row = {"model": label, **bench_hf(args, base, constitution, items[:args.pairs])}
            results.append(row)
            print(json.dumps(row), flush=True)
        if args.http_pairs:
            row = bench_http(args, base, constitution, items[:args.http_pairs], label)
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.function:
        row = bench_function(constitution)
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.tiny:
        for row in bench_tiny(args, constitution):
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
