"""PPO and the critic-free objectives side by side on one tiny verifiable task (not a test).

The task: the tiny random Llama of ``configs/tiny.yaml`` (``ppo.policy_from=base``, no SFT, no reward model),
rewarded 1 when its response starts with a digit, else 0 (:func:`starts_with_digit`, a rule verifier). The
random model does so about 8% of the time, so a group of 4 samples often ties at 0 and the task is learnable
in a few hundred episodes; it is the sparse 0/1 case the group estimators were designed for.

Every recipe gets the same episode budget (``--episodes``), prompts, seeds (``seed`` and ``ppo.train.seed``,
which the PPO stage samples from), learning rate, epochs, KL to the reference (in the reward, ``kl_coef`` 0.02,
except DAPO and the two no-KL controls: 0) and response length; only the objective keys differ (``RECIPES``).
Each run is in this process, one after another, recipe order forward for the first seed, reversed for the
second, and so on, so the episodes/s of each recipe is compared with GAE-PPO's measured beside it on the same
machine state (a ratio; wall times alone mean little on a shared machine).

Held-out score: the eval before and after training (``ppo.eval_data``, sampled at the training temperature
from fixed streams) on the prompts of ``data/demo/house_format/eval_prompts.jsonl`` that are not training
prompts, each ``--heldout-samples`` times. The eval verifier (:func:`heldout_verifier`, the same rule) records
every response's score, so the bench has per-prompt scores: a percentile bootstrap over prompts gives each
seed's 95% interval (the noise of the eval's sampling); the spread over seeds (the noise of training) is
shown beside it and is the larger of the two on this task.

Usage::

    .venv/bin/python bench/objectives.py                       # all recipes, seeds 0 1 2
    .venv/bin/python bench/objectives.py --seeds 0 --recipes gae-ppo grpo --episodes 160
    .venv/bin/python bench/objectives.py --json outputs/bench-objectives/results.json

Prints one Markdown table and the mean reward curve of each recipe; runs under ``outputs/bench-objectives``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUTPUT_ROOT = REPO / "outputs" / "bench-objectives"
TRAIN_PROMPTS = REPO / "data" / "demo" / "prompts.jsonl"
EVAL_PROMPTS = REPO / "data" / "demo" / "house_format" / "eval_prompts.jsonl"
THIS = "bench.objectives"  # the name the stage imports the reward and the verifier by

COMMON = [
    "stages=[ppo]", "ppo.policy_from=base", "logging.progress_bar=false",
    f"ppo.rewards=[{{kind: function, function: '{THIS}:starts_with_digit'}}]",
    f"ppo.eval_verifier={THIS}:heldout_verifier",
    "ppo.episodes_per_rollout=16", "ppo.mini_batch_size=8", "ppo.ppo_epochs=4", "ppo.max_new_tokens=16",
    "ppo.train.learning_rate=5e-3", "ppo.kl_coef=0.02", "ppo.missing_eos_penalty=0",
    "ppo.train.save_steps=100000", "ppo.train.num_threads=1",
]

# recipe -> its objective keys (everything else is COMMON); docs/PPO.md explains each key
RECIPES: dict[str, list[str]] = {
    "gae-ppo": ["ppo.advantage_estimator=gae", "ppo.num_samples_per_prompt=1"],
    # the two no-KL controls tell what DAPO gains by its clip and aggregation from what it gains by kl_coef 0
    "gae-ppo-no-kl": ["ppo.advantage_estimator=gae", "ppo.num_samples_per_prompt=1", "ppo.kl_coef=0"],
    "grpo": ["ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=4",
             "ppo.loss_aggregation=seq-mean-token-mean", "ppo.scale_rewards=group"],
    "dr-grpo": ["ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=4",
                "ppo.loss_aggregation=seq-mean-token-sum", "ppo.scale_rewards=none"],
    "gspo": ["ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=4", "ppo.importance_level=sequence",
             "ppo.loss_aggregation=seq-mean-token-mean", "ppo.cliprange_low=3e-4", "ppo.cliprange_high=4e-4"],
    "rloo": ["ppo.advantage_estimator=rloo", "ppo.num_samples_per_prompt=4"],
    "reinforce-pp": ["ppo.advantage_estimator=reinforce_pp", "ppo.num_samples_per_prompt=1"],
    "grpo-no-kl": ["ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=4",
                   "ppo.loss_aggregation=seq-mean-token-mean", "ppo.scale_rewards=group", "ppo.kl_coef=0"],
    # DAPO's objective (clip-higher, token mean, no KL); its dynamic sampling and overlong shaping are left out
    "dapo": ["ppo.advantage_estimator=grpo", "ppo.num_samples_per_prompt=4", "ppo.cliprange_low=0.2",
             "ppo.cliprange_high=0.28", "ppo.loss_aggregation=token-mean", "ppo.kl_coef=0"],
}
BASELINE = "gae-ppo"


# ------------------------------------------------------------------------------ reward and verifier
def starts_with_digit(prompts: list[str], responses: list[str], references: list[Any]) -> list[float]:
    """1.0 where the response's first non-space character is a digit, else 0.0 (empty: 0.0)."""
    return [1.0 if response.lstrip()[:1].isdigit() else 0.0 for response in responses]


HELDOUT_SCORES: list[tuple[int, float]] = []  # (held-out prompt id, score) per eval response, in eval order


def heldout_verifier(prompts: list[str], responses: list[str], references: list[Any]) -> list[float]:
    """:func:`starts_with_digit`, recording each score with its prompt id (the held-out file's ``reference``)."""
    scores = starts_with_digit(prompts, responses, references)
    HELDOUT_SCORES.extend((int(ref), score) for ref, score in zip(references, scores))
    return scores


def write_heldout(path: Path, samples: int) -> int:
    """The eval prompts that are not training prompts, each ``samples`` times (one sampling stream per row),
    with the prompt's id as ``reference``; returns the number of distinct prompts."""
    train = {json.loads(line)["prompt"] for line in TRAIN_PROMPTS.read_text().splitlines() if line.strip()}
    prompts = [json.loads(line)["prompt"] for line in EVAL_PROMPTS.read_text().splitlines() if line.strip()]
    heldout = [p for p in dict.fromkeys(prompts) if p not in train]
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, "reference": str(i)} for i, p in enumerate(heldout) for _ in range(samples)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(heldout)


# ------------------------------------------------------------------------------------- statistics
def per_prompt_means(pairs: list[tuple[int, float]]) -> dict[int, float]:
    """(prompt id, score) pairs -> each prompt's mean score."""
    sums: dict[int, list[float]] = {}
    for prompt, score in pairs:
        sums.setdefault(prompt, []).append(score)
    return {prompt: sum(s) / len(s) for prompt, s in sums.items()}


def bootstrap_ci(values: list[float], rounds: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``values`` (resampling the values)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ------------------------------------------------------------------------------------------- runs
def run_recipe(recipe: str, seed: int, episodes: int, heldout: Path, n_heldout: int) -> dict[str, Any]:
    """Train one recipe at one seed in this process -> its curves, held-out scores and throughput."""
    from pipeline.config import load_config
    from stages.ppo import trainer

    overrides = [f"output_root={OUTPUT_ROOT}", f"run_name={recipe}-s{seed}", f"seed={seed}", f"ppo.train.seed={seed}",
                 *COMMON, f"ppo.total_episodes={episodes}", f"ppo.eval_data={{path: {heldout}}}", *RECIPES[recipe]]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    stage_dir = cfg.stage_dir("ppo")
    shutil.rmtree(stage_dir, ignore_errors=True)  # a fresh run, never a resume of an older one
    HELDOUT_SCORES.clear()
    final = trainer.run(cfg)
    rows = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "score" in r]
    evals = [r for r in rows if "eval_verifier" in r]
    per_eval = len(HELDOUT_SCORES) // 2
    before, after = per_prompt_means(HELDOUT_SCORES[:per_eval]), per_prompt_means(HELDOUT_SCORES[per_eval:])
    if len(evals) != 2 or not len(before) == len(after) == n_heldout:
        raise RuntimeError(f"{recipe}: expected 2 evals of {n_heldout} prompts, got {len(evals)} evals, "
                           f"{len(before)} and {len(after)} prompts recorded")
    for logged, recorded in ((evals[0], before), (evals[-1], after)):  # the recording is the logged eval
        if abs(logged["eval_verifier"] - mean(list(recorded.values()))) > 1e-6:
            raise RuntimeError(f"{recipe}: recorded held-out scores differ from the logged eval_verifier")
    return {"recipe": recipe, "seed": seed, "score": [r["score"] for r in train],
            "kl": [r["kl"] for r in train if "kl" in r], "clipfrac": [r["clipfrac"] for r in train],
            "before": before, "after": after,
            "episodes_per_s": final["episodes_per_s_mean"], "steps": len(train), "load_avg": os.getloadavg()[0]}


def run_all(recipes: list[str], seeds: list[int], episodes: int, samples: int) -> list[dict[str, Any]]:
    """Every recipe at every seed; the order alternates forward / reversed from one seed to the next."""
    heldout = OUTPUT_ROOT / "heldout.jsonl"
    n_heldout = write_heldout(heldout, samples)
    results = []
    for i, seed in enumerate(seeds):
        for recipe in (recipes if i % 2 == 0 else recipes[::-1]):
            start = time.perf_counter()
            result = run_recipe(recipe, seed, episodes, heldout, n_heldout)
            print(f"{recipe} seed {seed}: score {result['score'][0]:.2f} -> {result['score'][-1]:.2f}, held-out "
                  f"{mean(list(result['before'].values())):.3f} -> {mean(list(result['after'].values())):.3f}, "
                  f"{result['episodes_per_s']:.1f} episodes/s, {time.perf_counter() - start:.0f} s", flush=True)
            results.append(result)
    return results


# ---------------------------------------------------------------------------------------- summary
def steps_to(curve: list[float], level: float, window: int = 3) -> int | None:
    """The first step (1-based) at which the mean reward of the last ``window`` steps reaches ``level``."""
    for step in range(window, len(curve) + 1):
        if mean(curve[step - window:step]) >= level:
            return step
    return None


def summarise(recipe: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One recipe's figures over its seeds (``results`` holds every recipe's runs)."""
    mine = [r for r in results if r["recipe"] == recipe]
    base = {r["seed"]: r for r in results if r["recipe"] == BASELINE}
    after_means = [mean(list(r["after"].values())) for r in mine]
    before_means = [mean(list(r["before"].values())) for r in mine]
    ratios = [r["episodes_per_s"] / base[r["seed"]]["episodes_per_s"] for r in mine if r["seed"] in base]
    kls = [mean(r["kl"][-3:]) for r in mine if r["kl"]]
    return {
        "recipe": recipe, "seeds": [r["seed"] for r in mine],
        "score_first": mean([mean(r["score"][:3]) for r in mine]),
        "score_last": mean([mean(r["score"][-3:]) for r in mine]),
        "heldout_before": mean(before_means), "heldout_after": mean(after_means),
        "heldout_after_per_seed": after_means, "heldout_after_sd": spread(after_means),
        "heldout_after_ci_per_seed": [bootstrap_ci(list(r["after"].values())) for r in mine],
        "kl_last": mean(kls) if kls else None,
        "clipfrac": mean([mean(r["clipfrac"]) for r in mine]),
        "steps_to_half": [steps_to(r["score"], 0.5) for r in mine],
        "episodes_per_s": [r["episodes_per_s"] for r in mine],
        "ratio_to_baseline": math.exp(mean([math.log(x) for x in ratios])) if ratios else None,
        "ratio_range": (min(ratios), max(ratios)) if ratios else None,
        "score_curve": [mean([r["score"][s] for r in mine]) for s in range(min(len(r["score"]) for r in mine))],
    }


def table(summaries: list[dict[str, Any]]) -> str:
    lines = ["| recipe | K | train reward, first 3 → last 3 steps | held-out before → after, mean ± sd over seeds "
             "(per seed) | 95% CI per seed | steps to train reward 0.5 | final KL | clipfrac | episodes/s vs GAE-PPO |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        k = next(x.split("=")[1] for x in RECIPES[s["recipe"]] if x.startswith("ppo.num_samples_per_prompt="))
        per_seed = " / ".join(f"{x:.2f}" for x in s["heldout_after_per_seed"])
        cis = " / ".join(f"{low:.2f}–{high:.2f}" for low, high in s["heldout_after_ci_per_seed"])
        reach = " / ".join("—" if x is None else str(x) for x in s["steps_to_half"])
        kl = "not measured (no reference)" if s["kl_last"] is None else f"{s['kl_last']:.1f}"
        ratio = "—"
        if s["ratio_to_baseline"] is not None:
            lo, hi = s["ratio_range"]
            ratio = f"{s['ratio_to_baseline']:.2f}x ({lo:.2f}–{hi:.2f})"
        lines.append(f"| {s['recipe']} | {k} | {s['score_first']:.2f} → {s['score_last']:.2f} | "
                     f"{s['heldout_before']:.2f} → **{s['heldout_after']:.2f}** ± {s['heldout_after_sd']:.2f} "
                     f"({per_seed}) | {cis} | {reach} | {kl} | {s['clipfrac']:.2f} | {ratio} |")
    return "\n".join(lines)


def recipe_keys(recipes: list[str]) -> str:
    """One line per recipe: the keys it sets beside the common ones."""
    return "\n".join(f"- {r}: " + ", ".join(f"`{k.removeprefix('ppo.')}`" for k in RECIPES[r]) for r in recipes)


def curves(summaries: list[dict[str, Any]], every: int = 2) -> str:
    """Mean training reward over the seeds at steps 1, 1 + every, ... and the last step."""
    lines = []
    for s in summaries:
        curve = s["score_curve"]
        steps = sorted({*range(0, len(curve), every), len(curve) - 1})
        lines.append(f"    {s['recipe']:<13} " + " ".join(f"{curve[i]:.2f}" for i in steps))
    return "\n".join(lines)


def git_state() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True)
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--episodes", type=int, default=640, help="episodes per run (16 per step)")
    parser.add_argument("--heldout-samples", type=int, default=2, help="samples per held-out prompt per eval")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # the new value head's load report, once per GAE run
    transformers.logging.disable_progress_bar()
    recipes = [BASELINE, *[r for r in args.recipes if r != BASELINE]]  # ratios need the baseline's runs
    start = time.perf_counter()
    results = run_all(recipes, args.seeds, args.episodes, args.heldout_samples)
    summaries = [summarise(recipe, results) for recipe in recipes]
    print(f"\n{args.episodes} episodes per run, seeds {args.seeds}, code {git_state()}, "
          f"{time.perf_counter() - start:.0f} s in all, load average {os.getloadavg()[0]:.1f}\n")
    print(table(summaries))
    print(f"\n{recipe_keys(recipes)}")
    print(f"\nTraining reward per step (mean over seeds), every 2nd step:\n{curves(summaries)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": results, "summaries": summaries}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    # the stage imports the reward and the verifier as bench.objectives: make that this module, so the
    # verifier's recordings land in the HELDOUT_SCORES this script reads
    sys.modules.setdefault(THIS, sys.modules[__name__])
    raise SystemExit(main())
