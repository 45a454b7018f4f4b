"""TRL 0.19's PPOTrainer on the tiny setup of ``bench/ppo.py`` (the baseline our PPO throughput is compared with).

Not part of the project: it runs in its own environment, since TRL 0.19 (the last release with the old
PPOTrainer) needs transformers 4.x and the project uses transformers 5::

    python3 -m venv /work/trl019
    /work/trl019/bin/pip install torch==2.13.0              # CPU build, as the project's venv has
    /work/trl019/bin/pip install "trl==0.19.*" "transformers==4.53.*"

It cannot import ``pipeline``, so it loads the tiny base folder the project writes to its cache
(``prepare_base``); print its path with::

    .venv/bin/python -c "from pipeline.config import load_config; from pipeline.models import prepare_base; \\
        print(prepare_base(load_config('configs/tiny.yaml').model))"

The reward model of ``bench/ppo.py``'s tiny setup (the RM stage, 40 steps from the base; ~8 s) can be
written with the project's venv and passed as ``--rm``::

    .venv/bin/python -c "from pipeline.config import load_config; from stages import run_stage; \
        cfg = load_config('configs/tiny.yaml', ['output_root=/tmp/trl-bench-rm', 'logging.progress_bar=false', \
        'rm.init_from=base', 'rm.train.max_steps=40', 'rm.train.num_threads=1']); run_stage('rm', cfg)"
    # -> /tmp/trl-bench-rm/tiny/rm/model

Usage::

    OMP_NUM_THREADS=1 /work/trl019/bin/python bench/trl_ppo.py BASE_DIR [--rm RM_DIR]          # TRL as shipped
    OMP_NUM_THREADS=1 /work/trl019/bin/python bench/trl_ppo.py BASE_DIR [--rm RM_DIR] --no-gc  # gc.collect() no-op

Setup, as close to ``bench/ppo.py --setup tiny`` as TRL allows: the same tiny random Llama and
tokenizer, the same prompts (``data/demo/prompts.jsonl`` through the chat template, last 64 tokens kept),
batch 16, 2 minibatches of 8, 4 PPO epochs, 24-token responses at temperature 1, lr 3e-4 (constant),
KL coef 0.05 (k1), missing-eos penalty 1, fp32, 1 thread, 20 steps, no evaluation, sample generations,
checkpoints or reporting. Reward model and critic: ``--rm DIR`` (a sequence classifier, e.g. the
project's RM stage output) or, by default, the base loaded as ``AutoModelForSequenceClassification``
with a fresh 1-label head (the scores do not change the work done per step). TRL ships with bf16 on by
default; it is turned off here (fp32, as the project runs on the CPU).

Timing: a callback stamps the wall and CPU clock at every ``on_step_end``; steady state is the time
between the first and the last step end (the first step, warm-up, excluded), the same rule as
``bench/ppo.py``. Each interval covers one whole PPO step, including the ``gc.collect()`` and
``empty_cache()`` calls TRL makes at its end. ``--no-gc`` replaces the ``gc`` module that
``trl.trainer.ppo_trainer`` sees with one whose ``collect`` does nothing (TRL calls it twice a step);
``empty_cache()`` (a CUDA call, a no-op on a CPU-only build) stays. Without ``--no-gc`` the calls
are counted and timed.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the tiny base folder (prepare_base's output)")
    parser.add_argument("--rm", default=None, help="reward model / critic folder (default: base + fresh head)")
    parser.add_argument("--no-gc", action="store_true", help="make trl's per-step gc.collect() calls no-ops")
    parser.add_argument("--steps", type=int, default=20, help="PPO steps (default 20, as bench/ppo.py)")
    parser.add_argument("--prompts", default=str(REPO / "data/demo/prompts.jsonl"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    import trl.trainer.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        PreTrainedTokenizerFast,
        TrainerCallback,
        set_seed,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import PPOConfig, PPOTrainer

    base = Path(args.base)
    # The project's tokenizer_config.json is transformers 5's ("TokenizersBackend"): build the fast
    # tokenizer from tokenizer.json and name the special tokens as that file does.
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(base / "tokenizer.json"), bos_token=tok_cfg["bos_token"],
        eos_token=tok_cfg["eos_token"], pad_token=tok_cfg["pad_token"], padding_side="left")
    tokenizer.chat_template = (base / "chat_template.jinja").read_text()

    set_seed(args.seed)
    policy = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    rm_dir = Path(args.rm) if args.rm else base
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, torch_dtype=torch.float32)
    set_seed(args.seed)  # the critic gets the same fresh head as the reward model when rm_dir is the base
    value_model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, torch_dtype=torch.float32)
    for m in (policy, ref_policy, reward_model, value_model):
        m.config.pad_token_id = tokenizer.pad_token_id
    assert policy.config.eos_token_id == tokenizer.eos_token_id, (policy.config.eos_token_id, tokenizer.eos_token_id)

    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    ids = []
    for p in prompts:
        messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][-64:])  # ppo.max_prompt_length 64
    train_dataset = Dataset.from_dict({"input_ids": ids})
    eval_dataset = Dataset.from_dict({"input_ids": ids[:16]})  # required by the constructor, never used

    batch = 16
    out_dir = tempfile.mkdtemp(prefix="bench-trl-ppo-")
    config = PPOConfig(
        output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_mini_batches=2, num_ppo_epochs=4, response_length=24, temperature=1.0,
        total_episodes=batch * args.steps, learning_rate=3e-4, lr_scheduler_type="constant",
        kl_coef=0.05, kl_estimator="k1", vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95,
        whiten_rewards=False, stop_token="eos", missing_eos_penalty=1.0,
        num_sample_generations=0, report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=1, disable_tqdm=True, bf16=False, fp16=False, use_cpu=True, seed=args.seed,
        dataloader_num_workers=0,
    )

    gc_stats = {"calls": 0, "seconds": 0.0}
    if args.no_gc:
        ppo_module.gc = types.SimpleNamespace(collect=lambda *a, **k: 0)
    else:
        real_collect = gc.collect

        def timed_collect(*a, **k):
            t0 = time.perf_counter()
            try:
                return real_collect(*a, **k)
            finally:
                gc_stats["calls"] += 1
                gc_stats["seconds"] += time.perf_counter() - t0

        ppo_module.gc = types.SimpleNamespace(collect=timed_collect)

    class Clock(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu, self.logs, self.gc_calls, self.gc_seconds = [], [], [], [], []

        def on_train_begin(self, *a, **k):
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.gc_calls.append(gc_stats["calls"])
            self.gc_seconds.append(gc_stats["seconds"])

        on_step_end = on_train_begin

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "objective/scores" in logs:
                self.logs.append(dict(logs))

    clock = Clock()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # keep stdout to the one JSON line
    trainer.remove_callback(ProgressCallback)
    start = time.perf_counter()
    trainer.train()
    total_wall = time.perf_counter() - start

    steps = len(clock.wall) - 1
    if steps < 2:
        raise SystemExit("need at least 2 steps for a steady-state figure")
    steady = steps - 1  # intervals between step ends 1..N: the first step is excluded
    wall = clock.wall[-1] - clock.wall[1]
    cpu = clock.cpu[-1] - clock.cpu[1]
    logs = clock.logs
    k = min(3, len(logs))
    result = {
        "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "gc": not args.no_gc, "threads": torch.get_num_threads(),
        "steps": steps, "steady_steps": steady, "episodes": batch * steps,
        "episodes_per_s": batch * steady / wall,
        "episodes_per_cpu_s": batch * steady / cpu,
        "s_per_step": wall / steady,
        "first_step_s": clock.wall[1] - clock.wall[0],
        "train_wall_s": total_wall,
        "gc_collect_calls_per_step": (clock.gc_calls[-1] - clock.gc_calls[1]) / steady,
        "gc_collect_s_per_step": (clock.gc_seconds[-1] - clock.gc_seconds[1]) / steady,
        "gc_objects_tracked": len(gc.get_objects()),
        "score_first": sum(r["objective/scores"] for r in logs[:k]) / k,
        "score_last": sum(r["objective/scores"] for r in logs[-k:]) / k,
        "kl_last": logs[-1]["objective/kl"],
        "eos_tokens_last": logs[-1]["val/num_eos_tokens"],
        "rm": str(rm_dir) if args.rm else "base + fresh head",
        "load_avg": os.getloadavg()[0],
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
