"""Rollout backends side by side (not a test): hf vs vllm in one run, interleaved A B A B, ratios pair by pair.

Three measurements on one model (SmolLM2-135M-Instruct from configs/demo.yaml by default):

1. ``rollout``: sampling throughput of the bare backends (``stages.rollout_backend``): ``--prompts`` chat
   prompts from data/demo/prompts.jsonl, temperature 1, ``--max-new-tokens``; generated tokens/s.
2. ``rlaif_label``: the rlaif_label stage's sampling function (``stages.rlaif.label.sample_responses``,
   ``--num-responses`` per prompt); generated tokens/s.
3. ``ppo``: whole PPO steps (rollout + scoring forwards + update + the vllm weight sync) of two trainers
   that differ only in ``rollout.backend`` (function reward ``digit_fraction``, policy from the base,
   ``--tuning`` full or lora); episodes/s of each step.

Each round times A (hf) then B (vllm) on the same work; the first round is a warm-up and is left out; the
table gives each backend's median and the median of the per-round ratios vllm / hf. The vLLM worker is
started once, before timing (its start-up time is reported apart). Memory: the PPO part holds two SmolLM2
trainers (actor, reference, critic, optimisers: ~4 GB each in fp32, estimated from the parameter count) and
a vLLM worker (~3 GB with its 2 GiB KV cache). Run it on a quiet machine:

    # SmolLM2 (not yet timed at this size):
    .venv/bin/python bench/rollout_backends.py --threads 2 --json bench/results/rollout_backends.json
    # wiring check on the tiny model (~1.5 min):
    .venv/bin/python bench/rollout_backends.py --tiny --rounds 1

Needs the vLLM environment (``make vllm-env``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY32 = ["model.tiny.num_heads=2", "model.tiny.num_kv_heads=1"]  # head_dim 32: vLLM's CPU attention needs >= 32


def load_prompts(tok, n: int) -> list[list[int]]:
    from data.formats import load_examples
    from pipeline.config import DataSource
    from stages.chat import prompt_ids

    examples, _ = load_examples(DataSource(path=str(REPO / "data/demo/prompts.jsonl"), max_records=n), "prompt")
    return [prompt_ids(tok, ex.prompt, None) for ex in examples]


def tokens_of(groups) -> int:
    return sum(len(g.token_ids) for group in groups for g in group)


class CountingBackend:
    """A backend that counts the tokens it generated (the stage function returns text)."""

    def __init__(self, backend):
        self.backend, self.tokens = backend, 0

    def generate(self, prompt_ids, sampling):
        groups = self.backend.generate(prompt_ids, sampling)
        self.tokens += tokens_of(groups)
        return groups


def summarise(name: str, unit: str, hf: list[float], vllm: list[float]) -> dict:
    ratios = [b / a for a, b in zip(hf, vllm)]
    return {"measure": name, "unit": unit, "rounds": len(hf), "hf": hf, "vllm": vllm,
            "hf_median": statistics.median(hf), "vllm_median": statistics.median(vllm),
            "ratio_vllm_over_hf_median": statistics.median(ratios), "ratios": ratios}


def bench_sampling(args, cfg, base, tok, vllm_backend) -> list[dict]:
    import torch

    from pipeline.models import load_model
    from stages.rlaif.label import sample_responses
    from stages.rollout_backend import HFBackend, Sampling

    prompts = load_prompts(tok, args.prompts)
    hf_backend = HFBackend(load_model(base, cfg.model, tok).eval(), tok, torch.device("cpu"), args.batch_size)
    backends = {"hf": hf_backend, "vllm": vllm_backend}
    rollout = {"hf": [], "vllm": []}
    label = {"hf": [], "vllm": []}
    for r in range(args.rounds + 1):
        for name, backend in backends.items():  # A then B, every round
            started = time.perf_counter()
            groups = backend.generate(prompts, Sampling(args.max_new_tokens, 1.0, seed=r))
            seconds = time.perf_counter() - started
            if r:
                rollout[name].append(tokens_of(groups) / seconds)
            counting = CountingBackend(backend)
            started = time.perf_counter()
            sample_responses(counting, tok, prompts, args.num_responses, args.max_new_tokens, 1.0, r)
            seconds = time.perf_counter() - started
            if r:
                label[name].append(counting.tokens / seconds)
            if r:
                print(f"round {r} {name}: rollout {rollout[name][-1]:.1f} tokens/s, rlaif_label "
                      f"{label[name][-1]:.1f} tokens/s", flush=True)
    return [summarise("rollout sampling", "generated tokens/s", rollout["hf"], rollout["vllm"]),
            summarise("rlaif_label sampling", "generated tokens/s", label["hf"], label["vllm"])]


def bench_ppo(args, config: str, overrides: list[str], vllm_python: str) -> dict:
    from pipeline.config import load_config
    from pipeline.stage import StageRun
    from stages.engine import init_distributed
    from stages.ppo.trainer import PPOTrainer

    out = tempfile.mkdtemp(prefix="bench-rollout-")
    common = [f"output_root={out}", "logging.progress_bar=false", "stages=[ppo]", "ppo.policy_from=base",
              "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]",
              f"ppo.episodes_per_rollout={args.ppo_batch}", f"ppo.mini_batch_size={args.ppo_batch}",
              f"ppo.max_new_tokens={args.max_new_tokens}", f"ppo.tuning.method={args.tuning}",
              "ppo.train.learning_rate=1e-5", "ppo.train.save_steps=100000", *overrides]
    cfgs = {"hf": load_config(REPO / config, [*common, "run_name=bench-hf"]),
            "vllm": load_config(REPO / config, [*common, "run_name=bench-vllm", "rollout.backend=vllm",
                                                f"rollout.vllm.python={vllm_python}"])}
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    # where each step's time went and how long the responses were (sampled lengths differ between engines)
    split_keys = ("time_generate", "time_forward", "time_score", "time_update", "response_length")
    splits: dict[str, dict[str, list[float]]] = {name: {k: [] for k in split_keys} for name in rates}
    runs, trainers = {}, {}
    try:
        for name, cfg in cfgs.items():
            runs[name] = StageRun(cfg, "ppo").__enter__()
            started = time.perf_counter()
            trainers[name] = PPOTrainer(cfg, runs[name], init_distributed())
            print(f"ppo {name}: trainer built in {time.perf_counter() - started:.1f} s", flush=True)
        for r in range(args.rounds + 1):
            for name, trainer in trainers.items():
                started = time.perf_counter()
                step_row, _ = trainer._ppo_step()
                seconds = time.perf_counter() - started
                if r:
                    rates[name].append(trainer.sizes.global_batch / seconds)
                    for key in split_keys:
                        splits[name][key].append(float(step_row.get(key, float("nan"))))
                print(f"ppo round {r} {name}: {trainer.sizes.global_batch / seconds:.3f} episodes/s; "
                      + ", ".join(f"{k} {float(step_row.get(k, float('nan'))):.2f}" for k in split_keys), flush=True)
        sync = trainers["vllm"].engine_sync_seconds
    finally:
        for trainer in trainers.values():
            trainer.close_rollout_engine()
        for run in runs.values():
            run.manifest["metrics"] = {}
            run.__exit__(None, None, None)
    row = summarise(f"PPO steps ({args.tuning}, batch {args.ppo_batch})", "episodes/s", rates["hf"], rates["vllm"])
    row["vllm_weight_sync_seconds_total"] = sync
    row["step_split_median"] = {name: {k: statistics.median(v) for k, v in parts.items() if v}
                                for name, parts in splits.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (wiring check, not figures)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="hf generate batch (prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-responses", type=int, default=2, help="rlaif_label samples per prompt")
    parser.add_argument("--rounds", type=int, default=3, help="timed A/B rounds (after one warm-up round)")
    parser.add_argument("--ppo-batch", type=int, default=8)
    parser.add_argument("--tuning", choices=["full", "lora"], default="full")
    parser.add_argument("--skip-ppo", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    import torch

    from pipeline.config import VLLMRolloutConfig, load_config
    from pipeline.models import load_tokenizer, prepare_base
    from stages.rollout_backend.vllm_client import VLLMBackend

    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.vllm_python).exists():
        sys.exit(f"no vLLM environment at {args.vllm_python}: run `make vllm-env`")
    config, overrides = ("configs/tiny.yaml", TINY32) if args.tiny else ("configs/demo.yaml", [])
    cfg = load_config(REPO / config, overrides)
    base = prepare_base(cfg.model)
    tok = load_tokenizer(base, cfg.model, cfg.chat)
    started = time.perf_counter()
    vllm_backend = VLLMBackend(VLLMRolloutConfig(python=args.vllm_python), base, tok, tempfile.mkdtemp(),
                               max_model_len=512, model_dtype=cfg.model.dtype)
    startup = time.perf_counter() - started
    print(f"vllm worker ready in {startup:.1f} s", flush=True)
    try:
        rows = bench_sampling(args, cfg, base, tok, vllm_backend)
    finally:
        vllm_backend.close()
    if not args.skip_ppo:
        rows.append(bench_ppo(args, config, overrides, args.vllm_python))
    meta = {"model": base, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
            "torch_threads": torch.get_num_threads(), "vllm_startup_seconds": startup, "tiny": args.tiny}
    print("\n| measure | unit | hf (median) | vllm (median) | vllm / hf (median of pairs) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['measure']} | {row['unit']} | {row['hf_median']:.2f} | {row['vllm_median']:.2f} | "
              f"{row['ratio_vllm_over_hf_median']:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
