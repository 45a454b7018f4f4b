"""Shared prefills side by side (not a test): the K samples of a prompt running one prompt forward pass
(``PPORollout._shared_prefill``, the default with the hf backend) against K separate prompt passes, in one
process, interleaved A B A B on the same work.

The rollout's sampling step alone (``PPORollout.sample``: left-padded prompts, HF ``generate`` with the
per-episode sampler), on SmolLM2-135M-Instruct (configs/demo.yaml's GGUF base) by default: ``--prompts``
demo prompts, each lengthened to about ``--prompt-tokens`` tokens with a context of other demo questions
(long prompts are where sharing pays), ``--k`` samples each, ``--max-new-tokens``. Each round samples the
same episodes (same streams) both ways, in alternating order; the first round is a warm-up and is left out.
Reported: episodes/s of each way (medians) and the median of the per-round ratios shared / separate, and
whether both ways sampled the same tokens. Absolute rates depend on the machine and its load; compare the
ratio.

    .venv/bin/python bench/shared_prefill.py                      # SmolLM2, ~300-token prompts, K = 4
    .venv/bin/python bench/shared_prefill.py --tiny --rounds 3    # wiring check on the tiny model
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


def build_trainer(args: argparse.Namespace, root: str):
    """A PPO trainer on the chosen model (no reference: kl_coef 0; no critic: grpo); -> (stage run, trainer)."""
    from pipeline.config import load_config
    from pipeline.stage import StageRun
    from stages.engine import init_distributed
    from stages.ppo.trainer import PPOTrainer

    config = "configs/tiny.yaml" if args.tiny else "configs/demo.yaml"
    cfg = load_config(REPO / config, [
        f"output_root={root}", "logging.progress_bar=false", "stages=[ppo]", "ppo.policy_from=base",
        "ppo.rewards=[{kind: function, function: 'stages.ppo.rewards:digit_fraction'}]",
        "ppo.advantage_estimator=grpo", f"ppo.num_samples_per_prompt={args.k}", "ppo.kl_coef=0",
        f"ppo.episodes_per_rollout={args.prompts * args.k}", f"ppo.mini_batch_size={args.prompts * args.k}",
        f"ppo.max_new_tokens={args.max_new_tokens}", f"ppo.max_prompt_length={args.prompt_tokens + 64}",
        f"ppo.tuning.method={args.tuning}", f"ppo.train.num_threads={args.threads}"])
    run = StageRun(cfg, "ppo")
    run.__enter__()
    return run, PPOTrainer(cfg, run, init_distributed())


def long_prompts(trainer, n: int, prompt_tokens: int) -> list[list[int]]:
    """``n`` demo prompts, each with a context of other demo questions in front, about ``prompt_tokens`` tokens."""
    from stages.chat import prompt_ids

    questions = [p.messages[-1]["content"] for p in trainer.data.prompts]
    out = []
    for i in range(n):
        context, j = [], i + 1
        while len(trainer.tokenizer(" ".join(context)).input_ids) < prompt_tokens:
            context.append(questions[j % len(questions)])
            j += 1
        text = "Context (earlier questions): " + " ".join(context) + "\n\nAnswer this one: " + questions[i]
        out.append(prompt_ids(trainer.tokenizer, [{"role": "user", "content": text}]))
    return out


def timed(experience, prompt_ids: list[list[int]], positions: list[int], stream: int, k: int,
          shared: bool) -> tuple[float, list[list[int]]]:
    """Seconds to sample every episode one way, and the sampled tokens."""
    experience.share_prefill = shared
    started = time.perf_counter()
    sampled, _ = experience.sample(prompt_ids, positions, stream, group_size=k)
    seconds = time.perf_counter() - started
    return seconds, sampled.response.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (a wiring check)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="A B rounds, the first a warm-up")
    parser.add_argument("--tuning", default="full", choices=["full", "lora"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        run, trainer = build_trainer(args, root)
        prompts = long_prompts(trainer, args.prompts, args.prompt_tokens)
        ids = [p for p in prompts for _ in range(args.k)]
        positions = list(range(len(ids)))
        rates: dict[bool, list[float]] = {True: [], False: []}
        ratios, same = [], True
        for r in range(args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            seconds, tokens = {}, {}
            for shared in order:
                seconds[shared], tokens[shared] = timed(trainer.experience, ids, positions, r, args.k, shared)
            same = same and tokens[True] == tokens[False]
            if r == 0:
                continue  # warm-up
            for shared in (True, False):
                rates[shared].append(len(ids) / seconds[shared])
            ratios.append(seconds[False] / seconds[True])
        run.manifest["metrics"] = {}
        run.__exit__(None, None, None)
    result = {
        "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct", "tuning": args.tuning, "threads": args.threads,
        "prompts": args.prompts, "k": args.k, "prompt_tokens": [len(p) for p in prompts],
        "max_new_tokens": args.max_new_tokens, "rounds_timed": len(ratios),
        "episodes_per_s_shared": statistics.median(rates[True]),
        "episodes_per_s_separate": statistics.median(rates[False]),
        "ratio_shared_over_separate": statistics.median(ratios), "ratios": ratios, "same_tokens": same}
    print(f"| prefill | episodes/s (median of {len(ratios)}) |\n|---|---|\n"
          f"| shared (one pass per prompt) | {result['episodes_per_s_shared']:.2f} |\n"
          f"| separate (K passes per prompt) | {result['episodes_per_s_separate']:.2f} |\n\n"
          f"ratio shared / separate: median {result['ratio_shared_over_separate']:.2f} (per round: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); same tokens both ways: {same}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
